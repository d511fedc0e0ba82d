"""Streamlit glue shared by the app's pages: cached resources, session state, common widgets.

Kept apart from the plain logic in :mod:`medxray.review` (settings, study, worklist,
model_card: unit-tested without Streamlit) so the pages in ``app/`` stay thin. The model is loaded once per checkpoint version with
``st.cache_resource`` and shared by all sessions: it is in eval mode, CAMs come from features
and head weights (no hooks) and nothing here mutates it. Per-image work is cached with
``st.cache_data`` keyed by the file's SHA-256.

The only module of the package that imports streamlit; nothing in ``medxray`` imports this one
(only the pages in ``app/`` do).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from medxray.errors import DataError, MedxrayError
from medxray.review import ReviewStore
from medxray.review.settings import NO_CHECKPOINT_HELP, AppSettings, file_fingerprint, user_message
from medxray.review.study import (StudyImage, StudyPrediction, cam_overlay, default_thresholds,
                                  load_study_bytes, predict_study, window_range)
from medxray.review.worklist import (RESULTS_FILENAME, load_results, resolve_result_path, result_label_names,
                                     result_probabilities, stored_cam_path)

log = logging.getLogger(__name__)

STUDY_PAGE = "app_pages/study.py"
WORKLIST_PAGE = "app_pages/worklist.py"
MODEL_CARD_PAGE = "app_pages/model_card.py"
VERDICT_CHOICES = ("—", "agree", "disagree", "unsure")


def settings() -> AppSettings:
    return AppSettings.from_env()


@st.cache_resource(show_spinner="Loading the model...", max_entries=2)
def _load_predictor(path: str, fingerprint: str, backend: str = "auto") -> Any:
    """One Predictor per checkpoint version (fingerprint = path+size+mtime), shared by all sessions."""
    from medxray.inference import Predictor

    del fingerprint  # only part of the cache key: a re-trained checkpoint is loaded afresh
    log.info("loading checkpoint for the app (backend %s)", backend)
    return Predictor.from_checkpoint(path, device="auto", backend=backend)


@dataclass
class ModelState:
    predictor: Any | None
    fingerprint: str
    error: str | None  # why there is no predictor (None: no checkpoint configured)


def model_state(cfg: AppSettings) -> ModelState:
    """The shared predictor, or the reason there is none (never raises into the page)."""
    if cfg.checkpoint is None:
        return ModelState(None, "", None)
    try:
        fp = file_fingerprint(cfg.checkpoint)
    except OSError:
        return ModelState(None, "", f"the checkpoint {cfg.checkpoint} does not exist; make one with `make demo` "
                          "or `medxray finetune`, then start the app with `medxray app --checkpoint PATH`")
    try:
        return ModelState(_load_predictor(str(cfg.checkpoint), fp, cfg.backend), f"{fp}:{cfg.backend}", None)
    except MedxrayError as exc:
        return ModelState(None, fp, str(exc))
    except Exception as exc:  # a bug, but the page must stay usable: log it, show one line
        log.exception("loading the checkpoint failed")
        return ModelState(None, fp, user_message(exc))


def show_model_problem(ms: ModelState) -> None:
    if ms.error:
        st.error(f"The model could not be loaded: {ms.error}")
    elif ms.predictor is None:
        st.info(NO_CHECKPOINT_HELP)


@st.cache_data(max_entries=8, show_spinner="Reading the image...")
def load_study(sha256: str, _data: bytes, name: str, max_bytes: int) -> StudyImage:
    """Decode an upload once per file content (``_data`` is identified by ``sha256``)."""
    del sha256
    return load_study_bytes(_data, name, max_bytes=max_bytes)


@st.cache_data(max_entries=64, show_spinner="Running the model...")
def predict(model_fingerprint: str, sha256: str, _predictor: Any, _pixels: np.ndarray) -> StudyPrediction:
    """Probabilities and CAMs once per (checkpoint version, image content)."""
    del model_fingerprint, sha256
    return predict_study(_predictor, _pixels)


def review_store(cfg: AppSettings) -> ReviewStore | None:
    try:
        return ReviewStore(cfg.reviews)
    except MedxrayError as exc:
        st.error(str(exc))
        return None


def results_dir(cfg: AppSettings) -> Path | None:
    """Results folder in use: the one typed on the worklist page, else the configured one."""
    typed = str(st.session_state.get("results_dir_override") or "").strip()
    if typed:
        return Path(typed).expanduser()
    return cfg.results


def results_dir_input(cfg: AppSettings) -> None:
    """Text box for the results folder; kept in a plain session key so it survives page changes."""
    def remember() -> None:
        st.session_state["results_dir_override"] = st.session_state["results_dir_input"]

    current = st.session_state.get("results_dir_override")
    st.text_input("Results folder (written by `medxray score-dicom ... --out DIR`)",
                  value=str(current if current is not None else (cfg.results or "")),
                  key="results_dir_input", on_change=remember)


# -- thresholds (sidebar; shared by all pages of a session, never written to the checkpoint) -----

def _thr_key(name: str) -> str:
    return f"thr_{name}"


def label_names_and_defaults(ms: ModelState, results_labels: list[str] | None = None) -> tuple[list[str], dict]:
    if ms.predictor is not None:
        labels = list(ms.predictor.label_names)
        return labels, default_thresholds(labels, getattr(ms.predictor, "thresholds", None))
    labels = list(results_labels or [])
    return labels, default_thresholds(labels, None)


def threshold_controls(labels: list[str], defaults: dict[str, float]) -> None:
    """Sliders that override the checkpoint's operating thresholds for this session only."""
    if not labels:
        return
    with st.sidebar.expander("Operating thresholds", expanded=False):
        st.caption("From the checkpoint; changes apply to this browser session only.")
        if st.button("Reset to checkpoint thresholds", key="thr_reset"):
            for n in labels:
                st.session_state[_thr_key(n)] = float(defaults[n])
        for n in labels:
            key = _thr_key(n)
            if key not in st.session_state:
                st.session_state[key] = float(defaults[n])
            st.slider(n, min_value=0.0, max_value=1.0, step=0.01, key=key)


def thresholds(labels: list[str], defaults: dict[str, float]) -> dict[str, float]:
    return {n: float(st.session_state.get(_thr_key(n), defaults.get(n, 0.5))) for n in labels}


def export_button(store: ReviewStore | None, *, key: str, where: Any = None) -> None:
    """Download every review as CSV (generated when clicked)."""
    if store is None:
        return
    target = where if where is not None else st
    target.download_button("Export reviews (CSV)", data=store.export_csv, file_name="medxray_reviews.csv",
                           mime="text/csv", on_click="ignore", key=key,
                           help=f"All reviews saved in {store.path}")


# -- results folder ------------------------------------------------------------------------------

@st.cache_data(max_entries=4, show_spinner=False)
def _read_results(path: str, fingerprint: str) -> Any:
    del fingerprint  # re-read when results.csv changes (the nightly scorer appends to it)
    return load_results(path)


def current_results(cfg: AppSettings) -> tuple[Path | None, Any, str | None]:
    """(folder, results DataFrame or None, error message or None) for the folder in use."""
    folder = results_dir(cfg)
    if folder is None:
        return None, None, None
    try:
        fp = file_fingerprint(folder / RESULTS_FILENAME)
    except OSError:
        return folder, None, (f"{folder} has no {RESULTS_FILENAME}; run `medxray score-dicom INPUT "
                              f"--checkpoint C --out {folder}` first")
    try:
        return folder, _read_results(str(folder), fp), None
    except MedxrayError as exc:
        return folder, None, str(exc)


def results_labels(cfg: AppSettings) -> list[str]:
    _, df, _ = current_results(cfg)
    return result_label_names(df) if df is not None else []


# -- study page pieces ---------------------------------------------------------------------------

def _show_error(exc: BaseException, what: str) -> None:
    if not isinstance(exc, MedxrayError):
        log.exception("%s failed", what)
    st.error(f"Cannot open this image: {user_message(exc)}")


def open_study(cfg: AppSettings, from_results: bool, folder: Path | None,
               results: Any) -> tuple[StudyImage, dict | None] | None:
    """The chosen image (and its results row), or None after explaining why there is none."""
    if from_results:
        ok = results[results["status"].astype(str) == "ok"]
        if not len(ok):
            st.info("The results folder has no successfully scored images.")
            return None
        options = [int(i) for i in ok.index]
        if st.session_state.get("study_row") not in options:
            st.session_state["study_row"] = options[0]
        row_idx = st.selectbox("Scored image", options, key="study_row",
                               format_func=lambda i: Path(str(results.at[i, "path"])).name)
        row = results.loc[row_idx].to_dict()
        path = resolve_result_path(folder, str(row.get("path", "")))
        try:
            data = path.read_bytes() if path.stat().st_size <= cfg.max_upload_bytes else None
            if data is None:
                raise DataError(f"{path.name} is larger than this app's limit of {cfg.max_upload_mb:g} MB")
            return load_study(hashlib.sha256(data).hexdigest(), data, path.name, cfg.max_upload_bytes), row
        except FileNotFoundError:
            st.error(f"{path} no longer exists; the stored results are shown in the worklist only.")
        except Exception as exc:
            _show_error(exc, "opening a results image")
        return None
    uploaded = st.file_uploader(
        f"DICOM, PNG or JPEG chest radiograph (up to {cfg.max_upload_mb:g} MB)", key="upload",
        help="DICOM files without a .dcm extension are recognised by their content.")
    if uploaded is None:
        st.caption("Upload an image to see the model's findings.")
        return None
    try:
        if uploaded.size > cfg.max_upload_bytes:  # refuse before reading it into memory again
            raise DataError(
                f"{uploaded.name} is {uploaded.size / 2**20:.1f} MB, above this app's upload limit of "
                f"{cfg.max_upload_mb:g} MB; export a smaller image or start the app with a larger --max-upload-mb")
        data = uploaded.getvalue()
        return load_study(hashlib.sha256(data).hexdigest(), data, uploaded.name, cfg.max_upload_bytes), None
    except Exception as exc:
        _show_error(exc, "reading an upload")
        return None


def prediction_for(ms: ModelState, study: StudyImage, folder: Path | None,
                   row: dict | None) -> StudyPrediction | None:
    """Live model output when a model is loaded, else the stored results row, else None."""
    if ms.predictor is not None:
        try:
            return predict(ms.fingerprint, study.sha256, ms.predictor, study.pixels)
        except Exception as exc:
            if not isinstance(exc, MedxrayError):
                log.exception("prediction failed")
            st.error(f"The model could not score this image: {user_message(exc)}")
            return None
    if row is not None:
        labels = [c[2:] for c in row if str(c).startswith("p_")]
        probs = result_probabilities(row, labels)
        if probs is not None:
            return StudyPrediction(labels, probs, None, str(row.get("model_version", "") or ""))
    return None


def window_controls(study: StudyImage) -> tuple[float, float] | None:
    """Window center/width sliders for DICOM (display only: the model always sees the default window)."""
    if study.kind != "dicom" or study.raw is None:
        return None
    lo, hi = window_range(study)
    span = hi - lo
    c0, w0 = study.window if study.window is not None else ((lo + hi) / 2, span)
    c0 = float(min(max(c0, lo), hi))
    w0 = float(min(max(w0, 1.0), 2 * span))
    suffix = study.sha256[:16]
    step = 1.0 if span > 50 else span / 500
    with st.expander("Window / level", expanded=False):
        st.caption("Changes the display only; the model always reads the file's default window.")
        cols = st.columns(2)
        center = cols[0].slider("Window center", float(lo), float(hi), c0, step, key=f"wc_{suffix}")
        width = cols[1].slider("Window width", float(step), float(2 * span), w0, step, key=f"ww_{suffix}")
    if (center, width) == (c0, w0):
        return None  # untouched: show the decoder's own rendering (VOI LUT, sigmoid, ... included)
    return float(center), float(width)


def cam_image(study: StudyImage, pred: StudyPrediction, finding: str, display: np.ndarray,
              alpha: float, folder: Path | None, row: dict | None) -> np.ndarray | None:
    """Overlay for one finding: computed from the CAM, or score-dicom's stored PNG without a model."""
    if pred.cams is not None:
        return cam_overlay(display, pred.cams[pred.label_names.index(finding)], alpha)
    if folder is not None and row is not None:
        p = stored_cam_path(folder, row, finding)
        if p.is_file():
            from PIL import Image

            with Image.open(p) as im:
                return np.asarray(im.convert("RGB"))
    return None


def review_form(cfg: AppSettings, study: StudyImage, pred: StudyPrediction, table: Any) -> None:
    """Per-finding agree/disagree/unsure, a note and the reviewer's name; one transaction per save."""
    store = review_store(cfg)
    if store is None:
        return
    st.subheader("Review")
    latest = store.latest(study.key.value)
    if latest is not None:
        st.caption(f"Last reviewed by {latest.reviewer} at {latest.saved_at_utc} (UTC); "
                   "saving again adds a new review, the latest one counts.")
    previous = latest.verdicts if latest else {}
    suffix = study.sha256[:16]
    with st.form(f"review_{suffix}", clear_on_submit=False):
        reviewer = st.text_input("Reviewer name", value=st.session_state.get("reviewer_last", ""),
                                 key=f"reviewer_{suffix}")
        choices: dict[str, str] = {}
        for _, r in table.iterrows():
            name = str(r["finding"])
            prev = previous.get(name)
            mark = "positive" if r["positive"] else "negative"
            choices[name] = st.radio(
                f"{name}: p = {r['probability']:.3f} ({mark} at {r['threshold']:.2f})", VERDICT_CHOICES,
                index=VERDICT_CHOICES.index(prev) if prev in VERDICT_CHOICES else 0,
                horizontal=True, key=f"verdict_{suffix}_{name}")
        note = st.text_area("Note", value=latest.note if latest else "", key=f"note_{suffix}",
                            help="Do not type patient names or identifiers here.")
        submitted = st.form_submit_button("Save review", type="primary")
    if submitted:
        verdicts = {n: v for n, v in choices.items() if v in ("agree", "disagree", "unsure")}
        try:
            saved = store.save(study.key, verdicts, reviewer=reviewer, note=note, model_version=pred.model_version,
                               probabilities=pred.as_dict(), thresholds=dict(zip(table["finding"], table["threshold"])))
        except MedxrayError as exc:
            st.error(f"Review not saved: {exc}")
        else:
            st.session_state["reviewer_last"] = saved.reviewer
            n = len(saved.findings)
            st.success(f"Review saved ({n} finding{'s' if n != 1 else ''}, review #{saved.review_id}).")
    export_button(store, key="export_study")
