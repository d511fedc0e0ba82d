"""One image in the review app: loading an upload or a scored file, display, predictions, warnings.

Turns uploaded bytes or a file into a :class:`StudyImage` (DICOM through
:func:`medxray.dicom.read_dicom`, PNG/JPEG through the data layer's one decoder
:func:`medxray.data.imageio.decode_image`; this module adds only the upload limits, EXIF
orientation and its messages), the display window and CAM overlay, the per-finding prediction
table and chart, the distribution warnings and the non-identifying metadata table.

Must not import streamlit (only :mod:`medxray.review.ui` does) or the worklist/model-card modules;
torch, pydicom and matplotlib are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from medxray.display import DISPLAY_LONG_SIDE, to_uint8  # noqa: F401  (to_uint8: re-exported for the app)
from medxray.errors import DataError
from medxray.labels import display_name
from medxray.review.store import ImageKey

log = logging.getLogger(__name__)

MAX_PIXELS: int | None = None  # None: the shared limit (medxray.limits: $MEDXRAY_MAX_PIXELS or 60 MP)
DISPLAY_MAX_SIDE = DISPLAY_LONG_SIDE  # the browser never needs more than this; keeps overlays fast
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})
POSITIVE_COLOUR, NEGATIVE_COLOUR = "#c0392b", "#7f8c8d"  # chart bars and table bars: at/above vs below threshold


# -- loading images ------------------------------------------------------------------------------


@dataclass
class StudyImage:
    """One image ready for the model and the page.

    ``pixels`` is the model input (2-D float32 in [0, 1], the file's default window; never the
    reviewer's display window, so predictions do not depend on how the image is viewed).
    ``meta`` holds only non-identifying fields.
    """

    pixels: np.ndarray
    kind: str  # "dicom" | "png" | "jpeg"
    key: ImageKey
    sha256: str
    meta: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    dicom: Any = None  # medxray.dicom.DicomImage (raw values for re-windowing), DICOM only
    is_lateral: bool = False
    name: str = ""  # the file's name (last path component only), stored beside the review key

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])

    @property
    def window(self) -> tuple[float, float] | None:
        """The file's default (center, width), None for PNG/JPEG or a VOI LUT table."""
        return None if self.dicom is None else self.dicom.window

    @property
    def raw(self) -> np.ndarray | None:
        return None if self.dicom is None else self.dicom.raw


def sniff_kind(data: bytes, name: str = "") -> str | None:
    """'dicom' | 'png' | 'jpeg' from the file's bytes (extension only as a DICOM fallback)."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if name.lower().endswith((".dcm", ".dicom")):
        return "dicom"  # DICOM without the 128-byte preamble; read_dicom decides
    return None


def load_study_bytes(data: bytes, name: str = "", *, max_bytes: int | None = None) -> StudyImage:
    """Turn uploaded bytes into a :class:`StudyImage`, or raise a :class:`DataError`/:class:`DicomError`."""
    label = Path(name).name or "the file"
    if max_bytes is not None and len(data) > max_bytes:
        raise DataError(
            f"{label} is {len(data) / 2**20:.1f} MB, above this app's upload limit of "
            f"{max_bytes / 2**20:.0f} MB; export a smaller image or start the app with a larger "
            f"--max-upload-mb"
        )
    if not data:
        raise DataError(f"{label} is empty; choose a DICOM, PNG or JPEG chest radiograph")
    kind = sniff_kind(data, name)
    digest = hashlib.sha256(data).hexdigest()
    if kind is None:
        raise DataError(f"{label} is not a DICOM, PNG or JPEG image; upload a chest radiograph in one of those formats")
    study = _load_dicom(data, digest) if kind == "dicom" else _load_raster(data, kind, digest, label)
    study.name = Path(name).name if name else ""
    return study


def load_study_file(path: str | os.PathLike, *, max_bytes: int | None = None) -> StudyImage:
    """Same as :func:`load_study_bytes` for a file on disk (a row of a results folder)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise DataError(f"{p.name} is {size / 2**20:.1f} MB, above this app's limit of {max_bytes / 2**20:.0f} MB")
        data = p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{p} no longer exists; re-run score-dicom or check the results folder") from None
    except OSError as exc:
        raise DataError(f"cannot read {p}: {exc.strerror}") from None
    return load_study_bytes(data, p.name, max_bytes=max_bytes)


def _load_dicom(data: bytes, digest: str) -> StudyImage:
    from medxray.dicom import read_dicom

    # Any modality is opened: the reviewer gets a warning for an unexpected one instead of nothing.
    dimg = read_dicom(data, allowed_modalities=None)  # raises DicomError with the reason
    meta = dict(dimg.meta or {})
    key = ImageKey.for_image(
        meta.get("sop_instance_uid"),
        data,
        study_instance_uid=meta.get("study_instance_uid"),
        series_instance_uid=meta.get("series_instance_uid"),
    )  # two patients cannot share it
    return StudyImage(
        pixels=np.asarray(dimg.pixels, dtype=np.float32),
        kind="dicom",
        key=key,
        sha256=digest,
        meta=meta,
        warnings=list(dimg.warnings or []),
        dicom=dimg,
        is_lateral=bool(dimg.is_lateral),
    )


def _load_raster(data: bytes, kind: str, digest: str, label: str) -> StudyImage:
    from medxray.data.imageio import decode_image

    # The data layer's decoder (the one training used); the app adds only its pixel limit,
    # EXIF orientation for phone photos of films, and the colour warning.
    img = decode_image(data, name=label, max_pixels=MAX_PIXELS, exif_transpose=kind == "jpeg")
    warnings = (
        ["colour image converted to grayscale: radiographs are grayscale, check this is the right file"]
        if img.colour
        else []
    )
    meta = {"format": kind.upper(), "rows": img.shape[0], "columns": img.shape[1]}
    return StudyImage(
        pixels=img.as_float01(), kind=kind, key=ImageKey.from_bytes(data), sha256=digest, meta=meta, warnings=warnings
    )


# -- display -------------------------------------------------------------------------------------


def window_range(study: StudyImage) -> tuple[float, float]:
    """Bounds for the window/level controls: the raw value range of the image."""
    if study.raw is None:
        return 0.0, 1.0
    lo, hi = float(np.min(study.raw)), float(np.max(study.raw))
    return (lo, hi if hi > lo else lo + 1.0)


def _downsample(img01: np.ndarray, max_side: int) -> np.ndarray:
    h, w = img01.shape
    scale = max_side / max(h, w)
    if scale >= 1:
        return img01.astype(np.float32, copy=False)
    from PIL import Image

    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(
        Image.fromarray(np.ascontiguousarray(img01, dtype=np.float32)).resize(size, Image.BOX), dtype=np.float32
    )


def display_image(
    study: StudyImage, window: tuple[float, float] | None = None, *, max_side: int = DISPLAY_MAX_SIDE
) -> np.ndarray:
    """The image as the reviewer sees it: re-windowed from the raw values when a window is given.

    For DICOM ``window`` is (center, width) in the raw (modality-LUT) values; for PNG/JPEG in
    [0, 1] grey levels. Returns float32 in [0, 1], at most ``max_side`` pixels on a side.
    """
    if window is not None and study.dicom is not None:
        from medxray.dicom import rewindow

        func = str(study.meta.get("voi_lut_function") or "LINEAR")
        img = rewindow(study.dicom, window[0], max(float(window[1]), 1.0), func)
    elif window is not None:
        from medxray.review.viewing import apply_gray_window

        img = apply_gray_window(study.pixels, window)
    else:
        img = study.pixels
    return np.clip(_downsample(img, max_side), 0.0, 1.0)


# -- predictions ---------------------------------------------------------------------------------


@dataclass
class StudyPrediction:
    """Model output for one image: probability per finding; maps come per finding (:func:`finding_map`)."""

    label_names: list[str]
    probabilities: np.ndarray  # (C,)
    cams: np.ndarray | None  # precomputed (C, S, S) maps in [0, 1], or None (live: ask finding_map; stored: none)
    model_version: str = ""
    warnings: list[str] = field(default_factory=list)  # the model's own (out of distribution), codes.py texts
    live: bool = False  # from a loaded model (maps on demand), not from a results.csv row
    # the network input (3, S, S) float32 the probabilities came from (live only): a finding's map
    # starts from it instead of preprocessing the full-resolution image again
    network_input: np.ndarray | None = None

    def as_dict(self) -> dict[str, float]:
        return {n: float(p) for n, p in zip(self.label_names, self.probabilities)}


def predict_study(predictor: Any, pixels: np.ndarray) -> StudyPrediction:
    """Run the shared predictor on one image (no hooks, no state change): probabilities and the
    OOD check from one forward pass. Maps are computed per finding when shown (:func:`finding_map`):
    the gradient methods cost one backward pass per finding."""
    from medxray.scoring.gate import ood_verdict

    x = predictor.preprocess([pixels])
    pred = predictor.run(x, ood=True)
    threshold = getattr(getattr(predictor, "ood", None), "threshold", None)
    # the scorer's text for the same check (policy "warn": the app never hides a study)
    _, ood_warning = ood_verdict(None if pred.ood is None else float(pred.ood[0]), threshold, "warn")
    return StudyPrediction(
        label_names=list(predictor.label_names),
        probabilities=np.asarray(pred.probabilities[0], np.float32),
        cams=None,
        model_version=str(getattr(predictor, "model_version", "") or ""),
        warnings=[ood_warning] if ood_warning else [],
        live=True,
        network_input=np.asarray(x[0], np.float32),
    )


def finding_map(
    predictor: Any, pixels: np.ndarray, finding: str, network_input: np.ndarray | None = None
) -> np.ndarray:
    """The map (S, S) in [0, 1] the app shows for ``finding``: :meth:`Predictor.maps_tensor`
    (medxray.cam.compute_maps with the checkpoint's method), the arrays evaluation scores.
    ``network_input``: the image's preprocessed input (3, S, S) when already at hand
    (:attr:`StudyPrediction.network_input`), else ``pixels`` are preprocessed here."""
    import torch

    from medxray.scoring.mapstreams import one_intraop_thread

    x = predictor.preprocess([pixels]) if network_input is None else torch.from_numpy(network_input)[None]
    with one_intraop_thread():  # one image: no faster on more threads, and robust beside other work
        return np.asarray(predictor.maps_tensor(x, [finding])[0, 0], np.float32)


def default_thresholds(label_names: Sequence[str], thresholds: Mapping[str, float] | None) -> dict[str, float]:
    """Checkpoint thresholds for every finding (0.5 where the checkpoint has none)."""
    thresholds = thresholds or {}
    return {n: float(thresholds.get(n, 0.5)) for n in label_names}


def findings_table(
    label_names: Sequence[str], probabilities: Sequence[float] | np.ndarray, thresholds: Mapping[str, float]
) -> pd.DataFrame:
    """One row per finding, most likely first: probability, operating threshold, positive or not.

    ``finding`` keeps the model's label; ``name`` is how a person reads it ("Pleural thickening");
    ``above`` / ``below`` hold the probability in the column its bar is drawn in (red / grey,
    the chart's rule), the other one empty.
    """
    probs = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if len(probs) != len(label_names):
        raise ValueError(f"{len(probs)} probabilities for {len(label_names)} findings")
    thr = [float(thresholds.get(n, 0.5)) for n in label_names]
    df = pd.DataFrame({"finding": list(label_names), "probability": probs, "threshold": thr})
    df["positive"] = df["probability"] >= df["threshold"]
    df.insert(1, "name", [display_name(n) for n in label_names])
    df["above"] = df["probability"].where(df["positive"])
    df["below"] = df["probability"].where(~df["positive"])
    return df.sort_values("probability", ascending=False, kind="stable").reset_index(drop=True)


def probability_figure(table: pd.DataFrame):
    """Horizontal probability bars with each finding's operating threshold marked."""
    from matplotlib.figure import Figure  # no pyplot: no global state shared between sessions

    n = len(table)
    fig = Figure(figsize=(6.0, 0.32 * n + 0.9), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(n)[::-1]
    colours = [POSITIVE_COLOUR if pos else NEGATIVE_COLOUR for pos in table["positive"]]
    ax.barh(y, table["probability"], color=colours, height=0.7)
    for yi, t in zip(y, table["threshold"]):
        ax.plot([t, t], [yi - 0.45, yi + 0.45], color="black", linewidth=2)
    # "$" would start matplotlib mathtext: names (from a checkpoint or results.csv) are drawn as text
    ax.set_yticks(y, labels=[display_name(n).replace("$", r"\$") for n in table["finding"]])
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability (black tick = operating threshold; red = above threshold)")
    ax.tick_params(axis="y", labelsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


# -- warnings ------------------------------------------------------------------------------------


def distribution_warnings(
    study: StudyImage,
    *,
    image_size: int | None = None,
    expected_size: int = 1024,
    prediction: StudyPrediction | None = None,
) -> list[str]:
    """Reasons the model may be less reliable on this image than on its training data.

    ChestX-ray14 images are 1024x1024 8-bit frontal (PA/AP) chest radiographs; anything far from
    that (lateral or AP view, not a radiograph, tiny or very elongated, unusual brightness or
    contrast) is flagged so the reviewer weighs the predictions accordingly. The model's own
    out-of-distribution warning (``prediction.warnings``) comes first; header texts are the
    scorer's (:func:`medxray.scoring.gate.header_gate`, :mod:`medxray.dicom.codes`).
    """
    out: list[str] = [*(prediction.warnings if prediction is not None else []), *study.warnings]

    def add(msg: str) -> None:
        if not any(msg.split(":")[0].lower() in w.lower() for w in out):
            out.append(msg)

    view = str(study.meta.get("view_position") or "").upper()
    if study.is_lateral or view in ("LL", "RL", "LAT", "LATERAL", "LLD", "RLD"):
        from medxray.dicom.codes import LATERAL_WARNING  # the text results.csv carries (one definition)

        add(LATERAL_WARNING)
    elif view == "AP":
        add(
            "AP view: usually a portable or supine film; heart size and effusions look different from PA, "
            "read the predictions with care"
        )
    modality = str(study.meta.get("modality") or "").upper()
    if study.kind == "dicom" and modality and modality not in RADIOGRAPH_MODALITIES:
        add(f"unexpected modality {modality}: the model was trained on projection radiographs (CR/DX)")
    if study.kind == "dicom":
        from medxray.scoring.gate import DEFAULT_ACCEPT_BODY_PARTS, header_gate

        skip, header_warnings = header_gate(study.meta, DEFAULT_ACCEPT_BODY_PARTS)
        for text in ([skip.split(": ", 1)[1]] if skip else []) + header_warnings:
            add(text)
    h, w = study.shape
    if min(h, w) < max(256, int(image_size or 0)):
        add(
            f"small image: {w}x{h} pixels, training images are {expected_size}x{expected_size}; "
            "fine findings (nodules, pneumothorax) may be lost"
        )
    if max(h, w) / max(1, min(h, w)) > 1.5:
        add(f"unusual shape: {w}x{h} (aspect {max(h, w) / min(h, w):.1f}), the model squeezes it to a square")
    px = study.pixels
    step = max(1, int(math.sqrt(px.size / 250_000)))
    sample = px[::step, ::step]
    mean, std = float(sample.mean()), float(sample.std())
    if mean < 0.15 or mean > 0.85:
        add(
            f"unusual brightness: mean intensity {mean:.2f} (training images average about 0.5); "
            "check the window and the photometric interpretation"
        )
    if std < 0.05:
        add(f"very low contrast (std {std:.3f}): the image may be blank or badly windowed")
    return out


# -- metadata shown on the page ------------------------------------------------------------------

# Only technical fields; nothing naming or dating the patient (contract: meta carries no PHI,
# and the page shows an allow-list of it anyway).
SAFE_META_FIELDS: tuple[str, ...] = (
    "format",
    "modality",
    "view_position",
    "body_part",
    "image_laterality",
    "rows",
    "columns",
    "bits_stored",
    "photometric",
    "transfer_syntax_name",
    "pixel_spacing_mm",
    "window_source",
    "voi_lut_function",
    "sop_instance_uid",
    "study_instance_uid",
    "series_instance_uid",
)


def safe_metadata_table(study: StudyImage) -> pd.DataFrame:
    from medxray.review.viewing import spacing_text

    labels = {
        "pixel_spacing_mm": "pixel spacing",
        "transfer_syntax_name": "transfer syntax",
        "sop_instance_uid": "SOP Instance UID",
        "study_instance_uid": "Study Instance UID",
        "series_instance_uid": "Series Instance UID",
        "voi_lut_function": "VOI LUT function",
    }
    rows = [
        (
            labels.get(k, k.replace("_", " ")),
            spacing_text(study.meta.get(k)) if k == "pixel_spacing_mm" else format_value(study.meta[k]),
        )
        for k in SAFE_META_FIELDS
        if study.meta.get(k) not in (None, "") or k == "pixel_spacing_mm"
    ]
    if study.window is not None:
        rows.append(("default window (center, width)", f"{study.window[0]:g}, {study.window[1]:g}"))
    rows.append(("image key", f"{study.key.kind}: {study.key.value}"))
    return pd.DataFrame(rows, columns=["field", "value"])


def format_value(v: Any) -> str:
    """A metadata or model-card value as page text (lists joined, floats without trailing zeros)."""
    if isinstance(v, (list, tuple)):
        return ", ".join(format_value(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)
