"""--max-maps: at most N maps (overlay PNGs) per image, its most probable findings; the DICOM node
draws only the maps it sends as Secondary Captures."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pydicom.data")
from pydicom.data import get_testdata_file  # noqa: E402

from medxray.errors import ConfigError  # noqa: E402
from medxray.scoring import ScoreConfig, score_directory  # noqa: E402
from medxray.scoring.workers import mapped_classes  # noqa: E402

FAST = dict(backend="torch", precision="fp32", batch_size=4, workers=1, progress=False)


def test_mapped_classes_keeps_the_most_probable_in_class_order():
    probs = [0.1, 0.9, 0.5, 0.9, 0.7]
    assert mapped_classes([0, 1, 2, 3, 4], probs, None) == [0, 1, 2, 3, 4]
    assert mapped_classes([0, 1, 2, 3, 4], probs, 2) == [1, 3]  # the two 0.9s
    assert mapped_classes([0, 2, 4], probs, 2) == [2, 4]
    assert mapped_classes([1, 3, 4], probs, 1) == [1]  # a tie goes to the earlier class
    assert mapped_classes([2], probs, 5) == [2]
    assert mapped_classes([], probs, 1) == []


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def four_rg1(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rg1")
    for name in ("RG1_UNCI.dcm", "RG1_UNCR.dcm", "RG1_J2KI.dcm", "RG1_J2KR.dcm"):
        shutil.copy(get_testdata_file(name), root / name)
    return root


def test_max_maps_draws_the_most_probable_positives_and_resumes(four_rg1, scoring_checkpoint, tmp_path):
    full, capped = tmp_path / "full", tmp_path / "capped"
    score_directory(ScoreConfig(four_rg1, scoring_checkpoint, full, cams="positive", **FAST))
    s = score_directory(ScoreConfig(four_rg1, scoring_checkpoint, capped, cams="positive", max_maps=1, **FAST))
    assert s.ok == 4
    many = 0
    for a, b in zip(_rows(full), _rows(capped)):
        assert a["path"] == b["path"] and a["positive_findings"] == b["positive_findings"]  # same scores
        positives = [f for f in b["positive_findings"].split(";") if f]
        drawn = sorted(p.stem for p in (capped / b["cam_dir"]).glob("*.png")) if b["cam_dir"] else []
        assert len(drawn) == min(1, len(positives))
        if len(positives) > 1:
            many += 1
            best = max(positives, key=lambda f: float(b[f"p_{f}"]))
            assert drawn == [best]
            # the overlay is the uncapped run's overlay of that finding (the map batch differs, so
            # the map may differ by float rounding: a level of the colour map here and there)
            mine = np.asarray(Image.open(capped / b["cam_dir"] / f"{best}.png"))
            ref = np.asarray(Image.open(full / a["cam_dir"] / f"{best}.png"))
            assert mine.shape == ref.shape and np.mean(np.any(mine != ref, axis=2)) < 0.01
            assert len(list((full / a["cam_dir"]).glob("*.png"))) == len(positives)
    assert many, "the test model calls several findings positive on some RG1 encodings"
    # resuming the capped run: nothing is missing, nothing redone
    again = score_directory(ScoreConfig(four_rg1, scoring_checkpoint, capped, cams="positive", max_maps=1, **FAST))
    assert again.skipped == 4 and again.outputs_redone == 0 and again.scored == 0
    # the cap is part of the run: another cap on the same OUT is refused, as another --cams is
    with pytest.raises(ConfigError):
        score_directory(ScoreConfig(four_rg1, scoring_checkpoint, capped, cams="positive", max_maps=2, **FAST))


def test_max_maps_below_one_is_refused(four_rg1, scoring_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="--max-maps must be >= 1"):
        score_directory(ScoreConfig(four_rg1, scoring_checkpoint, tmp_path / "o", max_maps=0, **FAST))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "medxray.cli",
            "score-dicom",
            str(four_rg1),
            "--checkpoint",
            str(scoring_checkpoint),
            "--out",
            str(tmp_path / "o2"),
            "--max-maps",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "--max-maps must be >= 1" in r.stderr and "Traceback" not in r.stderr


def test_node_draws_only_the_maps_it_sends(tmp_path, scoring_checkpoint):
    import pydicom
    from test_pacs_result_workers import _inbox_with_rg1

    from medxray.pacs.config import load_node_config
    from medxray.pacs.results import ResultPolicy, queue_results, result_rows, score_inbox
    from medxray.pacs.spool import Spool

    _inbox_with_rg1(tmp_path / "w", 3)
    spool = Spool(tmp_path / "w")
    policy = ResultPolicy(sc_max_findings=1, scoring={"workers": 1, "batch_size": 8})
    score_inbox(spool, str(scoring_checkpoint), policy)
    rows = [r for r in result_rows(spool) if r["cam_dir"]]
    assert rows and all(len(list((spool.scored / r["cam_dir"]).glob("*.png"))) == 1 for r in rows)
    queue_results(spool, policy)
    scs = [p for p in spool.outbox.glob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).Modality != "SR"]
    assert len(scs) == len([r for r in rows if "not-a-uid" not in r.get("study_instance_uid", "")])
    # and the count is checked where the node's config is read
    cfg = tmp_path / "node.yaml"
    base = (
        f"ae_title: MEDXRAY\nport: 11112\nallowed_calling_aes: [PACS]\ncheckpoint: {scoring_checkpoint}\n"
        f"work_dir: {tmp_path / 'w2'}\ndestination: {{ae_title: PACS, host: 127.0.0.1, port: 4242}}\n"
    )
    cfg.write_text(base + "sc_max_findings: 2\n")
    assert load_node_config(cfg).sc_max_findings == 2
    for bad in ("-1", "two", "1.5", "true"):
        cfg.write_text(base + f"sc_max_findings: {bad}\n")
        with pytest.raises(ConfigError, match="sc_max_findings"):
            load_node_config(cfg)
