"""The logic behind the Streamlit review app, importable and testable without Streamlit.

The pages in ``app/`` only lay out widgets; everything they show comes from here: settings,
loading an upload or a scored file (with size limits and clear refusals), display windowing,
per-finding result tables and charts, CAM overlays, distribution warnings, the worklist built
from a ``score-dicom`` results folder, and the model card built from checkpoint metadata.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from medxray.errors import DataError, MedxrayError
from medxray.review import ImageKey, Review

log = logging.getLogger(__name__)

# -- settings ------------------------------------------------------------------------------------

ENV_CHECKPOINT = "MEDXRAY_CHECKPOINT"
ENV_RESULTS = "MEDXRAY_RESULTS"
ENV_REVIEWS = "MEDXRAY_REVIEWS"
ENV_MAX_UPLOAD_MB = "MEDXRAY_MAX_UPLOAD_MB"
ENV_BACKEND = "MEDXRAY_BACKEND"
APP_ENV_VARS = frozenset({ENV_CHECKPOINT, ENV_RESULTS, ENV_REVIEWS, ENV_MAX_UPLOAD_MB, ENV_BACKEND})
DEFAULT_MAX_UPLOAD_MB = 64.0
MAX_PIXELS = 60_000_000  # refuse decompression bombs before decoding (a 1955x1841 CR is 3.6 MP)
DISPLAY_MAX_SIDE = 1024  # the browser never needs more than this; keeps overlays fast
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})
NO_CHECKPOINT_HELP = (
    "No model checkpoint is configured, so the app cannot score images. Make one with "
    "`make demo` (trains a small model on phantom data in a few minutes) or "
    "`medxray finetune --dataset chestxray14 --data-root DIR`, then start the app with "
    "`medxray app --checkpoint PATH/TO/checkpoint.pt` (or set MEDXRAY_CHECKPOINT)."
)
NOT_FOR_CLINICAL_USE = (
    "Research software: **not for clinical use**. Predictions are not a diagnosis and must not "
    "be used to make or change decisions about patient care."
)


def default_reviews_dir() -> Path:
    """Per-user data folder, so reviews never land inside a source checkout by accident."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "medxray" / "reviews"


@dataclass(frozen=True)
class AppSettings:
    """What the app was started with (``medxray app`` passes these as environment variables)."""

    checkpoint: Path | None = None
    results: Path | None = None
    reviews: Path = field(default_factory=default_reviews_dir)
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    backend: str = "auto"  # Predictor backend: auto | torch | openvino

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "AppSettings":
        env = os.environ if env is None else env

        def path(name: str) -> Path | None:
            v = (env.get(name) or "").strip()
            return Path(v).expanduser() if v else None

        limit = DEFAULT_MAX_UPLOAD_MB
        raw = (env.get(ENV_MAX_UPLOAD_MB) or "").strip()
        if raw:
            try:
                limit = float(raw)
            except ValueError:
                log.warning("%s=%r is not a number; using %s MB", ENV_MAX_UPLOAD_MB, raw, DEFAULT_MAX_UPLOAD_MB)
            if not limit > 0:
                limit = DEFAULT_MAX_UPLOAD_MB
        return cls(checkpoint=path(ENV_CHECKPOINT), results=path(ENV_RESULTS),
                   reviews=path(ENV_REVIEWS) or default_reviews_dir(), max_upload_mb=limit,
                   backend=(env.get(ENV_BACKEND) or "auto").strip() or "auto")

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings in the Streamlit process."""
        env = {ENV_REVIEWS: str(self.reviews), ENV_MAX_UPLOAD_MB: f"{self.max_upload_mb:g}",
               ENV_BACKEND: self.backend}
        if self.checkpoint is not None:
            env[ENV_CHECKPOINT] = str(self.checkpoint)
        if self.results is not None:
            env[ENV_RESULTS] = str(self.results)
        return env


def user_message(exc: BaseException) -> str:
    """One line for the page: our own errors say what to do; anything else is summarised, not dumped."""
    if isinstance(exc, MedxrayError):
        return str(exc)
    return (f"Unexpected error ({type(exc).__name__}): {str(exc).splitlines()[0][:200] if str(exc) else ''} "
            "- the details are in the app's log.")


def file_fingerprint(path: str | os.PathLike) -> str:
    """Identity of a file's current version (path, size, mtime) for cache keys."""
    p = Path(path)
    st = p.stat()
    return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"


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
            f"--max-upload-mb")
    if not data:
        raise DataError(f"{label} is empty; choose a DICOM, PNG or JPEG chest radiograph")
    kind = sniff_kind(data, name)
    digest = hashlib.sha256(data).hexdigest()
    if kind is None:
        raise DataError(f"{label} is not a DICOM, PNG or JPEG image; upload a chest radiograph in one of those formats")
    if kind == "dicom":
        return _load_dicom(data, digest)
    return _load_raster(data, kind, digest, label)


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
    key = ImageKey.for_image(meta.get("sop_instance_uid"), data)
    return StudyImage(pixels=np.asarray(dimg.pixels, dtype=np.float32), kind="dicom", key=key, sha256=digest,
                      meta=meta, warnings=list(dimg.warnings or []), dicom=dimg, is_lateral=bool(dimg.is_lateral))


def _load_raster(data: bytes, kind: str, digest: str, label: str) -> StudyImage:
    from PIL import Image, ImageOps, UnidentifiedImageError

    warnings: list[str] = []
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise DataError(f"{label} is {w}x{h} pixels, more than this app accepts "
                                f"({MAX_PIXELS / 1e6:.0f} megapixels); downscale it first")
            img.load()
            if kind == "jpeg":
                img = ImageOps.exif_transpose(img)
            mode = img.mode
            if mode in ("L", "P", "1", "LA"):
                arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
            elif mode.startswith("I;16") or mode == "I":
                a = np.asarray(img, dtype=np.float64)
                top = 65535.0 if a.max() <= 65535 else float(a.max())
                arr = (np.clip(a, 0, None) / top).astype(np.float32)
            elif mode == "F":
                arr = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
            else:
                rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
                if np.abs(rgb[..., 0] - rgb[..., 1]).max() > 8 or np.abs(rgb[..., 1] - rgb[..., 2]).max() > 8:
                    warnings.append("colour image converted to grayscale: radiographs are grayscale, "
                                    "check this is the right file")
                arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{label} looks like a {kind.upper()} but cannot be decoded (damaged or truncated?): "
                        f"{str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}") from None
    if arr.ndim != 2 or min(arr.shape) < 2:
        raise DataError(f"{label} is not a 2-D image (shape {arr.shape})")
    meta = {"format": kind.upper(), "rows": int(arr.shape[0]), "columns": int(arr.shape[1])}
    return StudyImage(pixels=np.ascontiguousarray(arr, dtype=np.float32), kind=kind,
                      key=ImageKey.from_bytes(data), sha256=digest, meta=meta, warnings=warnings)


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
    return np.asarray(Image.fromarray(np.ascontiguousarray(img01, dtype=np.float32)).resize(size, Image.BOX), dtype=np.float32)


def display_image(study: StudyImage, window: tuple[float, float] | None = None,
                  *, max_side: int = DISPLAY_MAX_SIDE) -> np.ndarray:
    """The image as the reviewer sees it: re-windowed from the raw values when a window is given."""
    if window is not None and study.dicom is not None:
        from medxray.dicom import rewindow

        func = str(study.meta.get("voi_lut_function") or "LINEAR")
        img = rewindow(study.dicom, window[0], max(float(window[1]), 1.0), func)
    else:
        img = study.pixels
    return np.clip(_downsample(img, max_side), 0.0, 1.0)


def to_uint8(img01: np.ndarray) -> np.ndarray:
    return (np.clip(img01, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def cam_overlay(display01: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """CAM (feature resolution, [0, 1]) upsampled onto the displayed image, as uint8 RGB."""
    from medxray.cam import overlay, upsample_cam

    cam_full = upsample_cam(np.asarray(cam, dtype=np.float32), display01.shape)
    return np.asarray(overlay(display01, cam_full, alpha=float(alpha)))


# -- predictions ---------------------------------------------------------------------------------

@dataclass
class StudyPrediction:
    """Model output for one image: probability per finding and a CAM per finding."""

    label_names: list[str]
    probabilities: np.ndarray  # (C,)
    cams: np.ndarray | None  # (C, h, w) in [0, 1], or None when only stored results exist
    model_version: str = ""

    def as_dict(self) -> dict[str, float]:
        return {n: float(p) for n, p in zip(self.label_names, self.probabilities)}


def predict_study(predictor: Any, pixels: np.ndarray) -> StudyPrediction:
    """Run the shared predictor on one image (no hooks, no state change)."""
    probs, cams = predictor.predict_with_cams([pixels])
    return StudyPrediction(label_names=list(predictor.label_names), probabilities=np.asarray(probs[0], np.float32),
                           cams=np.asarray(cams[0], np.float32),
                           model_version=str(getattr(predictor, "model_version", "") or ""))


def default_thresholds(label_names: Sequence[str], thresholds: Mapping[str, float] | None) -> dict[str, float]:
    """Checkpoint thresholds for every finding (0.5 where the checkpoint has none)."""
    thresholds = thresholds or {}
    return {n: float(thresholds.get(n, 0.5)) for n in label_names}


def findings_table(label_names: Sequence[str], probabilities: Sequence[float] | np.ndarray,
                   thresholds: Mapping[str, float]) -> pd.DataFrame:
    """One row per finding, most likely first: probability, operating threshold, positive or not."""
    probs = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if len(probs) != len(label_names):
        raise ValueError(f"{len(probs)} probabilities for {len(label_names)} findings")
    thr = [float(thresholds.get(n, 0.5)) for n in label_names]
    df = pd.DataFrame({"finding": list(label_names), "probability": probs, "threshold": thr})
    df["positive"] = df["probability"] >= df["threshold"]
    return df.sort_values("probability", ascending=False, kind="stable").reset_index(drop=True)


def probability_figure(table: pd.DataFrame):
    """Horizontal probability bars with each finding's operating threshold marked."""
    from matplotlib.figure import Figure  # no pyplot: no global state shared between sessions

    n = len(table)
    fig = Figure(figsize=(6.0, 0.32 * n + 0.9), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(n)[::-1]
    colours = ["#c0392b" if pos else "#7f8c8d" for pos in table["positive"]]
    ax.barh(y, table["probability"], color=colours, height=0.7)
    for yi, t in zip(y, table["threshold"]):
        ax.plot([t, t], [yi - 0.45, yi + 0.45], color="black", linewidth=2)
    ax.set_yticks(y, labels=list(table["finding"]))
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability (black tick = operating threshold; red = above threshold)")
    ax.tick_params(axis="y", labelsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


# -- warnings ------------------------------------------------------------------------------------

def distribution_warnings(study: StudyImage, *, image_size: int | None = None,
                          expected_size: int = 1024) -> list[str]:
    """Reasons the model may be less reliable on this image than on its training data.

    ChestX-ray14 images are 1024x1024 8-bit frontal (PA/AP) chest radiographs; anything far from
    that (lateral or AP view, not a radiograph, tiny or very elongated, unusual brightness or
    contrast) is flagged so the reviewer weighs the predictions accordingly.
    """
    out: list[str] = list(study.warnings)

    def add(msg: str) -> None:
        if not any(msg.split(":")[0].lower() in w.lower() for w in out):
            out.append(msg)

    view = str(study.meta.get("view_position") or "").upper()
    if study.is_lateral or view in ("LL", "RL", "LAT", "LATERAL", "LLD", "RLD"):
        add("lateral view: the model was trained on frontal (PA/AP) radiographs only; predictions are unreliable")
    elif view == "AP":
        add("AP view: usually a portable or supine film; heart size and effusions look different from PA, "
            "read the predictions with care")
    modality = str(study.meta.get("modality") or "").upper()
    if study.kind == "dicom" and modality and modality not in RADIOGRAPH_MODALITIES:
        add(f"unexpected modality {modality}: the model was trained on projection radiographs (CR/DX)")
    body = str(study.meta.get("body_part") or study.meta.get("body_part_examined") or "").upper()
    if body and "CHEST" not in body and "THORAX" not in body and body not in ("LUNG", "LUNGS"):
        add(f"body part {body}: the model was trained on chest radiographs only")
    h, w = study.shape
    if min(h, w) < max(256, int(image_size or 0)):
        add(f"small image: {w}x{h} pixels, training images are {expected_size}x{expected_size}; "
            "fine findings (nodules, pneumothorax) may be lost")
    if max(h, w) / max(1, min(h, w)) > 1.5:
        add(f"unusual shape: {w}x{h} (aspect {max(h, w) / min(h, w):.1f}), the model squeezes it to a square")
    px = study.pixels
    step = max(1, int(math.sqrt(px.size / 250_000)))
    sample = px[::step, ::step]
    mean, std = float(sample.mean()), float(sample.std())
    if mean < 0.15 or mean > 0.85:
        add(f"unusual brightness: mean intensity {mean:.2f} (training images average about 0.5); "
            "check the window and the photometric interpretation")
    if std < 0.05:
        add(f"very low contrast (std {std:.3f}): the image may be blank or badly windowed")
    return out


# -- metadata shown on the page ------------------------------------------------------------------

# Only technical fields; nothing naming or dating the patient (contract: meta carries no PHI,
# and the page shows an allow-list of it anyway).
SAFE_META_FIELDS: tuple[str, ...] = (
    "format", "modality", "view_position", "body_part", "image_laterality", "rows", "columns",
    "bits_stored", "photometric", "transfer_syntax_name", "pixel_spacing_mm", "window_source",
    "voi_lut_function", "sop_instance_uid", "study_instance_uid", "series_instance_uid",
)


def safe_metadata_table(study: StudyImage) -> pd.DataFrame:
    rows = [(k, _fmt_meta(study.meta[k])) for k in SAFE_META_FIELDS if study.meta.get(k) not in (None, "")]
    if study.window is not None:
        rows.append(("default window (center, width)", f"{study.window[0]:g}, {study.window[1]:g}"))
    rows.append(("image key", f"{study.key.kind}: {study.key.value}"))
    return pd.DataFrame(rows, columns=["field", "value"])


def _fmt_meta(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt_meta(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# -- results folder and worklist -----------------------------------------------------------------

RESULTS_FILENAME = "results.csv"


def load_results(out_dir: str | os.PathLike) -> pd.DataFrame:
    """Read ``OUT/results.csv`` written by ``medxray score-dicom``."""
    out = Path(out_dir)
    path = out / RESULTS_FILENAME
    if not path.is_file():
        raise DataError(f"{out} has no {RESULTS_FILENAME}; run `medxray score-dicom INPUT --checkpoint C --out {out}` first")
    try:
        df = pd.read_csv(path, dtype={"sop_instance_uid": str, "study_instance_uid": str,
                                      "series_instance_uid": str, "status": str, "reason": str},
                         keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable results table: {str(exc).splitlines()[0][:160]}") from None
    if "path" not in df.columns or "status" not in df.columns:
        raise DataError(f"{path} lacks the path/status columns of a score-dicom results table")
    return df


def result_label_names(results: pd.DataFrame) -> list[str]:
    return [c[2:] for c in results.columns if c.startswith("p_")]


def result_probabilities(row: Mapping[str, Any], label_names: Sequence[str]) -> np.ndarray | None:
    vals = []
    for n in label_names:
        v = row.get(f"p_{n}")
        try:
            vals.append(float(v))
        except (TypeError, ValueError):
            return None
    arr = np.asarray(vals, dtype=np.float32)
    return None if not np.all(np.isfinite(arr)) else arr


RUN_INFO_FILES: tuple[str, ...] = ("run.json", "manifest.json", "score_run.json")
_INPUT_KEYS: tuple[str, ...] = ("input_dir", "input_root", "input")


def results_input_root(out_dir: str | os.PathLike) -> Path | None:
    """The INPUT_DIR a results folder was scored from (``path`` in results.csv is relative to it)."""
    import json

    out = Path(out_dir)
    for f in [out / n for n in RUN_INFO_FILES] + sorted(out.glob("run.shard-*.json")):
        try:
            info = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key in _INPUT_KEYS:
            v = info.get(key) if isinstance(info, dict) else None
            if isinstance(v, str) and v:
                return Path(v).expanduser()
    return None


def resolve_result_path(out_dir: str | os.PathLike, path: str) -> Path:
    """Where a scored file is now: absolute as written, else under the run's INPUT_DIR (or nearby)."""
    p = Path(str(path)).expanduser()
    if p.is_absolute():
        return p
    out = Path(out_dir)
    bases = [b for b in (results_input_root(out), out, out.parent, Path.cwd()) if b is not None]
    for base in bases:
        if (base / p).exists():
            return base / p
    return bases[0] / p


def stored_cam_path(out_dir: str | os.PathLike, row: Mapping[str, Any], finding: str) -> Path:
    """Overlay PNG that score-dicom wrote for one finding: ``OUT/<cam_dir>/<Finding>.png``."""
    cam_dir = str(row.get("cam_dir") or "").strip()
    if not cam_dir:
        from medxray.scoring import CAMS_DIR, output_stem

        cam_dir = f"{CAMS_DIR}/{output_stem(str(row.get('path', '')))}"
    return Path(out_dir) / cam_dir / f"{finding}.png"


def row_image_key(out_dir: str | os.PathLike, row: Mapping[str, Any]) -> str | None:
    """Review key of a results row: its SOP Instance UID, else the SHA-256 of the file."""
    uid = str(row.get("sop_instance_uid") or "").strip()
    if uid and uid.lower() != "nan":
        return uid
    p = resolve_result_path(out_dir, str(row.get("path", "")))
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    except OSError:
        return None


WORKLIST_COLUMNS: tuple[str, ...] = (
    "file", "status", "top_finding", "max_probability", "positive_findings", "n_positive", "modality",
    "view", "reviewed", "reviewer", "review_summary", "reason",
)


def worklist_table(results: pd.DataFrame, out_dir: str | os.PathLike, thresholds: Mapping[str, float],
                   reviews: Mapping[str, Review]) -> pd.DataFrame:
    """One row per scored file with its most likely finding and review state.

    Positive findings are recomputed with the thresholds in use (they may differ from the ones
    the batch scorer used). Extra columns ``row`` (index into ``results``) and ``image_key`` let
    the page open the study.
    """
    labels = result_label_names(results)
    rows = []
    for idx, r in results.iterrows():
        rd = r.to_dict()
        probs = result_probabilities(rd, labels) if labels else None
        key = row_image_key(out_dir, rd) if str(rd.get("status")) == "ok" else None
        rev = reviews.get(key) if key else None
        if probs is not None and len(probs):
            top = int(np.argmax(probs))
            pos = [n for n, p in zip(labels, probs) if p >= thresholds.get(n, 0.5)]
            top_name, max_p = labels[top], float(probs[top])
        else:
            pos, top_name, max_p = [], "", float("nan")
        rows.append({
            "file": Path(str(rd.get("path", ""))).name,
            "status": str(rd.get("status", "")),
            "top_finding": top_name,
            "max_probability": max_p,
            "positive_findings": "; ".join(pos),
            "n_positive": len(pos),
            "modality": str(rd.get("modality", "") or ""),
            "view": str(rd.get("view_position", "") or ""),
            "reviewed": rev is not None,
            "reviewer": rev.reviewer if rev else "",
            "review_summary": ", ".join(f"{f}: {v}" for f, v in rev.verdicts.items()) if rev else "",
            "reason": str(rd.get("reason", "") or ""),
            "row": int(idx),
            "image_key": key or "",
        })
        for n in labels:
            rows[-1][f"p_{n}"] = float(probs[labels.index(n)]) if probs is not None else float("nan")
    cols = list(WORKLIST_COLUMNS) + ["row", "image_key"] + [f"p_{n}" for n in labels]
    return pd.DataFrame(rows, columns=cols)


def filter_worklist(table: pd.DataFrame, *, statuses: Iterable[str] | None = None, finding: str | None = None,
                    positive_only: bool = False, reviewed: str = "all", search: str = "",
                    sort_by: str = "max_probability", descending: bool = True) -> pd.DataFrame:
    """Filter and sort the worklist; ``finding`` focuses on one finding's probability."""
    df = table
    if statuses is not None:
        df = df[df["status"].isin(list(statuses))]
    if reviewed == "reviewed":
        df = df[df["reviewed"]]
    elif reviewed == "not reviewed":
        df = df[~df["reviewed"]]
    if search.strip():
        df = df[df["file"].str.contains(search.strip(), case=False, regex=False)]
    if finding:
        col = f"p_{finding}"
        if positive_only:
            df = df[df["positive_findings"].apply(lambda s: finding in s.split("; "))]
        if sort_by == "finding_probability" and col in df.columns:
            sort_by = col
    elif positive_only:
        df = df[df["n_positive"] > 0]
    if sort_by == "finding_probability":
        sort_by = "max_probability"
    if sort_by in df.columns:
        df = df.sort_values(sort_by, ascending=not descending, kind="stable", na_position="last")
    return df.reset_index(drop=True)


# -- model card ----------------------------------------------------------------------------------

@dataclass
class ModelCard:
    """What a reviewer should know about the model, from the checkpoint's own metadata."""

    title: str
    summary: pd.DataFrame  # field / value
    training: pd.DataFrame  # field / value
    metrics: pd.DataFrame  # finding, metric, value, ci_low, ci_high (may be empty)
    thresholds: pd.DataFrame  # finding, threshold, (how chosen)
    intended_use: str
    limitations: list[str]
    not_for_clinical_use: str = NOT_FOR_CLINICAL_USE


def _kv(rows: Iterable[tuple[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([(k, _fmt_meta(v)) for k, v in rows if v not in (None, "", [], {})],
                        columns=["field", "value"])


def _first(meta: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        cur: Any = meta
        for part in k.split("."):
            if not isinstance(cur, Mapping) or part not in cur:
                cur = None
                break
            cur = cur[part]
        if cur not in (None, "", [], {}):
            return cur
    return None


def metrics_table(metrics: Any) -> pd.DataFrame:
    """Flatten the checkpoint's metrics into rows with confidence intervals where present.

    Accepts ``{"auroc": {finding: v}, "auroc_ci": {finding: [lo, hi]}}``,
    ``{finding: {"auroc": v, "auroc_ci": [lo, hi]}}``, ``{"auroc": {finding: {"value", "ci_low", "ci_high"}}}``
    and scalars such as ``{"mean_auroc": v}`` (nested per split, e.g. ``{"val": {...}}``, too).
    """
    rows: list[dict[str, Any]] = []

    def ci_of(container: Mapping[str, Any], metric: str, finding: str | None) -> tuple[float | None, float | None]:
        for ck in (f"{metric}_ci", f"{metric}_ci95", "ci", "ci95"):
            c = container.get(ck)
            if isinstance(c, Mapping) and finding is not None:
                c = c.get(finding)
            if isinstance(c, (list, tuple)) and len(c) == 2:
                return _num(c[0]), _num(c[1])
        return None, None

    def walk(obj: Any, prefix: str) -> None:
        if not isinstance(obj, Mapping):
            return
        for key, val in obj.items():
            if str(key).endswith(("_ci", "_ci95")) or key in ("ci", "ci95", "epoch", "best_epoch"):
                continue
            name = f"{prefix}{key}"
            if _num(val) is not None:
                lo, hi = ci_of(obj, str(key), None)
                rows.append({"scope": prefix.rstrip("/") or "all", "finding": "(overall)", "metric": str(key),
                             "value": _num(val), "ci_low": lo, "ci_high": hi})
            elif isinstance(val, Mapping) and val and all(_num(v) is not None or _is_point(v) for v in val.values()):
                # {metric: {finding: value | {value, ci_low, ci_high}}}
                for finding, v in val.items():
                    if _is_point(v):
                        rows.append({"scope": prefix.rstrip("/") or "all", "finding": finding, "metric": str(key),
                                     "value": _num(v.get("value", v.get("estimate"))),
                                     "ci_low": _num(v.get("ci_low", (v.get("ci") or [None, None])[0])),
                                     "ci_high": _num(v.get("ci_high", (v.get("ci") or [None, None])[1]))})
                    else:
                        lo, hi = ci_of(obj, str(key), str(finding))
                        rows.append({"scope": prefix.rstrip("/") or "all", "finding": finding, "metric": str(key),
                                     "value": _num(v), "ci_low": lo, "ci_high": hi})
            elif isinstance(val, Mapping):
                walk(val, f"{name}/")

    walk(metrics, "")
    df = pd.DataFrame(rows, columns=["scope", "finding", "metric", "value", "ci_low", "ci_high"])
    return df.astype({"value": float, "ci_low": float, "ci_high": float})


def _with_ci(value: float, lo: float, hi: float) -> str:
    if not math.isfinite(value):
        return ""
    return f"{value:.3f}" + (f" ({lo:.3f}-{hi:.3f})" if math.isfinite(lo) and math.isfinite(hi) else "")


def metrics_overview(metrics: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(overall metrics, one row per finding x one column per metric), values as "v (lo-hi)" text."""
    m = metrics.copy()
    m["metric"] = [f"{s}/{k}" if s != "all" else k for s, k in zip(m["scope"], m["metric"])]
    m["text"] = [_with_ci(v, lo, hi) for v, lo, hi in zip(m["value"], m["ci_low"], m["ci_high"])]
    overall = m[m["finding"] == "(overall)"][["metric", "text"]].rename(columns={"text": "value (95% CI)"})
    per = m[m["finding"] != "(overall)"]
    if len(per):
        order = list(dict.fromkeys(per["finding"]))
        table = per.pivot_table(index="finding", columns="metric", values="text", aggfunc="first")
        table = table.reindex(order).reset_index()
        table.columns.name = None
    else:
        table = pd.DataFrame(columns=["finding"])
    return overall.reset_index(drop=True), table


def _is_point(v: Any) -> bool:
    return isinstance(v, Mapping) and ("value" in v or "estimate" in v) and \
        _num(v.get("value", v.get("estimate"))) is not None


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def model_card(metadata: Mapping[str, Any], *, checkpoint_path: str | os.PathLike | None = None) -> ModelCard:
    """Build the model card; every fact comes from the checkpoint, missing ones are said to be missing."""
    meta = dict(metadata)
    labels = list(meta.get("label_names") or [])
    prep = meta.get("preprocessing") or {}
    arch = meta.get("architecture", "unknown")
    init = _first(meta, "pretrained", "init", "initialisation", "initialization", "config.pretrained")
    summary = _kv([
        ("architecture", arch),
        ("initialisation", init if init is not None else "not recorded"),
        ("model version", meta.get("model_version")),
        ("findings", f"{len(labels)}: " + ", ".join(labels) if labels else None),
        ("input", f"{prep.get('image_size', '?')}x{prep.get('image_size', '?')}, {prep.get('intensity', '?')}"
         if prep else None),
        ("created", _first(meta, "created", "created_at", "saved_at")),
        ("git commit", _first(meta, "git_commit")),
        ("checkpoint", str(checkpoint_path) if checkpoint_path else None),
        ("software versions", ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items()) or None),
    ])
    training = _kv([
        ("dataset", _first(meta, "dataset", "data.dataset", "config.dataset")),
        ("split", _first(meta, "split", "data.split", "split_description", "config.split")),
        ("split seed", _first(meta, "split_seed", "data.split_seed", "config.split_seed")),
        ("view filter", _first(meta, "view", "data.view", "config.view")),
        ("validation fraction", _first(meta, "val_fraction", "config.val_fraction")),
        ("manifest hash", _first(meta, "data_manifest_hash", "manifest_hash", "data.manifest_hash")),
        ("counts", _first(meta, "summary", "data.summary", "data_summary")),
        ("epochs", _first(meta, "epochs", "config.epochs", "train.epochs")),
        ("checkpoint epoch", _first(meta, "epoch")),
        ("selected by", _first(meta, "metrics.selected_by")),
        ("optimiser", _first(meta, "optimizer", "config.optimizer")),
        ("learning rate", _first(meta, "lr", "config.lr")),
        ("batch size", _first(meta, "batch_size", "config.batch_size")),
    ])
    metrics = metrics_table(meta.get("metrics") or {})
    thr = meta.get("thresholds") or {}
    how = _first(meta, "threshold_method", "thresholds_method", "threshold_policy")
    if how is None and meta.get("threshold_split"):
        how = f"Youden's J on the {meta['threshold_split']} split (medxray evaluate)"
    thresholds = pd.DataFrame(
        [(n, float(thr.get(n, 0.5)), how or ("default 0.5" if n not in thr else "from checkpoint"))
         for n in labels],
        columns=["finding", "threshold", "how chosen"])
    intended = str(meta.get("intended_use") or (
        "Research and education: helping a radiologist or ML engineer explore what a DenseNet "
        "fine-tuned on chest radiographs predicts for frontal (PA/AP) adult chest X-rays, and record "
        "agreement per finding. It is a second look for research, not a device."))
    limitations = list(meta.get("limitations") or []) + [
        "Trained on the labels of its training set; ChestX-ray14 labels were mined from reports by NLP "
        "and are noisy (estimated accuracy around 90%), so the model learns their errors too.",
        "Frontal views only: lateral views, paediatric films and non-chest images are out of scope.",
        "Performance depends on the scanner, population and prevalence; validate locally before any use.",
        "Class activation maps are coarse (feature-map resolution) and show where evidence was found, "
        "not the outline of a lesion.",
        "Thresholds trade sensitivity against specificity for the validation set they were chosen on.",
    ]
    if not len(metrics):
        limitations.insert(0, "This checkpoint records no evaluation metrics: run `medxray evaluate` on it.")
    return ModelCard(title=f"medxray model card: {arch}", summary=summary, training=training, metrics=metrics,
                     thresholds=thresholds, intended_use=intended, limitations=limitations)


# -- launching -----------------------------------------------------------------------------------

def app_entry_path() -> Path:
    """``app/medxray_app.py`` next to the package (source checkout / editable install)."""
    entry = Path(__file__).resolve().parent.parent / "app" / "medxray_app.py"
    if not entry.is_file():
        from medxray.errors import ConfigError

        raise ConfigError(f"the app's entry file {entry} is missing; run `medxray app` from a medxray source "
                          "checkout (pip install -e .)")
    return entry


def streamlit_command(cfg: AppSettings, *, host: str = "127.0.0.1", port: int = 8501, open_browser: bool = False,
                      python: str | None = None) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment for ``streamlit run`` of the app with these settings.

    Settings travel as environment variables (read by :meth:`AppSettings.from_env` in every
    page); Streamlit's own upload cap is raised above ours so our clearer message is the one
    a user sees. Usage statistics are off: the app must make no outside connections.
    """
    import sys

    argv = [python or sys.executable, "-m", "streamlit", "run", str(app_entry_path()),
            "--server.address", host, "--server.port", str(int(port)),
            "--server.headless", "false" if open_browser else "true",
            "--server.maxUploadSize", str(int(math.ceil(cfg.max_upload_mb)) + 1),
            "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none",
            "--client.toolbarMode", "minimal",
            "--global.showWarningOnDirectExecution", "false"]
    return argv, cfg.to_env()


def check_app_settings(cfg: AppSettings) -> None:
    """Fail fast, before starting a server, on settings that cannot work."""
    from medxray.errors import CheckpointError
    from medxray.review import ReviewStore

    if cfg.checkpoint is not None and not cfg.checkpoint.is_file():
        raise CheckpointError(f"checkpoint {cfg.checkpoint} does not exist; train one with `make demo` or "
                              "`medxray finetune`, or leave out --checkpoint to browse results only")
    if cfg.results is not None and not cfg.results.is_dir():
        raise DataError(f"results folder {cfg.results} does not exist; write one with "
                        f"`medxray score-dicom INPUT --checkpoint C --out {cfg.results}`")
    ReviewStore(cfg.reviews)  # creates the folder and database, or says why it cannot
