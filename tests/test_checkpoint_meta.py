"""CheckpointMeta: the typed checkpoint metadata (schema version, from/to dict, unknown keys kept, old files load)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from medxray.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint, update_metadata
from medxray.checkpoint_meta import META_SCHEMA_VERSION, SCHEMA_KEY, CheckpointMeta
from medxray.errors import CheckpointError

OLD = Path(__file__).resolve().parent / "data" / "main_463112c"


def _same(a, b) -> bool:
    """Equality that treats NaN as equal to NaN (stored metrics hold NaN AUROCs)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def test_a_checkpoint_from_before_the_schema_reads_typed_and_round_trips():
    ck = load_checkpoint(OLD / "best.pt")
    assert SCHEMA_KEY not in ck.metadata  # written before CheckpointMeta existed
    m = ck.meta
    assert m.schema_version == 1 and m.architecture == "densenet_40_k12" and m.n_classes == 14
    assert m.label_names[:2] == ("Atelectasis", "Cardiomegaly") and m.preprocessing["image_size"] == 32
    assert m.threshold("Hernia") == 0.5 and m.threshold("not a finding") == 0.5
    assert m.version_label == "densenet_40_k12-oldrun-e001" and m.display_name == "densenet_40_k12"
    assert m.cam_method is None and m.ood is None and m.extra == {} and m.training_dataset == "chestxray14"
    assert math.isnan(m.metrics["val_auroc"]["Mass"])
    back = m.to_dict()
    assert back.pop(SCHEMA_KEY) == 1
    assert _same(back, ck.metadata)


def test_unknown_keys_none_values_and_empty_containers_survive_a_round_trip():
    d = {
        "architecture": "densenet121",
        "label_names": ["Mass"],
        "preprocessing": {"image_size": 64},
        "pretrained": None,
        "thresholds": None,
        "thresholds_fallback": [],
        "limitations": ["x-ray only"],
        "from_a_newer_medxray": {"nested": [1, 2]},
        "model_name": "chest-v2",
    }
    m = CheckpointMeta.from_dict(d)
    assert m.extra == {"from_a_newer_medxray": {"nested": [1, 2]}}
    assert m.thresholds == {} and m.threshold("Mass") == 0.5 and m.limitations == ("x-ray only",)
    assert m.display_name == "chest-v2" and m.version_label == "unversioned" and m.n_classes == 1
    assert m.to_dict() == {**d, SCHEMA_KEY: META_SCHEMA_VERSION}
    assert CheckpointMeta.from_dict(m.to_dict()) == m
    changed = m.updated({"thresholds": {"Mass": 0.3}, "another_new_key": 5})
    assert changed.threshold("Mass") == 0.3 and changed.extra["another_new_key"] == 5 and m.thresholds == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.architecture = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "key,value,what",
    [
        ("label_names", "Mass", "a list of strings"),
        ("thresholds", {"Mass": "high"}, "a mapping of finding name to number"),
        ("num_classes", "14", "an integer"),
        ("preprocessing", [1], "a mapping"),
        ("model_version", 3, "a string"),
    ],
)
def test_a_key_of_the_wrong_type_is_one_clear_checkpoint_error(key, value, what):
    d = {"architecture": "densenet121", "label_names": ["Mass"], "preprocessing": {}, key: value}
    with pytest.raises(CheckpointError, match=f"{key!r} should be {what}"):
        CheckpointMeta.from_dict(d)


def test_save_writes_the_schema_and_load_refuses_a_newer_one(tmp_path):
    sd = {"w": torch.zeros(2)}
    meta = {"architecture": "densenet121", "label_names": ["Mass"], "preprocessing": {}, "site_note": "kept"}
    p = save_checkpoint(tmp_path / "a.pt", sd, meta)
    ck = load_checkpoint(p)
    assert ck.metadata == {**meta, SCHEMA_KEY: META_SCHEMA_VERSION}  # the same dict format, schema added
    update_metadata(p, {"thresholds": {"Mass": 0.25}})
    ck = load_checkpoint(p)
    assert ck.meta.threshold("Mass") == 0.25 and ck.metadata["site_note"] == "kept"
    save_checkpoint(tmp_path / "typed.pt", sd, ck.meta)  # a CheckpointMeta is accepted as well
    assert load_checkpoint(tmp_path / "typed.pt").metadata == ck.metadata
    with pytest.raises(ValueError, match="needs 'preprocessing'"):
        save_checkpoint(tmp_path / "b.pt", sd, {"architecture": "densenet121", "label_names": []})
    newer = {**ck.metadata, SCHEMA_KEY: META_SCHEMA_VERSION + 1}
    torch.save({"format": "medxray-checkpoint/1", "state_dict": sd, "metadata": newer}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match=r"new.pt: .*schema 2.*upgrade medxray"):
        load_checkpoint(tmp_path / "new.pt")


def test_the_predictor_reads_the_typed_metadata(scoring_checkpoint):
    from medxray.inference import Predictor

    ck = load_checkpoint(scoring_checkpoint)
    meta = ck.meta.updated(
        {"thresholds": {"Mass": 0.2}, "model_version": None, "cam_method": "cam", "model_name": "tiny"}
    )
    p = Predictor(model_from_checkpoint(ck), meta, device="cpu", backend="torch", verify=False)
    assert p.meta == meta and p.thresholds["Mass"] == 0.2 and p.thresholds["Edema"] == 0.5
    assert p.model_version == "unversioned" and p.model_name == "tiny" and p.cam_method == "cam"
    assert p.image_size == ck.meta.preprocessing["image_size"] and p.label_names == list(ck.meta.label_names)
