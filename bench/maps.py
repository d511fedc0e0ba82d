"""Benchmark: ``score-dicom`` with the default maps vs ``--cams none`` on the same files (issue 21).

    python bench/maps.py                       # 60 RG1_UNCR copies, 224 px, 2 positive findings per image
    python bench/maps.py --files 8 --image-size 64    # smoke run
    python bench/maps.py --checkpoint C        # a trained checkpoint, with its own thresholds

Each run is ``score_directory`` end to end in its own fresh process (start-up, model load and
the OpenVINO conversion cache as a user meets them; the cache is warmed once first), on the
same copies of a real chest CR: ``--cams none`` and then the default (``--cams positive``, the
checkpoint's map method, overlays at the display size). Printed: images/s of both, their ratio
(target >= 0.3), the maps drawn per image beside it, seconds per map, the app's latency for one
finding's map (target <= 0.3 s), and the quiet-machine verdict of :mod:`quiet` (other processes'
CPU sampled before each timed phase).

Without ``--checkpoint`` the model is a random DenseNet-121 whose head is spread like a trained
model's (as the tests' checkpoints) and whose thresholds are set so that exactly
``--positives`` findings are positive on RG1: the maps per image are then a chosen number, not
an accident of random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from quiet import sample, verdict  # noqa: E402
from score_dicom import make_files  # noqa: E402


def make_checkpoint(path: Path, image_size: int, positives: int, rg1: Path) -> Path:
    """A random densenet121 with a spread head; thresholds put ``positives`` findings over on RG1."""
    import numpy as np
    import torch

    from medxray.checkpoint import save_checkpoint
    from medxray.data.transforms import preprocessing_config
    from medxray.dicom import read_dicom
    from medxray.inference import Predictor
    from medxray.labels import CHESTXRAY14_FINDINGS
    from medxray.models import create_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("densenet121", num_classes=len(CHESTXRAY14_FINDINGS))
        with torch.no_grad():
            model.classifier.weight.mul_(8.0)
            model.classifier.bias.uniform_(-2.0, 2.0)
    meta = {
        "architecture": "densenet121",
        "num_classes": len(CHESTXRAY14_FINDINGS),
        "in_chans": 3,
        "label_names": list(CHESTXRAY14_FINDINGS),
        "preprocessing": preprocessing_config(image_size),
        "thresholds": {n: 0.5 for n in CHESTXRAY14_FINDINGS},
        "model_version": "bench-maps",
    }
    save_checkpoint(path, model.state_dict(), meta)
    p = Predictor.from_checkpoint(path, device="cpu", backend="torch", precision="fp32")
    probs = p.predict([read_dicom(rg1, reduce_to=image_size).pixels])[0]
    order = np.sort(probs)[::-1]
    cut = float((order[positives - 1] + order[positives]) / 2)  # midway between the k-th and the next
    meta["thresholds"] = {n: cut for n in CHESTXRAY14_FINDINGS}
    return save_checkpoint(path, model.state_dict(), meta)


def child(src: str, ckpt: str, out: str, cams: str, batch: int) -> None:
    """One score_directory run in this fresh process; prints JSON."""
    import threading

    t_start = time.perf_counter()
    from medxray.scoring import ScoreConfig, score_directory

    res_path = Path(out) / "results.csv"
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                samples.append((time.perf_counter(), res_path.read_bytes().count(b"\n") - 1))
            except FileNotFoundError:
                pass
            time.sleep(0.02)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    s = score_directory(ScoreConfig(src, ckpt, out, batch_size=batch, cams=cams, progress=False))
    t_end = time.perf_counter()
    stop.set()
    th.join()
    n = s.ok
    samples.append((t_end, n))
    lo = next((ts, k) for ts, k in samples if k >= max(1, n // 10))
    steady = (n - lo[1]) / max(t_end - lo[0], 1e-9) if n > lo[1] else n / (t_end - t_start)
    first = next((ts for ts, k in samples if k >= 1), t_end) - t_start
    maps = sum(1 for _ in Path(out, "cams").rglob("*.png")) if cams != "none" else 0
    print(
        json.dumps(
            {
                "n": n,
                "errors": s.error,
                "wall": t_end - t_start,
                "rate": n / (t_end - t_start),
                "steady": steady,
                "first": first,
                "maps": maps,
                "backend": s.backend,
            }
        )
    )


def app_child(ckpt: str, rg1: str, reps: int) -> None:
    """The app's path for one finding's map, timed after the finding is chosen: the Predictor as
    the app loads it (backend auto), :func:`medxray.review.study.finding_map` on the study's
    pixels and the overlay the Study page draws (:func:`medxray.review.viewing.cam_view` at the
    display size). The first call (kernel warm-up) is reported apart; prints JSON."""
    from medxray.inference import Predictor
    from medxray.review.study import display_image, finding_map, load_study_file, predict_study
    from medxray.review.viewing import ViewState, cam_view

    p = Predictor.from_checkpoint(ckpt, device="auto", backend="auto")
    study = load_study_file(rg1)
    display = display_image(study, None)
    pred = predict_study(p, study.pixels)  # what the page has when a finding is chosen
    times = []
    for k in range(reps + 1):
        finding = p.label_names[k % len(p.label_names)]
        t0 = time.perf_counter()
        cam = finding_map(p, study.pixels, finding, pred.network_input)
        cam_view(display, cam, ViewState(), finding=finding)
        times.append(time.perf_counter() - t0)
    steady = sorted(times[1:])
    print(
        json.dumps(
            {
                "first": times[0],
                "median": steady[len(steady) // 2],
                "worst": steady[-1],
                "display": list(display.shape),
                "backend": f"{p.backend}/{p.map_precision}",
            }
        )
    )


def run_app_child(ckpt: Path, rg1: Path, reps: int) -> dict:
    r = subprocess.run(
        [sys.executable, str(HERE), "--app-child", str(ckpt), "--child-ckpt", str(rg1), "--reps", str(reps)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise SystemExit(f"app child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_child(src: Path, ckpt: Path, out: Path, cams: str, batch: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = subprocess.run(
        [
            sys.executable,
            str(HERE),
            "--child",
            str(src),
            "--child-ckpt",
            str(ckpt),
            "--child-out",
            str(out),
            "--cams",
            cams,
            "--batch-size",
            str(batch),
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise SystemExit(f"child run ({cams}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=60)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--positives", type=int, default=2, help="positive findings per image (bench model only)")
    ap.add_argument("--checkpoint", default=None, help="a trained checkpoint instead of the bench model")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--cams", default="positive", help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-ckpt", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--app-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=9, help="app phase: maps timed after the first")
    a = ap.parse_args(argv)
    if a.app_child:
        app_child(a.app_child, a.child_ckpt, a.reps)
        return 0
    if a.child:
        child(a.child, a.child_ckpt, a.child_out, a.cams, a.batch_size)
        return 0

    from pydicom.data import get_testdata_file

    tmp = Path(a.workdir or tempfile.mkdtemp(prefix="medxray-maps-bench-"))
    os.environ.setdefault("MEDXRAY_CACHE_DIR", str(tmp / "cache"))
    try:
        rg1 = Path(get_testdata_file("RG1_UNCR.dcm"))
        ckpt = Path(a.checkpoint) if a.checkpoint else make_checkpoint(tmp / "bench.pt", a.image_size, a.positives, rg1)
        src = tmp / "in"
        make_files(src, a.files, "RG1_UNCR.dcm")
        warm = tmp / "warm_in"
        make_files(warm, 2, "RG1_UNCR.dcm")
        run_child(warm, ckpt, tmp / "warm_out", "positive", a.batch_size)  # OpenVINO conversion cached once
        samples, res = [], {}
        for cams in ("none", "positive"):
            samples.append(sample(f"cams {cams}"))
            print(samples[-1].line(), flush=True)
            res[cams] = run_child(src, ckpt, tmp / f"out_{cams}", cams, a.batch_size)
            r = res[cams]
            print(
                f"--cams {cams:8}: {r['rate']:.2f} img/s end to end ({r['n']} files, {r['wall']:.1f} s, first row "
                f"after {r['first']:.2f} s), {r['steady']:.2f} img/s steady, {r['maps']} maps "
                f"({r['maps'] / max(r['n'], 1):.2f} per image), {r['backend']}",
                flush=True,
            )
        none, pos = res["none"], res["positive"]
        per_map = (pos["wall"] - none["wall"]) / max(pos["maps"], 1)
        print(
            f"default maps / --cams none: {pos['rate'] / none['rate']:.2f} end to end, "
            f"{pos['steady'] / none['steady']:.2f} steady (target >= 0.3), with "
            f"{pos['maps'] / max(pos['n'], 1):.2f} maps per image; {per_map:.3f} s per map "
            f"(extra wall time / maps), {a.image_size} px"
        )
        samples.append(sample("app map"))
        print(samples[-1].line(), flush=True)
        app = run_app_child(ckpt, rg1, a.reps)
        print(
            f"app: a finding's map after it is chosen (finding_map + overlay at {app['display'][1]}x"
            f"{app['display'][0]} display, {app['backend']} maps): median {app['median']:.3f} s, worst "
            f"{app['worst']:.3f} s over {a.reps} (target <= 0.3 s); first call {app['first']:.3f} s"
        )
        print(verdict(samples))
    finally:
        if not a.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
