"""Phantom ChestX-ray14: NIH layout, real manifest rows, every box holds its pattern."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from medxray.data.chestxray14 import read_box_file, read_label_file, resolve_files
from medxray.data.manifest import read_name_list
from medxray.data.synthetic import PATTERNS, place_pattern, render_phantom, select_rows, synthesize
from medxray.errors import DataError
from medxray.labels import CHESTXRAY14_FINDINGS


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("ph") / "root", n_images=8, seed=3, workers=2)


def test_layout_is_nih_and_rows_are_real(phantom):
    files = sorted(p.name for p in phantom.iterdir())
    assert files == [
        "BBox_List_2017.csv",
        "Data_Entry_2017_v2020.csv",
        "MEDXRAY_PHANTOM.json",
        "SYNTHETIC_DATA_README.txt",
        "images",
        "test_list.txt",
        "train_val_list.txt",
    ]
    assert json.loads((phantom / "MEDXRAY_PHANTOM.json").read_text())["synthetic"] is True
    pngs = sorted((phantom / "images").glob("*.png"))
    assert len(pngs) == 8
    for p in pngs[:3]:
        with Image.open(p) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "L", (1024, 1024))
    shipped = read_label_file(resolve_files(None)["labels"])
    real = dict(zip(shipped.names, shipped.lines))
    ours = (phantom / "Data_Entry_2017_v2020.csv").read_text().splitlines()
    assert ours[0] == shipped.header
    assert all(real[line.split(",")[0]] == line for line in ours[1:])  # verbatim real rows
    names = {line.split(",")[0] for line in ours[1:]}
    assert names == {p.name for p in pngs}
    tv, te = read_name_list(phantom / "train_val_list.txt"), read_name_list(phantom / "test_list.txt")
    assert set(tv) | set(te) == names and not set(tv) & set(te)
    real_test = set(read_name_list(resolve_files(None)["test_list"]))
    assert set(te) <= real_test and not set(tv) & real_test  # official split membership kept


def test_select_rows_whole_patients_both_splits_enough_positives():
    shipped = read_label_file(resolve_files(None)["labels"])
    tv, te = select_rows(1000, seed=0)
    assert len(tv) + len(te) == 1000 and abs(len(te) - 300) <= 15
    for rows in (tv, te):
        patients = {shipped.patients[i] for i in rows}
        every = [i for i, p in enumerate(shipped.patients) if p in patients]
        assert sorted(every) == sorted(rows)  # whole patients only
        pos = shipped.labels[rows].sum(0)
        assert pos.min() >= 0.06 * len(rows), dict(zip(CHESTXRAY14_FINDINGS, pos))
    assert select_rows(1000, seed=0) == (tv, te)


def test_boxes_hold_their_patterns_and_nothing_else_changes():
    key = (5, 17)
    bg, none = render_phantom([], key)
    assert none == []
    full, boxes = render_phantom(list(PATTERNS), key)
    assert [b["finding"] for b in boxes] == list(CHESTXRAY14_FINDINGS)
    union = np.zeros(full.shape, bool)
    for b in boxes:
        one, (box,) = render_phantom([b["finding"]], key)
        assert box == b
        diff = one != bg
        inside = np.zeros_like(diff)
        inside[box["y"] : box["y"] + box["h"], box["x"] : box["x"] + box["w"]] = True
        assert diff.any() and not (diff & ~inside).any(), b["finding"]
        # the pattern reaches all four sides of its box (the box is tight)
        ys, xs = np.nonzero(diff)
        assert ys.min() - box["y"] <= 8 and box["y"] + box["h"] - 1 - ys.max() <= 8
        assert xs.min() - box["x"] <= 8 and box["x"] + box["w"] - 1 - xs.max() <= 8
        union |= inside
    assert not ((full != bg) & ~union).any()


def test_box_file_matches_images_and_labels(phantom):
    boxes, bad = read_box_file(phantom / "BBox_List_2017.csv")
    assert bad == 0
    with open(phantom / "BBox_List_2017.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""]
    table = read_label_file(phantom / "Data_Entry_2017_v2020.csv")
    for name, lab in zip(table.names, table.labels):
        positives = [f for f, v in zip(CHESTXRAY14_FINDINGS, lab) if v]
        assert sorted(b["finding"] for b in boxes.get(name, [])) == sorted(positives)
        for b in boxes.get(name, []):
            assert 0 <= b["x"] and b["x"] + b["w"] <= 1024 and 0 <= b["y"] and b["y"] + b["h"] <= 1024
    name, blist = next(iter(boxes.items()))
    img = np.asarray(Image.open(phantom / "images" / name))
    bg, _ = render_phantom([], (3, sorted(table.names).index(name)))
    assert np.array_equal(img, render_phantom([b["finding"] for b in blist], (3, sorted(table.names).index(name)))[0])
    assert not np.array_equal(img, bg)


def test_nested_layout_rerun_and_refusal(tmp_path):
    root = synthesize(tmp_path / "n", n_images=4, seed=1, image_size=128, layout="nested", workers=1)
    assert sorted(p.name for p in (root / "images_001" / "images").glob("*.png"))
    mtime = (root / "MEDXRAY_PHANTOM.json").stat().st_mtime_ns
    assert synthesize(root, n_images=4, seed=1, image_size=128, layout="nested") == root  # finished: reused
    assert (root / "MEDXRAY_PHANTOM.json").stat().st_mtime_ns == mtime
    (root / "medxray_cache").mkdir()
    with pytest.raises(DataError, match="--overwrite"):  # other parameters: refused unless asked (issue 11)
        synthesize(root, n_images=3, seed=1, image_size=128, workers=1)
    assert len(list(root.rglob("*.png"))) == 4
    synthesize(root, n_images=3, seed=1, image_size=128, workers=1, overwrite=True)  # old images and cache go
    assert len(list(root.rglob("*.png"))) == 3 and not (root / "medxray_cache").exists()
    assert not list(root.glob("images_0*"))
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not an empty folder"):
        synthesize(other, n_images=4)


BLANK_FINDINGS = ("Cardiomegaly", "Effusion", "Mass", "Pneumothorax")


def _blank_set(n: int, seed: int, size: int = 96):
    """Phantom images with random subsets of BLANK_FINDINGS; each also blanked at each finding's box.

    Blanking fills the finding's box with the mean of a 3-pixel ring around it. Negatives are
    blanked at the box their pattern *would* have had (same key, drawn and discarded), so a
    flat rectangle at a finding's usual place is no cue by itself.
    """
    rng = np.random.default_rng(seed)
    images, labels, blanked = [], [], {f: [] for f in BLANK_FINDINGS}
    for i in range(n):
        key = (seed, i)
        present = [f for f in BLANK_FINDINGS if rng.random() < 0.4]
        img, boxes = render_phantom(present, key, size=size)
        images.append(img)
        labels.append([f in present for f in BLANK_FINDINGS])
        for f in BLANK_FINDINGS:
            box = next((b for b in boxes if b["finding"] == f), None) or place_pattern(f, key, size=size)[3]
            y0, x0, y1, x1 = box["y"], box["x"], box["y"] + box["h"], box["x"] + box["w"]
            around = img[max(y0 - 3, 0) : y1 + 3, max(x0 - 3, 0) : x1 + 3].astype(np.float64)
            inside = img[y0:y1, x0:x1].astype(np.float64)
            fill = (around.sum() - inside.sum()) / max(around.size - inside.size, 1)  # the 3-pixel ring only
            out = img.copy()
            out[y0:y1, x0:x1] = np.uint8(round(fill))
            blanked[f].append(out)
    to_x = lambda a: torch.from_numpy(np.stack(a)).float().div(255.0)[:, None]  # noqa: E731
    return to_x(images), torch.tensor(labels, dtype=torch.float32), {f: to_x(v) for f, v in blanked.items()}


def test_findings_are_drawn_only_in_their_boxes_a_model_cannot_see_them_blanked():
    """Localisation is learnable only if the box is the only cue: a small CNN trained on intact
    phantoms recognises each finding (AUROC >= 0.9) but is at chance once the box is blanked."""
    from sklearn.metrics import roc_auc_score
    from torch import nn

    torch.manual_seed(0)
    x_tr, y_tr, _ = _blank_set(480, seed=1)
    x_te, y_te, blanked = _blank_set(200, seed=2)

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    net = nn.Sequential(
        *block(1, 16),
        *block(16, 32),
        *block(32, 48),
        *block(48, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, len(BLANK_FINDINGS)),
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(5):
        perm = torch.randperm(len(x_tr))
        for j in range(0, len(perm), 32):
            idx = perm[j : j + 32]
            loss = nn.functional.binary_cross_entropy_with_logits(net(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        intact = torch.sigmoid(net(x_te)).numpy()
        gone = {f: torch.sigmoid(net(v)).numpy()[:, c] for c, (f, v) in enumerate(blanked.items())}
    for c, f in enumerate(BLANK_FINDINGS):
        auc_intact = roc_auc_score(y_te[:, c], intact[:, c])
        auc_blank = roc_auc_score(y_te[:, c], gone[f])
        assert auc_intact >= 0.9, (f, auc_intact)
        assert auc_blank <= 0.65, (f, auc_blank)  # chance is 0.5; 200 images give a standard error ~0.04


def test_cli_synth_says_synthetic_and_refuses_bad_input(tmp_path, capsys):
    from medxray.cli import main

    assert main(["-q", "data", "synth", "--out", str(tmp_path / "cli"), "--images", "3", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and len(list((tmp_path / "cli" / "images").glob("*.png"))) == 3
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--images", "1"]) == 2
    err = capsys.readouterr().err
    assert "at least 2" in err and "Traceback" not in err
