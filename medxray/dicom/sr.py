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


# Header attributes of the evidence item that highdicom requires present (Type 2, empty here):
# the SR's own Patient/Study modules come from :func:`copy_patient_study`, never from the evidence.
_EVIDENCE_EMPTY_KEYWORDS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def save_result(dataset: Any, path: str | os.PathLike) -> Path:
    """Write a result object (SR or SC) atomically as a DICOM file (PS3.10 file meta enforced);
    returns ``path``. OSError from the file system is left to the caller."""
    with atomic_output(path, "wb") as fh:
        dataset.save_as(fh, enforce_file_format=True)
    return Path(path)


def _evidence_reference(source: Mapping[str, str]) -> Any:
    """The evidence item (a pydicom Dataset) highdicom needs to reference the source image
    (PS3.3 C.17.2 SR Document General module, Current Requested Procedure Evidence Sequence):
    the source's four UIDs and modality, every identifying attribute present but empty."""
    from pydicom.dataset import Dataset

    ref = Dataset()
    ref.SOPClassUID = source["sop_class_uid"]
    ref.SOPInstanceUID = source["sop_instance_uid"]
    ref.StudyInstanceUID = source["study_instance_uid"]
    ref.SeriesInstanceUID = source["series_instance_uid"]
    ref.Modality = source.get("modality", "")
    for kw in _EVIDENCE_EMPTY_KEYWORDS:
        setattr(ref, kw, None)
    return ref


def _header_items(source: Mapping[str, str], model_name: str, model_version: str) -> list[Any]:
    """The content items before the findings: the not-for-clinical-use comment, the algorithm's
    name and version (DCM 111001/111003, truncated to 64 characters) and the source image
    (DCM 121112 Source of Measurement)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    comment = codes.DCM.Comment if hasattr(codes.DCM, "Comment") else hd.sr.CodedConcept("121106", "DCM", "Comment")
    return [
        hd.sr.TextContentItem(name=comment, value=NOT_FOR_CLINICAL_USE, relationship_type="CONTAINS"),
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


def _finding_items(label_names: Sequence[str], probabilities: Sequence[float], positives: Sequence[str]) -> list[Any]:
    """One NUM item per finding (private code ``MXF<nnn>``, probability rounded to 6 places, UCUM
    "1" = no units) and a closing TEXT item (DCM 121071 Finding) naming the findings above
    threshold (at most 1024 characters)."""
    import highdicom as hd

    unit = hd.sr.CodedConcept("1", "UCUM", "no units")
    items: list[Any] = []
    for i, (name, p) in enumerate(zip(label_names, probabilities)):
        concept = hd.sr.CodedConcept(f"MXF{i + 1:03d}", CODING_SCHEME, f"Probability of {name}"[:64])
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
    return items


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

    check_source_uids(source)
    title = hd.sr.CodedConcept("MX0001", CODING_SCHEME, "Chest radiograph AI findings (not for clinical use)")
    root = hd.sr.ContainerContentItem(name=title, template_id=None)
    root.ContentSequence = hd.sr.ContentSequence(
        _header_items(source, model_name, model_version) + _finding_items(label_names, probabilities, positives)
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[_evidence_reference(source)],
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
    return save_result(sr, path)
