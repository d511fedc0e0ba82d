"""The scorer's policy gate: what is not a frontal chest radiograph is not scored as one.

Two checks, each with an explicit policy:

* :func:`header_gate`, on what the header says (before inference): Body Part Examined (or,
  without it, the Anatomic Region Sequence) must be in the accepted list (``--accept-body-parts``,
  ``CHEST`` by default; ``any`` turns the check off): another part gives a ``skipped`` row with
  code ``not_chest``; no body part at all is scored with a ``body part not stated`` warning. The
  modality allow-list is the reader's (``modality`` refusal); a lateral View Position or View Code
  is the reader's ``lateral view`` warning; an oblique or decubitus View Position adds ``not a
  frontal view``. A missing View Position adds nothing (most archives leave it empty; the content
  check below does not need it).
* :func:`ood_verdict`, on what the image looks like to the model (after inference, no header
  needed): the Mahalanobis distance of its pooled features (:mod:`medxray.ood`) over the
  checkpoint's threshold gives an ``out of distribution`` warning (``--ood-policy warn``, the
  default) or a ``skipped`` row with code ``out_of_distribution`` (``--ood-policy skip``).

Every text and code comes from :mod:`medxray.dicom.codes` (the app and the worklist show and filter
the same strings). Must not import the engine, the run, the workers or torch.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from medxray.dicom.codes import (
    BODY_PART_MISSING_WARNING,
    NOT_CHEST,
    OUT_OF_DISTRIBUTION,
    not_chest_reason,
    not_frontal_warning,
    out_of_distribution_warning,
)
from medxray.errors import ConfigError
from medxray.scoreoptions import OOD_POLICIES  # the table, re-exported

DEFAULT_ACCEPT_BODY_PARTS: tuple[str, ...] = ("CHEST",)

# Anatomic Region Sequence codes that name the chest: SNOMED CT 51185008 (thoracic structure, CID 4031
# "Chest") and 43799004 ("Thorax"), SNOMED RT T-D3000, and their code meanings.
_CHEST_REGIONS = frozenset({"51185008", "43799004", "T-D3000", "CHEST", "THORAX", "THORACIC STRUCTURE"})
# View Position defined terms (PS3.3 C.8.11.5.1.1) that are neither frontal nor lateral.
_NOT_FRONTAL = {
    "RLO": "right lateral oblique",
    "LLO": "left lateral oblique",
    "RAO": "right anterior oblique",
    "LAO": "left anterior oblique",
    "RPO": "right posterior oblique",
    "LPO": "left posterior oblique",
    "RLD": "right lateral decubitus",
    "LLD": "left lateral decubitus",
    "OBL": "oblique",
}


def accepted_body_parts(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """``--accept-body-parts`` as an upper-case tuple; None (check off) for ``any``/``None``.

    Accepts a comma-separated string or a list. Raises :class:`ConfigError` for an empty list.
    """
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    parts = tuple(dict.fromkeys(p.strip().upper() for p in items if p.strip()))
    if any(p == "ANY" for p in parts):
        return None
    if not parts:
        raise ConfigError(
            "--accept-body-parts needs at least one body part (e.g. CHEST), or 'any' to turn the check off"
        )
    return parts


def check_ood_policy(policy: str) -> str:
    if policy not in OOD_POLICIES:
        raise ConfigError(f"--ood-policy must be one of {', '.join(OOD_POLICIES)}, got {policy!r}")
    return policy


def header_gate(meta: Mapping[str, Any], accept: tuple[str, ...] | None) -> tuple[str | None, list[str]]:
    """(skip reason ``"not_chest: ..."`` or None, warnings to add) from the reader's safe metadata."""
    warnings: list[str] = []
    if accept is not None:
        part = str(meta.get("body_part") or "").strip().upper()
        region = str(meta.get("anatomic_region") or "").strip().upper()
        if part:
            if part not in accept:
                return f"{NOT_CHEST}: {not_chest_reason(part, accept)}", []
        elif region:
            as_part = "CHEST" if region in _CHEST_REGIONS else region
            if as_part not in accept:
                return f"{NOT_CHEST}: {not_chest_reason(region, accept, 'Anatomic Region Sequence')}", []
        else:
            warnings.append(BODY_PART_MISSING_WARNING)
    view = str(meta.get("view_position") or "").strip().upper()
    if view in _NOT_FRONTAL:
        warnings.append(not_frontal_warning(view, _NOT_FRONTAL[view]))
    return None, warnings


def ood_verdict(distance: float | None, threshold: float | None, policy: str) -> tuple[str | None, str | None]:
    """(skip reason or None, warning or None) for one image's OOD distance.

    No statistics in the checkpoint (``threshold`` None) or no distance: nothing. A non-finite
    distance counts as over the threshold (a feature vector with NaN is not a normal image).
    """
    if distance is None or threshold is None:
        return None, None
    d = float(distance)
    if math.isfinite(d) and d <= threshold:
        return None, None
    text = out_of_distribution_warning(d, float(threshold))
    if policy == "skip":
        return f"{OUT_OF_DISTRIBUTION}: {text}", None
    return None, text
