"""The checkpoint's own validation predictions: what the site's figures are set beside.

``finetune`` writes ``val_predictions.csv`` (``p_<Finding>`` and ``y_<Finding>`` columns, blank =
unknown) beside ``best.pt``. A site version written by ``site calibrate`` lives elsewhere, so the
reference is embedded into its metadata (``validation_reference``, at most :data:`MAX_ROWS` rows,
a seeded subset beyond that, stated). :func:`validation_reference` reads either.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

MAX_ROWS = 5000
VAL_PREDICTIONS = "val_predictions.csv"


@dataclass(frozen=True)
class Reference:
    """(N, C) probabilities, labels and masks of the checkpoint's validation split, and where they came from."""

    label_names: tuple[str, ...]
    probs: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    source: str
    ood_rate: float | None = None


def _from_csv(path: Path, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not all(f"p_{n}" in (reader.fieldnames or []) and f"y_{n}" in (reader.fieldnames or []) for n in names):
            return None
        P, Y, M = [], [], []
        for r in reader:
            try:
                P.append([float(r[f"p_{n}"]) for n in names])
            except (TypeError, ValueError):
                continue
            ys = [r[f"y_{n}"].strip() for n in names]
            Y.append([1.0 if y in ("1", "1.0") else 0.0 for y in ys])
            M.append([0.0 if y == "" else 1.0 for y in ys])
    if not P:
        return None
    return np.asarray(P), np.asarray(Y), np.asarray(M)


def validation_reference(checkpoint: str | os.PathLike, metadata: Mapping[str, Any]) -> Reference | None:
    """The reference of a checkpoint: embedded in its metadata, else ``val_predictions.csv`` beside it."""
    names = tuple(metadata.get("label_names") or [])
    ood_info = metadata.get("ood") if isinstance(metadata.get("ood"), Mapping) else {}
    ood_rate = (1.0 - float(ood_info["percentile"]) / 100.0) if "percentile" in ood_info else None
    emb = metadata.get("validation_reference")
    if isinstance(emb, Mapping) and emb.get("probs"):
        P = np.asarray(emb["probs"], dtype=np.float64)
        L = np.asarray([[np.nan if v is None else v for v in row] for row in emb["labels"]], dtype=np.float64)
        return Reference(
            names, P, np.nan_to_num(L), (~np.isnan(L)).astype(float), str(emb.get("source", "embedded")), ood_rate
        )
    f = Path(checkpoint).expanduser().resolve().parent / VAL_PREDICTIONS
    if f.is_file():
        got = _from_csv(f, names)
        if got is not None:
            return Reference(
                names,
                *got,
                source=f"{f.name} beside the checkpoint ({len(got[0])} validation images)",
                ood_rate=ood_rate,
            )
    return None


def embed(ref: Reference, seed: int = 0) -> dict[str, Any]:
    """The JSON-able form stored as ``metadata["validation_reference"]`` (at most MAX_ROWS rows)."""
    idx = np.arange(len(ref.probs))
    note = ref.source
    if len(idx) > MAX_ROWS:
        idx = np.sort(np.random.default_rng(seed).choice(idx, MAX_ROWS, replace=False))
        note += f"; a seeded subset of {MAX_ROWS} of {len(ref.probs)} rows"
    return {
        "source": note,
        "probs": [[round(float(v), 5) for v in ref.probs[i]] for i in idx],
        "labels": [[(int(y) if m > 0.5 else None) for y, m in zip(ref.labels[i], ref.masks[i])] for i in idx],
    }
