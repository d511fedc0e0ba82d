"""External predictions and model comparison (issue 11 items 6 and 7): `medxray evaluate --predictions`
checked against scikit-learn; DeLong's test (fast midrank algorithm) against the definition's slow
pairwise form; `medxray evaluate --compare` on two prediction files."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from medxray.evaluation.compare import compare_arrays, delong_test, holm, paired_bootstrap_diff
from medxray.labels import CHESTXRAY14_FINDINGS

FINDINGS = list(CHESTXRAY14_FINDINGS)


def _cli(argv):
    from medxray.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def official():
    """Labels of 400 official test images and 300 val images (the seeded train_val carve-out), no images needed."""
    from medxray.data.chestxray14 import split_records

    parts, _ = split_records(None)
    rng = np.random.default_rng(0)
    pick = {s: np.sort(rng.choice(len(parts[s]), n, replace=False)) for s, n in (("test", 400), ("val", 300))}
    return {s: parts[s].subset(idx) for s, idx in pick.items()}


def _write_predictions(path, rec_by_split, *, strength, seed, style="plain"):
    rng = np.random.default_rng(seed)
    rows = []
    for rec in rec_by_split:
        p = np.clip(rec.labels * strength + rng.random(rec.labels.shape) * (1 - strength), 0, 1)
        p = np.round(p, 3)  # rounding makes ties, which AUROC must count one half
        for name, pr in zip(rec.names, p):
            rows.append([f"images_001/images/{name}" if style == "paths" else name] + list(pr))
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        cols = FINDINGS if style != "ours" else [f"p_{n}" for n in FINDINGS]
        w.writerow(["Image Index", *cols, "comment"])
        for r in rows:
            w.writerow(r + ["x"])
    return path


def test_predictions_file_scores_like_sklearn_with_thresholds_from_val(official, tmp_path):
    f = _write_predictions(
        tmp_path / "theirs.csv", [official["test"], official["val"]], strength=0.3, seed=1, style="paths"
    )
    rc, out, err = _cli(["evaluate", "--predictions", str(f), "--out", str(tmp_path / "ev"), "--bootstrap", "200"])
    assert rc == 0, err
    assert out.splitlines()[0].startswith("Coverage: 400 of 25,596 official ChestX-ray14 test images")
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n_images"] == 400 and m["threshold_split"] == "val" and m["rows"] == 700
    with open(f, newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    P = {r[0].rsplit("/", 1)[-1]: np.array([float(v) for v in r[1:15]]) for r in rows}
    for split_name, key in (("test", "auroc"),):
        rec = official[split_name]
        probs = np.stack([P[n] for n in rec.names])
        for c, name in enumerate(FINDINGS):
            y = rec.labels[:, c]
            if 0 < y.sum() < len(y):
                assert m[key][name] == pytest.approx(roc_auc_score(y, probs[:, c]), abs=1e-12)
                assert m["auprc"][name] == pytest.approx(average_precision_score(y, probs[:, c]), abs=1e-12)
                lo, hi = m["auroc_ci95"][name]
                assert lo <= m[key][name] <= hi
            else:
                assert m[key][name] is None
    # thresholds: Youden's J on the val rows, not on the test rows
    rec = official["val"]
    pv = np.stack([P[n] for n in rec.names])
    for c, name in enumerate(FINDINGS):
        y = rec.labels[:, c]
        if 0 < y.sum() < len(y):
            fpr, tpr, thr = roc_curve(y, pv[:, c])
            want = min(1.0, thr[int(np.argmax(tpr - fpr))])
            assert m["thresholds_youden"][name] == pytest.approx(want), name
        else:
            assert name in m["thresholds_fallback"]
    md = (tmp_path / "ev" / "report.md").read_text()
    assert "Predictions file" in md and "not comparable: 400 of 25,596 official test images" in md


def test_predictions_file_errors_are_one_clear_line(official, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("name,Atelectasis\n00000003_000.png,0.5\n")
    rc, _, err = _cli(["evaluate", "--predictions", str(bad), "--out", str(tmp_path / "o")])
    assert rc == 2 and "no column for 'Cardiomegaly'" in err and "Traceback" not in err
    f = _write_predictions(tmp_path / "p.csv", [official["test"]], strength=0.3, seed=1)
    text = f.read_text().splitlines()
    text[3] = text[3].replace(",", ",1.7,", 1).rsplit(",", 1)[0]
    (tmp_path / "q.csv").write_text("\n".join(text) + "\n")
    rc, _, err = _cli(["evaluate", "--predictions", str(tmp_path / "q.csv"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "line 4" in err and "not a probability" in err
    only_val = _write_predictions(tmp_path / "v.csv", [official["val"]], strength=0.3, seed=1)
    rc, _, err = _cli(["evaluate", "--predictions", str(only_val), "--out", str(tmp_path / "o")])
    assert rc == 2 and "no image of v.csv is on the test split" in err


def _delong_slow(y, a, b):
    """DeLong et al. 1988 as written: structural components from all m x n pairs (psi = 1, 1/2, 0)."""
    y = np.asarray(y) > 0.5
    v10, v01, auc = [], [], []
    for s in (a, b):
        x, z = s[y][:, None], s[~y][None, :]
        psi = (x > z) + 0.5 * (x == z)
        v10.append(psi.mean(1))
        v01.append(psi.mean(0))
        auc.append(psi.mean())
    m, n = y.sum(), (~y).sum()
    S = np.cov(np.array(v10)) / m + np.cov(np.array(v01)) / n
    var = S[0, 0] + S[1, 1] - 2 * S[0, 1]
    z = (auc[1] - auc[0]) / np.sqrt(var)
    from scipy.stats import norm

    return auc, z, 2 * norm.sf(abs(z))


def test_delong_fast_algorithm_equals_the_pairwise_definition():
    rng = np.random.default_rng(4)
    for n, prev, step in ((60, 0.3, 0.05), (250, 0.1, 0.01), (500, 0.5, 0.001)):
        y = (rng.random(n) < prev).astype(float)
        a = np.round(y * 0.4 + rng.random(n), int(-np.log10(step)))  # rounding: ties within and across classes
        b = np.round(0.6 * a + y * 0.3 + 0.4 * rng.random(n), int(-np.log10(step)))
        t = delong_test(y, a, b)
        auc, z, p = _delong_slow(y, a, b)
        assert t["auc_a"] == pytest.approx(roc_auc_score(y, a), abs=1e-12)
        assert t["auc_b"] == pytest.approx(auc[1], abs=1e-12)
        assert t["z"] == pytest.approx(z, rel=1e-9) and t["p"] == pytest.approx(p, rel=1e-9, abs=1e-15)
    same = delong_test(y, a, a)
    assert same["diff"] == 0 and same["p"] == 1.0
    assert np.isnan(delong_test(np.zeros(5), a[:5], b[:5])["p"])


def test_paired_bootstrap_and_holm():
    rng = np.random.default_rng(5)
    y = (rng.random(300) < 0.3).astype(float)
    a = y * 0.2 + rng.random(300)
    b = y * 0.6 + rng.random(300)
    lo, hi = paired_bootstrap_diff(y, a, b, n_boot=400, seed=0)
    d = roc_auc_score(y, b) - roc_auc_score(y, a)
    assert lo < d < hi and lo > 0
    assert holm([0.01, 0.04, 0.03, float("nan")]) == pytest.approx([0.03, 0.06, 0.06, float("nan")], nan_ok=True)


def test_compare_two_prediction_files_gives_a_verdict_per_finding(official, tmp_path):
    a = _write_predictions(tmp_path / "a.csv", [official["test"], official["val"]], strength=0.05, seed=2)
    b = _write_predictions(tmp_path / "b.csv", [official["test"], official["val"]], strength=0.5, seed=3, style="ours")
    rc, out, err = _cli(["evaluate", "--compare", str(a), str(b), "--out", str(tmp_path / "cmp"), "--bootstrap", "300"])
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("Coverage: 400 of 25,596")
    res = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert res["n_images"] == 400
    for name in FINDINGS:
        r = res["findings"][name]
        verdict_line = next(ln for ln in lines if ln.startswith(f"{name} "))
        if r["positives"] >= 10:
            assert r["verdict"].startswith(f"{b} better"), (name, r)
            assert r["diff_ci95"][0] > 0 and r["p_holm"] < 0.05
        if r["positives"] == 0:
            assert "not testable" in verdict_line
    assert (tmp_path / "cmp" / "A" / "report.md").is_file() and (tmp_path / "cmp" / "B" / "report.md").is_file()
    assert "DeLong" in (tmp_path / "cmp" / "comparison.md").read_text()
    # one of each is refused with one line
    rc, _, err = _cli(["evaluate", "--compare", str(a), str(tmp_path / "x.pt"), "--out", str(tmp_path / "c2")])
    assert rc == 2 and "two checkpoints or two predictions files" in err


def test_compare_arrays_equal_models_never_significant():
    rng = np.random.default_rng(6)
    y = (rng.random((200, 2)) < 0.3).astype(float)
    p = rng.random((200, 2))
    comp = compare_arrays(["x", "y"], y, np.ones_like(y), p, p.copy(), n_boot=50)
    assert all(r["verdict"].startswith("no significant difference") for r in comp.rows.values())
