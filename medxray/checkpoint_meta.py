"""CheckpointMeta: the typed form of a checkpoint's ``metadata`` dict (the checkpoint format's contract).

A medxray checkpoint stores its metadata as a plain JSON-able dict (:mod:`medxray.checkpoint`; files on
disk keep that format). :class:`CheckpointMeta` is the one place that knows its keys, their types and the
default each reader used to repeat with ``.get(key, default)``: ``CheckpointMeta.from_dict(d)`` checks the
types of the known keys and keeps every unknown key in :attr:`CheckpointMeta.extra`, so
``from_dict(d).to_dict()`` gives ``d`` back (plus :data:`SCHEMA_KEY`) and a key written by a newer
medxray survives a rewrite by this one. The pattern is that of torchvision's ``Weights.meta`` and timm's
``pretrained_cfg``: a typed record next to the weights, not a dict whose keys each reader spells itself.

Who writes which key:

- ``medxray finetune`` (:func:`medxray.training.state.checkpoint_metadata`): architecture, num_classes,
  in_chans, label_names, preprocessing, thresholds (0.5 each), metrics, versions, git_commit,
  data_manifest_hash, data_provenance, dataset, pretrained, model_version, epoch, created, config;
- ``medxray evaluate`` (:func:`medxray.evaluation.run.evaluate`): thresholds, thresholds_spec90,
  thresholds_fallback, operating_points, threshold_split, metrics, cam_method, localisation;
- ``medxray ood-calibrate`` (:mod:`medxray.ood`): ood;
- site calibration (:mod:`medxray.site.calibrate`): thresholds, threshold_source, model_version,
  parent_version, site_calibration, validation_reference;
- by hand (read by the model card and the scorer): model_name, intended_use, limitations.

Schema versions: 1 is the dict every medxray so far has written (a dict without :data:`SCHEMA_KEY` is
version 1); a checkpoint declaring a newer schema is refused with a :class:`CheckpointError` saying to
upgrade medxray. Imports nothing but the standard library and :mod:`medxray.errors`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from medxray.errors import CheckpointError

META_SCHEMA_VERSION = 1
SCHEMA_KEY = "meta_schema"
DEFAULT_THRESHOLD = 0.5
"""The decision threshold of a finding the checkpoint has none for (training writes 0.5 for every finding)."""
UNVERSIONED = "unversioned"
"""What a checkpoint without ``model_version`` is called in results and reports."""

# field name -> the kind of value it holds; checked by from_dict (None is allowed for every optional key)
_KINDS: dict[str, str] = {
    "architecture": "str",
    "num_classes": "int",
    "in_chans": "int",
    "label_names": "strs",
    "preprocessing": "map",
    "thresholds": "floats",
    "thresholds_spec90": "map",
    "thresholds_fallback": "strs",
    "operating_points": "any",
    "threshold_split": "str",
    "threshold_source": "str",
    "metrics": "map",
    "versions": "map",
    "git_commit": "str",
    "data_manifest_hash": "str",
    "data_provenance": "map",
    "dataset": "str",
    "pretrained": "str",
    "model_version": "str",
    "model_name": "str",
    "parent_version": "str",
    "epoch": "int",
    "created": "str",
    "config": "map",
    "cam_method": "str",
    "localisation": "map",
    "ood": "map",
    "validation_reference": "any",
    "site_calibration": "any",
    "intended_use": "str",
    "limitations": "strs",
}


def _check(name: str, kind: str, value: Any) -> Any:
    """``value`` converted to ``kind``'s Python form, or a CheckpointError naming the key."""
    if value is None or kind == "any":
        return value
    bad = CheckpointError(
        f"checkpoint metadata {name!r} should be {_WHAT[kind]}, found {type(value).__name__} "
        f"{str(value)[:60]!r}; the checkpoint is damaged or was edited by hand: re-write it with "
        "`medxray finetune` / `medxray evaluate`"
    )
    if kind == "str":
        if not isinstance(value, str):
            raise bad
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if kind == "strs":
        if (
            isinstance(value, (str, bytes))
            or not isinstance(value, (list, tuple))
            or not all(isinstance(v, str) for v in value)
        ):
            raise bad
        return tuple(value)
    if kind == "map":
        if not isinstance(value, Mapping):
            raise bad
        return dict(value)
    if kind == "floats":
        if not isinstance(value, Mapping):
            raise bad
        try:
            return {str(k): float(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise bad from None
    raise AssertionError(kind)


_WHAT = {
    "str": "a string",
    "int": "an integer",
    "strs": "a list of strings",
    "map": "a mapping",
    "floats": "a mapping of finding name to number",
}


@dataclass(frozen=True)
class CheckpointMeta:
    """A checkpoint's metadata, typed. Build with :meth:`from_dict`; write with :meth:`to_dict`.

    Optional keys a checkpoint lacks are None (or empty); the properties below give the value every
    reader agreed on when a key is absent (:attr:`image_size`, :attr:`n_classes`, :attr:`version_label`,
    :attr:`display_name`, :meth:`threshold`). Containers are plain dicts / tuples: treat them as read-only
    and derive a changed record with :meth:`updated`.
    """

    architecture: str | None = None
    label_names: tuple[str, ...] = ()
    preprocessing: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    in_chans: int = 3
    thresholds: dict[str, float] = field(default_factory=dict)
    thresholds_spec90: dict[str, Any] | None = None
    thresholds_fallback: tuple[str, ...] = ()
    operating_points: Any = None
    threshold_split: str | None = None
    threshold_source: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    git_commit: str | None = None
    data_manifest_hash: str | None = None
    data_provenance: dict[str, Any] | None = None
    dataset: str | None = None
    pretrained: str | None = None
    model_version: str | None = None
    model_name: str | None = None
    parent_version: str | None = None
    epoch: int | None = None
    created: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    cam_method: str | None = None
    localisation: dict[str, Any] | None = None
    ood: dict[str, Any] | None = None
    validation_reference: Any = None
    site_calibration: Any = None
    intended_use: str | None = None
    limitations: tuple[str, ...] = ()
    schema_version: int = META_SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys this medxray does not know (kept as they are and written back by :meth:`to_dict`)."""
    present: frozenset[str] = field(default=frozenset(), repr=False, compare=False)
    """The known keys the source dict had (so that a key stored empty is written back)."""
    stored_none: frozenset[str] = field(default=frozenset(), repr=False, compare=False)
    """Known keys stored as None whose field defaults to an empty container (written back as None)."""

    # -- construction / serialisation ----------------------------------------------------------

    @classmethod
    def from_dict(cls, metadata: Mapping[str, Any] | CheckpointMeta) -> CheckpointMeta:
        """Typed metadata from a checkpoint's dict. Raises :class:`CheckpointError` for a key of the wrong
        type or a schema newer than :data:`META_SCHEMA_VERSION`."""
        if isinstance(metadata, CheckpointMeta):
            return metadata
        if not isinstance(metadata, Mapping):
            raise CheckpointError(f"checkpoint metadata should be a mapping, found {type(metadata).__name__}")
        schema = metadata.get(SCHEMA_KEY, 1)
        if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
            raise CheckpointError(f"checkpoint metadata {SCHEMA_KEY!r} is {schema!r}, not a schema version")
        if schema > META_SCHEMA_VERSION:
            raise CheckpointError(
                f"checkpoint metadata has schema {schema}, this medxray reads up to "
                f"{META_SCHEMA_VERSION}: upgrade medxray to use this checkpoint"
            )
        known = {k: _check(k, kind, metadata[k]) for k, kind in _KINDS.items() if k in metadata}
        given = frozenset(known)
        nones = frozenset(k for k, v in known.items() if v is None and _default(k) is not None)
        known = {k: v for k, v in known.items() if k not in nones}
        extra = {k: v for k, v in metadata.items() if k not in _KINDS and k != SCHEMA_KEY}
        return cls(**known, schema_version=schema, extra=extra, present=given, stored_none=nones)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able dict stored in the checkpoint: known keys the source had or that differ from their
        default (None stays None where it was stored), unknown keys as they came, and :data:`SCHEMA_KEY`."""
        out: dict[str, Any] = {}
        for name in _KINDS:
            value = getattr(self, name)
            if name in self.stored_none and value == _default(name):
                out[name] = None
            elif name in self.present or value != _default(name):
                out[name] = list(value) if isinstance(value, tuple) else value
        out.update(self.extra)
        out[SCHEMA_KEY] = self.schema_version
        return out

    def updated(self, changes: Mapping[str, Any]) -> "CheckpointMeta":
        """A new record with ``changes`` (metadata keys, known or not) merged in, types checked."""
        return CheckpointMeta.from_dict({**self.to_dict(), **changes})

    # -- the defaults every reader shared ----------------------------------------------------------

    @property
    def n_classes(self) -> int:
        """Outputs of the head: ``num_classes``, else the number of label names."""
        return int(self.num_classes) if self.num_classes is not None else len(self.label_names)

    @property
    def version_label(self) -> str:
        """``model_version``, or ``"unversioned"`` (results, reports, site logs)."""
        return self.model_version or UNVERSIONED

    @property
    def display_name(self) -> str:
        """``model_name``, else the architecture, else ``"unknown"`` (results.csv's ``model`` column)."""
        return self.model_name or self.architecture or "unknown"

    def threshold(self, finding: str) -> float:
        """The decision threshold of ``finding`` (:data:`DEFAULT_THRESHOLD` when the checkpoint has none)."""
        return float(self.thresholds.get(finding, DEFAULT_THRESHOLD))

    @property
    def training_dataset(self) -> str:
        """The dataset the model was trained on: ``dataset``, else the config's, else ``"chestxray14"``."""
        return self.dataset or self.config.get("dataset") or "chestxray14"


def _default(name: str) -> Any:
    f = _FIELDS[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[operator]


_FIELDS = {f.name: f for f in dataclasses.fields(CheckpointMeta)}
