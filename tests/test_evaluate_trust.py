"""Evaluation you can trust (issue 11 items 1, 2, 4): the report states its coverage of the official
test list first and labels the published columns "not comparable" below 100 %; evaluation runs in
fp32 by default and predictions.csv reproduces the reported AUROCs exactly; fallback thresholds are
flagged in the checkpoint, the report and the app's model card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medxray.evaluation.assess import coverage_note, official_test_coverage, reference_label
from medxray.evaluation.metrics import auroc_per_class


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    from medxray.data.synthetic import synthesize

    return synthesize(tmp_path_factory.mktemp("phantom") / "root", n_images=80, seed=0, image_size=64, workers=1)


def _checkpoint(path):
    from medxray.checkpoint import save_checkpoint
    from medxray.data.transforms import preprocessing_config
    from medxray.labels import CHESTXRAY14_FINDINGS
    from medxray.models import create_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("densenet121", num_classes=14)
        with torch.no_grad():  # spread the logits so bf16 rounding would show in the probabilities
            model.classifier.weight.mul_(8.0)
    save_checkpoint(
        path,
        model.state_dict(),
        {
            "architecture": "densenet121",
            "num_classes": 14,
            "in_chans": 3,
            "label_names": list(CHESTXRAY14_FINDINGS),
            "preprocessing": preprocessing_config(32),
            "thresholds": {n: 0.5 for n in CHESTXRAY14_FINDINGS},
            "dataset": "chestxray14",
            "model_version": "test",
        },
    )
    return path


@pytest.fixture(scope="module")
def evaluated(phantom_root, tmp_path_factory):
    """One default evaluation (CLI, so its summary is checked too) of a random checkpoint on the phantom's
    test split."""
    from medxray.cli import main

    d = tmp_path_factory.mktemp("eval")
    ckpt = _checkpoint(d / "best.pt")
    out = d / "eval"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(
            [
                "evaluate",
                "--checkpoint",
                str(ckpt),
                "--data-root",
                str(phantom_root),
                "--out",
                str(out),
                "--bootstrap",
                "50",
                "--num-workers",
                "0",
                "--batch-size",
                "16",
                "--no-localisation",
            ]
        )
    assert rc == 0
    return {
        "ckpt": ckpt,
        "out": out,
        "stdout": buf.getvalue(),
        "metrics": json.loads((out / "metrics.json").read_text()),
    }


def test_partial_test_list_is_stated_first_and_references_labelled_not_comparable(evaluated):
    m = evaluated["metrics"]
    n = m["n_images"]
    assert 0 < n < 100 and m["coverage"]["evaluated"] == n and m["coverage"]["official_test_images"] == 25596
    label = f"not comparable: {n:,} of 25,596 official test images"
    md = (evaluated["out"] / "report.md").read_text().splitlines()
    first = [ln for ln in md if ln.strip()][1]  # the line right after the title
    assert f"{n:,} of 25,596 official ChestX-ray14 test images" in first and "NOT comparable" in first
    header = next(ln for ln in md if ln.startswith("| Finding | AUROC"))
    assert f"CheXNet 2017 ({label})" in header and f"Wang et al. 2017 ({label})" in header
    assert "Wang et al.'s numbers are on that same" not in "\n".join(md)
    html = (evaluated["out"] / "report.html").read_text()
    body = html[html.index("<body>") :]
    assert body.index("25,596 official ChestX-ray14 test images") < body.index("<table>")
    assert html.count(label) == 2
    assert evaluated["stdout"].splitlines()[0].startswith(f"Coverage: {n:,} of 25,596 official")


def test_full_official_test_list_is_called_comparable():
    from medxray.data.manifest import read_name_list, shipped_files

    names = read_name_list(shipped_files("chestxray14")["test_list"])
    full = official_test_coverage(names + ["00000001_000.png"], "chestxray14")  # a train_val image does not count
    assert full["complete"] and full["evaluated"] == 25596
    assert reference_label(full, "test") is None and "all 25,596" in coverage_note(full, "test", 25597)
    part = official_test_coverage(names[:75], "chestxray14")
    assert reference_label(part, "test") == "not comparable: 75 of 25,596 official test images"
    assert reference_label(full, "val") is not None  # a val split is never comparable with test-set numbers
    assert official_test_coverage(names, "chexpert") is None


def test_fp32_by_default_and_predictions_csv_reproduces_the_reported_auroc(evaluated):
    m = evaluated["metrics"]
    assert m["precision"] == "fp32"
    assert "precision of the probabilities: **fp32**" in (evaluated["out"] / "report.md").read_text()
    path = evaluated["out"] / "predictions.csv"
    header = path.read_text().splitlines()[0].split(",")
    names = [h[2:] for h in header if h.startswith("p_")]
    c = len(names)
    probs = np.loadtxt(path, delimiter=",", skiprows=1, usecols=range(1, 1 + c), dtype=np.float32)
    raw = np.genfromtxt(path, delimiter=",", skip_header=1, usecols=range(1 + c, 1 + 2 * c))
    mask = np.isfinite(raw).astype(np.float32)
    again = auroc_per_class(probs, np.nan_to_num(raw), mask)
    for name, a in zip(names, again):
        want = m["auroc"][name]
        assert (a == want) or (np.isnan(a) and want is None), name  # exact, not approximately
    # fp32 with 9 significant digits: (almost) every probability distinct, unlike bf16 or 6 decimals
    assert len(np.unique(probs)) > 0.9 * probs.size


def test_bf16_is_an_option_and_the_report_names_it(phantom_root, tmp_path):
    from medxray.evaluation.run import evaluate

    ckpt = _checkpoint(tmp_path / "c.pt")
    kw = dict(
        data_root=phantom_root,
        split="val",
        n_bootstrap=0,
        batch_size=16,
        num_workers=0,
        localisation=False,
        threshold_split=None,
    )
    r16 = evaluate(ckpt, out_dir=tmp_path / "bf16", precision="bf16", **kw)
    assert r16.precision == "bf16" and "**bf16**" in r16.report_md.read_text()
    p16 = np.loadtxt(tmp_path / "bf16" / "predictions.csv", delimiter=",", skiprows=1, usecols=range(1, 15))
    r32 = evaluate(ckpt, out_dir=tmp_path / "fp32", **kw)
    p32 = np.loadtxt(tmp_path / "fp32" / "predictions.csv", delimiter=",", skiprows=1, usecols=range(1, 15))
    assert r32.precision == "fp32"
    # bf16 keeps ~3 significant digits: fewer distinct probabilities than fp32 on the same images
    assert len(np.unique(p16)) < len(np.unique(p32))


def test_fallback_thresholds_are_flagged_in_checkpoint_report_and_model_card(evaluated, phantom_root):
    from medxray.checkpoint import load_checkpoint
    from medxray.data import build_datasets
    from medxray.review.model_card import model_card

    val = build_datasets("chestxray14", phantom_root, image_size=32, augment=False).val
    y, mk = val.records.labels, val.records.mask
    names = list(load_checkpoint(evaluated["ckpt"]).label_names)
    undecidable = [n for c, n in enumerate(names) if not 0 < y[mk[:, c] > 0, c].sum() < (mk[:, c] > 0).sum()]
    assert undecidable, "the 80-image phantom's val split should lack some finding (e.g. Hernia)"
    meta = load_checkpoint(evaluated["ckpt"]).metadata
    assert meta["thresholds_fallback"] == undecidable
    assert all(meta["thresholds"][n] == 0.5 for n in undecidable)
    assert evaluated["metrics"]["thresholds_fallback"] == undecidable
    md = (evaluated["out"] / "report.md").read_text()
    assert f"Fallback thresholds (0.5, not chosen on data): {', '.join(undecidable)}" in md
    assert f"| {undecidable[0]} | 0.500 (fallback) |" in md
    card = model_card(meta)
    how = dict(zip(card.thresholds["finding"], card.thresholds["how chosen"]))
    assert how[undecidable[0]].startswith("fallback 0.5")
    chosen = next(n for n in names if n not in undecidable)
    assert "Youden" in how[chosen]
    assert "fallback thresholds" in evaluated["stdout"]


def test_compare_two_checkpoints_on_the_same_images(phantom_root, evaluated, tmp_path):
    """`--compare A.pt B.pt`: both scored on the same images, neither checkpoint changed, a verdict per finding."""
    import contextlib
    import io

    from medxray.checkpoint import load_checkpoint
    from medxray.cli import main

    a = evaluated["ckpt"]
    b = tmp_path / "b.pt"
    b.write_bytes(a.read_bytes())  # the same model under another name: never significantly different
    before = load_checkpoint(a).metadata
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(
            [
                "evaluate",
                "--compare",
                str(a),
                str(b),
                "--data-root",
                str(phantom_root),
                "--out",
                str(tmp_path / "cmp"),
                "--bootstrap",
                "20",
                "--num-workers",
                "0",
                "--batch-size",
                "16",
                "--threshold-split",
                "same",
            ]
        )
    assert rc == 0
    res = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert res["n_images"] == evaluated["metrics"]["n_images"]
    for r in res["findings"].values():
        assert r["diff"] in (0.0, None) and (
            r["verdict"].startswith("no significant") or "not testable" in r["verdict"]
        )
    assert load_checkpoint(a).metadata == before
    assert sum(ln.startswith(n + " ") for ln in buf.getvalue().splitlines() for n in res["findings"]) == 14
