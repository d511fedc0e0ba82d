"""Benchmark: batch DICOM scoring end to end vs a naive loop, measured in the same run.

    python bench/score_dicom.py                 # 200 real-size DICOMs (RG1 copies with new UIDs)
    python bench/score_dicom.py --files 400 --workers 2 --threads 2

Measures, on the same files and machine:

* naive: pydicom read -> numpy -> resize -> torchvision densenet121 fp32, one image at a time;
* decode-only: the scorer's worker pool (read_dicom + THE deterministic transforms), no model;
* model-only: the Predictor on preprocessed 224x224 batches, no decoding;
* pipeline: ``medxray.scoring.score_directory`` (decode workers overlapped with batched
  inference, results.csv journal), wall time from call to return and the steady-state rate.

Prints images/s and the ratios the issue asks for (pipeline / naive >= 8, pipeline >= 0.8x the
slower of decode-only and model-only). The machine may be shared: the load average is printed
before and after; compare ratios rather than absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


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
    meta = {"architecture": "densenet121", "num_classes": 14, "in_chans": 3,
            "label_names": list(CHESTXRAY14_FINDINGS), "preprocessing": preprocessing_config(image_size),
            "thresholds": {n: 0.5 for n in CHESTXRAY14_FINDINGS}, "model_version": "bench"}
    return save_checkpoint(path, model.state_dict(), meta)


def naive_loop(paths: list[Path], image_size: int) -> float:
    """The obvious script: one file at a time, fp32 eager torchvision DenseNet-121."""
    import pydicom
    import torch
    import torch.nn.functional as F
    import torchvision

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
    return len(paths) / (time.perf_counter() - t)


def decode_only(paths: list[Path], image_size: int, workers: int) -> float:
    """The scorer's decode stage alone: same pool, same job, results fetched, no model."""
    from medxray.dicom import DEFAULT_ALLOWED_MODALITIES, DEFAULT_MAX_PIXELS
    from medxray.scoring.workers import decode_job, new_decode_pool, ping

    with new_decode_pool(workers, image_size) as pool:
        for f in [pool.submit(ping) for _ in range(workers * 2)]:
            f.result()  # workers started and warmed up: we time decoding, not interpreter start-up
        t = time.perf_counter()
        futs = [pool.submit(decode_job, str(p), image_size, DEFAULT_ALLOWED_MODALITIES, DEFAULT_MAX_PIXELS, False)
                for p in paths]
        n_ok = sum(f.result()["status"] == "ok" for f in futs)
        rate = len(paths) / (time.perf_counter() - t)
    assert n_ok == len(paths)
    return rate


def model_only(ckpt: Path, n: int, batch: int, threads: int | None, backend: str) -> tuple[float, str]:
    import torch

    from medxray.inference import Predictor

    p = Predictor.from_checkpoint(ckpt, device="auto", backend=backend, batch_size=batch, num_threads=threads)
    x = torch.randn(batch, 3, p.image_size, p.image_size)
    p.predict_tensor(x)  # warm-up (kernel selection)
    t = time.perf_counter()
    done = 0
    while done < n:
        p.predict_tensor(x)
        done += batch
    return done / (time.perf_counter() - t), f"{p.backend}/{p.precision}/{p.device}"


def pipeline(src: Path, ckpt: Path, out: Path, n: int, args: argparse.Namespace) -> tuple[float, float, str]:
    """score_directory end to end: (wall rate incl. start-up, steady rate, backend)."""
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
            time.sleep(0.05)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    t = time.perf_counter()
    s = score_directory(ScoreConfig(src, ckpt, out, workers=args.workers, batch_size=args.batch_size,
                                    cams=args.cams, backend=args.backend, threads=args.threads, progress=False))
    wall = time.perf_counter() - t
    stop.set()
    th.join()
    assert s.ok == n and s.error == 0, s.line()
    # Steady state: from the 10% mark to the last row (start-up and the tail excluded).
    lo = next((ts, k) for ts, k in samples if k >= max(1, n // 10))
    hi = next((ts, k) for ts, k in samples if k >= n) if samples[-1][1] >= n else samples[-1]
    steady = (hi[1] - lo[1]) / max(hi[0] - lo[0], 1e-9)
    first = next((ts for ts, k in samples if k >= 1), t) - t
    print(f"  (pipeline: {wall:.1f} s wall, first row after {first:.1f} s of start-up)")
    return n / wall, steady, s.backend


def main(argv: list[str] | None = None) -> int:
    from medxray.scoring import default_threads, default_workers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=200, help="number of real-size DICOM files (default 200)")
    ap.add_argument("--naive-files", type=int, default=None, help="files for the naive loop (default: all)")
    ap.add_argument("--source", default="RG1_UNCR.dcm", help="pydicom-data file to copy (default RG1_UNCR.dcm)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=None, help="decode processes (default: the scorer's)")
    ap.add_argument("--threads", type=int, default=None, help="inference threads (default: the scorer's)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--cams", default="none", help="scorer --cams for the pipeline run (default none)")
    ap.add_argument("--workdir", default=None, help="where to write the files (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    args.workers = args.workers or default_workers()
    args.threads = args.threads or default_threads(args.workers)

    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="medxray-bench-"))
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; files in {tmp}")
    try:
        paths = make_files(tmp / "in", args.files, args.source)
        mb = sum(p.stat().st_size for p in paths) / 2**20
        print(f"{len(paths)} x {args.source} copies with new UIDs ({mb:.0f} MiB), workers={args.workers} "
              f"threads={args.threads} batch={args.batch_size} cams={args.cams}")
        ckpt = make_checkpoint(tmp / "bench.pt", args.image_size)

        m_rate, backend = model_only(ckpt, max(64, args.files // 2), args.batch_size, args.threads, args.backend)
        print(f"model-only   {m_rate:8.1f} img/s  ({backend}, batch {args.batch_size})")
        d_rate = decode_only(paths, args.image_size, args.workers)
        print(f"decode-only  {d_rate:8.1f} img/s  ({args.workers} worker process(es))")
        wall, steady, pbackend = pipeline(tmp / "in", ckpt, tmp / "out", len(paths), args)
        print(f"pipeline     {wall:8.1f} img/s end to end incl. start-up; {steady:.1f} img/s steady ({pbackend})")
        naive_paths = paths[: args.naive_files] if args.naive_files else paths
        n_rate = naive_loop(naive_paths, args.image_size)
        print(f"naive loop   {n_rate:8.1f} img/s  (pydicom -> numpy -> resize -> torchvision densenet121 fp32, "
              f"1 at a time, {len(naive_paths)} files)")
        slower = min(d_rate, m_rate)
        print("ratios:")
        print(f"  pipeline / naive           {wall / n_rate:6.1f}x end to end, {steady / n_rate:.1f}x steady "
              "(target >= 8x)")
        print(f"  pipeline / min(dec, model) {wall / slower:6.2f}  end to end, {steady / slower:.2f} steady "
              "(target >= 0.8)")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
