"""Typed boundaries: the decode/post worker messages (medxray.scoring.messages) and Predictor.run's Prediction.

The bug kind these guard against: the workers used to hand the engine dicts whose keys were agreed
by convention only, so a renamed key gave an empty results.csv column instead of an error.
"""

from __future__ import annotations

import csv
import dataclasses
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

from medxray.errors import ConfigError  # noqa: E402
from medxray.scoring.messages import DecodedImage, DecodeFailure, PostResult, PostTask, SRRequest  # noqa: E402
from medxray.scoring.workers import decode_job  # noqa: E402

SIZE = 64
FAST = dict(backend="torch", precision="fp32", batch_size=4, workers=1, progress=False, accept_body_parts="any")
MARKS = dict(window=(123.5, 456.5), warnings=("marker_warning",), is_lateral=True)


def dict_decode(path, *args, **kwargs):  # runs in a spawned worker: the old untyped message
    res = decode_job(path, *args, **kwargs)
    assert isinstance(res, DecodedImage)
    return {"status": "ok", "meta": dict(res.meta), "x": res.x, "warnings": list(res.warnings), "display": None}


def marked_decode(path, *args, **kwargs):  # runs in a spawned worker: distinctive values in every field
    res = decode_job(path, *args, **kwargs)
    assert isinstance(res, DecodedImage)
    return dataclasses.replace(res, meta={**res.meta, "view_position": "MARKVP"}, **MARKS)


def _decoded() -> DecodedImage:
    res = decode_job(get_testdata_file("RG1_UNCR.dcm"), SIZE, None, None, 256)
    assert isinstance(res, DecodedImage)
    return res


def test_worker_messages_are_frozen_and_pickle_whole():
    img = _decoded()
    back = pickle.loads(pickle.dumps(img))
    assert isinstance(back, DecodedImage) and back.display is not None and img.display is not None
    np.testing.assert_array_equal(back.x, img.x)
    np.testing.assert_array_equal(back.display, img.display)
    assert (back.meta, back.window, back.warnings, back.is_lateral) == (img.meta, img.window, img.warnings, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        img.warnings = ()  # type: ignore[misc]
    sr = SRRequest({"modality": "CR"}, ("Effusion",), (0.7,), ("Effusion",), "m", "v", {"Effusion": 0.5})
    task = PostTask(
        out="o",
        stem="s",
        classes=("Effusion",),
        class_probs=(0.7,),
        cams=np.zeros((1, 4, 4)),
        display=img.display,
        sr=sr,
    )
    for msg in (DecodeFailure("not_dicom: x"), PostResult("cams/s", "sr/s.dcm", "", ()), task):
        assert pickle.loads(pickle.dumps(msg)).__dict__.keys() == msg.__dict__.keys()
    assert sr.keywords()["probabilities"] == [0.7] and img.with_warnings(["w"]).warnings == (*img.warnings, "w")


def test_a_missing_renamed_or_misshapen_field_fails_where_the_message_is_built():
    img = _decoded()
    fields = {f.name: getattr(img, f.name) for f in dataclasses.fields(img)}
    with pytest.raises(TypeError, match="warnings"):
        DecodedImage(**{k: v for k, v in fields.items() if k != "warnings"})
    renamed = {("warning" if k == "warnings" else k): v for k, v in fields.items()}
    with pytest.raises(TypeError, match="warning"):
        DecodedImage(**renamed)
    with pytest.raises(AttributeError):
        img.warning  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(TypeError, match=r"\(3, S, S\) float32"):
        DecodedImage(**{**fields, "x": img.x[0]})
    with pytest.raises(TypeError, match="uint8"):
        DecodedImage(**{**fields, "display": img.x[0]})
    with pytest.raises(TypeError, match="strings"):
        DecodedImage(**{**fields, "warnings": "one warning, not a sequence of them"})
    with pytest.raises(ValueError, match="reason"):
        DecodeFailure("")
    with pytest.raises(ValueError, match="cams and display"):
        PostTask(out="o", stem="s", classes=("Effusion",), class_probs=(0.7,))
    with pytest.raises(ValueError, match=r"\(2, S, S\)"):
        PostTask(
            out="o", stem="s", classes=("A", "B"), class_probs=(0.1, 0.2), cams=np.zeros((1, 4, 4)), display=img.display
        )
    with pytest.raises(ValueError, match="probabilities"):
        SRRequest({}, ("A", "B"), (0.1,), (), "m", "v", {})


def _one_file(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(get_testdata_file("RG1_UNCR.dcm"), src / "rg1.dcm")
    return src


def test_engine_refuses_an_untyped_decode_result(scoring_checkpoint, tmp_path):
    """A decode step handing the engine the old dict is a TypeError that stops the run, not a row with
    empty columns."""
    from medxray.scoring import ScoreConfig, score_directory

    cfg = ScoreConfig(
        _one_file(tmp_path), scoring_checkpoint, tmp_path / "out", cams="none", decode_fn=dict_decode, **FAST
    )
    with pytest.raises(TypeError, match="DecodedImage or DecodeFailure"):
        score_directory(cfg)


def test_every_decoded_field_reaches_its_results_column(scoring_checkpoint, tmp_path):
    """Distinctive values in every field of DecodedImage appear in the row: no field is dropped on the
    way from the worker to results.csv (window, warnings, lateral flag, header metadata)."""
    from medxray.scoring import ScoreConfig, score_directory

    out = tmp_path / "out"
    cfg = ScoreConfig(_one_file(tmp_path), scoring_checkpoint, out, cams="none", decode_fn=marked_decode, **FAST)
    assert score_directory(cfg).scored == 1
    with open(out / "results.csv", newline="", encoding="utf-8") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["status"] == "ok", row
    assert (row["window_center"], row["window_width"]) == ("123.5", "456.5")
    assert row["warnings"] == "marker_warning" and row["is_lateral"] in ("True", "true", "1")
    assert row["view_position"] == "MARKVP" and (row["rows"], row["columns"]) == ("1955", "1841")
    assert row["sop_instance_uid"] == str(pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")).SOPInstanceUID)


@pytest.fixture(scope="module")
def predictor(scoring_checkpoint):
    from medxray.inference import Predictor

    return Predictor.from_checkpoint(scoring_checkpoint, device="cpu", backend="torch", precision="fp32", verify=False)


def test_run_returns_one_prediction_and_the_old_methods_are_its_wrappers(predictor):
    from medxray.inference import Prediction

    rng = np.random.default_rng(0)
    x = predictor.preprocess([rng.random((96, 80), dtype=np.float32) for _ in range(3)])
    plain = predictor.run(x)
    assert isinstance(plain, Prediction) and len(plain) == 3
    assert plain.probabilities.shape == (3, len(predictor.label_names)) and plain.probabilities.dtype == np.float32
    assert plain.ood is None and plain.maps is None and plain.map_classes == () and plain.map_method is None
    np.testing.assert_array_equal(predictor.predict_tensor(x), plain.probabilities)
    probs, dist = predictor.predict_tensor(x, with_ood=True)
    assert dist is None  # this checkpoint has no OOD statistics
    np.testing.assert_array_equal(probs, plain.probabilities)

    eff = predictor.label_names.index("Effusion")
    mapped = predictor.run(x, maps=["Effusion", 0], ood=True)
    assert mapped.map_classes == (eff, 0) and mapped.map_method == predictor.cam_method
    assert mapped.maps is not None and mapped.maps.shape == (3, 2, predictor.image_size, predictor.image_size)
    p2, m2 = predictor.predict_tensor_with_cams(x, ["Effusion", 0])
    np.testing.assert_array_equal(m2, mapped.maps)
    np.testing.assert_allclose(p2, plain.probabilities, atol=1e-5)
    np.testing.assert_array_equal(predictor.maps_tensor(x, ["Effusion", 0]), mapped.maps)
    wanted = np.array([[True, False], [False, False], [False, True]])
    some = predictor.run(x, maps=["Effusion", 0], wanted=wanted)
    assert some.maps is not None and not some.maps[~wanted].any()
    np.testing.assert_array_equal(some.maps[wanted], mapped.maps[wanted])
    assert predictor.run(x[:1], maps=True).map_classes == tuple(range(len(predictor.label_names)))
    assert predictor.run(x[:1], maps="Effusion").map_classes == (eff,)
    with pytest.raises(ConfigError, match="wanted"):
        predictor.run(x, wanted=wanted)
    with pytest.raises(ConfigError, match="unknown finding"):
        predictor.run(x, maps=["Not a finding"])
    with pytest.raises(ValueError, match="maps"):
        Prediction(plain.probabilities, maps=np.zeros((3, 1, 4, 4), np.float32))
    with pytest.raises(ValueError, match="ood"):
        Prediction(plain.probabilities, ood=np.zeros(2))
