"""Issue 22, the site loop's parts on realistic inputs: review verdicts -> labels (rule, several reviewers,
pseudonyms, no PHI), the locked set (freeze, tamper check, refusal), the registry (atomic current, rollback),
the monitor (PSI alert on a shifted day, Prometheus text file) and the statistics."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from site_sim import FINDINGS, write_dicom

from medxray.errors import CheckpointError, ConfigError

# ---- statistics ------------------------------------------------------------------------------


def test_wilson_and_psi_known_values():
    from medxray.site.stats import psi, psi_level, two_proportion_p, wilson

    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)  # Brown, Cai and DasGupta 2001, table values
    lo, hi = wilson(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-3)
    assert psi([10, 20, 30], [10, 20, 30]) == pytest.approx(0.0)
    assert psi([50, 50], [10, 90], pseudo=0) == pytest.approx(0.4 * math.log(5) + 0.4 * math.log(1.8), rel=1e-6)
    assert psi([50, 50, 0], [10, 90, 0]) < psi([50, 50], [10, 90], pseudo=0)  # smoothing shrinks small counts
    assert psi_level(0.3) == "alert" and psi_level(0.12) == "warn" and psi_level(0.01) == "ok"
    assert two_proportion_p(50, 100, 50, 100) == pytest.approx(1.0)
    assert two_proportion_p(90, 100, 50, 100) < 1e-6


# ---- labels ----------------------------------------------------------------------------------


def test_verdict_rule_table():
    from medxray.site.labels import verdict_label

    assert verdict_label("agree", True) == 1 and verdict_label("disagree", True) == 0
    assert verdict_label("agree", False) == 0 and verdict_label("disagree", False) == 1
    assert verdict_label("unsure", True) is None and verdict_label("unsure", False) is None


def _scored_site(tmp_path: Path, n: int = 12) -> tuple[Path, Path, list]:
    """n site DICOMs (patients of 2 images) and a results.csv/run.json as score-dicom writes them."""
    from pydicom.uid import generate_uid

    from medxray.review.store import ImageKey
    from medxray.scoring.journal import result_columns

    inp, out = tmp_path / "in", tmp_path / "out"
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    cols = result_columns(FINDINGS)
    sops = []
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for i in range(n):
            sop = generate_uid(entropy_srcs=["u", str(i)])
            study, series = generate_uid(entropy_srcs=["st", str(i)]), generate_uid(entropy_srcs=["se", str(i)])
            sops.append(ImageKey.for_image(sop, study_instance_uid=study, series_instance_uid=series))
            write_dicom(
                inp / f"s{i:03d}.dcm",
                rng.random((64, 64)).astype(np.float32),
                patient_id=f"MRN{i // 2:05d}",
                study=study,
                series=series,
                sop=sop,
            )
            probs = {f: float(rng.random()) for f in FINDINGS}
            row = {c: "" for c in cols}
            row.update(
                path=f"s{i:03d}.dcm",
                status="ok",
                sop_instance_uid=sop,
                study_instance_uid=study,
                series_instance_uid=series,
                view_position="PA",
                model="densenet121",
                model_version="v1",
                positive_findings=";".join(f for f in FINDINGS if probs[f] >= 0.5),
                **{f"p_{f}": f"{p:.4f}" for f, p in probs.items()},
            )
            w.writerow(row)
        w.writerow({**{c: "" for c in cols}, "path": "../escape.dcm", "status": "ok"})  # a path leaving the input
    (out / "run.json").write_text(json.dumps({"input": str(inp)}))
    return inp, out, sops


def test_labels_from_a_real_review_store(tmp_path):
    from medxray.data import build_datasets
    from medxray.review.store import ReviewStore
    from medxray.site.labels import make_site_labels

    inp, out, sops = _scored_site(tmp_path)
    store = ReviewStore(tmp_path / "reviews")
    th = {f: 0.5 for f in FINDINGS}
    p_hi, p_lo = {f: 0.9 for f in FINDINGS}, {f: 0.1 for f in FINDINGS}
    # image 0: two reviewers agree with a positive call of Cardiomegaly -> 1; a negative Mass call disagreed -> 1
    for who in ("dr_a", "dr_b"):
        store.save(sops[0], {"Cardiomegaly": "agree"}, reviewer=who, probabilities=p_hi, thresholds=th)
        store.save(sops[0], {"Mass": "disagree"}, reviewer=who, probabilities=p_lo, thresholds=th)
    # image 1: a 1-1 tie on Effusion -> masked, listed; an adjudicator decides Cardiomegaly
    store.save(
        sops[1], {"Effusion": "agree", "Cardiomegaly": "agree"}, reviewer="dr_a", probabilities=p_hi, thresholds=th
    )
    store.save(
        sops[1],
        {"Effusion": "disagree", "Cardiomegaly": "disagree"},
        reviewer="dr_b",
        probabilities=p_hi,
        thresholds=th,
    )
    store.save(sops[1], {"Cardiomegaly": "disagree"}, reviewer="chief", probabilities=p_hi, thresholds=th)
    # image 2: a reviewer changes their mind: only the latest verdict counts; unsure -> masked
    store.save(sops[2], {"Mass": "agree", "Effusion": "unsure"}, reviewer="dr_a", probabilities=p_hi, thresholds=th)
    store.save(sops[2], {"Mass": "disagree", "Effusion": "unsure"}, reviewer="dr_a", probabilities=p_hi, thresholds=th)
    for i in range(3, 12):  # the rest: agree with every call
        store.save(sops[i], {f: "agree" for f in FINDINGS}, reviewer="dr_a", probabilities=p_lo, thresholds=th)
    secret = tmp_path / "keys" / "site.key"
    with pytest.raises(ConfigError, match="outside"):
        make_site_labels(tmp_path / "reviews", [out], out / "labels.csv", secret=out / "site.key")
    labels_csv = tmp_path / "site" / "site_labels.csv"
    run = make_site_labels(
        tmp_path / "reviews",
        [out],
        labels_csv,
        secret=secret,
        adjudicators=["chief"],
        lock_min_patients=4,
        lock_fraction=0.34,
    )
    assert run.images == 12 and run.patients == 6 and run.unmatched_reviews == 0
    rows = {Path(r["image"]).name: r for r in csv.DictReader(open(labels_csv))}
    assert rows["s000.dcm"]["Cardiomegaly"] == "1" and rows["s000.dcm"]["Mass"] == "1"
    assert rows["s000.dcm"]["Effusion"] == ""  # nobody reviewed it: masked
    assert rows["s001.dcm"]["Effusion"] == "" and rows["s001.dcm"]["Cardiomegaly"] == "0"
    assert rows["s002.dcm"]["Mass"] == "0" and rows["s002.dcm"]["Effusion"] == ""
    assert rows["s003.dcm"]["Cardiomegaly"] == "0"
    conflicts = list(csv.DictReader(open(run.files["conflicts"])))
    assert {(Path(c["image"]).name, c["finding"], c["resolution"]) for c in conflicts} == {
        ("s001.dcm", "Effusion", "tie: masked"),
        ("s001.dcm", "Cardiomegaly", "adjudicated by the latest adjudicator review"),
    }
    # patient-disjoint pseudonyms: two images per patient share one, and no output carries the MRN or the name
    assert rows["s000.dcm"]["patient_id"] == rows["s001.dcm"]["patient_id"] != rows["s002.dcm"]["patient_id"]
    for f in [labels_csv, *run.files.values(), labels_csv.parent / "site_lock.json"]:
        text = Path(f).read_text()
        assert "MRN" not in text and "Site^Patient" not in text and "19600101" not in text
    # the locked set was frozen (6 patients >= 4) and its patients are split=test
    lock = json.loads((labels_csv.parent / "site_lock.json").read_text())
    assert lock["n_patients"] in (2, 3) and lock["n_images"] == 2 * lock["n_patients"]  # ~34% of each stratum
    assert {r["split"] for r in rows.values() if r["patient_id"] in lock["patients"]} == {"test"}
    assert all(r["split"] in ("train", "val") for r in rows.values() if r["patient_id"] not in lock["patients"])
    # the same secret gives the same pseudonyms on a re-run; the lock is kept
    again = make_site_labels(tmp_path / "reviews", [out], labels_csv, secret=secret, lock_min_patients=4)
    assert "kept" in again.lock_status
    assert (
        rows["s000.dcm"]["patient_id"]
        == {Path(r["image"]).name: r for r in csv.DictReader(open(labels_csv))}["s000.dcm"]["patient_id"]
    )
    # finetune --dataset csv reads it as is, DICOM rows through the scorer's reader
    splits = build_datasets("csv", labels_csv, image_size=32, use_cache=False, augment=False)
    assert splits.label_names == list(FINDINGS) and splits.test is not None and len(splits.test) == lock["n_images"]
    item = splits.train[0]
    assert tuple(item["image"].shape) == (3, 32, 32) and float(item["mask"].sum()) > 0


# ---- the locked set ---------------------------------------------------------------------------


def test_lock_freeze_tamper_and_refusal(tmp_path):
    from medxray.site.lockset import assign_splits, check_unlocked, freeze, load_lock

    pats = {f"P{i:02d}": [f"/img/{i}a.dcm", f"/img/{i}b.dcm"] for i in range(20)}
    lock = freeze(pats, [f"P{i:02d}" for i in range(0, 20, 4)], tmp_path / "lock.json", fraction=0.3)
    assert len(lock.patients) == 6 and sum(p in {f"P{i:02d}" for i in range(0, 20, 4)} for p in lock.patients) == 2
    assert load_lock(tmp_path / "lock.json") == lock
    with pytest.raises(ConfigError, match="frozen once"):
        freeze(pats, [], tmp_path / "lock.json")
    splits = assign_splits(pats, lock, val_fraction=0.25)
    assert {splits[p] for p in lock.patients} == {"test"} and list(splits.values()).count("val") == 4
    with pytest.raises(ConfigError, match="locked site test set"):
        check_unlocked([(lock.patients[0], "")], lock, what="training")
    assert check_unlocked([("P99", "/img/new.dcm")], lock, what="training") == 1
    d = json.loads((tmp_path / "lock.json").read_text())
    d["patients"] = d["patients"][1:]  # someone "frees" a patient for training
    (tmp_path / "lock.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="does not match its hash"):
        load_lock(tmp_path / "lock.json")


# ---- the registry -------------------------------------------------------------------------------


def test_registry_current_switch_and_rollback(tmp_path):
    from conftest import make_test_checkpoint

    from medxray.site import registry as reg

    a = make_test_checkpoint(tmp_path / "a.pt", model_version="A", seed=1)
    b = make_test_checkpoint(tmp_path / "b.pt", model_version="B", seed=2)
    c = make_test_checkpoint(tmp_path / "c.pt", model_version="C", seed=3)
    r = tmp_path / "registry"
    with pytest.raises(CheckpointError):
        reg.current_checkpoint(r)
    assert reg.current_checkpoint(a) == a  # a plain file resolves to itself
    va = reg.register(r, a)
    reg.set_current(r, va)
    reg.record(r, "initial", to=va, frm=None, approver="lead")
    for src in (b, c):
        v = reg.register(r, src)
        frm = reg.current_version(r)
        reg.set_current(r, v)
        reg.record(r, "promote", to=v, frm=frm, approver="lead", figures={"mean_auc": 0.9})
    assert reg.register(r, c).name == reg.current_version(r).name  # same bytes: the same version
    assert reg.current_checkpoint(r).read_bytes() == c.read_bytes()
    assert (r / "current").resolve() == reg.current_checkpoint(r).parent.resolve()
    rec = reg.rollback(r, approver="lead")
    assert rec["to_model_version"] == "B" and rec["from_model_version"] == "C"
    assert reg.rollback(r)["to_model_version"] == "A"  # a second rollback goes further back, not forward
    with pytest.raises(ConfigError, match="nothing to roll back"):
        reg.rollback(r)
    assert [h["action"] for h in reg.history(r)] == ["initial", "promote", "promote", "rollback", "rollback"]
    assert not list(r.glob(".*tmp*")) and not list(r.glob("*.tmp"))


# ---- the monitor -------------------------------------------------------------------------------


def test_monitor_alerts_on_the_drifted_day_and_writes_prometheus_text(tmp_path):
    from conftest import make_test_checkpoint

    from medxray.checkpoint import update_metadata
    from medxray.labels import CHESTXRAY14_FINDINGS
    from medxray.scoring.journal import result_columns
    from medxray.site.monitor import monitor, monitor_view, read_monitor

    rng = np.random.default_rng(0)
    ck = make_test_checkpoint(tmp_path / "c.pt")
    names = list(CHESTXRAY14_FINDINGS)
    ref = rng.beta(2, 5, size=(400, len(names)))
    update_metadata(
        ck,
        {
            "validation_reference": {
                "source": "test",
                "probs": ref.round(4).tolist(),
                "labels": (ref > 0.4).astype(int).tolist(),
            },
            "ood": {"threshold": 10.0, "percentile": 95.0},
        },
    )
    out = tmp_path / "scored"
    out.mkdir()
    cols = result_columns(names)

    def write(rows_probs, start, ood_share=0.0):
        with open(out / "results.csv", "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, lineterminator="\n")
            if start == 0:
                w.writeheader()
            for k, p in enumerate(rows_probs):
                row = {c: "" for c in cols}
                row.update(
                    path=f"img{start + k:04d}.dcm",
                    status="ok",
                    model_version="test",
                    positive_findings=";".join(n for n, v in zip(names, p) if v >= 0.5),
                    ood_distance=f"{20.0 if rng.random() < ood_share else 5.0:.2f}",
                    **{f"p_{n}": f"{v:.4f}" for n, v in zip(names, p)},
                )
                w.writerow(row)

    write(rng.beta(2, 5, size=(60, len(names))), 0)
    day1 = monitor([out], ck, tmp_path / "mon", as_of="2026-03-02T08:00:00Z")
    assert not [a for a in day1.alerts if a.level == "alert"] and day1.days["2026-03-02"]["images"] == 60
    drift = rng.beta(2, 5, size=(60, len(names)))
    drift[:, 2] = rng.beta(6, 2, size=60)  # Effusion: a prevalence jump
    write(drift, 60, ood_share=0.5)
    day2 = monitor([out], ck, tmp_path / "mon", as_of="2026-03-03T08:00:00Z")
    assert day2.days["2026-03-02"]["images"] == 60 and day2.days["2026-03-03"]["images"] == 60  # first-seen kept
    kinds = {(a.kind, a.finding) for a in day2.alerts if a.day == "2026-03-03"}
    assert ("psi", "Effusion") in kinds and ("positive_rate", "Effusion") in kinds and ("ood_rate", "") in kinds
    assert not [a for a in day2.alerts if a.day == "2026-03-02" and a.level == "alert"]
    prom = (tmp_path / "mon" / "medxray.prom").read_text()
    assert 'medxray_score_psi{model_version="test",finding="Effusion"}' in prom
    assert 'medxray_alert{model_version="test",kind="psi",finding="Effusion",level="alert"} 1' in prom
    for line in prom.splitlines():  # the text exposition format: comments or NAME{labels} VALUE
        assert line.startswith("# ") or (line.startswith("medxray_") and len(line.rsplit(" ", 1)) == 2)
    view = monitor_view(read_monitor(tmp_path / "mon"))
    assert view["latest"] == "2026-03-03" and any(a["kind"] == "ood_rate" for a in view["alerts"])
    assert (tmp_path / "mon" / "psi.png").stat().st_size > 1000


# ---- recalibration rules -------------------------------------------------------------------------


def test_threshold_rules():
    from sklearn.metrics import roc_curve

    from medxray.site.calibrate import choose_threshold, parse_operating_point

    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.3).astype(int)
    p = np.round(np.clip(0.35 * y + rng.random(400) * 0.65, 0, 1), 3)
    fpr, tpr, thr = roc_curve(y, p)
    assert choose_threshold(p, y, "youden", None) == pytest.approx(thr[np.argmax(tpr - fpr)])
    t = choose_threshold(p, y, "sensitivity", 0.9)
    sens = ((p >= t) & (y == 1)).sum() / y.sum()
    assert sens >= 0.9 and ((p > t) & (y == 1)).sum() / y.sum() < 0.9  # the highest threshold reaching 90%
    assert parse_operating_point("sensitivity=0.95") == ("sensitivity", 0.95)
    assert parse_operating_point("Youden") == ("youden", None)
    with pytest.raises(ConfigError, match="operating-point"):
        parse_operating_point("spec=0.9")


def test_score_dicom_takes_the_registrys_current_version_at_each_run(tmp_path):
    """A promotion (or rollback) reaches the next scoring run without touching its command line."""
    from conftest import make_test_checkpoint
    from pydicom.uid import generate_uid

    from medxray.cli import main
    from medxray.site import registry as reg

    for i in range(2):
        write_dicom(
            tmp_path / "in" / f"x{i}.dcm",
            np.random.default_rng(i).random((64, 64)).astype(np.float32),
            patient_id="MRN1",
            study=generate_uid(),
            series=generate_uid(),
            sop=generate_uid(),
        )
    r = tmp_path / "registry"
    versions = [
        reg.register(r, make_test_checkpoint(tmp_path / f"{v}.pt", model_version=v, seed=k))
        for k, v in enumerate(("site-v1", "site-v2"))
    ]
    for k, v in enumerate(versions):
        reg.set_current(r, v)
        out = tmp_path / f"out{k}"
        assert (
            main(
                [
                    "score-dicom",
                    str(tmp_path / "in"),
                    "--checkpoint",
                    str(r),
                    "--out",
                    str(out),
                    "--cams",
                    "none",
                    "--workers",
                    "1",
                    "--backend",
                    "torch",
                    "--no-progress",
                ]
            )
            == 0
        )
        rows = list(csv.DictReader(open(out / "results.csv")))
        assert len(rows) == 2 and {row["model_version"] for row in rows} == {v.model_version}
