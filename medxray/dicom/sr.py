"""DICOM writers: the Comprehensive SR that carries one image's AI findings back to a PACS.

:func:`write_sr` builds the document with highdicom (DICOM PS3.3 A.35.3 Comprehensive SR IOD)
and writes it atomically. :data:`NOT_FOR_CLINICAL_USE` is the text every written object
carries; :func:`copy_patient_study` and :func:`check_source_uids` are shared with the Secondary
Capture writer (:mod:`medxray.dicom.sc`). The private codes live in one declared coding
scheme (:data:`CODING_SCHEME`, PS3.3 C.12.1.1.2 Coding Scheme Identification Sequence).

Must not import the reader, the scorer or the app; only pydicom/highdicom and
:mod:`medxray.fileio` / :mod:`medxray.dicom.codes`.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from medxray.dicom.codes import refusal
from medxray.fileio import atomic_output

NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE: research software output, not a medical device"
MANUFACTURER = "medxray"
CODING_SCHEME = "99MEDXRAY"  # "99" prefix: a private scheme (PS3.16 Section 8)
INVALID_UID = "invalid_uid"  # reason code: the source's UIDs cannot be referenced

# Patient module (PS3.3 C.7.1.1) and General Study / Patient Study modules (C.7.2.1, C.7.2.2):
# what a result object copies from its source so the PACS files it under the same patient+study.
PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "EthnicGroup",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "ProcedureCodeSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def is_valid_uid(value: Any) -> bool:
    """PS3.5 9.1: components of digits without leading zeros, dot-separated, at most 64 characters."""
    s = str(value or "")
    return 0 < len(s) <= 64 and bool(_UID_RE.fullmatch(s))


def check_source_uids(source: dict[str, str]) -> None:
    """Refuse (``invalid_uid``) a source whose SOP Class/Instance, Study or Series UID is missing or
    not a valid UID: a result object referencing it would be invalid and would not file under
    the right study. No UID is ever made up for the source."""
    names = {
        "sop_class_uid": "SOP Class UID",
        "sop_instance_uid": "SOP Instance UID",
        "study_instance_uid": "Study Instance UID",
        "series_instance_uid": "Series Instance UID",
    }
    bad = [n for k, n in names.items() if not is_valid_uid(source.get(k))]
    if bad:
        raise refusal(
            INVALID_UID,
            f"the source has no valid {', '.join(bad)}; no result object written "
            "(fix the source's UIDs in the archive)",
        )


def copy_patient_study(dst: Any, src: Any | None) -> None:
    """Copy the Patient and General Study module attributes present in ``src`` into ``dst``.

    With ``src`` None (de-identified research copies) every such attribute of ``dst`` is emptied
    instead (Type 2 attributes stay present, empty); the Study Instance UID is kept.
    """
    for kw in PATIENT_STUDY_KEYWORDS:
        if kw == "StudyInstanceUID":
            continue
        if src is None:
            if kw in dst:
                dst[kw].value = None
        elif kw in src and src[kw].value not in (None, "", []):
            setattr(dst, kw, copy.deepcopy(src[kw].value))
    if src is not None and "SpecificCharacterSet" in src:
        dst.SpecificCharacterSet = copy.deepcopy(src.SpecificCharacterSet)


def coding_scheme_identification() -> Any:
    """The Coding Scheme Identification Sequence item declaring :data:`CODING_SCHEME` (PS3.3 C.12.1.1.2)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    item = Dataset()
    item.CodingSchemeDesignator = CODING_SCHEME
    item.CodingSchemeName = "medxray chest radiograph AI findings"
    item.CodingSchemeResponsibleOrganization = "medxray project"
    return DicomSequence([item])


def result_uid(source: Mapping[str, str], model_version: str, kind: str) -> str:
    """The deterministic SOP Instance UID of a result object (``kind`` "sr", "sr-series", "sc-series"
    or "sc:<finding>") for the source image ``source`` describes.

    The identity covers the study and series the source belongs to, not its SOP Instance UID
    alone: SOP Instance UIDs are supposed to be unique (PS3.5 9.1) but re-used UIDs from broken
    modality software and merged archives exist, and two patients' images that share one must get
    two results, not one. ``source["content_sha256"]``, when present and not empty, is the source
    data set's content hash of a *changed re-send* (same Study/Series/SOP UIDs, different data set,
    :mod:`medxray.pacs.spool`): that version gets its own result objects; the first version of an
    instance, and every image scored from a folder, carries none, so the node and ``score-dicom``
    give the same image the same result UIDs. Re-scoring the same image with the same model gives
    the same UID, so a PACS stores it once. Returns a "2.25." UID (PS3.5 B.2) from a SHA-512 of the
    inputs (pydicom's ``generate_uid(entropy_srcs=...)``).
    """
    from pydicom.uid import generate_uid

    parts = [
        str(source.get("study_instance_uid", "")),
        str(source.get("series_instance_uid", "")),
        str(source.get("sop_instance_uid", "")),
    ]
    content = str(source.get("content_sha256", "") or "")
    if content:
        parts.append(f"sha256:{content}")
    return generate_uid(entropy_srcs=["medxray-result-v2", *parts, model_version, kind])


def write_sr(
    path: str | os.PathLike,
    *,
    source: dict[str, str],
    label_names: Sequence[str],
    probabilities: Sequence[float],
    positives: Sequence[str],
    model_name: str,
    model_version: str,
    thresholds: dict[str, float],
    source_dataset: Any | None = None,
) -> Path:
    """A highdicom Comprehensive SR referencing the source image, filed under the source's study.

    ``source`` holds the source's UIDs (``sop_class_uid``, ``sop_instance_uid``,
    ``study_instance_uid``, ``series_instance_uid``) and ``modality``. With ``source_dataset``
    (the source's header, a pydicom Dataset) the SR copies its Patient and General Study modules
    (:data:`PATIENT_STUDY_KEYWORDS`): the object returned into a PACS files under the right
    patient and study. Without it the patient module is EMPTY (folder outputs and
    ``--deidentified-sr`` research copies never carry identifiers). Content qualification is
    RESEARCH and the document says "not for clinical use" in its title, series description and a
    comment. Raises :class:`~medxray.errors.DicomError` (code ``invalid_uid``) when the source's
    UIDs are missing or invalid (PS3.5 9.1): no SR is written then.
    """
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes

    check_source_uids(source)
    ref = Dataset()
    ref.SOPClassUID = source["sop_class_uid"]
    ref.SOPInstanceUID = source["sop_instance_uid"]
    ref.StudyInstanceUID = source["study_instance_uid"]
    ref.SeriesInstanceUID = source["series_instance_uid"]
    ref.Modality = source.get("modality", "")
    for kw in (
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
    ):
        setattr(ref, kw, None)

    scheme = CODING_SCHEME
    title = hd.sr.CodedConcept("MX0001", scheme, "Chest radiograph AI findings (not for clinical use)")
    root = hd.sr.ContainerContentItem(name=title, template_id=None)
    items = [
        hd.sr.TextContentItem(
            name=codes.DCM.Comment if hasattr(codes.DCM, "Comment") else hd.sr.CodedConcept("121106", "DCM", "Comment"),
            value=NOT_FOR_CLINICAL_USE,
            relationship_type="CONTAINS",
        ),
        hd.sr.TextContentItem(
            name=hd.sr.CodedConcept("111001", "DCM", "Algorithm Name"),
            value=model_name[:64],
            relationship_type="CONTAINS",
        ),
        hd.sr.TextContentItem(
            name=hd.sr.CodedConcept("111003", "DCM", "Algorithm Version"),
            value=model_version[:64],
            relationship_type="CONTAINS",
        ),
        hd.sr.ImageContentItem(
            name=hd.sr.CodedConcept("121112", "DCM", "Source of Measurement"),
            referenced_sop_class_uid=source["sop_class_uid"],
            referenced_sop_instance_uid=source["sop_instance_uid"],
            relationship_type="CONTAINS",
        ),
    ]
    unit = hd.sr.CodedConcept("1", "UCUM", "no units")
    for i, (name, p) in enumerate(zip(label_names, probabilities)):
        concept = hd.sr.CodedConcept(f"MXF{i + 1:03d}", scheme, f"Probability of {name}"[:64])
        items.append(
            hd.sr.NumContentItem(name=concept, value=round(float(p), 6), unit=unit, relationship_type="CONTAINS")
        )
    findings = ", ".join(positives) if positives else "none above threshold"
    items.append(
        hd.sr.TextContentItem(
            name=hd.sr.CodedConcept("121071", "DCM", "Finding"),
            value=f"Above threshold: {findings}"[:1024],
            relationship_type="CONTAINS",
        )
    )
    root.ContentSequence = hd.sr.ContentSequence(items)
    sr = hd.sr.ComprehensiveSR(
        evidence=[ref],
        content=root,
        series_instance_uid=result_uid(source, model_version, "sr-series"),
        series_number=9901,
        sop_instance_uid=result_uid(source, model_version, "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description="medxray AI findings - NOT FOR CLINICAL USE",
        content_qualification="RESEARCH",
        manufacturer_model_name=model_name[:64],
        software_versions=model_version[:64],
    )
    copy_patient_study(sr, source_dataset)
    sr.CodingSchemeIdentificationSequence = coding_scheme_identification()
    with atomic_output(path, "wb") as fh:
        sr.save_as(fh, enforce_file_format=True)
    return Path(path)
