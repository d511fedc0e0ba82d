"""CheXpert and generic CSV manifests on small fixtures: uncertain and blank labels become a mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medxray.data import build_datasets
from medxray.data.chexpert import CHEXPERT_OBSERVATIONS
from medxray.errors import ConfigError, DataError

HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS]


def _png(path, value=100, size=(72, 64), bits=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full(size, value, np.uint16 if bits == 16 else np.uint8)
    arr[:10, :10] = 255 if bits == 8 else 65535
    Image.fromarray(arr).save(path)


def _chexpert(tmp_path, n_patients=12):
    root = tmp_path / "CheXpert-v1.0-small"
    rows = []
    for p in range(1, n_patients + 1):
        for view, fl, apa in (
            ("view1_frontal.jpg", "Frontal", "AP" if p % 2 else "PA"),
            ("view2_lateral.jpg", "Lateral", ""),
        ):
            rel = f"CheXpert-v1.0-small/train/patient{p:05d}/study1/{view}"
            _png(tmp_path / rel.replace(".jpg", ".png"), value=40 + p)
            rel = rel.replace(".jpg", ".png")
            labels = [""] * len(CHEXPERT_OBSERVATIONS)
            labels[CHEXPERT_OBSERVATIONS.index("Cardiomegaly")] = "1.0" if p % 3 == 0 else "0.0"
            labels[CHEXPERT_OBSERVATIONS.index("Edema")] = "-1.0" if p % 4 == 0 else ("1.0" if p % 2 else "")
            rows.append([rel, "Male", "60", fl, apa, *labels])
    (root).mkdir(parents=True, exist_ok=True)
    text = ",".join(HEADER) + "\n" + "".join(",".join(r) + "\n" for r in rows)
    text += "CheXpert-v1.0-small/train/patient99999/study1/view1_frontal.png,Male,60,Frontal,AP" + ",maybe" * 14 + "\n"
    (root / "train.csv").write_text(text)
    valid = []
    for p in (101, 102):
        rel = f"CheXpert-v1.0-small/valid/patient{p:05d}/study1/view1_frontal.png"
        _png(tmp_path / rel, value=200)
        labels = ["0.0"] * len(CHEXPERT_OBSERVATIONS)
        labels[CHEXPERT_OBSERVATIONS.index("Edema")] = "1.0"
        valid.append([rel, "Female", "50", "Frontal", "PA", *labels])
    (root / "valid.csv").write_text(",".join(HEADER) + "\n" + "".join(",".join(r) + "\n" for r in valid))
    return root


def test_chexpert_policies_mask_and_splits(tmp_path, caplog):
    root = _chexpert(tmp_path)
    edema, cardio = CHEXPERT_OBSERVATIONS.index("Edema"), CHEXPERT_OBSERVATIONS.index("Cardiomegaly")
    with caplog.at_level("WARNING"):
        s = build_datasets("chexpert", root, image_size=32, use_cache=False)
    assert "1 malformed" in caplog.text
    assert s.label_names == list(CHEXPERT_OBSERVATIONS)
    assert len(s.train) + len(s.val) == 12 and len(s.test) == 2  # laterals dropped, valid.csv = test
    assert s.summary["malformed_rows"] == 1
    pool = {n: (lab, m) for d in (s.train, s.val) for n, lab, m in zip(d.names, d.labels, d.mask)}
    lab, m = pool["train/patient00004/study1/view1_frontal.png"]
    assert m[edema] == 0 and lab[edema] == 0  # uncertain -> ignore (masked)
    lab, m = pool["train/patient00002/study1/view1_frontal.png"]
    assert m[edema] == 1 and lab[edema] == 0  # blank -> 0 (not mentioned)
    lab, m = pool["train/patient00003/study1/view1_frontal.png"]
    assert lab[cardio] == 1 and m[cardio] == 1 and lab[edema] == 1
    item = s.train[0]
    assert item["image"].shape == (3, 32, 32) and item["orig_size"] == (72, 64)
    assert not set(s.train.records.patients) & set(s.val.records.patients)

    ones = build_datasets("chexpert", root, image_size=32, use_cache=False, uncertain="ones", blank="ignore")
    pool = {n: (lab, m) for d in (ones.train, ones.val) for n, lab, m in zip(d.names, d.labels, d.mask)}
    lab, m = pool["train/patient00004/study1/view1_frontal.png"]
    assert lab[edema] == 1 and m[edema] == 1
    lab, m = pool["train/patient00002/study1/view1_frontal.png"]
    assert m[edema] == 0
    assert ones.manifest_hash != s.manifest_hash
    zeros = build_datasets("chexpert", root, image_size=32, use_cache=False, uncertain="zeros", labels="competition")
    assert zeros.label_names == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    pool = {n: (lab, m) for d in (zeros.train, zeros.val) for n, lab, m in zip(d.names, d.labels, d.mask)}
    lab, m = pool["train/patient00004/study1/view1_frontal.png"]
    assert lab[3] == 0 and m[3] == 1
    pa = build_datasets("chexpert", root, image_size=32, use_cache=False, view="PA")
    assert all(v == "PA" for d in (pa.train, pa.val, pa.test) for v in d.records.views)
    with pytest.raises(ConfigError):
        build_datasets("chexpert", root, uncertain="maybe")
    with pytest.raises(DataError, match="train.csv"):
        build_datasets("chexpert", tmp_path)


def _manifest(tmp_path, with_split=True):
    rows = (
        ["image,patient_id,split,view,Effusion,Pneumothorax"]
        if with_split
        else ["image,patient_id,Effusion,Pneumothorax"]
    )
    for i in range(20):
        rel = f"scans/p{i // 2}/img{i}.png"
        _png(tmp_path / rel, value=30 + i, bits=16 if i % 5 == 0 else 8)
        split = "test" if i >= 16 else "train"
        eff = "" if i % 3 == 0 else str(i % 2)
        ptx = "-1" if i % 7 == 0 else "0"
        rows.append(
            f"{rel},P{i // 2},{split},{'PA' if i % 2 else 'AP'},{eff},{ptx}"
            if with_split
            else f"{rel},P{i // 2},{eff},{ptx}"
        )
    rows.append("scans/x.png,P99,train,PA,2,0")  # bad label value
    rows.append(",P98,train,PA,1,0")  # no image
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_csv_manifest_blank_is_unknown_and_split_column(tmp_path, caplog):
    root = _manifest(tmp_path)
    with caplog.at_level("WARNING"):
        s = build_datasets("csv", root, image_size=32, use_cache=False)
    assert "2 malformed" in caplog.text and s.summary["malformed_rows"] == 2
    assert s.label_names == ["Effusion", "Pneumothorax"]
    assert len(s.test) == 4 and len(s.train) + len(s.val) == 16 and len(s.val) >= 1
    every = {n: (lab, m) for d in (s.train, s.val, s.test) for n, lab, m in zip(d.names, d.labels, d.mask)}
    lab, m = every["scans/p0/img0.png"]
    assert m.tolist() == [0.0, 0.0]  # blank effusion and -1 pneumothorax -> unknown
    lab, m = every["scans/p0/img1.png"]
    assert lab.tolist() == [1.0, 0.0] and m.tolist() == [1.0, 1.0]
    assert s.summary["unknown_labels"]["test"] >= 1
    batch = torch.utils.data.default_collate([s.train[i] for i in range(2)])
    assert batch["mask"].shape == (2, 2)
    # 16-bit files load too
    i16 = [i for i, n in enumerate(s.train.names) if n.endswith(("img0.png", "img5.png", "img10.png"))]
    assert i16 and s.train[i16[0]]["image"].shape == (3, 32, 32)


def test_csv_manifest_without_split_and_bad_input(tmp_path):
    root = _manifest(tmp_path, with_split=False)
    s = build_datasets("csv", root / "manifest.csv", image_size=32, use_cache=False, val_fraction=0.25)
    assert s.test is None and len(s.train) + len(s.val) == 20
    assert not set(s.train.records.patients) & set(s.val.records.patients)
    (root / "scans" / "p3" / "img7.png").unlink()
    with pytest.raises(DataError, match="1 of .* missing"):
        build_datasets("csv", root, image_size=32, use_cache=False)
    dropped = build_datasets("csv", root, image_size=32, use_cache=False, allow_missing=True)
    assert dropped.summary["missing_dropped"] == 1
    (root / "leak.csv").write_text(
        "image,patient_id,split,Effusion\nscans/p0/img0.png,P0,train,1\n"
        "scans/p0/img1.png,P0,test,0\nscans/p1/img2.png,P1,train,0\n"
    )
    with pytest.raises(DataError, match="leak"):
        build_datasets("csv", root, csv_path="leak.csv", use_cache=False)
    (root / "nopatient.csv").write_text("image,Effusion\nscans/p0/img0.png,1\n")
    with pytest.raises(DataError, match="patient_id"):
        build_datasets("csv", root, csv_path="nopatient.csv")
    with pytest.raises(DataError, match="not found"):
        build_datasets("csv", root, csv_path="absent.csv")
