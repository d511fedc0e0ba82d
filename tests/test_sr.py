"""Result objects (SR, CAM Secondary Capture) are valid DICOM: 0 dciodvfy errors (issues 13 and 16 item 6).

Every object written here is checked with dicom3tools' ``dciodvfy`` (the standard's IOD
validator). Sources are pydicom-data's real RG1 CR and pydicom's ``bad_sequence.dcm`` (UIDs
that are not UIDs).
"""

from __future__ import annotations

import csv
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pacs_fixtures import dciodvfy_errors, dciodvfy_warnings
from pydicom.data import get_testdata_file

from medxray.dicom.sc import SC_SERIES_DESCRIPTION, write_cam_sc
from medxray.dicom.sr import CODING_SCHEME, result_uid, write_sr
from medxray.errors import DicomError

pytestmark = pytest.mark.skipif(
    shutil.which("dciodvfy") is None,
    reason="needs Debian dicom3tools (dciodvfy): run `make system-deps` (make test does)",
)
LABELS = ["Atelectasis", "Cardiomegaly", "Effusion"]


def header(name: str = "RG1_UNCI.dcm") -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)


def source_of(ds: pydicom.Dataset) -> dict[str, str]:
    return {
        "sop_class_uid": str(ds.get("SOPClassUID", "")),
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
        "modality": str(ds.get("Modality", "")),
    }


def sr_kwargs(ds: pydicom.Dataset) -> dict:
    return dict(
        source=source_of(ds),
        label_names=LABELS,
        probabilities=[0.1, 0.7, 0.55],
        positives=["Cardiomegaly", "Effusion"],
        model_name="densenet121",
        model_version="test",
        thresholds={},
    )


@pytest.mark.parametrize("copy_patient", [True, False], ids=["patient-copied", "deidentified"])
def test_sr_validates_and_files_under_the_source_study(tmp_path, copy_patient):
    src = header()
    path = write_sr(tmp_path / "sr.dcm", **sr_kwargs(src), source_dataset=src if copy_patient else None)
    assert dciodvfy_errors(path) == []
    sr = pydicom.dcmread(path)
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    assert sr.SOPInstanceUID == result_uid(source_of(src), "test", "sr")
    if copy_patient:
        for kw in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "AccessionNumber",
            "StudyID",
            "StudyDate",
            "StudyTime",
            "StudyDescription",
        ):
            assert sr[kw].value == src[kw].value, kw
    else:
        assert not str(sr.PatientName) and not sr.PatientID and not sr.PatientBirthDate and not sr.AccessionNumber
    declared = [i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence]
    assert declared == [CODING_SCHEME]
    # dciodvfy checks designators against PS3.16's fixed list and ignores the identification
    # sequence, so it still warns about the (declared) private scheme; nothing else is unrecognised.
    unrecognised = [w for w in dciodvfy_warnings(path) if "Unrecognized defined term" in w]
    assert all(f"<{CODING_SCHEME}>" in w for w in unrecognised)


@pytest.mark.parametrize("broken", ["study_instance_uid", "series_instance_uid", "sop_instance_uid"])
def test_source_without_valid_uids_gets_no_sr(tmp_path, broken):
    kwargs = sr_kwargs(header())
    kwargs["source"][broken] = "" if broken == "study_instance_uid" else "1.02.3"
    with pytest.raises(DicomError, match="invalid_uid"):
        write_sr(tmp_path / "sr.dcm", **kwargs)
    assert not (tmp_path / "sr.dcm").exists()


def test_bad_sequence_uids_are_refused_not_written(tmp_path):
    src = header("bad_sequence.dcm")
    with pytest.raises(DicomError, match="invalid_uid: the source has no valid SOP Instance UID, Study"):
        write_sr(tmp_path / "sr.dcm", **sr_kwargs(src))
    with pytest.raises(DicomError, match="invalid_uid"):
        write_cam_sc(
            tmp_path / "sc.dcm",
            overlay_rgb=np.zeros((8, 8, 3), np.uint8),
            source=source_of(src),
            finding="Effusion",
            probability=0.5,
            model_name="m",
            model_version="t",
        )
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("copy_patient", [True, False], ids=["patient-copied", "deidentified"])
def test_cam_secondary_capture_validates_with_burned_in_warning(tmp_path, copy_patient):
    src = header()
    rgb = np.zeros((200, 240, 3), np.uint8)
    rgb[50:150, 60:180, 0] = 255
    path = write_cam_sc(
        tmp_path / "sc.dcm",
        overlay_rgb=rgb,
        source=source_of(src),
        finding="Effusion",
        probability=0.55,
        model_name="densenet121",
        model_version="test",
        source_dataset=src if copy_patient else None,
    )
    assert dciodvfy_errors(path) == []
    sc = pydicom.dcmread(path)
    assert sc.SeriesDescription == SC_SERIES_DESCRIPTION and sc.BurnedInAnnotation == "YES"
    assert sc.StudyInstanceUID == src.StudyInstanceUID and sc.SeriesInstanceUID != src.SeriesInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert (sc.PatientID == src.PatientID) if copy_patient else not sc.PatientID
    px = sc.pixel_array
    band = px.shape[0] - rgb.shape[0]
    assert band > 0 and np.array_equal(px[band:], rgb), "the overlay itself is unchanged below the banner"
    assert (px[:band].min(axis=-1) > 128).sum() > 100, "white banner text is burned into the pixels"
    assert (px[:band].max(axis=-1) == 0).mean() > 0.5, "a black band, not a copy of the image"


def test_every_sr_the_batch_scorer_writes_validates(tmp_path, scoring_checkpoint):
    """score-dicom --sr over RG1, a copy without a Study UID and bad_sequence.dcm: valid SRs or a row that says why."""
    from medxray.scoring import ScoreConfig, score_directory

    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(get_testdata_file("RG1_UNCI.dcm"), inp / "rg1.dcm")
    shutil.copy(get_testdata_file("bad_sequence.dcm"), inp / "bad_sequence.dcm")
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    del ds.StudyInstanceUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.save_as(inp / "no_study_uid.dcm")
    out = tmp_path / "out"
    score_directory(
        ScoreConfig(
            inp,
            scoring_checkpoint,
            out,
            sr=True,
            cams="none",
            allowed_modalities=None,
            backend="torch",
            precision="fp32",
            batch_size=4,
            workers=1,
            progress=False,
        )
    )
    with open(out / "results.csv", newline="") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    assert rows["rg1.dcm"]["sr_file"] and dciodvfy_errors(out / rows["rg1.dcm"]["sr_file"]) == []
    for name in ("no_study_uid.dcm", "bad_sequence.dcm"):
        r = rows[name]
        assert not r["sr_file"], name
        if r["status"] == "ok":  # scored, but no SR: the row says why
            assert "invalid_uid" in r["reason"], (name, r["reason"])
    assert rows["no_study_uid.dcm"]["status"] == "ok"
    written = list(Path(out).rglob("*.dcm"))
    assert written == [out / rows["rg1.dcm"]["sr_file"]]
