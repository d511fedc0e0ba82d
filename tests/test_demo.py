"""`medxray demo --quick`: the whole demo path end to end (synthesise, cache, fine-tune, evaluate,
CAM overlays, score the real RG1 DICOM, summary) in about a minute."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from medxray.cli import main


@pytest.mark.slow
def test_quick_demo_runs_every_step(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["-q", "demo", "--quick", "--out", str(out)])
    captured = capsys.readouterr()
    text = captured.out
    assert rc == 0, captured.err[-3000:]
    assert "SYNTHETIC" in text and "not radiographs" in text
    assert "--pretrained none" in text and "ImageNet" in text
    assert "mean AUROC" in text
    # localisation printed beside the AUROC, labelled as phantom numbers, with the measured method
    from medxray.cam import DEFAULT_MAP_METHOD

    loc_line = next(ln for ln in text.splitlines() if ln.startswith("PHANTOM CAM localisation"))
    assert f"({DEFAULT_MAP_METHOD})" in loc_line and "pointing game" in loc_line and "IoBB>0.25" in loc_line
    assert "phantom boxes" in loc_line
    assert f"medxray app --checkpoint {out.resolve()}" in text

    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["synthetic"] is True and summary["ok"] is True
    assert 0.0 <= summary["mean_auroc"] <= 1.0
    for key in ("checkpoint", "report_html", "report_md"):
        assert Path(summary[key]).is_file(), key
    assert len(summary["cam_files"]) >= 1
    assert summary["localisation"]["method"] == DEFAULT_MAP_METHOD and summary["localisation"]["overall"]["n"] > 0
    for f in summary["cam_files"]:
        assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "synthetic" in (out / "evaluation" / "report.md").read_text().lower()

    # the real radiograph went through the DICOM scorer with the new checkpoint
    assert summary["rg1"]["status"] == "ok", summary["rg1"]
    with open(summary["rg1"]["results"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["path"].endswith("RG1_UNCI.dcm")
    assert "RG1_UNCI.dcm scored" in text

    # a second run reuses the phantom data and the finished training run
    rc = main(["-q", "demo", "--quick", "--out", str(out)])
    assert rc == 0
    assert not (out / "run-2").exists()
