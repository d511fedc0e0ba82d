"""Issue 16 "Also": the results.csv ``warnings`` column and the review app carry the same texts,
defined once in medxray.dicom.codes (built from RG1 variants: lateral, an undefined window, a
header whose Bits Stored is too small)."""

from __future__ import annotations

import csv

import pytest
from dicom_rg1 import rg1_dataset, save

from medxray.dicom import read_dicom
from medxray.dicom.codes import LATERAL_WARNING, WARNING_PREFIXES


@pytest.fixture(scope="module")
def warned_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("warned")
    lateral = rg1_dataset()
    lateral.ViewPosition = "LL"
    window = rg1_dataset()
    window.RescaleSlope, window.RescaleIntercept = "1e-05", "0"
    window.WindowCenter, window.WindowWidth = 0.15, 0.3  # LINEAR with width < 1: undefined
    bits = rg1_dataset()
    bits.BitsStored, bits.HighBit = 12, 11
    return {
        name: save(ds, root / f"{name}.dcm")
        for name, ds in (("lateral", lateral), ("window", window), ("bits", bits), ("plain", rg1_dataset()))
    }


def test_reader_warnings_use_the_defined_texts(warned_files):
    got = {n: read_dicom(p).warnings for n, p in warned_files.items()}
    assert got["lateral"] == [LATERAL_WARNING] and got["plain"] == []
    assert got["window"][0].startswith("window not used") and got["bits"][0].startswith("bit depth")
    for warns in got.values():
        assert all(w.startswith(WARNING_PREFIXES) for w in warns)


def test_results_csv_and_app_carry_the_same_texts(warned_files, scoring_checkpoint, tmp_path):
    from medxray.review.study import distribution_warnings, load_study_file
    from medxray.scoring import ScoreConfig, score_directory

    root = next(iter(warned_files.values())).parent
    out = tmp_path / "out"
    score_directory(
        ScoreConfig(
            root,
            scoring_checkpoint,
            out,
            cams="none",
            backend="torch",
            precision="fp32",
            batch_size=4,
            workers=1,
            progress=False,
        )
    )
    with open(out / "results.csv", newline="", encoding="utf-8") as fh:
        rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(fh)}
    for name, path in warned_files.items():
        row = rows[f"{name}.dcm"]
        assert row["status"] == "ok", row
        expected = read_dicom(path).warnings
        assert row["warnings"] == "; ".join(expected)
        shown = distribution_warnings(load_study_file(path))
        for text in expected:
            assert text in shown, (name, text, shown)
        assert sum(w.startswith("lateral view") for w in shown) == (name == "lateral")
