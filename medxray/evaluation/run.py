"""The evaluation job: ``evaluate(checkpoint, ...) -> EvalResult``, scoring a split (with optional TTA)
and writing its outputs.

What it measures, and why that way:

* per-class AUROC with 95% bootstrap confidence intervals (images resampled jointly, so the mean
  AUROC gets an interval too) and AUPRC, the numbers CheXNet and Wang et al. report;
* operating thresholds per class (Youden's J, and the threshold giving 90% specificity). They are
  chosen on the validation split by default, so the sensitivity and specificity reported on the
  test split are not fitted to it. They are written back into the checkpoint's metadata, where
  the scorer and the app read them;
* calibration (expected calibration error, reliability plot), ROC and PR curves as PNG;
* optional TenCrop test-time augmentation;
* localisation on images with boxes: the class activation map (features . classifier weights,
  no hooks) is thresholded into boxes, scored by IoBB at T = 0.1 ... 0.9 as in Wang et al. 2017,
  plus the pointing game;
* a Markdown + HTML report placing our AUROC beside CheXNet's and Wang's and saying which split
  and data the numbers rest on.

The metrics live in :mod:`medxray.evaluation.metrics`, localisation in
:mod:`medxray.evaluation.localisation`, plots and the report in :mod:`medxray.evaluation.report`.
This module must not import training (:mod:`medxray.training`, :mod:`medxray.train`): shared
helpers come from :mod:`medxray.hardware`, :mod:`medxray.fileio` and :mod:`medxray.data`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medxray.data import DATASETS, build_datasets
from medxray.data.loading import IndexedDataset, make_loader
from medxray.data.manifest import PHANTOM_MARKER
from medxray.errors import CheckpointError, ConfigError, DataError
from medxray.evaluation.assess import assess
from medxray.evaluation.localisation import localisation_metadata, localise_batch, summarise_localisation
from medxray.evaluation.result import EvalResult
from medxray.fileio import json_line
from medxray.hardware import autocast

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")

# --------------------------------------------------------------------------------------------
# scoring a split


def ten_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, S, S) -> (N*10, C, S, S): upscale by 1/0.875 (CheXNet's 256/224), take 4 corners +
    centre, and their mirror images."""
    big = int(round(size / 0.875))
    up = F.interpolate(x, size=(big, big), mode="bilinear", align_corners=False)
    o = big - size
    c = o // 2
    crops = [
        up[..., :size, :size],
        up[..., :size, o:],
        up[..., o:, :size],
        up[..., o:, o:],
        up[..., c : c + size, c : c + size],
    ]
    crops += [torch.flip(t, dims=(-1,)) for t in crops]
    return torch.stack(crops, 1).reshape(-1, *x.shape[1:])


@torch.no_grad()
def score_split(
    model: torch.nn.Module,
    dataset: Any,
    *,
    device: torch.device,
    precision: str,
    batch_size: int,
    tta: bool = False,
    boxes: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    label_names: Sequence[str] = (),
    cam_threshold: float = 0.5,
    num_workers: int = 0,
    progress: bool = False,
    cam_method: str | None = None,
) -> dict[str, Any]:
    """Probabilities for every image of ``dataset``; localisation records for images that have boxes.

    Returns ``probs``, ``labels``, ``masks`` as (N, C) arrays in dataset order, ``names``, and
    ``localisation`` (records of :func:`medxray.evaluation.localisation.localise_batch`, maps by
    ``cam_method``, None = :data:`medxray.cam.DEFAULT_MAP_METHOD`).
    ``tta``: average the sigmoid over TenCrop's ten crops (:func:`ten_crop`).
    """
    loader = make_loader(
        IndexedDataset(dataset),
        batch_size=batch_size,
        seed=0,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    model.eval()
    index_of = {n: i for i, n in enumerate(label_names)}
    probs, labels, masks, names, loc = [], [], [], [], []
    it: Any = loader
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc="scoring", unit="batch", leave=False)
    for batch in it:
        fmt = torch.contiguous_format if precision == "fp32" else torch.channels_last
        x = batch["image"].to(device).contiguous(memory_format=fmt)
        size = x.shape[-1]
        with autocast(device, precision):
            feats = model.forward_features(x)
            logits = model.classifier(feats.float().mean(dim=(2, 3)))
            if tta:
                # one forward per crop position keeps memory at one batch's worth
                crops = ten_crop(x, size).reshape(x.shape[0], 10, *x.shape[1:])
                p = torch.stack(
                    [torch.sigmoid(model(crops[:, k].contiguous(memory_format=fmt)).float()) for k in range(10)]
                ).mean(0)
        p = p if tta else torch.sigmoid(logits.float())
        probs.append(p.cpu().numpy())
        labels.append(batch["label"].numpy())
        masks.append(batch["mask"].numpy())
        names.extend(batch["name"])
        if not boxes:
            continue
        loc.extend(
            localise_batch(
                model,
                x,
                [boxes.get(name, []) for name in batch["name"]],
                names=batch["name"],
                orig_sizes=batch["orig_size"],
                index_of=index_of,
                probs=p,
                method=cam_method,
                cam_threshold=cam_threshold,
            )
        )
    c = len(label_names)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros((0, c), dtype=np.float32)  # noqa: E731
    return {"probs": cat(probs), "labels": cat(labels), "masks": cat(masks), "names": names, "localisation": loc}


# --------------------------------------------------------------------------------------------
# the evaluation job


def evaluate(
    checkpoint: str | Path,
    *,
    dataset: str | None = None,
    data_root: str | Path | None = None,
    split: str = "test",
    out_dir: str | Path | None = None,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 32,
    tta: bool = False,
    n_bootstrap: int = 1000,
    seed: int = 0,
    threshold_split: str | None = "val",
    write_thresholds: bool = True,
    write_back: bool | None = None,
    localisation: bool = True,
    cam_threshold: float = 0.5,
    num_workers: int | None = None,
    data_note: str | None = None,
    splits: Any = None,
    progress: bool = False,
    cam_method: str | None = None,
) -> EvalResult:
    """Evaluate ``checkpoint`` on one split and write metrics, plots and a report to ``out_dir``.

    Dataset options (view, validation fraction and seed, ...) default to the ones the checkpoint
    was trained with, so ``split="val"`` is the same validation split training used.
    ``threshold_split``: where operating thresholds are chosen (``None``: on ``split`` itself).
    ``precision``: fp32 by default, so that the reported numbers do not depend on the hardware; "bf16"
    or "auto" (bf16 where native) trade exactness for speed, and the report names the one used.
    ``data_root`` defaults to the absolute path the checkpoint was trained on.
    ``cam_method``: the map method localisation is scored with (:data:`medxray.cam.MAP_METHODS`;
    None = the one the checkpoint records, else :data:`medxray.cam.DEFAULT_MAP_METHOD`). It is
    written into the checkpoint with the per-finding localisation figures, so the app and the
    scorer show the maps these figures were measured on.
    """
    from medxray.cam import check_method
    from medxray.checkpoint import load_checkpoint, model_from_checkpoint, update_metadata
    from medxray.data.transforms import check_preprocessing
    from medxray.hardware import default_num_workers, resolve_device, resolve_precision

    ckpt_path = Path(checkpoint)
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if threshold_split is not None and threshold_split not in SPLITS:
        raise ConfigError(f"threshold split must be one of {', '.join(SPLITS)}, got {threshold_split!r}")
    ckpt = load_checkpoint(ckpt_path)
    meta = ckpt.meta
    image_size = check_preprocessing(meta.preprocessing)
    model = model_from_checkpoint(ckpt)
    train_cfg = dict(meta.config)
    dataset = dataset or meta.training_dataset
    if splits is None:
        splits = _build_eval_splits(dataset, data_root or train_cfg.get("data_root"), image_size, train_cfg)
    label_names = list(ckpt.label_names)
    if list(splits.label_names) != label_names:
        raise CheckpointError(
            f"{ckpt_path} predicts {len(label_names)} findings ({', '.join(label_names[:4])}, ...) but the "
            f"{dataset} data has {len(splits.label_names)} ({', '.join(list(splits.label_names)[:4])}, ...); "
            f"evaluate it on the dataset it was trained for"
        )
    ds = getattr(splits, split, None)
    if ds is None or len(ds) == 0:
        raise DataError(f"the {dataset} data has no {split} split here; choose another with --split")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    model.to(dev)
    if prec != "fp32":  # channels_last pays off under bf16/fp16; fp32 keeps the layout the Predictor's fp32 maps use
        model.to(memory_format=torch.channels_last)
    workers = default_num_workers(dev) if num_workers is None else num_workers
    out = Path(out_dir) if out_dir else ckpt_path.parent / f"eval-{split}"
    out.mkdir(parents=True, exist_ok=True)

    boxes = getattr(splits, "boxes", None) if localisation else None
    cam_method = check_method(cam_method or meta.cam_method)
    log.info("scoring %d %s images (%s, %s%s)", len(ds), split, dev, prec, ", TenCrop" if tta else "")
    scored = score_split(
        model,
        ds,
        device=dev,
        precision=prec,
        batch_size=batch_size,
        tta=tta,
        boxes=boxes,
        label_names=label_names,
        cam_threshold=cam_threshold,
        num_workers=workers,
        progress=progress,
        cam_method=cam_method,
    )
    P, Y, M = scored["probs"], scored["labels"], scored["masks"]

    # thresholds: chosen on threshold_split (default val), applied to this split
    th_split = threshold_split if threshold_split and threshold_split != split else split
    if th_split != split and (getattr(splits, th_split, None) is None or len(getattr(splits, th_split)) == 0):
        log.warning("no %s split to choose thresholds on; choosing them on %s itself", th_split, split)
        th_split = split
    th_set = None
    if th_split != split:
        log.info("choosing operating thresholds on the %s split", th_split)
        th = score_split(
            model,
            getattr(splits, th_split),
            device=dev,
            precision=prec,
            batch_size=batch_size,
            tta=tta,
            label_names=label_names,
            num_workers=workers,
        )
        th_set = (th["probs"], th["labels"], th["masks"])
    loc = summarise_localisation(scored["localisation"], label_names) if scored["localisation"] else None
    if loc is not None:
        loc["method"] = cam_method
    root_text = str(data_root or train_cfg.get("data_root") or "")
    source_lines = [
        f"Checkpoint: `{ckpt_path}` ({meta.architecture}, model version `{meta.model_version}`, "
        f"{image_size} px, trained from `{meta.pretrained or 'n/a'}` initialisation)",
        f"Data root: `{root_text}`",
    ]
    result, metrics = assess(
        out,
        label_names=label_names,
        names=scored["names"],
        probs=P,
        labels=Y,
        masks=M,
        split=split,
        dataset=dataset,
        threshold_set=th_set,
        threshold_split=th_split,
        n_bootstrap=n_bootstrap,
        seed=seed,
        localisation=loc,
        localisation_records=scored["localisation"],
        source_lines=source_lines,
        note=data_note or _data_note(splits, data_root or train_cfg.get("data_root")),
        summary=getattr(splits, "summary", {}) or {},
        checkpoint=ckpt_path,
        precision=prec,
        extra={
            "checkpoint": str(ckpt_path),
            "model_version": meta.model_version,
            "tta": tta,
            "data_root": root_text,
            "data_manifest_hash": getattr(splits, "manifest_hash", None),
        },
    )
    if write_thresholds if write_back is None else write_back:
        merged_metrics = dict(meta.metrics)
        merged_metrics.update(
            {
                f"{split}_mean_auroc": result.mean_auroc,
                f"{split}_auroc": metrics["auroc"],
                f"{split}_auroc_ci95": metrics["auroc_ci95"],
                f"{split}_ece": metrics["ece"],
                f"{split}_precision": prec,
            }
        )
        update_metadata(
            ckpt_path,
            {
                "thresholds": result.thresholds,
                "thresholds_spec90": metrics["thresholds_spec90"],
                "thresholds_fallback": result.thresholds_fallback,
                "operating_points": result.operating_points,
                "threshold_split": th_split,
                "metrics": json.loads(json_line(merged_metrics)),
                "cam_method": cam_method,
                "localisation": localisation_metadata(
                    loc,
                    split=split,
                    method=cam_method,
                    synthetic=_is_phantom(splits, data_root or train_cfg.get("data_root")),
                ),
            },
        )
        log.info("wrote per-class thresholds (Youden J on %s) into %s", th_split, ckpt_path)
        if result.thresholds_fallback:
            log.warning(
                "no threshold could be chosen on %s for %s (no positive or no negative there): 0.5 is a "
                "fallback, flagged as thresholds_fallback in the checkpoint",
                th_split,
                ", ".join(result.thresholds_fallback),
            )
    return result


def _build_eval_splits(dataset: str, data_root: Any, image_size: int, train_cfg: Mapping[str, Any]) -> Any:
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    if not data_root:
        raise ConfigError("--data-root is required: the folder holding the dataset's images and label file")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data root {root} does not exist or is not a folder; pass the folder that holds the {dataset} data"
        )
    opts = {
        k: train_cfg[k]
        for k in ("val_fraction", "split_seed", "view", "max_per_patient", "allow_missing", "use_cache")
        if k in train_cfg
    }
    return build_datasets(
        dataset=dataset,
        data_root=root,
        image_size=image_size,
        augment=False,
        **opts,
        **dict(train_cfg.get("dataset_options") or {}),
    )


def _data_note(splits: Any, data_root: Any) -> str | None:
    summary = getattr(splits, "summary", {}) or {}
    if summary.get("synthetic") or (data_root and (Path(data_root) / PHANTOM_MARKER).exists()):
        return (
            "These images are synthetic phantoms generated by medxray.data.synthetic, not radiographs: the numbers "
            "check that the pipeline learns and are not comparable with the published results."
        )
    return None


def _is_phantom(splits: Any, data_root: Any) -> bool:
    """Whether the evaluated data is a SYNTHETIC phantom (its marker file, or the splits say so)."""
    if (getattr(splits, "summary", None) or {}).get("synthetic"):
        return True
    return bool(data_root) and (Path(data_root) / PHANTOM_MARKER).is_file()
