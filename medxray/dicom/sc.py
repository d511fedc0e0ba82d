"""DICOM writer: a Secondary Capture image of a CAM overlay, for a PACS viewer.

:func:`write_cam_sc` turns one RGB overlay (the image with the class-activation map of one
finding blended in and a colour legend, :func:`medxray.overlay.overlay_with_legend`) into a
Secondary Capture Image (PS3.3 A.8.1) with highdicom: "NOT FOR CLINICAL USE" and the finding
burned into the pixels (Burned In Annotation YES), its own series with a clear Series
Description, the Patient / General Study modules copied from the source (or emptied for
de-identified copies) and a Source Image Sequence pointing at the scored image.

Why a Secondary Capture and not a Grayscale Softcopy Presentation State: a GSPS can only draw
graphics and text over the original grayscale pixels; a heat map is a colour image, and every
PACS viewer displays an SC while GSPS support (and colour blending, which needs a Blending
Softcopy PS) is patchy. Must not import the reader, the scorer or the app.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from medxray.dicom.sr import (
    MANUFACTURER,
    NOT_FOR_CLINICAL_USE,
    check_source_uids,
    copy_patient_study,
    result_uid,
    save_result,
)

SC_SERIES_NUMBER = 9902
SC_SERIES_DESCRIPTION = "medxray CAM overlays - NOT FOR CLINICAL USE"
BANNER = "NOT FOR CLINICAL USE"


def burn_in_banner(rgb: np.ndarray, lines: list[str]) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 with a black band on top holding ``lines`` in white: (H + band, W, 3)."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = rgb.shape[:2]
    size = max(12, min(64, w // 40))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        font = ImageFont.load_default()
    band = (size + size // 3) * len(lines) + size // 2
    canvas = Image.new("RGB", (w, h + band), (0, 0, 0))
    canvas.paste(Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)), (0, band))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(lines):
        draw.text((size // 2, size // 4 + i * (size + size // 3)), text, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def _banner_pixels(
    rgb: np.ndarray, finding: str, probability: float, model_name: str, model_version: str
) -> np.ndarray:
    """The SC's pixel data: ``rgb`` (H, W, 3) with the not-for-clinical-use banner and the
    finding, probability and model burned in on top (:func:`burn_in_banner`); (H + band, W, 3)
    uint8. ValueError for an array that is not (H, W, 3)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"a Secondary Capture overlay must be (H, W, 3) RGB, got shape {rgb.shape}")
    return burn_in_banner(
        rgb.astype(np.uint8),
        [
            f"{BANNER} - research software output",
            f"{finding} p={probability:.2f} - {model_name} {model_version} (CAM)"[:120],
        ],
    )


def _source_orientation(source_dataset: Any | None) -> tuple[str, str] | None:
    """The source's Patient Orientation (0020,0020) when it has both values, else None (unknown:
    never made up)."""
    if source_dataset is None:
        return None
    value = list(source_dataset.get("PatientOrientation") or [])
    if len(value) == 2 and all(value):
        return (str(value[0]), str(value[1]))
    return None


def _describe_sc(
    sc: Any,
    *,
    source: dict[str, str],
    source_dataset: Any | None,
    finding: str,
    probability: float,
    model_name: str,
    model_version: str,
) -> None:
    """Fill in what :class:`highdicom.sc.SCImage` leaves to us, in place: Laterality (Type 2C,
    L/R from the source or empty), the Patient/General Study modules (:func:`copy_patient_study`),
    Burned In Annotation YES, Image Type DERIVED\\SECONDARY, comments and derivation description
    (truncated to their VR lengths) and the Source Image Sequence pointing at the scored image
    (PS3.3 C.7.6.1.1.4)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    lat = str(source_dataset.get("Laterality", "") or "") if source_dataset is not None else ""
    sc.Laterality = lat if lat in ("L", "R") else None  # Type 2C (General Series): empty = not paired/unknown
    copy_patient_study(sc, source_dataset)
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ImageComments = f"{finding}: class activation map, p={probability:.4f}. {NOT_FOR_CLINICAL_USE}"[:10240]
    sc.DerivationDescription = f"CAM overlay of {finding} computed by {model_name} {model_version}"[:1024]
    ref = Dataset()
    ref.ReferencedSOPClassUID = source["sop_class_uid"]
    ref.ReferencedSOPInstanceUID = source["sop_instance_uid"]
    sc.SourceImageSequence = DicomSequence([ref])


def _overlay_series_uid(source: dict[str, str], model_version: str) -> str:
    """The overlays' Series Instance UID: one series per source series and model version
    (:func:`medxray.dicom.sr.result_uid` with the source SOP Instance UID left out on purpose)."""
    return result_uid(
        {"study_instance_uid": source["study_instance_uid"], "series_instance_uid": source["series_instance_uid"]},
        model_version,
        "sc-series",
    )


def write_cam_sc(
    path: str | os.PathLike,
    *,
    overlay_rgb: np.ndarray,
    source: dict[str, str],
    finding: str,
    probability: float,
    model_name: str,
    model_version: str,
    instance_number: int = 1,
    source_dataset: Any | None = None,
) -> Path:
    """Write one Secondary Capture of ``overlay_rgb`` (H, W, 3 uint8) for ``finding``.

    ``source`` holds the scored image's UIDs (``sop_class_uid``, ``sop_instance_uid``,
    ``study_instance_uid``, ``series_instance_uid``); ``source_dataset`` its header (Patient and
    General Study modules are copied; None = de-identified, empty patient module). The SOP
    Instance UID is :func:`medxray.dicom.sr.result_uid` (the source's study + series + SOP UIDs and,
    for a changed re-send, its content hash; model version; finding), so a re-send is stored once
    and two studies sharing a SOP Instance UID get two objects. Raises
    :class:`~medxray.errors.DicomError` (``invalid_uid``) when the source's UIDs are unusable,
    ValueError for an array that is not (H, W, 3) uint8-compatible.
    """
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian

    check_source_uids(source)
    pixels = _banner_pixels(overlay_rgb, finding, probability, model_name, model_version)
    orientation = _source_orientation(source_dataset)
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=source["study_instance_uid"],
        series_instance_uid=_overlay_series_uid(source, model_version),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=result_uid(source, model_version, f"sc:{finding}"),
        instance_number=int(instance_number),
        manufacturer=MANUFACTURER,
        patient_orientation=orientation or ("L", "F"),  # placeholder, emptied below when the source has none
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SC_SERIES_DESCRIPTION,
        manufacturer_model_name=model_name[:64],
        software_versions=model_version[:64],
    )
    if orientation is None:
        sc.PatientOrientation = None  # type: ignore[assignment]  # Type 2C: present, empty = unknown (never made up)
    _describe_sc(
        sc,
        source=source,
        source_dataset=source_dataset,
        finding=finding,
        probability=probability,
        model_name=model_name,
        model_version=model_version,
    )
    return save_result(sc, path)
