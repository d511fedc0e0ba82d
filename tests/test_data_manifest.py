"""Shipped ChestX-ray14 manifests: SHA-256 verification, counts, the official split on all 112,120 rows."""

from __future__ import annotations

import gzip
import random
import shutil

import numpy as np
import pytest
import torch

from medxray.data import manifest as mf
from medxray.data.chestxray14 import read_label_file, split_records
from medxray.data.verify import verify_manifests
from medxray.errors import ConfigError, DataError
from medxray.labels import CHESTXRAY14_FINDINGS


@pytest.fixture(scope="module")
def official():
    parts, info = split_records(None)
    return parts, info


def test_shipped_files_verify_and_counts_match_manifest_yaml():
    files = mf.shipped_files("chestxray14")
    assert set(files) == {"labels", "boxes", "train_val_list", "test_list"}
    assert all(p.suffix == ".gz" for p in files.values())
    got = verify_manifests()
    assert got == {
        "sha256": "ok",
        "images": 112120,
        "patients": 30805,
        "train_val": 86524,
        "test": 25596,
        "boxes": 984,
        "boxed_images": 880,
    }
    assert mf.manifest_spec()["findings"] == list(CHESTXRAY14_FINDINGS)


def test_modified_manifest_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "data_manifests"
    shutil.copytree(mf.manifests_root(), fake)
    monkeypatch.setattr(mf, "manifests_root", lambda: fake)
    assert mf.shipped_files()["labels"].parent == fake / "chestxray14"
    target = fake / "chestxray14" / "test_list.txt.gz"
    with gzip.open(target, "rt") as fh:
        lines = fh.read().splitlines()
    with gzip.open(target, "wt") as fh:
        fh.write("\n".join(lines[:-1]) + "\n")  # one image quietly dropped
    with pytest.raises(DataError, match="does not match the SHA-256"):
        mf.shipped_files()
    target.unlink()
    with pytest.raises(DataError, match="missing"):
        mf.shipped_files()


def test_missing_manifests_folder_is_a_clear_error(tmp_path, monkeypatch):
    import medxray

    monkeypatch.setattr(medxray, "__file__", str(tmp_path / "pkg" / "medxray" / "__init__.py"))
    with pytest.raises(DataError, match="data_manifests"):
        mf.manifests_root()


def test_official_split_counts_and_patient_disjoint(official):
    parts, info = official
    assert info["label_rows"] == 112120 and info["malformed_rows"] == 0
    assert len(parts["train"]) + len(parts["val"]) == 86524
    assert len(parts["test"]) == 25596
    pats = {k: set(v.patients) for k, v in parts.items()}
    assert not (pats["train"] & pats["val"]) and not (pats["train"] & pats["test"]) and not (pats["val"] & pats["test"])
    assert len(pats["train"] | pats["val"] | pats["test"]) == 30805
    names = [set(v.names) for v in parts.values()]
    assert sum(len(n) for n in names) == 112120 == len(set().union(*names))
    # validation = 10% of the train_val patients, prevalence close to train for every finding
    n_tv_patients = len(pats["train"]) + len(pats["val"])
    assert abs(len(pats["val"]) - 0.1 * n_tv_patients) <= 1
    prev_tr, prev_va = parts["train"].labels.mean(0), parts["val"].labels.mean(0)
    assert np.all(np.abs(prev_tr - prev_va) <= 0.1 * prev_tr + 0.001), (prev_tr, prev_va)
    assert parts["val"].labels[:, CHESTXRAY14_FINDINGS.index("Hernia")].sum() >= 10


def test_split_is_seeded_and_leaves_global_rng_alone(official):
    parts0, _ = official
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    again, _ = split_records(None, split_seed=0)
    other, _ = split_records(None, split_seed=1)
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    assert again["val"].names == parts0["val"].names
    assert set(other["val"].names) != set(parts0["val"].names)
    assert other["test"].names == parts0["test"].names  # the official test list never moves


def test_view_filter_and_max_per_patient(official):
    parts, _ = official
    pa, _ = split_records(None, view="pa")
    assert all(v == "PA" for k in pa for v in pa[k].views)
    assert sum(len(v) for v in pa.values()) == 67310
    assert set(pa["val"].patients) <= set(parts["val"].patients)  # view filter does not move patients
    one, _ = split_records(None, max_per_patient=1)
    assert sum(len(v) for v in one.values()) == 30805
    with pytest.raises(ConfigError):
        split_records(None, view="lateral")
    with pytest.raises(ConfigError):
        split_records(None, val_fraction=1.5)


def test_label_parsing_no_finding_and_malformed_rows(tmp_path, caplog):
    header = (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
    )
    rows = [
        "a_000.png,No Finding,0,1,50,M,PA,2500,2048,0.14,0.14",
        "a_001.png,Cardiomegaly|Effusion,1,1,51,M,AP,2500,2048,0.14,0.14",
        "b_000.png,Hernia,0,2,70,F,pa,2500,2048,0.14,0.14",
        "c_000.png,Flu,0,3,70,F,PA,2500,2048,0.14,0.14",  # unknown finding
        "d_000.png,No Finding|Mass,0,4,70,F,PA,2500,2048,0.14,0.14",  # contradictory
        "e_000.png,Mass,0,,70,F,PA,2500,2048,0.14,0.14",  # no patient
        "a_000.png,Mass,0,1,70,F,PA,2500,2048,0.14,0.14",  # duplicate
        "f_000.png,Mass",  # truncated
    ]
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    with caplog.at_level("WARNING"):
        t = read_label_file(path)
    assert t.names == ("a_000.png", "a_001.png", "b_000.png")
    assert t.labels[0].sum() == 0  # "No Finding" = all zeros
    assert list(np.flatnonzero(t.labels[1])) == [
        CHESTXRAY14_FINDINGS.index("Cardiomegaly"),
        CHESTXRAY14_FINDINGS.index("Effusion"),
    ]
    assert t.labels[2, CHESTXRAY14_FINDINGS.index("Hernia")] == 1
    assert t.views == ("PA", "AP", "PA")
    assert t.malformed == 5
    assert "5 malformed" in caplog.text and "line 5" in caplog.text
    bad = tmp_path / "bad.csv"
    bad.write_text("name,labels\nx.png,Mass\n")
    with pytest.raises(DataError, match="lacks the column"):
        read_label_file(bad)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00garbage\xff\xfe")
    with pytest.raises(DataError):
        read_label_file(bad)


def test_box_file_aliases_and_malformed_rows(tmp_path):
    from medxray.data.chestxray14 import read_box_file

    shipped, bad = read_box_file(mf.shipped_files()["boxes"])
    assert bad == 0 and sum(len(b) for b in shipped.values()) == 984 and len(shipped) == 880
    assert {b["finding"] for bl in shipped.values() for b in bl} == {
        "Atelectasis",
        "Cardiomegaly",
        "Effusion",
        "Infiltration",
        "Mass",
        "Nodule",
        "Pneumonia",
        "Pneumothorax",
    }
    p = tmp_path / "BBox_List_2017.csv"
    p.write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\na.png,Infiltrate,1,2,3,4\nb.png,Mass,x,2,3,4\n"
        "c.png,Flu,1,2,3,4\nd.png,Mass,1,2,0,4\n"
    )
    boxes, bad = read_box_file(p)
    assert boxes == {"a.png": [{"finding": "Infiltration", "x": 1.0, "y": 2.0, "w": 3.0, "h": 4.0}]} and bad == 3
