"""`make fuzz`: build seed corpora from pydicom's test files, run both harnesses, report.

    python tests/fuzz/run.py [--seconds 600] [--workdir /tmp/medxray-fuzz]

The time budget is split evenly between the DICOM reader, the image decoder and the DICOM node's
network path (tests/fuzz/network.py: malformed associations and PDUs sent to a running
``serve-dicom``; 0 crashes, RSS bounded, C-ECHO answered afterwards), run one after the other.
Seeds: pydicom's and pydicom-data's test files up to 64 KiB, a 64x64
crop of RG1 in several transfer syntaxes with LUTs and padding (DICOM); PNG/JPEG/TIFF/BMP
renderings of pydicom's images in 8/16-bit gray, RGB, RGBA and palette (image decoder).
Prints each harness's execution count and escapes; exits 1 when any input escaped (the inputs
are then in tests/data/fuzz-escapes/, replayed by the test suite).
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MAX_SEED = 64 * 1024


def dicom_seeds(folder: Path) -> int:
    import pydicom
    from pydicom.data import get_testdata_file, get_testdata_files
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for path in get_testdata_files():
        if not Path(path).is_file():
            continue
        data = Path(path).read_bytes()
        if len(data) <= MAX_SEED:
            (folder / f"pydicom_{n:03d}").write_bytes(data)
            n += 1
    base = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    arr = np.ascontiguousarray(base.pixel_array[900:964:1, 900:964])
    base.Rows, base.Columns = arr.shape
    base.PixelData = arr.tobytes()
    base.PatientName, base.PatientID = "Fuzz^Seed", "FUZZ0001"
    variants = {}
    plain = copy.deepcopy(base)
    variants["plain"] = plain
    pad = copy.deepcopy(base)
    pad.add_new(0x00280120, "US", 32767)
    pad.add_new(0x00280121, "US", 30000)
    variants["padding"] = pad
    voi = copy.deepcopy(base)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])
    item.add_new(0x00283006, "US", list(range(0, 65536, 16)))
    voi.VOILUTSequence = Sequence([item])
    variants["voilut"] = voi
    mlut = copy.deepcopy(base)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])
    item.add_new(0x00283006, "US", list(range(4096)))
    item.ModalityLUTType = "US"
    mlut.ModalityLUTSequence = Sequence([item])
    variants["mlut"] = mlut
    for syntax in (RLELossless, JPEG2000Lossless, JPEGLSLossless):
        ds = copy.deepcopy(base)
        try:
            ds.compress(syntax)
        except Exception as exc:  # an encoder missing here only loses a seed
            print(f"seed {syntax.name} skipped ({type(exc).__name__})")
            continue
        variants[syntax.name] = ds
    for name, ds in variants.items():
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        (folder / f"rg1_{re.sub(r'[^A-Za-z0-9]+', '_', name)}").write_bytes(buf.getvalue())
        n += 1
    return n


def image_seeds(folder: Path) -> int:
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for name in ("RG1_UNCR.dcm", "CT_small.dcm", "MR_small.dcm"):
        a = pydicom.dcmread(get_testdata_file(name)).pixel_array.astype(np.float64)
        a = a[:: max(1, a.shape[0] // 48), :: max(1, a.shape[1] // 48)][:48, :48]
        a8 = np.uint8(np.clip((a - a.min()) / max(np.ptp(a), 1) * 255, 0, 255))
        a16 = np.uint16(np.clip((a - a.min()) / max(np.ptp(a), 1) * 65535, 0, 65535))
        images = {
            "L.png": Image.fromarray(a8),
            "I16.png": Image.fromarray(a16),
            "RGB.png": Image.fromarray(np.stack([a8] * 3, -1)),
            "RGBA.png": Image.fromarray(np.stack([a8] * 4, -1)),
            "P.png": Image.fromarray(a8).convert("P"),
            "L.jpg": Image.fromarray(a8),
            "RGB.jpg": Image.fromarray(np.stack([a8, a8 // 2, a8], -1)),
            "L.tif": Image.fromarray(a16),
            "L.bmp": Image.fromarray(a8),
        }
        for suffix, img in images.items():
            buf = io.BytesIO()
            img.save(buf, format={"png": "PNG", "jpg": "JPEG", "tif": "TIFF", "bmp": "BMP"}[suffix.rsplit(".", 1)[1]])
            (folder / f"{name.split('.')[0]}_{suffix}").write_bytes(buf.getvalue())
            n += 1
    return n


def run_harness(target: str, seconds: int, workdir: Path) -> tuple[int, int]:
    corpus, seeds = workdir / f"{target}-corpus", workdir / f"{target}-seeds"
    corpus.mkdir(parents=True, exist_ok=True)
    n = (dicom_seeds if target == "dicom" else image_seeds)(seeds)
    log = workdir / f"{target}.log"
    cmd = [
        sys.executable,
        str(HERE / "harness.py"),
        target,
        f"-max_total_time={seconds}",
        "-timeout=20",
        "-rss_limit_mb=4096",
        f"-max_len={MAX_SEED}",
        f"-artifact_prefix={workdir}/{target}-",
        "-print_final_stats=1",
        str(corpus),
        str(seeds),
    ]
    print(f"== {target}: {n} seeds, {seconds} s, log {log}", flush=True)
    env = dict(os.environ, RUST_BACKTRACE="0", PYTHONWARNINGS="ignore")
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    text = log.read_text(errors="replace")
    runs = re.findall(r"Done (\d+) runs", text) or re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
    execs = int(runs[-1]) if runs else 0
    escapes = len(set(re.findall(r"^ESCAPE \S+ ([0-9a-f]{40})", text, re.M)))
    # libFuzzer stops at an input that runs out of memory or time, or crashes the process: keep it
    # as a regression test too (the harness already saved the exceptions that escaped).
    artifacts = (
        sorted(workdir.glob(f"{target}-oom-*"))
        + sorted(workdir.glob(f"{target}-timeout-*"))
        + sorted(workdir.glob(f"{target}-crash-*"))
    )
    for art in artifacts:
        dest = REPO / "tests" / "data" / "fuzz-escapes" / target / (art.name[len(target) + 1 :] + ".bin")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(art.read_bytes())
        print(f"   {target}: {art.name} kept as {dest.relative_to(REPO)}")
    crashed = rc != 0
    print(
        f"   {target}: {execs} executions in {time.time() - t0:.0f} s, {escapes} escapes, exit {rc}"
        + (" (libFuzzer stopped early: see the log and the artifact files)" if crashed else ""),
        flush=True,
    )
    return execs, escapes + (1 if crashed else 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=600, help="total time budget, split between the two harnesses")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "medxray-fuzz")
    ap.add_argument("--only", choices=("dicom", "image", "network"), help="run one harness with the whole budget")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    targets = [args.only] if args.only else ["dicom", "image", "network"]
    per = max(10, args.seconds // len(targets))
    total_execs = total_escapes = 0
    for target in targets:
        if target == "network":
            import network

            print(f"== network: {per} s against a running serve-dicom", flush=True)
            r = network.fuzz(per, args.workdir / "network")
            print(
                f"   network: {r['executions']} sessions, escapes {r['escapes']}, node RSS growth "
                f"{r['rss_growth_mb']:.1f} MiB, threads {r['threads'][0]} -> {r['threads'][1]}, pynetdicom Sta13 "
                f"races {r['upstream_races']}, C-ECHO after: {r['echo_after']}",
                flush=True,
            )
            total_execs += r["executions"]
            total_escapes += len(r["escapes"])
            continue
        execs, escapes = run_harness(target, per, args.workdir)
        total_execs += execs
        total_escapes += escapes
    print(f"fuzz: {total_execs} executions, {total_escapes} escapes")
    return 1 if total_escapes else 0


if __name__ == "__main__":
    sys.exit(main())
