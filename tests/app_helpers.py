"""Builders shared by the app tests (AppTest and browser): a tiny checkpoint, real DICOM copies, a results folder."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from medxray.labels import CHESTXRAY14_FINDINGS

APP_ENTRY = Path(__file__).resolve().parent.parent / "app" / "medxray_app.py"
# Real NIH ChestX-ray14 PNGs beside the clone (CI has ../shared too); the app never reads it.


def rg1_path() -> str:
    from pydicom.data import get_testdata_file

    return str(get_testdata_file("RG1_UNCI.dcm"))


def rg1_bytes() -> bytes:
    return Path(rg1_path()).read_bytes()


def make_checkpoint(
    path: Path,
    *,
    image_size: int = 64,
    thresholds: Mapping[str, float] | None = None,
    metrics: Mapping[str, Any] | None = None,
    seed: int = 0,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """A random densenet121 with 14 ChestX-ray14 heads at a small input size (fast on CPU)."""
    import torch

    from medxray.checkpoint import save_checkpoint
    from medxray.data.transforms import preprocessing_config
    from medxray.models import create_model

    with torch.random.fork_rng():  # deterministic weights without touching the global RNG
        torch.manual_seed(seed)
        model = create_model("densenet121", num_classes=len(CHESTXRAY14_FINDINGS))
    labels = list(CHESTXRAY14_FINDINGS)
    meta = {
        "architecture": "densenet121",
        "num_classes": len(labels),
        "in_chans": 3,
        "label_names": labels,
        "preprocessing": preprocessing_config(image_size),
        "thresholds": dict(thresholds) if thresholds else {n: 0.5 for n in labels},
        "metrics": dict(metrics)
        if metrics is not None
        else {
            "val_mean_auroc": 0.61,
            "val_auroc": {n: 0.6 + 0.001 * i for i, n in enumerate(labels)},
            "test_auroc": {"Effusion": 0.71},
            "test_auroc_ci95": {"Effusion": [0.65, 0.77]},
        },
        "dataset": "chestxray14",
        "pretrained": "none",
        "model_version": "test-random-v1",
        "config": {"split_seed": 0, "val_fraction": 0.1, "epochs": 0, "batch_size": 16, "image_size": image_size},
    }
    if provenance is not None:
        meta["data_provenance"] = dict(provenance)
    return save_checkpoint(path, model.state_dict(), meta)


def dicom_copy(dest: Path, *, sop_uid: str, view: str = "PA", modality: str = "CR") -> Path:
    """RG1 with a new SOP Instance UID (and optionally another view/modality)."""
    import pydicom

    ds = pydicom.dcmread(rg1_path())
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.ViewPosition = view
    ds.Modality = modality
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest)
    return dest


def rg1_study_series() -> tuple[str, str]:
    """RG1's Study and Series Instance UIDs: what score-dicom writes in a copy's results row."""
    import pydicom

    ds = pydicom.dcmread(rg1_path(), stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def png_bytes(h: int = 320, w: int = 300, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 0.5 + 0.3 * np.sin(xx / 17.0) * np.cos(yy / 23.0) + rng.normal(0, 0.05, (h, w))
    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_results(root: Path, probs: Sequence[Sequence[float]] | None = None) -> tuple[Path, list[str]]:
    """A score-dicom-style folder: INPUT with two RG1 copies and a broken file, OUT/results.csv.

    Returns (OUT, SOP UIDs of the two good files). Probabilities are given (not computed) so
    worklist tests know exactly which file is most suspicious.
    """
    labels = list(CHESTXRAY14_FINDINGS)
    inp, out = root / "input", root / "out"
    uids = ["1.2.826.0.1.3680043.8.498.1001", "1.2.826.0.1.3680043.8.498.1002"]
    dicom_copy(inp / "a" / "first.dcm", sop_uid=uids[0])
    dicom_copy(inp / "second.dcm", sop_uid=uids[1], view="AP")
    (inp / "broken.dcm").write_bytes(b"\x00" * 10)
    if probs is None:
        probs = [[0.2] * len(labels), [0.3] * len(labels)]
        probs[0][labels.index("Effusion")] = 0.93
        probs[1][labels.index("Mass")] = 0.71
    rows = []
    study, series = rg1_study_series()  # as in the files: the review key is study + series + SOP UID
    for rel, uid, p, view in (("a/first.dcm", uids[0], probs[0], "PA"), ("second.dcm", uids[1], probs[1], "AP")):
        rows.append(
            {
                "path": rel,
                "status": "ok",
                "reason": "",
                "sop_instance_uid": uid,
                "study_instance_uid": study,
                "series_instance_uid": series,
                "modality": "CR",
                "view_position": view,
                **{f"p_{n}": v for n, v in zip(labels, p)},
                "positive_findings": ";".join(n for n, v in zip(labels, p) if v >= 0.5),
                "model": "densenet121",
                "model_version": "test-random-v1",
            }
        )
    rows.append(
        {
            "path": "broken.dcm",
            "status": "error",
            "reason": "not a DICOM file",
            "sop_instance_uid": "",
            "study_instance_uid": "",
            "series_instance_uid": "",
            "modality": "",
            "view_position": "",
            **{f"p_{n}": "" for n in labels},
            "positive_findings": "",
            "model": "densenet121",
            "model_version": "test-random-v1",
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    (out / "run.json").write_text(json.dumps({"input_dir": str(inp)}))
    return out, uids


PHANTOM_PROVENANCE = {
    "synthetic": True,
    "dataset": "chestxray14",
    "data_root": "/data/phantom",
    "manifest_hash": "f" * 64,
    "counts": {"train": 700, "val": 80, "test": 220},
    "missing_by_split": {"train": 0, "val": 0, "test": 0},
}


def nih_pngs(n: int) -> list[Path]:
    from conftest import nih_sample_pngs

    return nih_sample_pngs()[:n]


def make_review_folder(out: Path, *, n_dicom: int = 4, n_png: int = 8, seed: int = 0) -> tuple[Path, list[dict]]:
    """A score-dicom-style results folder of real images: RG1 copies (new SOP UIDs), real NIH PNGs, one bad file.

    Probabilities are drawn with a fixed seed (the worklist order is then known). Returns (OUT, rows).
    """
    import shutil

    labels = list(CHESTXRAY14_FINDINGS)
    rng = np.random.default_rng(seed)
    inp = out / "input"
    rows: list[dict] = []
    for i in range(n_dicom):
        uid = f"1.2.826.0.1.3680043.8.498.{7000 + i}"
        rel = f"dicom/rg1_copy_{i}.dcm"
        dicom_copy(inp / rel, sop_uid=uid, view="PA" if i % 2 == 0 else "AP")
        rows.append(
            {
                "path": rel,
                "sop_instance_uid": uid,
                "modality": "CR",
                "view_position": "PA" if i % 2 == 0 else "AP",
                **dict(zip(("study_instance_uid", "series_instance_uid"), rg1_study_series())),
            }
        )
    for f in nih_pngs(n_png):
        rel = f"png/{f.name}"
        (inp / "png").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, inp / rel)
        rows.append({"path": rel, "sop_instance_uid": "", "modality": "", "view_position": ""})
    for r in rows:
        p = rng.uniform(0.01, 0.9, len(labels))
        r.update(
            {
                "status": "ok",
                "reason": "",
                "study_instance_uid": r.get("study_instance_uid", ""),
                "series_instance_uid": r.get("series_instance_uid", ""),
                **{f"p_{n}": float(v) for n, v in zip(labels, p)},
                "positive_findings": ";".join(n for n, v in zip(labels, p) if v >= 0.5),
                "model": "densenet121",
                "model_version": "test-random-v1",
            }
        )
    (inp / "notes.dcm").write_bytes(b"this is not an image\n")
    rows.append(
        {
            "path": "notes.dcm",
            "status": "error",
            "reason": "not_dicom: no DICM marker and no data set",
            **{f"p_{n}": "" for n in labels},
            "sop_instance_uid": "",
            "modality": "",
            "view_position": "",
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    (out / "run.json").write_text(json.dumps({"input_dir": str(inp)}))
    return out, rows
