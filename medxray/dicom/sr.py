"""DICOM writers: the Comprehensive SR that carries one image's AI findings back to a PACS.

:func:`write_sr` builds the document with highdicom (DICOM PS3.3 A.35.3 Comprehensive SR IOD)
and writes it atomically. :data:`NOT_FOR_CLINICAL_USE` is the text every written object
carries. Further writers (Secondary Capture) belong here.

Must not import the reader, the scorer or the app; only pydicom/highdicom and
:mod:`medxray.fileio`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from medxray.fileio import atomic_output

NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE: research software output, not a medical device"


def write_sr(path: str | os.PathLike, *, source: dict[str, str], label_names: Sequence[str],
             probabilities: Sequence[float], positives: Sequence[str], model_name: str, model_version: str,
             thresholds: dict[str, float]) -> Path:
    """A highdicom Comprehensive SR referencing the source image, with an EMPTY patient module.

    ``source`` holds only UIDs and the modality. The SR belongs to the source's study (same
    Study Instance UID) so a PACS files it next to the image; patient name/ID/birth date are
    deliberately left empty (outputs never carry them). Content qualification is RESEARCH and
    the document says "not for clinical use" in its title, series description and a comment.
    """
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    ref = Dataset()
    ref.SOPClassUID = source["sop_class_uid"]
    ref.SOPInstanceUID = source["sop_instance_uid"]
    ref.StudyInstanceUID = source["study_instance_uid"]
    ref.SeriesInstanceUID = source["series_instance_uid"]
    ref.Modality = source.get("modality", "")
    for kw in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
               "StudyDate", "StudyTime", "ReferringPhysicianName"):
        setattr(ref, kw, None)

    scheme = "99MEDXRAY"
    title = hd.sr.CodedConcept("MX0001", scheme, "Chest radiograph AI findings (not for clinical use)")
    root = hd.sr.ContainerContentItem(name=title, template_id=None)
    items = [
        hd.sr.TextContentItem(name=codes.DCM.Comment if hasattr(codes.DCM, "Comment")
                              else hd.sr.CodedConcept("121106", "DCM", "Comment"),
                              value=NOT_FOR_CLINICAL_USE, relationship_type="CONTAINS"),
        hd.sr.TextContentItem(name=hd.sr.CodedConcept("111001", "DCM", "Algorithm Name"), value=model_name[:64],
                              relationship_type="CONTAINS"),
        hd.sr.TextContentItem(name=hd.sr.CodedConcept("111003", "DCM", "Algorithm Version"),
                              value=model_version[:64], relationship_type="CONTAINS"),
        hd.sr.ImageContentItem(name=hd.sr.CodedConcept("121112", "DCM", "Source of Measurement"),
                               referenced_sop_class_uid=source["sop_class_uid"],
                               referenced_sop_instance_uid=source["sop_instance_uid"],
                               relationship_type="CONTAINS"),
    ]
    unit = hd.sr.CodedConcept("1", "UCUM", "no units")
    for i, (name, p) in enumerate(zip(label_names, probabilities)):
        concept = hd.sr.CodedConcept(f"MXF{i + 1:03d}", scheme, f"Probability of {name}"[:64])
        items.append(hd.sr.NumContentItem(name=concept, value=round(float(p), 6), unit=unit,
                                          relationship_type="CONTAINS"))
    findings = ", ".join(positives) if positives else "none above threshold"
    items.append(hd.sr.TextContentItem(name=hd.sr.CodedConcept("121071", "DCM", "Finding"),
                                       value=f"Above threshold: {findings}"[:1024], relationship_type="CONTAINS"))
    root.ContentSequence = hd.sr.ContentSequence(items)
    sr = hd.sr.ComprehensiveSR(
        evidence=[ref], content=root,
        series_instance_uid=generate_uid(entropy_srcs=[source["sop_instance_uid"], "medxray-sr-series"]),
        series_number=9901,
        sop_instance_uid=generate_uid(entropy_srcs=[source["sop_instance_uid"], model_version, "medxray-sr"]),
        instance_number=1, manufacturer="medxray", is_complete=True, is_final=False, is_verified=False,
        series_description="medxray AI findings - NOT FOR CLINICAL USE", content_qualification="RESEARCH",
        manufacturer_model_name=model_name[:64], software_versions=model_version[:64],
    )
    with atomic_output(path, "wb") as fh:
        sr.save_as(fh, enforce_file_format=True)
    return Path(path)
