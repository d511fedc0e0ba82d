"""Benchmark: batch DICOM scoring vs a naive loop, every number measured in this run (issue 14).

    python bench/score_dicom.py                          # 200 files each of RG1_UNCR and RG1_J2KR copies
    python bench/score_dicom.py --files 4 --naive-files 2   # smoke run

Measured, on the same files and machine, and printed with the load average at both ends:

* naive peer: pydicom -> numpy -> bilinear resize -> torchvision densenet121 fp32, one file at a
  time, in its own fresh process, with its best thread count (1 and 2 tried, best kept), run
  BEFORE and AFTER ours; the ratio uses the faster of the two runs (the peer's best);
* pipeline: ``score_directory`` (cams none) end to end from the call (start-up included), the
  first row's latency, and the steady rate (10% mark to the last row);
* decode-only, core-seconds per image (process CPU time, one process): reduced decode
  (``read_dicom(reduce_to=S)``, numpy input) and the full decode + MONAI list;
* model-only at the same thread count: int8 (OpenVINO + NNCF, when a quantised model passes
  the gate), OpenVINO bf16/fp32, torch fp32; and model core-seconds per image at 1 thread;
* the machine's limit: cores / (decode core-s + model core-s per image) and steady / limit.

Quiet-machine rule (:mod:`quiet`): before each timed phase the bench samples ``/proc/loadavg``
and the CPU time that processes outside its own process tree used over 2 s; the ratios are
marked UNRELIABLE when other processes were busy (> 0.1 of the cores) before any phase. The
load average is printed, not judged: it counts the bench's own previous phase. The README's
numbers come only from runs without that mark.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from quiet import Sample, sample, verdict  # noqa: E402


def make_files(dst: Path, n: int, source: str) -> list[Path]:
    """Copies of a real chest CR with fresh Study/Series/SOP Instance UIDs."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(get_testdata_file(source))
    dst.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if i % 20 == 0:
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        p = dst / f"sub{i % 7}" / f"img_{i:04d}.dcm"
        p.parent.mkdir(exist_ok=True)
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def make_checkpoint(path: Path, image_size: int) -> Path:
    import torch

    from medxray.checkpoint import save_checkpoint
    from medxray.data.transforms import preprocessing_config
    from medxray.labels import CHESTXRAY14_FINDINGS
    from medxray.models import create_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("densenet121", num_classes=14)
    meta = {
        "architecture": "densenet121",
        "num_classes": 14,
        "in_chans": 3,
        "label_names": list(CHESTXRAY14_FINDINGS),
        "preprocessing": preprocessing_config(image_size),
        "thresholds": {n: 0.5 for n in CHESTXRAY14_FINDINGS},
        "model_version": "bench",
    }
    return save_checkpoint(path, model.state_dict(), meta)


# --------------------------------------------------------------------------------------------
# the naive peer (runs in its own fresh process: `--naive-child`)
# --------------------------------------------------------------------------------------------


def naive_child(folder: str, n: int, image_size: int, threads: int) -> None:
    """The obvious script: one file at a time, fp32 eager torchvision DenseNet-121. Prints JSON."""
    import pydicom
    import torch
    import torch.nn.functional as F
    import torchvision

    torch.set_num_threads(threads)
    paths = sorted(Path(folder).rglob("*.dcm"))[:n]
    model = torchvision.models.densenet121(weights=None, num_classes=14).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def one(p: Path) -> np.ndarray:
        ds = pydicom.dcmread(p)
        arr = ds.pixel_array.astype(np.float32)
        arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1.0)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            arr = 1.0 - arr
        x = F.interpolate(torch.from_numpy(arr)[None, None], size=(image_size, image_size), mode="bilinear")
        x = (x.repeat(1, 3, 1, 1) - mean) / std
        with torch.no_grad():
            return torch.sigmoid(model(x)).numpy()

    one(paths[0])  # warm-up
    t = time.perf_counter()
    for p in paths:
        one(p)
    print(json.dumps({"rate": len(paths) / (time.perf_counter() - t), "threads": threads, "n": len(paths)}))


def naive_best(folder: Path, n: int, image_size: int) -> tuple[float, int]:
    """The peer's best (rate, threads) over 1 and 2 threads, each in a fresh process."""
    best = (0.0, 0)
    for threads in sorted({1, min(2, os.cpu_count() or 1)}):
        out = subprocess.run(
            [
                sys.executable,
                str(HERE),
                "--naive-child",
                str(folder),
                "--naive-files",
                str(n),
                "--image-size",
                str(image_size),
                "--threads",
                str(threads),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rate = json.loads(out.stdout.strip().splitlines()[-1])["rate"]
        best = max(best, (rate, threads))
    return best


# --------------------------------------------------------------------------------------------
# our stages
# --------------------------------------------------------------------------------------------


def decode_core_seconds(paths: list[Path], image_size: int, reduced: bool) -> float:
    """Process CPU seconds per image of one decode (no pool): reduced + numpy input, or full + MONAI list."""
    from medxray.dicom import read_dicom
    from medxray.inference import preprocess
    from medxray.modelinput import model_input

    def one(p: Path) -> np.ndarray:
        if reduced:
            return model_input(read_dicom(p, keep_raw=False, reduce_to=image_size).pixels, image_size)
        return preprocess(read_dicom(p, keep_raw=False).pixels, image_size).numpy()

    one(paths[0])
    t = time.process_time()
    for p in paths:
        one(p)
    return (time.process_time() - t) / len(paths)


def model_rate(ckpt: Path, n: int, batch: int, threads: int, backend: str, precision: str) -> tuple[float, str]:
    """Images/s of the Predictor on preprocessed batches at ``threads`` threads (torch's pool set too)."""
    import torch

    from medxray.inference import Predictor

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        p = Predictor.from_checkpoint(
            ckpt, device="cpu", backend=backend, precision=precision, batch_size=batch, num_threads=threads
        )
        x = torch.randn(batch, 3, p.image_size, p.image_size)
        p.predict_tensor(x)  # warm-up (kernel selection)
        t = time.perf_counter()
        done = 0
        while done < n:
            p.predict_tensor(x)
            done += batch
        return done / (time.perf_counter() - t), f"{p.backend}/{p.precision}"
    finally:
        torch.set_num_threads(before)


def pipeline(src: Path, ckpt: Path, out: Path, n: int, batch: int) -> tuple[float, float, float, str]:
    """score_directory end to end: (wall rate incl. start-up, steady rate, first-row seconds, backend)."""
    from medxray.scoring import ScoreConfig, score_directory

    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def watch() -> None:
        res = out / "results.csv"
        while not stop.is_set():
            try:
                samples.append((time.perf_counter(), res.read_bytes().count(b"\n") - 1))
            except FileNotFoundError:
                pass
            time.sleep(0.02)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    t = time.perf_counter()
    s = score_directory(ScoreConfig(src, ckpt, out, batch_size=batch, cams="none", progress=False))
    wall = time.perf_counter() - t
    stop.set()
    th.join()
    assert s.ok == n and s.error == 0, s.line()
    samples.append((t + wall, n))
    lo = next((ts, k) for ts, k in samples if k >= max(1, n // 10))
    hi = next((ts, k) for ts, k in samples if k >= n)
    steady = (hi[1] - lo[1]) / max(hi[0] - lo[0], 1e-9) if hi[1] > lo[1] else n / wall
    first = next((ts for ts, k in samples if k >= 1), t + wall) - t
    return n / wall, steady, first, s.backend


def int8_rate(ckpt: Path, n: int, batch: int, threads: int) -> tuple[float | None, str]:
    """Images/s of the NNCF int8 graph of this checkpoint (:func:`medxray.quantize.quantize_model`),
    compiled and run as the Predictor runs a gated int8 model (:func:`compile_config`: ``threads``
    single-threaded streams, f32 for the layers left in float; the batch split over the streams by
    :func:`run_on_streams`). Speed only: the bench model has random weights, so the accuracy gate
    (medxray.quantize, a test's business) is not what is measured here."""
    try:
        import nncf  # noqa: F401  (checked here, used through medxray.quantize)
        import openvino as ov  # noqa: F401
    except ImportError as exc:
        return None, f"nncf/openvino missing ({exc})"
    from medxray.backends.openvino import compile_config, run_on_streams
    from medxray.hardware import openvino_core
    from medxray.inference import Predictor
    from medxray.quantize import quantize_model

    ref = Predictor.from_checkpoint(ckpt, device="cpu", backend="openvino", precision="fp32", batch_size=batch)
    s = ref.image_size
    calib = np.random.default_rng(0).standard_normal((32, 3, s, s)).astype(np.float32)
    config, streams = compile_config("int8", threads)
    compiled = openvino_core().compile_model(quantize_model(ref.openvino_fp32_model(), calib), "CPU", config)
    reqs = [compiled.create_infer_request() for _ in range(streams)]
    x = np.random.default_rng(1).standard_normal((batch, 3, s, s)).astype(np.float32)
    run_on_streams(reqs, x)
    t = time.perf_counter()
    done = 0
    while done < n:
        run_on_streams(reqs, x)
        done += batch
    return done / (time.perf_counter() - t), f"openvino/int8 (NNCF MINMAX, {streams} streams, speed only)"


# --------------------------------------------------------------------------------------------


def load_per_core() -> float:
    return os.getloadavg()[0] / (os.cpu_count() or 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=200, help="DICOM copies per source (default 200)")
    ap.add_argument("--naive-files", type=int, default=None, help="files the naive peer scores (default: all)")
    ap.add_argument("--sources", default="RG1_UNCR.dcm,RG1_J2KR.dcm", help="pydicom-data files to copy")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="model-only thread count (default: all cores)")
    ap.add_argument("--workdir", default=None, help="where to write the files (default: a temp dir, removed)")
    ap.add_argument("--naive-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.naive_child:
        naive_child(args.naive_child, args.naive_files or 10**9, args.image_size, args.threads or 1)
        return 0

    cores = os.cpu_count() or 1
    threads = args.threads or cores
    load0 = load_per_core()
    quiet: list[Sample] = []

    def before(phase: str) -> None:
        quiet.append(sample(phase))
        print(quiet[-1].line(), flush=True)

    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="medxray-bench-"))
    print(f"load average before: {os.getloadavg()[0]:.2f} on {cores} CPUs ({load0:.2f}/core); files in {tmp}")
    lines: list[str] = []
    try:
        ckpt = make_checkpoint(tmp / "bench.pt", args.image_size)
        n_model = max(2 * args.batch_size, args.files // 2)
        before("model-only")
        # model-only: same thread count for all three, then 1 thread for the core-seconds
        r_ov, ov_name = model_rate(ckpt, n_model, args.batch_size, threads, "openvino", "auto")
        r_fp32, _ = model_rate(ckpt, n_model, args.batch_size, threads, "torch", "fp32")
        r_i8, i8_name = int8_rate(ckpt, n_model, args.batch_size, threads)
        r_ov1, _ = model_rate(ckpt, n_model, args.batch_size, 1, "openvino", "auto")
        model_cs = 1.0 / r_ov1
        print(
            f"model-only @{threads} threads: {ov_name} {r_ov:.1f} img/s, torch fp32 {r_fp32:.1f} img/s, "
            f"int8 {f'{r_i8:.1f} img/s' if r_i8 else 'n/a'} ({i8_name}); @1 thread {ov_name} {r_ov1:.1f} img/s "
            f"= {model_cs * 1e3:.1f} core-ms/img"
        )
        if r_i8:
            lines.append(
                f"model-only int8 / {ov_name}: {r_i8 / r_ov:.2f}x (target >= 1.8x); "
                f"int8 / torch fp32: {r_i8 / r_fp32:.2f}x"
            )
        for source in [s.strip() for s in args.sources.split(",") if s.strip()]:
            tag = source.removesuffix(".dcm")
            folder = tmp / tag
            paths = make_files(folder / "in", args.files, source)
            n_naive = min(args.naive_files or len(paths), len(paths))
            before(f"{tag} naive before")
            nb_rate, nb_threads = naive_best(folder / "in", n_naive, args.image_size)
            before(f"{tag} decode-only")
            sub = paths[: max(2, min(len(paths), 20))]
            d_red = decode_core_seconds(sub, args.image_size, reduced=True)
            d_full = decode_core_seconds(sub[: max(2, min(len(sub), 5))], args.image_size, reduced=False)
            before(f"{tag} pipeline")
            wall, steady, first, backend = pipeline(folder / "in", ckpt, folder / "out", len(paths), args.batch_size)
            before(f"{tag} naive after")
            na_rate, na_threads = naive_best(folder / "in", n_naive, args.image_size)
            limit = cores / (d_red + model_cs)
            naive = max(nb_rate, na_rate)
            print(
                f"[{tag}] naive peer before {nb_rate:.2f} img/s ({nb_threads} thr), after {na_rate:.2f} img/s "
                f"({na_threads} thr), {n_naive} files"
            )
            print(f"[{tag}] decode core-ms/img: reduced {d_red * 1e3:.1f}, full {d_full * 1e3:.1f}")
            print(
                f"[{tag}] pipeline {wall:.1f} img/s end to end ({len(paths)} files, first row after {first:.2f} s), "
                f"{steady:.1f} img/s steady ({backend})"
            )
            print(
                f"[{tag}] machine limit = {cores} cores / ({d_red * 1e3:.1f} + {model_cs * 1e3:.1f}) core-ms "
                f"= {limit:.1f} img/s"
            )
            lines.append(
                f"[{tag}] end to end / naive (best of before/after): {wall / naive:.1f}x "
                f"(target >= {'15' if 'J2K' in tag else '6'}x); steady / naive {steady / naive:.1f}x"
            )
            lines.append(f"[{tag}] decode-only reduced / full: {d_full / d_red:.1f}x (target >= 4x for J2K)")
            lines.append(f"[{tag}] pipeline steady / machine limit: {steady / limit:.2f} (target >= 0.85)")
            lines.append(
                f"[{tag}] first result after {first:.2f} s (target < 1 s: model load, worker start-up; imports done)"
            )
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    load1 = load_per_core()
    busy = any(q.busy for q in quiet)
    print(f"load average after: {os.getloadavg()[0]:.2f} ({load1:.2f}/core; the bench's own work)")
    print(f"ratios ({verdict(quiet)}" + ("; rerun on a quiet machine" if busy else "") + "):")
    for line in lines:
        print(("  UNRELIABLE " if busy else "  ") + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
