"""`medxray demo`: the whole product end to end on synthetic phantom images, on a CPU.

1. synthesise a phantom ChestX-ray14 data root (real manifest rows, drawn images: SYNTHETIC);
2. build the preprocessing cache, so epochs read small arrays instead of decoding 1024 px PNGs;
3. fine-tune DenseNet-121 (random init: ImageNet weights cannot be downloaded here, and the
   demo says so) with the same ``finetune`` users run;
4. evaluate on the phantom test split (AUROC with CIs, thresholds, calibration, localisation,
   report);
5. render CAM overlays for a few test images with ground-truth boxes;
6. score a real chest radiograph (RG1 from pydicom-data) with the new checkpoint through the
   batch DICOM scorer;
7. say where everything is and how to open the viewer.

Library code does not print: progress goes through ``echo`` (the CLI passes ``print``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from medxray.errors import ConfigError, MedxrayError
from medxray.fileio import atomic_write_text

log = logging.getLogger(__name__)

RG1_FILE = "RG1_UNCI.dcm"
SYNTHETIC_NOTE = (
    "The training and test images are SYNTHETIC phantoms (drawn patterns on real ChestX-ray14 "
    "manifest rows), not radiographs: the AUROC shows the pipeline learns, not clinical performance."
)


@dataclass
class DemoOptions:
    """Sizes of the demo; ``preset("default")`` fits 15 minutes on a 2-core CPU with margin."""

    out: str = "demo_out"
    images: int = 1000  # phantom images (train_val + test)
    phantom_size: int = 1024  # side of the phantom PNGs (NIH's size)
    image_size: int = 128  # network input
    epochs: int = 8  # AUROC needs 3; the maps need 8 to point at the findings (pointing game >= 0.80)
    batch_size: int = 16
    lr: float = 1e-3
    model: str = "densenet121"
    val_fraction: float = 0.15
    augment: bool = False  # the phantoms need no augmentation, and it costs more CPU than the network here
    seed: int = 0
    device: str = "auto"
    bootstrap: int = 500
    cam_images: int = 4
    target_auroc: float = 0.9
    # issue 9: the default map method must point at the phantom findings (Zhang et al.'s pointing game)
    # and its thresholded region must overlap the box (IoBB > 0.25, Wang et al. 2017)
    target_pointing: float = 0.80
    target_iobb25: float = 0.60
    quick: bool = False
    score_rg1: bool = True

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "DemoOptions":
        if name == "default":
            opts = cls()
        elif name == "quick":
            # The whole path in about a minute: tiny phantom, tiny input, one epoch. Its AUROC is
            # not expected to reach the target.
            opts = cls(
                images=120,
                phantom_size=256,
                image_size=64,
                epochs=1,
                bootstrap=50,
                cam_images=2,
                val_fraction=0.2,
                quick=True,
            )
        else:
            raise ConfigError(f"unknown demo preset {name!r}; use 'default' or 'quick'")
        for k, v in overrides.items():
            if not hasattr(opts, k):
                raise ConfigError(f"unknown demo option {k!r}")
            setattr(opts, k, v)
        return opts


@dataclass
class DemoResult:
    ok: bool
    mean_auroc: float
    target_auroc: float
    out: Path
    data_root: Path
    run_dir: Path
    checkpoint: Path
    report_html: Path
    report_md: Path
    cam_files: list[Path] = field(default_factory=list)
    scoring_dir: Path | None = None
    rg1: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    localisation: dict[str, Any] | None = None


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the wall-clock seconds of the block as ``timings[key]`` (not on an error)."""
    t = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t


def run_demo(opts: DemoOptions | None = None, echo: Callable[[str], None] | None = None) -> DemoResult:
    """Run every step and return where the results are; ``echo`` receives the human-readable story."""
    from medxray.evaluation.run import evaluate

    opts = opts or DemoOptions()
    say = echo or log.info
    out = Path(opts.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    _check_scoring_available(opts)
    _say_intro(opts, say)
    data_root = _phantom_data(opts, out, say, timings)
    res = _train(opts, data_root, out, say, timings)

    with _timed(timings, "evaluate"):
        say("[4/6] evaluating on the phantom test split (bootstrap CIs, thresholds, calibration, CAM localisation) ...")
        ev = evaluate(
            res.best_checkpoint,
            data_root=data_root,
            split="test",
            out_dir=out / "evaluation",
            n_bootstrap=opts.bootstrap,
            device=opts.device,
            batch_size=32,
            write_back=True,  # the scorer and the app below read the thresholds and map figures from it
        )
    with _timed(timings, "cams"):
        say(f"[5/6] CAM overlays for {opts.cam_images} test images with ground-truth boxes ...")
        cams = render_cam_examples(
            res.best_checkpoint, data_root, out / "cam_examples", n=opts.cam_images, device=opts.device
        )
    scoring_dir, rg1 = _score_rg1_step(opts, res.best_checkpoint, out, say, timings)
    timings["total"] = time.perf_counter() - t_all
    result = DemoResult(
        ok=opts.quick or _targets_reached(ev, opts),
        mean_auroc=ev.mean_auroc,
        target_auroc=opts.target_auroc,
        out=out,
        data_root=data_root,
        run_dir=res.run_dir,
        checkpoint=res.best_checkpoint,
        report_html=ev.report_html,
        report_md=ev.report_md,
        cam_files=cams,
        scoring_dir=scoring_dir,
        rg1=rg1,
        timings=timings,
        localisation=ev.localisation,
    )
    _write_summary(result, opts)
    _tell(result, opts, ev, say)
    return result


def _score_rg1_step(
    opts: DemoOptions, checkpoint: Path, out: Path, say: Callable[[str], None], timings: dict[str, float]
) -> tuple[Path | None, dict[str, Any]]:
    """Step 6 (with ``opts.score_rg1``): score pydicom-data's RG1_UNCI.dcm into ``out/scoring``;
    returns (that folder, :func:`score_rg1`'s summary), or (None, {}) when skipped."""
    if not opts.score_rg1:
        return None, {}
    with _timed(timings, "score_rg1"):
        say("[6/6] scoring a real chest radiograph (RG1_UNCI.dcm from pydicom-data) with the new checkpoint ...")
        scoring_dir = out / "scoring"
        return scoring_dir, score_rg1(checkpoint, out / "dicom_input", scoring_dir, device=opts.device)


def _targets_reached(ev: Any, opts: DemoOptions) -> bool:
    """Whether the full demo met its targets: a finite mean AUROC of at least ``opts.target_auroc``
    and the localisation targets (:func:`localisation_reached`)."""
    return (
        math.isfinite(ev.mean_auroc)
        and ev.mean_auroc >= opts.target_auroc
        and localisation_reached(ev.localisation, opts)
    )


def _say_intro(opts: DemoOptions, say: Callable[[str], None]) -> None:
    """The story's opening: what the demo is, that its data are synthetic and its weights random."""
    say("medxray demo" + (" (quick smoke version)" if opts.quick else ""))
    say(f"NOTE: {SYNTHETIC_NOTE}")
    say(
        "NOTE: the network starts from random weights (--pretrained none): ImageNet weights cannot be "
        "downloaded on this machine. With the weights in the torch hub cache, `medxray finetune` uses them "
        "by default."
    )


def _phantom_data(opts: DemoOptions, out: Path, say: Callable[[str], None], timings: dict[str, float]) -> Path:
    """Steps 1-2: synthesise the phantom set under ``out/phantom_data`` (NIH layout) and build its
    preprocessing cache; returns the data root."""
    from medxray.data.prepare import prepare_cache
    from medxray.data.synthetic import synthesize

    with _timed(timings, "synthesise"):
        say(f"[1/6] synthesising {opts.images} phantom images ({opts.phantom_size} px PNG, NIH layout) ...")
        data_root = synthesize(
            out / "phantom_data", n_images=opts.images, seed=opts.seed, image_size=opts.phantom_size, overwrite=True
        )  # the demo's own folder: a re-run with other options replaces it
    with _timed(timings, "cache"):
        say(f"[2/6] preprocessing cache at {opts.image_size} px ...")
        prepare_cache("chestxray14", data_root, size=opts.image_size, progress=False)
    return data_root


def _train(opts: DemoOptions, data_root: Path, out: Path, say: Callable[[str], None], timings: dict[str, float]) -> Any:
    """Step 3: fine-tune from random weights on the phantom train split (cosine schedule, no early
    stopping); returns :func:`medxray.training.loop.finetune`'s result."""
    from medxray.models import NO_PRETRAINED
    from medxray.training.config import make_config
    from medxray.training.loop import finetune

    with _timed(timings, "finetune"):
        cfg = make_config(
            dataset="chestxray14",
            data_root=str(data_root),
            model=opts.model,
            pretrained=NO_PRETRAINED,
            image_size=opts.image_size,
            epochs=opts.epochs,
            batch_size=opts.batch_size,
            lr=opts.lr,
            val_fraction=opts.val_fraction,
            seed=opts.seed,
            device=opts.device,
            early_stopping_patience=0,
            augment=opts.augment,
            scheduler="cosine",
            progress=True,
        )
        cfg = _run_config(cfg, out)
        say(
            f"[3/6] fine-tuning {opts.model} for {opts.epochs} epochs at {opts.image_size} px on the phantom "
            f"train split -> {cfg.out or cfg.resume}"
        )
        res = finetune(cfg)
    say(
        f"      best epoch {res.best_epoch}: validation mean AUROC {res.best_val_auroc:.3f} "
        f"({timings['finetune'] / 60:.1f} min)"
    )
    return res


def localisation_reached(loc: dict[str, Any] | None, opts: DemoOptions) -> bool:
    """Whether the phantom localisation met the demo's targets (pointing game, IoBB>0.25 accuracy)."""
    o = (loc or {}).get("overall") or {}
    if not o.get("n"):
        return False
    return o["pointing_game"] >= opts.target_pointing and o["iobb_accuracy"]["0.25"] >= opts.target_iobb25


def _check_scoring_available(opts: DemoOptions) -> None:
    """Fail at the start, not after training, if the RG1 step cannot run."""
    if not opts.score_rg1:
        return
    if _rg1_path() is None:
        raise ConfigError(
            "the demo scores the real radiograph RG1_UNCI.dcm from the pydicom-data package, which is "
            "not installed: pip install pydicom-data (it is in medxray's dev extra)"
        )


def _rg1_path() -> Path | None:
    try:
        from pydicom.data import get_testdata_file

        p = get_testdata_file(RG1_FILE)
    except Exception:  # pydicom-data missing or its index unreadable
        return None
    return Path(p) if p else None


def _run_config(cfg: Any, out: Path) -> Any:
    """Resume ``out/run`` when it holds this same configuration (a re-run finishes or reuses it);
    otherwise train into the first free ``out/run``, ``out/run-2``, ..."""
    import dataclasses

    from medxray.training.config import load_config_file

    k = 1
    while True:
        run = out / ("run" if k == 1 else f"run-{k}")
        if not (run / "last.pt").is_file():
            return dataclasses.replace(cfg, out=str(run))
        try:
            stored = load_config_file(run / "config.yaml")
        except MedxrayError:
            stored = {}
        mine = cfg.to_dict()
        same = all(stored.get(key) == mine[key] for key in mine if key not in ("out", "resume", "progress"))
        if same:
            return dataclasses.replace(cfg, resume=str(run), out=None)
        k += 1


def render_cam_examples(
    checkpoint: Path, data_root: Path, out_dir: Path, *, n: int = 4, device: str = "auto", max_side: int = 512
) -> list[Path]:
    """CAM overlays (with the ground-truth box drawn) for up to ``n`` phantom test images that have boxes."""
    from PIL import Image, ImageDraw

    from medxray.cam import overlay_with_legend, save_png, upsample_cam
    from medxray.data import build_datasets, read_image
    from medxray.inference import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, device=device, backend="torch")
    splits = build_datasets("chestxray14", data_root, image_size=predictor.image_size, augment=False)
    test = splits.test
    names = [nm for nm in test.names if nm in splits.boxes]
    # one image per finding first, so the examples show different patterns
    chosen, seen = [], set()
    for nm in names:
        f = splits.boxes[nm][0]["finding"]
        if f not in seen:
            chosen.append(nm)
            seen.add(f)
        if len(chosen) >= n:
            break
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    path_of = dict(zip(test.names, test.records.paths))
    for nm in chosen:
        pixels, (h, w) = read_image(path_of[nm])
        img01 = pixels.astype(np.float32) / float(np.iinfo(pixels.dtype).max)
        box = splits.boxes[nm][0]
        c = predictor.label_names.index(box["finding"])
        probs, cams = predictor.predict_with_cams([img01], classes=[c])
        scale = min(1.0, max_side / max(h, w))
        H, W = int(round(h * scale)), int(round(w * scale))
        small = (
            np.asarray(Image.fromarray((img01 * 255).astype(np.uint8)).resize((W, H), Image.BILINEAR), dtype=np.float32)
            / 255.0
        )
        cam = upsample_cam(cams[0, 0], (H, W))
        title = f"{box['finding']} p={probs[0, c]:.2f} {predictor.cam_method} (SYNTHETIC phantom)"
        rgb = overlay_with_legend(
            small,
            cam,
            title=title,
            finding=box["finding"],
            mark_peak=True,
            footer="green: ground-truth box; white cross: map peak; not for clinical use",
        )
        canvas = Image.fromarray(rgb)
        draw = ImageDraw.Draw(canvas)
        x0, y0 = box["x"] * scale, box["y"] * scale
        draw.rectangle([x0, y0, x0 + box["w"] * scale, y0 + box["h"] * scale], outline=(0, 255, 0), width=2)
        files.append(save_png(out_dir / f"{Path(nm).stem}_{box['finding']}.png", np.asarray(canvas)))
    return files


def score_rg1(checkpoint: Path, input_dir: Path, out_dir: Path, *, device: str = "auto") -> dict[str, Any]:
    """Score RG1_UNCI.dcm with the batch DICOM scorer; return its row (status, top findings)."""
    from medxray.scoring import ScoreConfig, score_directory

    src = _rg1_path()
    if src is None:
        raise ConfigError("RG1_UNCI.dcm (pydicom-data) is not installed: pip install pydicom-data")
    input_dir.mkdir(parents=True, exist_ok=True)
    dst = input_dir / RG1_FILE
    if not dst.is_file():
        shutil.copyfile(src, dst)
    summary = score_directory(
        ScoreConfig(
            input_dir=input_dir,
            checkpoint=checkpoint,
            out=out_dir,
            device=device,
            workers=1,
            cams="all",
            progress=False,
            overwrite=True,
        )
    )
    results = Path(summary.results or out_dir / "results.csv")
    with open(results, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {"status": "error", "reason": "no result row", "results": str(results)}
    row = rows[0]
    probs = {k[2:]: float(v) for k, v in row.items() if k.startswith("p_") and v not in ("", None)}
    top = sorted(probs.items(), key=lambda kv: -kv[1])[:3]
    return {
        "status": row.get("status"),
        "reason": row.get("reason", ""),
        "top": top,
        "positive_findings": row.get("positive_findings", ""),
        "results": str(results),
        "cam_dir": row.get("cam_dir", ""),
        "view_position": row.get("view_position", ""),
    }


def _write_summary(res: DemoResult, opts: DemoOptions) -> None:
    data = {
        "ok": res.ok,
        "mean_auroc": res.mean_auroc,
        "target_auroc": res.target_auroc,
        "options": asdict(opts),
        "checkpoint": str(res.checkpoint),
        "report_html": str(res.report_html),
        "report_md": str(res.report_md),
        "cam_files": [str(p) for p in res.cam_files],
        "scoring_dir": str(res.scoring_dir or ""),
        "rg1": res.rg1,
        "timings_s": res.timings,
        "synthetic": True,
        "note": SYNTHETIC_NOTE,
        "localisation": res.localisation,
        "targets": {
            "auroc": opts.target_auroc,
            "pointing_game": opts.target_pointing,
            "iobb_accuracy_0.25": opts.target_iobb25,
        },
    }
    atomic_write_text(res.out / "demo_summary.json", json.dumps(data, indent=2, default=str))


def _tell(res: DemoResult, opts: DemoOptions, ev: Any, say: Callable[[str], None]) -> None:
    lo, hi = ev.mean_auroc_ci
    say("")
    say("=" * 78)
    say(
        f"phantom test split: mean AUROC {res.mean_auroc:.3f} (95% CI {lo:.3f}-{hi:.3f}) over {ev.n_images} images"
        + ("" if opts.quick else f"; target >= {opts.target_auroc:.2f}: {'reached' if res.ok else 'NOT reached'}")
    )
    if opts.quick:
        say("(quick smoke version: one short epoch on a tiny phantom set; its AUROC is not meant to reach the target)")
    if res.localisation and res.localisation["overall"].get("n"):
        o = res.localisation["overall"]
        acc = o["iobb_accuracy"]
        reached = localisation_reached(res.localisation, opts)
        say(
            f"PHANTOM CAM localisation ({res.localisation.get('method', '?')}) on {o['n']} phantom boxes: "
            f"pointing game "
            f"{o['pointing_game']:.2f}, IoBB>0.25 accuracy {acc['0.25']:.2f} (IoBB>0.1 {acc['0.1']:.2f}, "
            f">0.5 {acc['0.5']:.2f}, mean IoBB {o['mean_iobb']:.2f})"
            + (
                ""
                if opts.quick
                else f"; targets >= {opts.target_pointing:.2f} / >= {opts.target_iobb25:.2f}: "
                f"{'reached' if reached else 'NOT reached'}"
            )
        )
        say("      (phantom numbers: drawn patterns in known boxes, not radiologists' boxes on radiographs)")
    say(f"SYNTHETIC DATA: {SYNTHETIC_NOTE}")
    if res.rg1:
        if res.rg1.get("status") == "ok":
            tops = ", ".join(f"{n} {p:.2f}" for n, p in res.rg1.get("top", []))
            say(
                f"real radiograph RG1_UNCI.dcm scored: top findings {tops}. These numbers come from a model trained on "
                f"phantoms and mean nothing clinically; they show the DICOM path works end to end."
            )
        else:
            say(f"real radiograph RG1_UNCI.dcm: {res.rg1.get('status')} ({res.rg1.get('reason')})")
    say(f"report:       {res.report_html}  (Markdown: {res.report_md})")
    say(f"plots:        {res.report_html.parent}/roc.png, pr.png, reliability.png")
    say(f"CAM examples: {res.cam_files[0].parent if res.cam_files else '(none)'}")
    say(f"checkpoint:   {res.checkpoint}")
    if res.scoring_dir:
        say(f"DICOM scores: {res.scoring_dir}/results.csv")
    say(
        f"viewer:       medxray app --checkpoint {res.checkpoint}"
        + (f" --results {res.scoring_dir}" if res.scoring_dir else "")
        + "   (then open http://127.0.0.1:8501)"
    )
    say("time:         " + ", ".join(f"{k} {v:.0f}s" for k, v in res.timings.items()))
