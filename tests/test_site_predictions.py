"""Issue 22 "external predictions": `medxray evaluate --predictions` reads the column conventions real files use
(jrzech/reproduce-chexnet's preds.csv `prob_X`, display names with spaces, torchxrayvision names, an explicit
--columns mapping) and `--split file` scores exactly the images the file names, whatever their official split,
so a published per-finding table is reproduced to the last digit (checked against scikit-learn)."""

from __future__ import annotations

import contextlib
import csv
import io

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medxray.errors import DataError
from medxray.evaluation.external import finding_columns, parse_columns
from medxray.labels import CHESTXRAY14_FINDINGS, display_name

FINDINGS = list(CHESTXRAY14_FINDINGS)


def _cli(argv):
    from medxray.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def test_column_conventions():
    assert finding_columns(["Image Index", *(f"prob_{n}" for n in FINDINGS)], FINDINGS)["Effusion"] == 1 + 2
    spaced = ["name", *(display_name(n) for n in FINDINGS)]  # "Pleural thickening"
    assert finding_columns(spaced, FINDINGS)["Pleural_Thickening"] == 1 + FINDINGS.index("Pleural_Thickening")
    txv = ["path", *(n.replace(" ", "_") for n in FINDINGS)]  # torchxrayvision's pathology names
    assert finding_columns(txv, FINDINGS)["Hernia"] == 14
    exact_first = ["name", "p_Mass", "Mass", *(n for n in FINDINGS if n != "Mass")]
    assert finding_columns(exact_first, FINDINGS)["Mass"] == 2  # the exact name beats p_Mass
    odd = ["img", *(f"score{k}" for k in range(14))]
    mapping = parse_columns(",".join(f"{n}=score{k}" for k, n in enumerate(FINDINGS)))
    assert finding_columns(odd, FINDINGS, mapping)["Nodule"] == 1 + FINDINGS.index("Nodule")
    with pytest.raises(DataError, match="--columns"):
        finding_columns(odd, FINDINGS)


def test_split_file_reproduces_a_table_on_the_files_own_images(tmp_path):
    from medxray.data.chestxray14 import split_records

    parts, _ = split_records(None)
    rng = np.random.default_rng(3)
    chosen = []  # images from train AND test: a split that is not an official one
    for s, n in (("train", 250), ("test", 250)):
        idx = np.sort(rng.choice(len(parts[s]), n, replace=False))
        rec = parts[s].subset(idx)
        chosen += list(zip(rec.names, rec.labels))
    names = [n for n, _ in chosen]
    Y = np.array([y for _, y in chosen])
    P = np.round(np.clip(Y * 0.35 + rng.random(Y.shape) * 0.65, 0, 1), 4)
    f = tmp_path / "preds.csv"  # jrzech/reproduce-chexnet's layout
    with open(f, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", *(f"prob_{n}" for n in FINDINGS)])
        for n, p in zip(names, P):
            w.writerow([n, *p])
    rc, out, err = _cli(
        ["evaluate", "--predictions", f, "--split", "file", "--out", tmp_path / "eval", "--bootstrap", 50]
    )
    assert rc == 0, err
    table = {ln.split()[0]: ln.split()[1] for ln in out.splitlines() if ln.split() and ln.split()[0] in FINDINGS}
    for c, n in enumerate(FINDINGS):
        if 0 < Y[:, c].sum() < len(Y):
            assert table[n] == f"{roc_auc_score(Y[:, c], P[:, c]):.3f}"  # the printed table, to its last digit
    assert "(500 file images" in out
    # the official test split alone sees only half of the file
    rc, out_test, _ = _cli(
        ["evaluate", "--predictions", f, "--split", "test", "--out", tmp_path / "eval_test", "--bootstrap", 50]
    )
    assert rc == 0 and "250 test images" in out_test
