"""A simulated hospital for the site-loop tests (issue 22): phantom images in two styles.

* :func:`training_phantom`: the "vendor" data the deployed model was trained on: PNG phantoms
  (medxray.data.synthetic.render_phantom) with a CSV manifest, prevalence ``prevalence``.
* :func:`site_dicoms`: the hospital's DICOM studies: the same kinds of findings drawn in another
  style (another detector: gamma, contrast, offset, noise) at another prevalence, 16-bit
  MONOCHROME2 CR with a PatientID (the pseudonym source) and real UIDs.
* :func:`simulate_reviews`: reviewers who see the model's call and agree when it matches the
  ground truth, with reviewer noise (a wrong verdict with probability ``noise``, unsure sometimes).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

FINDINGS = ("Cardiomegaly", "Effusion", "Mass")


def _truth(rng: np.random.Generator, n: int, prevalence: float) -> np.ndarray:
    return (rng.random((n, len(FINDINGS))) < prevalence).astype(int)


def _render(findings: Sequence[str], key: tuple[int, ...], size: int) -> np.ndarray:
    from medxray.data.synthetic import render_phantom

    img, _ = render_phantom(findings, key, size=size)
    return img.astype(np.float32) / 255.0


def site_style(img01: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Another detector: a gamma curve, lower contrast, an offset and more noise."""
    g = 1.0 + 0.8 * strength
    out = 0.12 * strength + (1 - 0.35 * strength) * np.clip(img01, 0, 1) ** g
    return np.clip(out + 0.02 * strength * rng.standard_normal(img01.shape), 0, 1).astype(np.float32)


def training_phantom(root: Path, n: int = 240, *, size: int = 64, prevalence: float = 0.35, seed: int = 0) -> Path:
    """PNG phantoms + manifest.csv (patients of 2 images, 20% of patients val); returns the manifest."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    y = _truth(rng, n, prevalence)
    rows = []
    for i in range(n):
        img = _render([f for f, v in zip(FINDINGS, y[i]) if v], (seed, i), size)
        name = f"img{i:04d}.png"
        Image.fromarray(np.rint(img * 255).astype(np.uint8), mode="L").save(root / name)
        pid = f"T{i // 2:04d}"
        rows.append([name, pid, "val" if (i // 2) % 5 == 0 else "train", *y[i]])
    path = root / "manifest.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "patient_id", "split", *FINDINGS])
        w.writerows(rows)
    return path


def write_dicom(path: Path, img01: np.ndarray, *, patient_id: str, study: str, series: str, sop: str) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    cr = "1.2.840.10008.5.1.4.1.1.1"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = cr
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = cr, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Site^Patient", patient_id, "19600101"
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "CR", "PA", "CHEST"
    ds.Rows, ds.Columns = img01.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = np.rint(np.clip(img01, 0, 1) * 4095).astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def site_dicoms(
    folder: Path,
    n: int,
    *,
    size: int = 64,
    prevalence: float = 0.2,
    seed: int = 100,
    start: int = 0,
    strength: float = 1.0,
    ood: bool = False,
) -> dict[str, np.ndarray]:
    """Write ``n`` site DICOM files (patients of 2 images); returns {SOP UID: truth (C,)}.
    ``ood=True`` writes images that are not chest radiographs at all (noise textures)."""
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    y = _truth(rng, n, prevalence)
    truth = {}
    for k in range(n):
        i = start + k
        if ood:
            img = np.clip(rng.random((size, size)) ** 3 + 0.3 * np.sin(np.arange(size) / 2.0)[None, :], 0, 1)
        else:
            img = site_style(_render([f for f, v in zip(FINDINGS, y[k]) if v], (seed, i), size), rng, strength)
        sop = generate_uid(entropy_srcs=[str(seed), str(i), "sop"])
        write_dicom(
            folder / f"s{i:05d}.dcm",
            img.astype(np.float32),
            patient_id=f"MRN{i // 2:06d}",
            study=generate_uid(entropy_srcs=[str(seed), str(i), "study"]),
            series=generate_uid(entropy_srcs=[str(seed), str(i), "series"]),
            sop=sop,
        )
        truth[sop] = y[k]
    return truth


def simulate_reviews(
    store_dir: Path,
    results_csv: Path,
    truth: dict[str, np.ndarray],
    *,
    thresholds: dict[str, float],
    reviewers: Sequence[str] = ("dr_a", "dr_b"),
    noise: float = 0.08,
    unsure: float = 0.05,
    share: float = 1.0,
    seed: int = 7,
) -> int:
    """Each scored image with ground truth is reviewed (with probability ``share``) by every reviewer; returns
    the number of reviews saved."""
    from medxray.review.store import ImageKey, ReviewStore

    rng = np.random.default_rng(seed)
    store = ReviewStore(store_dir)
    n = 0
    with open(results_csv, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "ok" and r["sop_instance_uid"] in truth]
    for r in rows:
        if rng.random() > share:
            continue
        y = truth[r["sop_instance_uid"]]
        probs = {f: float(r[f"p_{f}"]) for f in FINDINGS}
        for who in reviewers:
            verdicts = {}
            for c, f in enumerate(FINDINGS):
                called = probs[f] >= thresholds[f]
                correct = "agree" if bool(y[c]) == called else "disagree"
                u = rng.random()
                verdicts[f] = (
                    "unsure"
                    if u < unsure
                    else (({"agree": "disagree", "disagree": "agree"}[correct]) if u < unsure + noise else correct)
                )
            store.save(
                ImageKey.for_image(
                    r["sop_instance_uid"],
                    study_instance_uid=r.get("study_instance_uid"),
                    series_instance_uid=r.get("series_instance_uid"),
                ),
                verdicts,
                reviewer=who,
                model_version=r["model_version"],
                probabilities=probs,
                thresholds=thresholds,
                file_name=Path(r["path"]).name,
            )
            n += 1
    return n
