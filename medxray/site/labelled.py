"""Score a site's labelled rows with one or more checkpoints: the step ``site validate``,
``site calibrate`` and ``site promote`` share.

Rows come from the site label manifest (:func:`medxray.site.labels.read_manifest`); each
checkpoint scores the rows' image files through :func:`medxray.site.images.score_paths`. A row
any checkpoint could not read is left out of every array, so all models are judged on the same
images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from medxray.site.images import Scored, score_paths
from medxray.site.labels import ManifestRow


@dataclass(frozen=True)
class LabelledScores:
    """Labelled rows scored by one or more checkpoints.

    ``findings``: the manifest's findings that the (first) checkpoint outputs, in manifest order.
    ``labels``, ``masks``: (K, F) reviewer labels and known-label masks (1 = known) of the K rows
    every checkpoint read; ``probs``: one (K, F) array per checkpoint, columns in ``findings``
    order. ``kept``: (N,) bool over all N rows given. ``scored``: each checkpoint's raw
    :class:`~medxray.site.images.Scored` (all N rows; unreadable files by index).
    """

    findings: list[str]
    labels: np.ndarray
    masks: np.ndarray
    probs: tuple[np.ndarray, ...]
    kept: np.ndarray
    scored: tuple[Scored, ...]

    @property
    def n_images(self) -> int:
        """K: the rows every checkpoint read."""
        return int(self.kept.sum())


def score_labelled(
    checkpoints: Sequence[str | os.PathLike],
    finding_names: Sequence[str],
    rows: Sequence[ManifestRow],
    *,
    device: str = "cpu",
) -> LabelledScores:
    """Score ``rows`` (manifest rows whose labels are in ``finding_names`` order) with each of
    ``checkpoints``; unreadable files are recorded, never raised (:func:`score_paths`)."""
    names = list(finding_names)
    scored = tuple(score_paths(c, [r.image for r in rows], device=device) for c in checkpoints)
    kept = np.array([all(i not in s.failed for s in scored) for i in range(len(rows))])
    findings = [n for n in names if n in scored[0].label_names]
    Y = np.array([[r.labels[names.index(n)] for n in findings] for r in rows])[kept]
    M = np.array([[r.mask[names.index(n)] for n in findings] for r in rows])[kept]
    probs = tuple(s.probs[kept][:, [s.label_names.index(n) for n in findings]] for s in scored)
    return LabelledScores(findings, Y, M, probs, kept, scored)
