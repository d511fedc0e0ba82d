"""Evaluation: metric functions against references, localisation geometry, and the full job
(report, plots, thresholds written back) on a small phantom data root."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from medxray.cam import class_activation_maps
from medxray.evaluation.localisation import cam_to_boxes, iobb, localise_one
from medxray.evaluation.metrics import (
    auroc_per_class,
    bootstrap_auroc,
    calibration,
    operating_points,
    sens_spec_at,
    weighted_auroc,
)
from medxray.evaluation.run import ten_crop

# ---- metrics ------------------------------------------------------------------------------


def test_auroc_matches_sklearn_with_ties_masks_and_weights():
    rng = np.random.default_rng(0)
    n = 300
    y = (rng.random((n, 3)) < 0.3).astype(np.float32)
    p = np.round(np.clip(y * 0.3 + rng.random((n, 3)) * 0.7, 0, 1), 2)  # rounding makes ties
    m = (rng.random((n, 3)) > 0.1).astype(np.float32)
    ours = auroc_per_class(p, y, m)
    for c in range(3):
        k = m[:, c] == 1
        assert ours[c] == pytest.approx(roc_auc_score(y[k, c], p[k, c]), abs=1e-12)
    # integer weights == repeating samples
    w = rng.integers(0, 4, n)
    rep = np.repeat(np.arange(n), w)
    assert weighted_auroc(p[:, 0], y[:, 0], w[None])[0] == pytest.approx(roc_auc_score(y[rep, 0], p[rep, 0]))
    # undefined when a class has no positives
    assert np.isnan(auroc_per_class(p, np.zeros_like(y))[0])


def test_bootstrap_interval_brackets_the_estimate_and_is_reproducible():
    rng = np.random.default_rng(1)
    n = 400
    y = (rng.random((n, 2)) < 0.4).astype(np.float32)
    p = np.clip(y * 0.25 + rng.random((n, 2)) * 0.75, 0, 1)
    m = np.ones_like(y)
    b1 = bootstrap_auroc(p, y, m, n_boot=300, seed=3)
    b2 = bootstrap_auroc(p, y, m, n_boot=300, seed=3)
    assert b1 == b2
    est = auroc_per_class(p, y, m)
    for c in range(2):
        lo, hi = b1["per_class"][c]
        assert lo < est[c] < hi and 0.02 < hi - lo < 0.2
    lo, hi = b1["mean"]
    assert lo < np.mean(est) < hi
    # a quarter of the data gives a wider interval
    small = bootstrap_auroc(p[:100], y[:100], m[:100], n_boot=300, seed=3)
    assert np.diff(small["per_class"][0]) > np.diff(b1["per_class"][0])


def test_operating_points_youden_and_90_specificity():
    rng = np.random.default_rng(2)
    n = 500
    y = (rng.random((n, 1)) < 0.3).astype(np.float32)
    p = np.clip(y * 0.3 + rng.random((n, 1)) * 0.7, 0, 1)
    m = np.ones_like(y)
    ops = operating_points(p, y, m, ["F"])["F"]
    t = ops["youden"]["threshold"]
    sens, spec = sens_spec_at(p, y, m, [t])[0]
    assert sens == pytest.approx(ops["youden"]["sensitivity"]) and spec == pytest.approx(ops["youden"]["specificity"])
    # no other threshold has a larger J
    grid = [sens_spec_at(p, y, m, [v])[0] for v in np.unique(p[:, 0])]
    assert sens + spec - 1 == pytest.approx(max(s + sp - 1 for s, sp in grid))
    s90 = ops["spec90"]
    sens90, spec90 = sens_spec_at(p, y, m, [s90["threshold"]])[0]
    assert spec90 >= 0.9 and sens90 == pytest.approx(s90["sensitivity"])
    assert operating_points(p, np.zeros_like(y), m, ["F"]) == {"F": {}}


def test_calibration_error():
    rng = np.random.default_rng(4)
    p = rng.random((20000, 1))
    y_cal = (rng.random((20000, 1)) < p).astype(np.float32)
    m = np.ones_like(p)
    assert calibration(p, y_cal, m)["ece"] < 0.02
    y_over = (rng.random((20000, 1)) < 0.5).astype(np.float32)  # probabilities say nothing
    assert calibration(p, y_over, m)["ece"] > 0.2
    # hand-computed: bins [0,.5) and [.5,1] with 2 bins
    c = calibration(
        np.array([[0.2], [0.2], [0.8], [0.8]]), np.array([[0], [1], [1], [1]], dtype=float), np.ones((4, 1)), n_bins=2
    )
    assert c["ece"] == pytest.approx(0.5 * abs(0.5 - 0.2) + 0.5 * abs(1.0 - 0.8))


# ---- localisation geometry -------------------------------------------------------------------


def test_cam_boxes_iobb_and_pointing_game():
    cam = np.zeros((64, 64))
    cam[10:20, 30:50] = 1.0  # region 1
    cam[40:44, 5:9] = 0.6  # region 2, weaker
    boxes = cam_to_boxes(cam, 0.5)
    assert sorted(boxes) == sorted([(30.0, 10.0, 50.0, 20.0), (5.0, 40.0, 9.0, 44.0)])
    assert cam_to_boxes(cam, 0.7) == [(30.0, 10.0, 50.0, 20.0)]
    assert iobb((0, 0, 10, 10), (0, 0, 20, 20)) == 1.0  # predicted box inside the truth
    assert iobb((0, 0, 20, 20), (0, 0, 10, 10)) == 0.25
    assert iobb((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    hit = localise_one(cam, (28, 8, 52, 22), 0.5)
    assert hit["iobb"] == 1.0 and hit["pointing_hit"]
    miss = localise_one(cam, (0, 0, 8, 8), 0.5)
    assert miss["iobb"] == 0.0 and not miss["pointing_hit"]


def test_cam_average_is_the_logit():
    """CAM_c averaged over space plus the bias is exactly logit_c: the CAM explains the score."""
    from medxray.models import create_model

    torch.manual_seed(0)
    model = create_model("densenet_40_k12", num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
        cams = class_activation_maps(feats, model.classifier.weight, [0, 2, 3])
    assert cams.shape == (2, 3, *feats.shape[-2:])
    approx = cams.mean(dim=(2, 3)) + model.classifier.bias[[0, 2, 3]]
    assert torch.allclose(approx, logits[:, [0, 2, 3]], atol=1e-4)


def test_ten_crop():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    out = ten_crop(x, 32)
    assert out.shape == (20, 3, 32, 32)
    crops = out.reshape(2, 10, 3, 32, 32)
    assert torch.allclose(crops[:, 5], torch.flip(crops[:, 0], dims=(-1,)))  # mirror of the first crop
    assert not torch.allclose(crops[:, 0], crops[:, 3])


# ---- the job ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    from medxray.data.synthetic import synthesize

    return synthesize(tmp_path_factory.mktemp("phantom") / "root", n_images=80, seed=0, image_size=64, workers=1)


@pytest.fixture()
def random_checkpoint(tmp_path):
    """An untrained densenet121 checkpoint at 32 px: enough to exercise every part of evaluation."""
    from medxray.checkpoint import save_checkpoint
    from medxray.data.transforms import preprocessing_config
    from medxray.labels import CHESTXRAY14_FINDINGS
    from medxray.models import create_model

    torch.manual_seed(0)
    model = create_model("densenet121", num_classes=14)
    path = tmp_path / "best.pt"
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
            "metrics": {"val_mean_auroc": 0.5},
            "dataset": "chestxray14",
            "model_version": "test",
        },
    )
    return path


def test_evaluate_writes_report_plots_and_thresholds(phantom_root, random_checkpoint, tmp_path):
    from medxray.checkpoint import load_checkpoint
    from medxray.evaluation.run import evaluate
    from medxray.labels import CHEXNET_AUROC, WANG2017_AUROC

    out = tmp_path / "eval"
    res = evaluate(
        random_checkpoint,
        data_root=phantom_root,
        split="test",
        out_dir=out,
        n_bootstrap=50,
        precision="fp32",
        batch_size=16,
        num_workers=0,
        write_back=True,
    )
    assert res.n_images == len((out / "predictions.csv").read_text().splitlines()) - 1 > 10
    for f in ("report.md", "report.html", "roc.png", "pr.png", "reliability.png", "metrics.json", "predictions.csv"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    for png in ("roc.png", "pr.png", "reliability.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "synthetic" in md.lower()
    assert f"{CHEXNET_AUROC['Cardiomegaly']:.3f}" in md and f"{WANG2017_AUROC['Cardiomegaly']:.3f}" in md
    assert "official" in md and "test" in md
    html = (out / "report.html").read_text()
    assert "<table>" in html and 'src="roc.png"' in html
    # localisation ran on the phantom boxes
    assert res.localisation and res.localisation["overall"]["n"] > 0
    assert set(res.localisation["overall"]["iobb_accuracy"]) == {"0.1", "0.25", "0.5", "0.75", "0.9"}
    # thresholds chosen on val were written into the checkpoint
    meta = load_checkpoint(random_checkpoint).metadata
    assert meta["threshold_split"] == "val" and res.threshold_split == "val"
    assert meta["thresholds"] == res.thresholds
    assert meta["metrics"]["test_mean_auroc"] == pytest.approx(res.mean_auroc, nan_ok=True)
    assert meta["metrics"]["val_mean_auroc"] == 0.5  # earlier metrics kept
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n_images"] == res.n_images
    # localisation travels with the model (issue 9 item 4): per finding in the checkpoint, on the model card
    from medxray.labels import display_name
    from medxray.review.model_card import NOT_MEASURED, model_card

    loc = meta["localisation"]
    assert meta["cam_method"] == loc["method"] and loc["source"] == "phantom" and loc["split"] == "test"
    per = loc["per_finding"]
    assert per and all(v["n_boxes"] > 0 for v in per.values())
    assert sum(v["n_boxes"] for v in per.values()) == res.localisation["overall"]["n"]
    card = model_card(meta).localisation.set_index("finding")
    assert len(card) == 14
    for name in meta["label_names"]:
        row = card.loc[display_name(name)]
        if name in per:
            assert row["boxes"] == str(per[name]["n_boxes"]) and row["data"] == "phantom"
            assert row["pointing game"] == f"{per[name]['pointing_game']:.2f}"
            assert row["IoBB>0.25"] == f"{per[name]['iobb_accuracy']['0.25']:.2f}"
        else:  # no boxes for this finding: words, never a number
            assert row["pointing game"] == row["IoBB>0.5"] == NOT_MEASURED and row["boxes"] == "0"
    assert card.loc["Mass", "AUROC"] == (
        f"{res.auroc['Mass']:.3f}" if np.isfinite(res.auroc["Mass"]) else "not evaluated"
    )


def test_evaluate_tta_changes_scores_not_shapes(phantom_root, random_checkpoint, tmp_path):
    from medxray.evaluation.run import evaluate

    kw = dict(
        data_root=phantom_root,
        split="val",
        n_bootstrap=0,
        precision="fp32",
        batch_size=16,
        num_workers=0,
        localisation=False,
        threshold_split=None,
    )
    a = evaluate(random_checkpoint, out_dir=tmp_path / "a", **kw)
    b = evaluate(random_checkpoint, out_dir=tmp_path / "b", tta=True, **kw)
    pa = np.loadtxt(tmp_path / "a" / "predictions.csv", delimiter=",", skiprows=1, usecols=range(1, 15))
    pb = np.loadtxt(tmp_path / "b" / "predictions.csv", delimiter=",", skiprows=1, usecols=range(1, 15))
    assert pa.shape == pb.shape and not np.allclose(pa, pb)
    assert a.n_images == b.n_images


def test_medxray_evaluate_stays_the_stable_entry_point():
    """`medxray.evaluate` re-exports the evaluation package's objects (not copies of them)."""
    import medxray.evaluate as compat
    from medxray.evaluation import metrics, run

    assert compat.evaluate is run.evaluate
    assert compat.auroc_per_class is metrics.auroc_per_class
    assert all(hasattr(compat, name) for name in compat.__all__)


def test_evaluation_scores_the_very_maps_the_app_and_scorer_show(
    phantom_root, random_checkpoint, tmp_path, monkeypatch
):
    """Issue 9 item 1: the map evaluation's localisation scores for an image is, array for array,
    the map the Predictor (app, scorer, SR overlays) returns for that image file."""
    from medxray.evaluation import localisation

    seen = []
    real = localisation.compute_maps

    def spy(model, x, classes=None, method=None):
        res = real(model, x, classes, method=method)
        seen.append((x.detach().cpu().clone(), list(res.classes), res.maps.copy(), res.method))
        return res

    monkeypatch.setattr(localisation, "compute_maps", spy)
    # one intra-op thread: multi-threaded CPU convolution backward sums in a varying order (~1e-7
    # apart from run to run of the SAME call); with one thread the same call is bit-identical
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compare_evaluation_and_display_maps(phantom_root, random_checkpoint, tmp_path, seen)
    finally:
        torch.set_num_threads(threads)


def _compare_evaluation_and_display_maps(phantom_root, random_checkpoint, tmp_path, seen):
    from medxray.data import build_datasets, read_image
    from medxray.evaluation.run import evaluate
    from medxray.inference import Predictor

    evaluate(
        random_checkpoint,
        data_root=phantom_root,
        split="test",
        out_dir=tmp_path / "e",
        n_bootstrap=0,
        precision="fp32",
        batch_size=1,
        num_workers=0,
        threshold_split=None,
    )
    assert seen, "evaluation scored no map"
    pred = Predictor.from_checkpoint(random_checkpoint, device="cpu", backend="torch", precision="fp32")
    splits = build_datasets("chestxray14", phantom_root, image_size=pred.image_size, augment=False)
    files = [p for nm, p in zip(splits.test.names, splits.test.records.paths) if nm in splits.boxes]
    checked = 0
    for path in files[:6]:
        pixels, _ = read_image(path)
        img01 = pixels.astype(np.float32) / float(np.iinfo(pixels.dtype).max)
        x = pred.preprocess([img01])
        match = [s for s in seen if torch.equal(s[0].contiguous(), x)]
        assert match, f"evaluation's input for {path.name} differs from the Predictor's"
        x_eval, classes, maps_eval, method = match[0]
        assert method == pred.cam_method
        probs, maps_shown = pred.predict_with_cams([img01], classes=classes)
        np.testing.assert_array_equal(maps_shown, maps_eval)
        checked += 1
    assert checked >= 3
