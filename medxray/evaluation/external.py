"""Evaluate any model's predictions: ``evaluate_predictions(FILE.csv, ...) -> EvalResult``.

A predictions file has one row per image and one column per finding: the first column holds the
image name as in the ChestX-ray14 label file (``00000003_000.png``; a leading folder is dropped),
and each finding's column is named by the finding (``Cardiomegaly``) or as medxray's own
``predictions.csv`` names it (``p_Cardiomegaly``), so our outputs, published models and other tools
can be scored side by side. Values are probabilities in [0, 1]. Other columns are ignored.

The file is scored against the official labels and split (shipped in ``data_manifests/``; no image
is needed) with the same metrics, CIs, thresholds and report as a checkpoint
(:func:`medxray.evaluation.assess.assess`): rows on ``split`` are scored; operating thresholds are
chosen on the rows of ``threshold_split`` (default val: the seeded patient-disjoint share of
train_val that ``finetune`` uses) when the file has any, else on ``split`` itself, as the report says.

Must not import torch, models, training or the checkpoint evaluation (:mod:`medxray.evaluation.run`).
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Mapping, Sequence

import numpy as np

from medxray.errors import ConfigError, DataError
from medxray.evaluation.assess import assess
from medxray.evaluation.result import EvalResult

log = logging.getLogger(__name__)

NAME_COLUMNS = ("name", "image", "image index", "image_index", "path", "filename", "file")
SPLITS = ("train", "val", "test")
FILE_SPLIT = "file"  # score exactly the images the file names, whatever their official split


PREFIXES = ("", "p_", "prob_", "pred_", "score_", "probability_")


def _norm(text: str) -> str:
    """A column or finding name without case, spaces, underscores or hyphens ("Pleural thickening" ==
    "Pleural_Thickening" == "pleural-thickening")."""
    return "".join(ch for ch in text.lower() if ch.isalnum())


def finding_columns(
    header: Sequence[str], label_names: Sequence[str], columns: Mapping[str, str] | None = None
) -> dict[str, int]:
    """Index of each finding's column in ``header``.

    An explicit ``columns`` mapping (finding -> column) wins. Otherwise, per finding, the first
    match of: the exact name (``Atelectasis``), ``p_X`` (medxray), ``prob_X`` (jrzech/reproduce-chexnet's
    ``preds.csv``), ``pred_X``, ``score_X``, ``probability_X``, then the same compared without case,
    spaces, underscores and hyphens (display names such as ``Pleural thickening``, torchxrayvision's
    ``Pleural_Thickening``). Raises :class:`DataError` naming the missing finding and the header.
    """
    out: dict[str, int] = {}
    columns = dict(columns or {})
    unknown = [f for f in columns if f not in label_names]
    if unknown:
        raise ConfigError(f"--columns names unknown finding(s) {unknown}; findings: {', '.join(label_names)}")
    normed = [_norm(h) for h in header]
    for n in label_names:
        if n in columns:
            if columns[n] not in header:
                raise DataError(
                    f"--columns maps {n} to {columns[n]!r}, which is not a column of the file "
                    f"({', '.join(header[:8])}...)"
                )
            out[n] = header.index(columns[n])
            continue
        idx = next((header.index(pre + n) for pre in PREFIXES if pre + n in header), None)
        if idx is None:
            idx = next((normed.index(_norm(pre + n)) for pre in PREFIXES if _norm(pre + n) in normed), None)
        if idx is None:
            raise DataError(
                f"no column for {n!r} (tried {n}, p_{n}, prob_{n}, pred_{n}, score_{n} and the same "
                f"without case/spaces/underscores) among {', '.join(header[:12])}; name it with "
                f"--columns {n}=COLUMN"
            )
        out[n] = idx
    return out


def parse_columns(text: str | None) -> dict[str, str]:
    """``--columns "Atelectasis=atel,Effusion=pleural effusion"`` -> {finding: column}."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        k, sep, v = part.partition("=")
        if not sep or not k.strip() or not v.strip():
            raise ConfigError(f"--columns takes FINDING=COLUMN pairs separated by commas, got {part!r}")
        out[k.strip()] = v.strip()
    return out


def read_predictions(
    path: str | Path, label_names: Sequence[str], columns: Mapping[str, str] | None = None
) -> tuple[list[str], np.ndarray]:
    """(image names, (N, C) float64 probabilities in ``label_names`` order) from a predictions CSV.

    Finding columns are found by :func:`finding_columns`. Raises :class:`DataError` naming the row
    or column for: a missing file, a missing finding column, an empty or non-numeric cell, a value
    outside [0, 1], a repeated image.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"predictions file {p} does not exist")
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read predictions file {p}: {exc}") from None
    if not rows:
        raise DataError(f"predictions file {p} is empty; it needs a header row: name,{','.join(label_names[:2])},...")
    header = [h.strip() for h in rows[0]]
    lower = [h.lower() for h in header]
    name_col = next((lower.index(c) for c in NAME_COLUMNS if c in lower), 0)
    try:
        found = finding_columns(header, label_names, columns)
    except DataError as exc:
        raise DataError(f"predictions file {p}: {exc}") from None
    cols = [found[n] for n in label_names]
    names: list[str] = []
    values = np.empty((len(rows) - 1, len(label_names)), dtype=np.float64)
    seen: dict[str, int] = {}
    for i, row in enumerate(rows[1:]):
        line = i + 2
        if len(row) <= max(cols + [name_col]):
            raise DataError(f"{p} line {line}: {len(row)} cells, expected {len(header)}")
        name = PurePath(row[name_col].strip().replace("\\", "/")).name
        if not name:
            raise DataError(f"{p} line {line}: empty image name")
        if name in seen:
            raise DataError(f"{p} line {line}: image {name} already given on line {seen[name]}; one row per image")
        seen[name] = line
        for j, c in enumerate(cols):
            try:
                v = float(row[c])
            except ValueError:
                raise DataError(f"{p} line {line}, column {header[c]}: {row[c]!r} is not a number") from None
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise DataError(
                    f"{p} line {line}, column {header[c]}: {row[c]} is not a probability in [0, 1]; "
                    f"convert scores first (e.g. the sigmoid of a logit)"
                )
            values[i, j] = v
        names.append(name)
    if not names:
        raise DataError(f"predictions file {p} has a header but no rows")
    return names, values


@dataclass(frozen=True)
class _Rows:
    """The file's rows on one split, in the split's order: image names, (N, C) probabilities,
    (N, C) labels and (N, C) label masks (1 = known)."""

    names: list[str]
    probs: np.ndarray
    labels: np.ndarray
    masks: np.ndarray


@dataclass(frozen=True)
class _Matched:
    """A predictions file matched against the label file's splits."""

    parts: Mapping[str, Any]  # split -> records (names, patients, labels, mask)
    probs: np.ndarray  # (rows, C) as read
    row_of: dict[str, int]  # image name -> row of the file

    def take(self, which: str) -> _Rows:
        """The file's rows on split ``which``."""
        rec = self.parts[which]
        idx = [(k, self.row_of[n]) for k, n in enumerate(rec.names) if n in self.row_of]
        ks, rs = [k for k, _ in idx], [r for _, r in idx]
        return _Rows(
            [rec.names[k] for k in ks],
            self.probs[rs],
            rec.labels[ks].astype(np.float32),
            rec.mask[ks].astype(np.float32),
        )


def evaluate_predictions(
    predictions: str | Path,
    *,
    dataset: str = "chestxray14",
    data_root: str | Path | None = None,
    split: str = "test",
    out_dir: str | Path | None = None,
    threshold_split: str | None = "val",
    n_bootstrap: int = 1000,
    seed: int = 0,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    view: str = "all",
    columns: Mapping[str, str] | None = None,
) -> EvalResult:
    """Score an external predictions file on ``split`` of the official ChestX-ray14 labels; write the
    same files and report as :func:`medxray.evaluation.run.evaluate` into ``out_dir`` (default:
    ``<file stem>-eval-<split>`` beside the file).

    ``data_root``: use that root's label and list files (when present) instead of the shipped ones.
    ``val_fraction``, ``split_seed``, ``view``: how the val split is carved out of train_val (the
    ``finetune`` defaults). ``split="file"`` scores exactly the images the file names (any official
    split; thresholds then chosen on the same rows), so a table published on another split can be
    reproduced. ``columns``: an explicit finding -> column mapping (:func:`finding_columns`).
    Raises :class:`DataError` when no row of the file is on ``split``.
    """
    from medxray.data.chestxray14 import split_records
    from medxray.labels import CHESTXRAY14_FINDINGS

    threshold_split = _check_splits(dataset, split, threshold_split)
    label_names = list(CHESTXRAY14_FINDINGS)
    path = Path(predictions).expanduser().resolve()
    names, probs = read_predictions(path, label_names, columns)
    parts, info = split_records(data_root, val_fraction=val_fraction, split_seed=split_seed, view=view)
    if split == FILE_SPLIT:
        parts = _with_file_split(parts)
    matched = _Matched(parts, probs, {n: i for i, n in enumerate(names)})
    ev = matched.take(split)
    if not ev.names:
        raise DataError(
            f"no image of {path.name} is on the {split} split ({len(names)} rows); check the image names "
            f"(as in the label file, e.g. 00000003_000.png) or choose another --split"
        )
    unknown = _unknown_rows(path, names, parts)
    th_split, th_set = _threshold_rows(matched, path, split, threshold_split)
    result, _ = assess(
        Path(out_dir) if out_dir else path.parent / f"{path.stem}-eval-{split}",
        label_names=label_names,
        names=ev.names,
        probs=ev.probs,
        labels=ev.labels,
        masks=ev.masks,
        split=split,
        dataset=dataset,
        threshold_set=th_set,
        threshold_split=th_split,
        n_bootstrap=n_bootstrap,
        seed=seed,
        source_lines=_source_lines(path, len(names), len(unknown), info, val_fraction, split_seed),
        summary=_summary(matched, ev, split, label_names),
        precision="as given in the file",
        extra=_extra(path, names, unknown, info),
    )
    return result


def _source_lines(
    path: Path, n_rows: int, n_unknown: int, info: Mapping[str, Any], val_fraction: float, split_seed: int
) -> list[str]:
    """The report's lines on what was scored: the file (rows, rows not in the label file) and the
    labels (file, content SHA-256, how val was carved out of train_val)."""
    return [
        f"Predictions file: `{path}` ({n_rows} rows; {n_unknown} not in the label file)",
        f"Labels: {Path(info['files']['labels']).name} (content SHA-256 `{info['label_sha256'][:16]}`); "
        f"val = patient-disjoint {val_fraction:g} of train_val, seed {split_seed}",
    ]


def _check_splits(dataset: str, split: str, threshold_split: str | None) -> str | None:
    """The threshold split to use (None for ``split="file"``); ConfigError for an unsupported
    dataset or an unknown split name."""
    if dataset != "chestxray14":
        raise ConfigError(
            f"--predictions scores ChestX-ray14 predictions against its official labels; "
            f"dataset {dataset!r} is not supported"
        )
    if split not in (*SPLITS, FILE_SPLIT) or (threshold_split is not None and threshold_split not in SPLITS):
        raise ConfigError(
            f"split must be one of {', '.join(SPLITS)} or file, threshold split one of {', '.join(SPLITS)}"
        )
    return None if split == FILE_SPLIT else threshold_split


def _with_file_split(parts: Mapping[str, Any]) -> dict[str, Any]:
    """``parts`` plus a ``"file"`` split of every official split's records (in split order), which
    :meth:`_Matched.take` then restricts to the file's images."""
    from types import SimpleNamespace

    recs = [parts[k] for k in SPLITS if parts.get(k) is not None]
    return {
        **parts,
        FILE_SPLIT: SimpleNamespace(
            names=[n for r in recs for n in r.names],
            patients=[x for r in recs for x in r.patients],
            labels=np.concatenate([r.labels for r in recs]),
            mask=np.concatenate([r.mask for r in recs]),
        ),
    }


def _unknown_rows(path: Path, names: Sequence[str], parts: Mapping[str, Any]) -> list[str]:
    """The file's image names on none of the label file's splits (logged once as ignored)."""
    known = {n for rec in parts.values() for n in rec.names}
    unknown = [n for n in names if n not in known]
    if unknown:
        log.warning(
            "%d row(s) of %s are not images of the label file's splits and are ignored (first: %s)",
            len(unknown),
            path.name,
            unknown[0],
        )
    return unknown


def _threshold_rows(
    matched: _Matched, path: Path, split: str, threshold_split: str | None
) -> tuple[str, tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """(split the thresholds are chosen on, its (P, Y, M) or None = ``split`` itself): falls back
    to ``split`` with a warning when the file has no row on ``threshold_split``."""
    th_split = threshold_split if threshold_split and threshold_split != split else split
    if th_split == split:
        return th_split, None
    th = matched.take(th_split)
    if th.names:
        return th_split, (th.probs, th.labels, th.masks)
    log.warning("%s has no row on the %s split: choosing thresholds on %s itself", path.name, th_split, split)
    return split, None


def _summary(matched: _Matched, ev: _Rows, split: str, label_names: Sequence[str]) -> dict[str, Any]:
    """The report's data summary on ``split``: per-finding prevalence among known labels and the
    number of distinct patients of the file's rows."""
    Y, M = ev.labels, ev.masks
    rec = matched.parts[split]
    return {
        "prevalence": {
            split: {
                n: float(Y[M[:, c] > 0.5, c].mean()) if (M[:, c] > 0.5).any() else None
                for c, n in enumerate(label_names)
            }
        },
        "patients": {split: len({rec.patients[i] for i, n in enumerate(rec.names) if n in matched.row_of})},
    }


def _extra(path: Path, names: Sequence[str], unknown: Sequence[str], info: dict[str, Any]) -> dict[str, Any]:
    return {
        "predictions_file": str(path),
        "rows": len(names),
        "rows_not_in_label_file": len(unknown),
        "data_manifest_hash": info["label_sha256"],
        "tta": False,
    }
