"""Benchmark: the push path (storescu -> serve-dicom -> results in Orthanc) vs score-dicom on a folder.

    python bench/pacs_push.py                  # 100 RG1 copies, 224 px, as issue 13 asks
    python bench/pacs_push.py --files 4 --image-size 64    # smoke run

Same files, same machine, same run:

* folder: ``medxray.scoring.score_directory`` over the files (maps for the 3 most probable
  positive findings, as the node draws them for its 3 Secondary Captures: ``max_maps`` =
  ``sc_max_findings``; + SR), wall time from call to return;
* push: a real Orthanc (Debian ``orthanc``, loopback, temporary storage) and ``medxray
  serve-dicom`` as a separate process; wall time from the start of ``storescu`` (all files, one
  association) until Orthanc holds one SR per file. This includes the C-STORE transfer, the
  series-idle wait (``--idle-seconds``), the engine's start, SR + CAM Secondary Capture writing
  and the C-STORE back.

Prints images/s of both, the ratio push / folder, the load average before and after, and the
quiet-machine verdict (:mod:`quiet`: other processes' CPU sampled before each timed phase). Needs orthanc and dcmtk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the Orthanc launcher the tests use
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pacs_fixtures import OrthancServer, free_port, storescu  # noqa: E402
from quiet import sample, verdict  # noqa: E402
from score_dicom import make_checkpoint, make_files  # noqa: E402

SC_MAX_FINDINGS = 3  # medxray.pacs.config.NodeConfig.sc_max_findings: the node draws these maps only


def folder_run(src: Path, ckpt: Path, out: Path, args: argparse.Namespace) -> float:
    from medxray.scoring import ScoreConfig, score_directory

    t0 = time.perf_counter()
    score_directory(
        ScoreConfig(
            src,
            ckpt,
            out,
            cams="positive",
            max_maps=SC_MAX_FINDINGS,  # the node's default: the same maps on both paths
            sr=True,
            batch_size=args.batch_size,
            workers=args.workers,
            overlay_max_side=1024,
            progress=False,
        )
    )
    return time.perf_counter() - t0


def push_run(files: list[Path], ckpt: Path, root: Path, args: argparse.Namespace) -> float:
    node_port = free_port()
    orthanc = OrthancServer(root / "orthanc", node_port=node_port).start()
    cfg = {
        "ae_title": "MEDXRAY",
        "host": "127.0.0.1",
        "port": node_port,
        "allowed_calling_aes": ["STORESCU"],
        "destination": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port},
        "checkpoint": str(ckpt),
        "work_dir": str(root / "work"),
        "idle_seconds": args.idle_seconds,
        "scoring": {"batch_size": args.batch_size, **({"workers": args.workers} if args.workers else {})},
    }
    (root / "node.yaml").write_text(yaml.safe_dump(cfg))
    log = open(root / "node.log", "wb")
    node = subprocess.Popen(
        [sys.executable, "-m", "medxray.cli", "serve-dicom", "--config", str(root / "node.yaml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                socket.create_connection(("127.0.0.1", node_port), timeout=1).close()
                break
            except OSError:
                if node.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("serve-dicom did not start; see " + str(root / "node.log")) from None
                time.sleep(0.2)
        t0 = time.perf_counter()
        r = storescu(node_port, files, timeout=3600)
        if r.returncode != 0:
            raise SystemExit("storescu failed: " + r.stderr[-500:])
        while True:
            n_sr = sum(
                1 for t in orthanc.instances_tags() if t.get("Manufacturer") == "medxray" and t.get("Modality") == "SR"
            )
            if n_sr >= len(files):
                return time.perf_counter() - t0
            if node.poll() is not None:
                raise SystemExit("serve-dicom died; see " + str(root / "node.log"))
            time.sleep(0.5)
    finally:
        try:
            os.killpg(node.pid, signal.SIGTERM)
            node.wait(timeout=60)
            os.killpg(node.pid, signal.SIGKILL)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        log.close()
        orthanc.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--idle-seconds", type=float, default=2.0)
    args = ap.parse_args(argv)
    for tool in ("storescu",):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: install dcmtk and orthanc (make system-deps)")
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="medxray-pacs-bench-") as tmp:
        root = Path(tmp)
        files = make_files(root / "in", args.files, "RG1_UNCI.dcm")
        ckpt = make_checkpoint(root / "model.pt", args.image_size)
        samples = [sample("folder")]
        print(samples[-1].line(), flush=True)
        t_folder = folder_run(root / "in", ckpt, root / "folder_out", args)
        samples.append(sample("push"))
        print(samples[-1].line(), flush=True)
        t_push = push_run(files, ckpt, root / "push", args)
    n = args.files
    print(
        f"{n} RG1 copies, densenet121 at {args.image_size} px, maps for the {SC_MAX_FINDINGS} most probable positives"
        " + SR (+ their SCs on the push path)"
    )
    print(f"score-dicom folder : {t_folder:7.1f} s  {n / t_folder:6.2f} images/s")
    print(
        f"push (storescu -> serve-dicom -> SR in Orthanc): {t_push:7.1f} s  {n / t_push:6.2f} images/s "
        f"(includes {args.idle_seconds:.0f} s series-idle wait)"
    )
    print(f"ratio push / folder: {t_folder / t_push:.2f}")
    print(f"load average before {load0[0]:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    print(verdict(samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
