"""The locked site test set: frozen once, never trained or calibrated on.

Once enough labelled patients exist (``--lock-min-patients``), ``medxray site labels`` freezes a
patient-disjoint share of them (``--lock-fraction``): their pseudonyms and image paths are listed in
``site_lock.json`` beside the labels (or ``--lock PATH``) with the SHA-256 of the two sorted lists.
From then on:

* ``site labels`` marks every image of a locked patient ``split=test`` (new images of a locked
  patient join the locked set; new patients never do) and the other patients train/val;
* ``site calibrate`` and ``finetune --dataset csv`` call :func:`check_unlocked` and refuse a
  manifest whose train/val rows hold a locked patient or image;
* ``site promote`` compares models on exactly the locked images;
* every reader verifies the hash (:func:`load_lock`): an edited lock file is refused.

Choosing the locked patients is deterministic (ordered by their keyed pseudonym, which is random
to anyone without the site secret) and stratified: patients with any positive label and those
without are locked in the same share, so the set holds positives when the site has them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from medxray.errors import ConfigError
from medxray.fileio import atomic_write_text

LOCK_FORMAT = "medxray-site-lock/1"
LOCK_NAME = "site_lock.json"


@dataclass(frozen=True)
class SiteLock:
    """The frozen set: sorted patient pseudonyms and image paths, their hash, when and how made."""

    patients: tuple[str, ...]
    images: tuple[str, ...]
    sha256: str
    created_utc: str
    fraction: float

    def holds(self, patient: str, image: str = "") -> bool:
        return patient in self._pset or (bool(image) and image in self._iset)

    @property
    def _pset(self) -> frozenset[str]:
        return frozenset(self.patients)

    @property
    def _iset(self) -> frozenset[str]:
        return frozenset(self.images)


def lock_hash(patients: Iterable[str], images: Iterable[str]) -> str:
    """SHA-256 of the sorted patient list, a separator line, and the sorted image list."""
    text = "\n".join(sorted(patients)) + "\n--\n" + "\n".join(sorted(images)) + "\n"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def default_lock_path(labels: str | os.PathLike) -> Path:
    return Path(labels).expanduser().resolve().parent / LOCK_NAME


def load_lock(path: str | os.PathLike) -> SiteLock | None:
    """The lock at ``path`` (None when there is none); :class:`ConfigError` when it was altered."""
    p = Path(path).expanduser()
    if not p.exists():
        return None
    try:
        d = json.loads(p.read_text())
        patients, images = tuple(d["patients"]), tuple(d["images"])
        stored = str(d["sha256"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(
            f"site lock {p} is damaged; restore it from backup (it cannot be recreated without "
            "letting the old test set leak into training)"
        ) from None
    if d.get("format") != LOCK_FORMAT or lock_hash(patients, images) != stored:
        raise ConfigError(
            f"site lock {p} does not match its hash: the locked test set was edited. Restore the "
            "original file; a locked set is never changed by hand"
        )
    return SiteLock(patients, images, stored, str(d.get("created_utc", "")), float(d.get("fraction", 0.0)))


def freeze(
    patient_images: Mapping[str, Sequence[str]],
    positive_patients: Iterable[str],
    path: str | os.PathLike,
    *,
    fraction: float = 0.3,
) -> SiteLock:
    """Choose and write the locked set (module docstring); refuses to overwrite an existing lock."""
    p = Path(path).expanduser()
    if p.exists():
        raise ConfigError(f"a site lock already exists at {p}; a locked set is frozen once")
    if not 0.05 <= fraction <= 0.8:
        raise ConfigError(f"--lock-fraction must be between 0.05 and 0.8, got {fraction}")
    pos = set(positive_patients)
    chosen: list[str] = []
    for group in (sorted(x for x in patient_images if x in pos), sorted(x for x in patient_images if x not in pos)):
        chosen += group[: max(1, round(fraction * len(group)))] if group else []
    images = sorted(i for pt in chosen for i in patient_images[pt])
    lock = SiteLock(
        tuple(sorted(chosen)),
        tuple(images),
        lock_hash(chosen, images),
        datetime.now(timezone.utc).isoformat(timespec="seconds"),
        float(fraction),
    )
    atomic_write_text(
        p,
        json.dumps(
            {
                "format": LOCK_FORMAT,
                "created_utc": lock.created_utc,
                "fraction": fraction,
                "n_patients": len(lock.patients),
                "n_images": len(lock.images),
                "sha256": lock.sha256,
                "patients": list(lock.patients),
                "images": list(lock.images),
            },
            indent=1,
        )
        + "\n",
    )
    return lock


def assign_splits(patients: Iterable[str], lock: SiteLock | None, *, val_fraction: float = 0.2) -> dict[str, str]:
    """patient -> "test" (locked), "val" or "train"; val is a patient-disjoint share chosen by pseudonym."""
    rest = sorted(p for p in set(patients) if not (lock and lock.holds(p)))
    n_val = int(round(val_fraction * len(rest))) if len(rest) >= 5 else 0
    val = set(sorted(rest, key=lambda p: hashlib.sha256(p.encode()).hexdigest())[:n_val])
    out = {p: ("val" if p in val else "train") for p in rest}
    if lock:
        out.update({p: "test" for p in set(patients) if lock.holds(p)})
    return out


def check_unlocked(rows: Iterable[tuple[str, str]], lock: SiteLock | None, *, what: str) -> int:
    """Refuse (:class:`ConfigError`) when any (patient, image) about to be used for ``what`` is locked.
    Returns the number of rows checked."""
    n, bad = 0, []
    for patient, image in rows:
        n += 1
        if lock is not None and lock.holds(patient, image):
            bad.append(image or patient)
    if bad:
        raise ConfigError(
            f"refusing to use the locked site test set for {what}: {len(bad)} row(s) of locked patients "
            f"or images are marked train/val (first: {Path(bad[0]).name}); re-run `medxray site labels` "
            "so locked patients are split=test, and never edit their split"
        )
    return n
