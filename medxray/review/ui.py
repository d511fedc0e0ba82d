"""Streamlit glue shared by the app's pages: cached resources, standing notices, identity, results folders.

Kept apart from the plain logic in :mod:`medxray.review` (settings, study, viewing, worklist,
model_card: unit-tested without Streamlit) so the pages in ``app/`` stay thin. The model is
loaded once per checkpoint version with ``st.cache_resource`` and shared by all sessions: it is
in eval mode, CAMs come from features and head weights (no hooks) and nothing here mutates it.
Per-image work is cached with ``st.cache_data`` keyed by the file's SHA-256. The Study page's
widgets (navigation, viewing, review with keyboard shortcuts) are in :mod:`medxray.review.ui_study`.
Every session-state and widget key comes from :mod:`medxray.review.session_keys` (none is typed here).

Only this module and :mod:`medxray.review.ui_study` import streamlit; nothing in ``medxray``
imports them (only the pages in ``app/`` do).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import numpy as np
import streamlit as st

from medxray.errors import MedxrayError
from medxray.labels import display_name
from medxray.review import ReviewStore
from medxray.review.model_card import synthetic_banner
from medxray.review.safe import md_escape
from medxray.review.session_keys import AppKeys
from medxray.review.settings import (
    IDENTITY_TYPED,
    NO_CHECKPOINT_HELP,
    NOT_FOR_CLINICAL_USE_SHORT,
    AppSettings,
    allowed_results_folder,
    file_fingerprint,
    read_proxy_secret,
    reviewer_identity,
    user_message,
)
from medxray.review.study import StudyImage, StudyPrediction, default_thresholds, load_study_bytes, predict_study
from medxray.review.study import finding_map as study_finding_map
from medxray.review.worklist import (
    RESULTS_FILENAME,
    find_results_folders,
    load_results,
    result_label_names,
    row_image_keys,
)

log = logging.getLogger(__name__)

STUDY_PAGE = "app_pages/study.py"
WORKLIST_PAGE = "app_pages/worklist.py"
MODEL_CARD_PAGE = "app_pages/model_card.py"
REVIEWER_COOKIE = "medxray_reviewer"


def settings() -> AppSettings:
    return AppSettings.from_env()


# -- standing notices (every page, drawn before anything slow) -----------------------------------


def clinical_use_notice() -> None:
    """The not-for-clinical-use line at the top of every page; drawn before the model loads."""
    st.markdown(f":orange-badge[:material/warning: {NOT_FOR_CLINICAL_USE_SHORT}]")


def model_banner(ms: "ModelState") -> None:
    """A prominent warning on every page when the model was trained on synthetic data."""
    if ms.predictor is None:
        return
    text = synthetic_banner(ms.predictor.metadata)
    if text:
        st.warning(text, icon=":material/science:")


# -- model ---------------------------------------------------------------------------------------


@st.cache_resource(show_spinner="Loading the model... (research software, not for clinical use)", max_entries=2)
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
    try:  # a model registry is read at every script run: a promotion reaches the next study, no restart
        from medxray.site.registry import current_checkpoint

        path = current_checkpoint(cfg.checkpoint) if cfg.checkpoint.is_dir() else cfg.checkpoint
    except MedxrayError as exc:
        return ModelState(None, "", str(exc))
    try:
        fp = file_fingerprint(path)
    except OSError:
        return ModelState(
            None,
            "",
            f"the checkpoint {cfg.checkpoint} does not exist; make one with `make demo` "
            "or `medxray finetune`, then start the app with `medxray app --checkpoint PATH`",
        )
    try:
        return ModelState(_load_predictor(str(path), fp, cfg.backend), f"{fp}:{cfg.backend}", None)
    except MedxrayError as exc:
        return ModelState(None, fp, str(exc))
    except Exception as exc:  # a bug, but the page must stay usable: log it, show one line
        log.exception("loading the checkpoint failed")
        return ModelState(None, fp, user_message(exc))


def show_model_problem(ms: ModelState) -> None:
    if ms.error:
        st.error(f"The model could not be loaded: {md_escape(ms.error)}")
    elif ms.predictor is None:
        st.info(NO_CHECKPOINT_HELP)


@st.cache_data(max_entries=8, show_spinner="Reading the image...")
def load_study(sha256: str, _data: bytes, name: str, max_bytes: int) -> StudyImage:
    """Decode an upload once per file content (``_data`` is identified by ``sha256``)."""
    del sha256
    return load_study_bytes(_data, name, max_bytes=max_bytes)


def load_study_data(data: bytes, name: str, cfg: AppSettings) -> StudyImage:
    return load_study(hashlib.sha256(data).hexdigest(), data, name, cfg.max_upload_bytes)


@st.cache_data(max_entries=64, show_spinner="Running the model...")
def predict(model_fingerprint: str, sha256: str, _predictor: Any, _pixels: np.ndarray) -> StudyPrediction:
    """Probabilities and CAMs once per (checkpoint version, image content)."""
    del model_fingerprint, sha256
    return predict_study(_predictor, _pixels)


@st.cache_data(max_entries=256, show_spinner="Computing the map...")
def finding_map(
    model_fingerprint: str,
    sha256: str,
    finding: str,
    _predictor: Any,
    _pixels: np.ndarray,
    _network_input: np.ndarray | None = None,
) -> np.ndarray:
    """The finding's map once per (checkpoint version, image content, finding); ``_network_input``
    (the prediction's preprocessed image, same content) spares preprocessing it again."""
    del model_fingerprint, sha256
    return study_finding_map(_predictor, _pixels, finding, _network_input)


def review_store(cfg: AppSettings) -> ReviewStore | None:
    try:
        return ReviewStore(cfg.reviews)
    except MedxrayError as exc:
        st.error(md_escape(exc))
        return None


# -- reviewer identity ---------------------------------------------------------------------------


def _proxy_secret(cfg: AppSettings) -> str | None:
    if cfg.proxy_secret_file is None:
        return None
    try:
        return read_proxy_secret(cfg.proxy_secret_file)
    except MedxrayError as exc:
        log.error("proxy secret unusable: %s", exc)
        return None


def reviewer(cfg: AppSettings) -> tuple[str, str]:
    """(name, source) of the person reviewing; draws the name box when the name is typed.

    The deployment decides when it can (``--login``: Streamlit's st.login/OIDC; ``--identity-header``:
    a trusted reverse proxy's header, believed only with the proxy's secret and only when it appears
    once, :func:`~medxray.review.settings.reviewer_identity`); otherwise the typed name, remembered
    for this browser session in a session cookie (so a reload keeps it). A name of "" means no
    review can be saved; the page says why.
    """
    user = None
    if cfg.login:
        try:
            user = {"is_logged_in": bool(st.user.is_logged_in), **st.user.to_dict()}
        except Exception as exc:  # auth not configured in secrets.toml
            st.error(f"Sign-in is switched on (--login) but not configured: {md_escape(user_message(exc))}")
            return "", "sign-in"
    # st.context.headers keeps repeated headers (get_all): the check needs every value, not the first
    deployed = reviewer_identity(cfg, headers=st.context.headers, user=user, proxy_secret=_proxy_secret(cfg))
    if deployed is not None:
        if not deployed.name and cfg.login:
            st.button("Sign in to review", on_click=st.login, key=AppKeys.SIGN_IN)
        elif not deployed.name:
            st.error(f"Reviewer refused: {md_escape(deployed.problem)}.", icon=":material/gpp_bad:")
        else:
            st.caption(f"Reviewer: **{md_escape(deployed.name)}** (from the {deployed.source})")
        return deployed.name, deployed.source
    if AppKeys.REVIEWER_NAME not in st.session_state:
        st.session_state[AppKeys.REVIEWER_NAME] = unquote(str((st.context.cookies or {}).get(REVIEWER_COOKIE, "")))[
            :200
        ]
    name = st.text_input(
        "Reviewer name", key=AppKeys.REVIEWER_NAME, help="Remembered for this browser session; saved with every review."
    ).strip()
    if name:
        # Session cookie (no expiry: gone when the browser closes), read back by st.context.cookies.
        st.html(
            f"<script>document.cookie = '{REVIEWER_COOKIE}=' + {_js_string(quote(name))} + "
            "'; path=/; SameSite=Strict';</script>",
            unsafe_allow_javascript=True,
        )
    return name, IDENTITY_TYPED


def _js_string(text: str) -> str:
    import json

    return json.dumps(text).replace("<", "\\u003c")


# -- thresholds (sidebar; shared by all pages of a session, never written to the checkpoint) -----


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
        if st.button("Reset to checkpoint thresholds", key=AppKeys.THRESHOLDS_RESET):
            for n in labels:
                st.session_state[AppKeys.threshold(n)] = float(defaults[n])
        for n in labels:
            key = AppKeys.threshold(n)
            if key not in st.session_state:
                st.session_state[key] = float(defaults[n])
            st.slider(md_escape(display_name(n)), min_value=0.0, max_value=1.0, step=0.01, key=key)


def thresholds(labels: list[str], defaults: dict[str, float]) -> dict[str, float]:
    return {n: float(st.session_state.get(AppKeys.threshold(n), defaults.get(n, 0.5))) for n in labels}


def export_buttons(store: ReviewStore | None, *, key: str, where: Any = None) -> None:
    """Download every review, and the audit trail of every change, as CSV (generated when clicked)."""
    if store is None:
        return
    target = where if where is not None else st
    target.download_button(
        "Export reviews (CSV)",
        data=store.export_csv,
        file_name="medxray_reviews.csv",
        mime="text/csv",
        on_click="ignore",
        key=key,
        help="Every saved review, one row per finding, with the image's file name and key",
    )
    target.download_button(
        "Export review history (CSV)",
        data=lambda: store.export_csv(history=True),
        file_name="medxray_review_history.csv",
        mime="text/csv",
        on_click="ignore",
        key=AppKeys.export_history(key),
        help="Who changed which verdict or note, and when",
    )


# -- results folders -----------------------------------------------------------------------------


@st.cache_data(max_entries=4, show_spinner=False)
def _read_results(path: str, fingerprint: str) -> Any:
    del fingerprint  # re-read when results.csv changes (the nightly scorer appends to it)
    return load_results(path)


@st.cache_data(max_entries=4, show_spinner="Reading the results folder...")
def _row_keys(path: str, fingerprint: str) -> list[str | None]:
    del fingerprint
    return row_image_keys(load_results(path), path)


@st.cache_data(ttl=30, show_spinner=False)
def _candidates(roots: tuple[str, ...]) -> list[str]:
    return [str(p) for p in find_results_folders([Path(r) for r in roots])]


def results_folder_picker(cfg: AppSettings) -> None:
    """Choose the results folder among the configured roots (worklist page); remembered for the session."""
    if not cfg.results:
        return
    options = _candidates(tuple(str(r) for r in cfg.results)) or [str(cfg.results[0])]
    current = st.session_state.get(AppKeys.RESULTS_DIR)
    if current and current not in options:
        options = [current] + options
    with st.container(horizontal=True):
        chosen = st.selectbox(
            "Results folder",
            options,
            index=options.index(current) if current in options else 0,
            key=AppKeys.RESULTS_CHOICE,
            help="Folders with a results.csv inside the folders this app was started with (--results)",
        )
        typed = st.text_input(
            "Or type a folder inside them",
            key=AppKeys.RESULTS_TYPED,
            placeholder="e.g. " + str(cfg.results[0] / "night-2024-05-01"),
        )
    st.session_state[AppKeys.RESULTS_DIR] = typed.strip() or chosen


def current_results(cfg: AppSettings) -> tuple[Path | None, Any, str | None]:
    """(folder, results DataFrame or None, error message or None) for the folder in use.

    The folder must lie inside the configured roots (:func:`allowed_results_folder`); one outside is
    refused with a sentence saying so, never opened.
    """
    if not cfg.results:
        return None, None, None
    asked = str(st.session_state.get(AppKeys.RESULTS_DIR) or _candidates(tuple(str(r) for r in cfg.results))[0])
    try:
        folder = allowed_results_folder(asked, cfg.results)
    except MedxrayError as exc:
        return None, None, str(exc)
    try:
        fp = file_fingerprint(folder / RESULTS_FILENAME)
    except OSError:
        return (
            folder,
            None,
            (
                f"{folder} has no {RESULTS_FILENAME}; run `medxray score-dicom INPUT "
                f"--checkpoint C --out {folder}` first"
            ),
        )
    try:
        return folder, _read_results(str(folder), fp), None
    except MedxrayError as exc:
        return folder, None, str(exc)


def results_row_keys(folder: Path) -> list[str | None]:
    return _row_keys(str(folder), file_fingerprint(folder / RESULTS_FILENAME))


def results_labels(cfg: AppSettings) -> list[str]:
    _, df, _ = current_results(cfg)
    return result_label_names(df) if df is not None else []
