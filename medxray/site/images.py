"""Score a site's image files with a checkpoint the way the scorer does.

DICOM files go through :func:`medxray.dicom.reader.read_dicom` (modality LUT, VOI window,
MONOCHROME1 inversion: the scorer's display pipeline), PNG/JPEG through the one image decoder;
both then take the deterministic transform list of :class:`medxray.inference.Predictor`. A file
that cannot be read is reported by index, never raised: a site set keeps going.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from medxray.errors import DataError, DicomError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scored:
    """Probabilities (N, C) in ``label_names`` order (NaN rows for unreadable files), OOD flags (N,)
    (None when the checkpoint has no OOD statistics) and the reasons for unreadable files by index."""

    label_names: tuple[str, ...]
    probs: np.ndarray
    ood_flags: np.ndarray | None
    failed: dict[int, str]


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the file carries the DICM marker at byte 128 (PS3.10 section 7.1) or ends in .dcm."""
    p = Path(path)
    if p.suffix.lower() == ".dcm":
        return True
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def read_site_image(path: str | os.PathLike) -> np.ndarray:
    """2-D float32 image in [0, 1] (air dark) of a DICOM or PNG/JPEG file; raises :class:`DataError`."""
    if is_dicom_file(path):
        from medxray.dicom.reader import read_dicom

        try:
            return read_dicom(str(path), keep_raw=False).pixels
        except DicomError as exc:
            raise DataError(f"{Path(path).name}: {exc}") from None
    from medxray.data.imageio import decode_image, to_float01

    return to_float01(decode_image(path).pixels)


def score_paths(
    checkpoint: str | os.PathLike, paths: Sequence[str], *, device: str = "cpu", batch_size: int = 16
) -> Scored:
    """Score ``paths`` with the checkpoint (torch backend, fp32: the figures do not depend on a backend)."""
    from medxray.inference import Predictor

    pred = Predictor.from_checkpoint(
        checkpoint, device=device, backend="torch", precision="fp32", batch_size=batch_size, verify=False
    )
    c = len(pred.label_names)
    probs = np.full((len(paths), c), np.nan, dtype=np.float64)
    has_ood = pred.ood is not None and pred.ood.threshold is not None
    ood = np.zeros(len(paths), dtype=bool) if has_ood else None
    failed: dict[int, str] = {}
    for start in range(0, len(paths), batch_size):
        idx, imgs = [], []
        for i in range(start, min(len(paths), start + batch_size)):
            try:
                imgs.append(read_site_image(paths[i]))
                idx.append(i)
            except DataError as exc:
                failed[i] = str(exc)
        if not imgs:
            continue
        res = pred.run(pred.preprocess(imgs), ood=has_ood)
        probs[idx] = res.probabilities
        if ood is not None and res.ood is not None:
            ood[idx] = pred.ood.flags(res.ood)
    if failed:
        log.warning(
            "%d of %d site image(s) could not be read (first: %s)", len(failed), len(paths), next(iter(failed.values()))
        )
    return Scored(tuple(pred.label_names), probs, ood, failed)
