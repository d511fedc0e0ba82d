"""Streamlit widgets of the Study page: which study, how it is viewed, and the keyboard-driven review.

The reviewer's flow (issue "review app fit for a radiologist's working day", item 9) uses
Streamlit's own button shortcuts (``st.button(shortcut=...)``: handled in the page, nothing
fetched, ignored while typing in a text box): J / K next / previous study in the worklist's
order, N next unreviewed, Down / Up next / previous finding, A / D / U agree / disagree / unsure
for the current finding (then the next finding becomes current), Ctrl+Enter saves and, when
"open the next unreviewed study" is on, moves on. The current finding is also the one whose
map is shown, so the control always names the map on screen. Each results study has its URL
(``?study=<path in results.csv>``).

Imports streamlit (with :mod:`medxray.review.ui`, the only modules that do); nothing in
``medxray`` imports this one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import streamlit as st

from medxray.errors import DataError, MedxrayError
from medxray.labels import display_name
from medxray.review import ReviewStore
from medxray.review.safe import md_escape
from medxray.review.session_keys import AppKeys, StudyKeys
from medxray.review.settings import AppSettings, user_message
from medxray.review.study import NEGATIVE_COLOUR, POSITIVE_COLOUR, StudyImage, StudyPrediction, window_range
from medxray.review.ui import load_study_data, predict, review_store, reviewer
from medxray.review.viewing import PRESET_DEFAULT, PRESETS, ZOOM_LEVELS, ViewState, preset_window, window_text
from medxray.review.worklist import next_unreviewed, read_result_file, result_probabilities, step_row

log = logging.getLogger(__name__)

VERDICT_CHOICES = ("—", "agree", "disagree", "unsure")
SHORTCUTS: tuple[tuple[str, str], ...] = (
    ("J / K", "next / previous study (worklist order)"),
    ("N", "next unreviewed study"),
    ("Down / Up", "next / previous finding (its map is shown)"),
    ("A / D / U", "agree / disagree / unsure for the current finding, then the next finding"),
    ("Ctrl+Enter", "save the review (then the next unreviewed study, if chosen)"),
    ("V", "reset the view (window, invert, zoom)"),
)


def shortcut_help() -> None:
    with st.expander("Keyboard shortcuts", expanded=False, icon=":material/keyboard:"):
        st.markdown("\n".join(f"- **{k}**: {what}" for k, what in SHORTCUTS))


# -- which study ---------------------------------------------------------------------------------


def _go(row: int | None) -> None:
    if row is not None:
        st.session_state[AppKeys.STUDY_ROW] = int(row)


def choose_results_study(results: pd.DataFrame, order: list[int], reviewed_rows: set[int]) -> int | None:
    """The results row on screen: from the URL (?study=), the worklist, or J/K/N; keeps the URL in step."""
    paths = results["path"].astype(str)
    wanted = st.query_params.get("study")
    if wanted and st.session_state.get(AppKeys.STUDY_URL_SEEN) != wanted:
        st.session_state[AppKeys.STUDY_URL_SEEN] = wanted
        hit = [int(i) for i in results.index[paths == wanted]]
        if hit:
            st.session_state[AppKeys.STUDY_ROW] = hit[0]
        else:
            st.warning(f"The link names {md_escape(wanted)}, which is not in this results folder.")
    if not order:
        st.info("The results folder has no successfully scored images.")
        return None
    if st.session_state.get(AppKeys.STUDY_ROW) not in order:
        st.session_state[AppKeys.STUDY_ROW] = order[0]
    current = int(st.session_state[AppKeys.STUDY_ROW])
    with st.container(horizontal=True, vertical_alignment="bottom"):
        st.selectbox("Study", order, key=AppKeys.STUDY_ROW, format_func=lambda i: Path(paths[i]).name)
        st.button(
            "Previous",
            shortcut="K",
            on_click=_go,
            args=(step_row(order, current, -1),),
            disabled=step_row(order, current, -1) is None,
            key=AppKeys.NAV_PREV,
            icon=":material/arrow_back:",
        )
        st.button(
            "Next",
            shortcut="J",
            on_click=_go,
            args=(step_row(order, current, 1),),
            disabled=step_row(order, current, 1) is None,
            key=AppKeys.NAV_NEXT,
            icon=":material/arrow_forward:",
        )
        nxt = next_unreviewed(order, current, reviewed_rows)
        st.button(
            "Next unreviewed",
            shortcut="N",
            on_click=_go,
            args=(nxt,),
            disabled=nxt is None,
            key=AppKeys.NAV_UNREVIEWED,
            icon=":material/skip_next:",
        )
    done = len(reviewed_rows & set(order))
    st.caption(f"Study {order.index(current) + 1} of {len(order)}; {done} reviewed.")
    st.query_params["study"] = paths[current]
    st.session_state[AppKeys.STUDY_URL_SEEN] = paths[current]
    return current


def open_results_study(cfg: AppSettings, folder: Path, row: dict) -> StudyImage | None:
    """The row's scored file, read only when it is a regular file inside the results folder's roots
    (:func:`medxray.review.worklist.read_result_file`); a refusal is one plain-text message."""
    try:
        path, data = read_result_file(folder, str(row.get("path", "")), max_bytes=cfg.max_upload_bytes)
        return load_study_data(data, path.name, cfg)
    except Exception as exc:
        _show_error(exc, "opening a results image")
    return None


def open_upload(cfg: AppSettings) -> StudyImage | None:
    uploaded = st.file_uploader(
        "DICOM, PNG or JPEG chest radiograph",
        key=AppKeys.UPLOAD,
        max_upload_size=cfg.max_upload_mb,
        help="DICOM files without a .dcm extension are recognised by their content.",
    )
    if uploaded is None:
        st.caption("Upload an image to see the model's findings.")
        return None
    try:
        if uploaded.size > cfg.max_upload_bytes:  # refuse before reading it into memory again
            raise DataError(
                f"{uploaded.name} is {uploaded.size / 2**20:.1f} MB, above this app's upload limit of "
                f"{cfg.max_upload_mb} MB; export a smaller image or start the app with a larger --max-upload-mb"
            )
        st.session_state.setdefault(AppKeys.UPLOAD_T0, {}).setdefault(uploaded.file_id, time.monotonic())
        return load_study_data(uploaded.getvalue(), uploaded.name, cfg)
    except Exception as exc:
        _show_error(exc, "reading an upload")
        return None


def _show_error(exc: BaseException, what: str) -> None:
    if not isinstance(exc, MedxrayError):
        log.exception("%s failed", what)
    st.error(f"Cannot open this image: {md_escape(user_message(exc))}")


def prediction_for(ms: Any, study: StudyImage, row: dict | None) -> StudyPrediction | None:
    """Live model output when a model is loaded, else the stored results row, else None."""
    if ms.predictor is not None:
        try:
            return predict(ms.fingerprint, study.sha256, ms.predictor, study.pixels)
        except Exception as exc:
            if not isinstance(exc, MedxrayError):
                log.exception("prediction failed")
            st.error(f"The model could not score this image: {md_escape(user_message(exc))}")
            return None
    if row is not None:
        labels = [c[2:] for c in row if str(c).startswith("p_")]
        probs = result_probabilities(row, labels)
        if probs is not None:
            stored = str(row.get("warnings") or "") if not pd.isna(row.get("warnings")) else ""
            return StudyPrediction(
                labels,
                probs,
                None,
                str(row.get("model_version", "") or ""),  # scorer's OOD text
                warnings=[w for w in stored.split("; ") if w.startswith("out of distribution")],
            )
    return None


# -- viewing -------------------------------------------------------------------------------------


def _apply_preset(study: StudyImage, keys: StudyKeys) -> None:
    if study.raw is None:
        return
    preset = st.session_state.get(keys.preset, PRESET_DEFAULT)
    win = preset_window(study, preset) or _default_window(study)
    st.session_state[keys.window_center], st.session_state[keys.window_width] = _clamped(study, win)


def _default_window(study: StudyImage) -> tuple[float, float]:
    lo, hi = window_range(study)
    return study.window if study.window is not None else ((lo + hi) / 2, hi - lo)


def _clamped(study: StudyImage, win: tuple[float, float]) -> tuple[float, float]:
    lo, hi = window_range(study)
    span = hi - lo
    step = 1.0 if span > 50 else span / 500
    return float(min(max(win[0], lo), hi)), float(min(max(win[1], step), 2 * span))


def _reset_view(study: StudyImage, keys: StudyKeys) -> None:
    st.session_state[keys.preset] = PRESET_DEFAULT
    st.session_state[keys.invert] = False
    st.session_state[keys.zoom] = 1.0
    st.session_state[keys.pan_x] = st.session_state[keys.pan_y] = 50
    _apply_preset(study, keys)


def view_controls(study: StudyImage) -> tuple[ViewState, str]:
    """Window presets (file default, lung, mediastinum, bone), invert, zoom and pan; display only."""
    keys = StudyKeys.for_sha256(study.sha256)
    with st.container(horizontal=True, vertical_alignment="bottom"):
        preset = st.selectbox(
            "Window",
            PRESETS,
            key=keys.preset,
            on_change=_apply_preset,
            args=(study, keys),
            help="Chest presets from this image's own grey levels",
        )
        invert = st.toggle("Invert", key=keys.invert)
        zoom = st.select_slider("Zoom", ZOOM_LEVELS, value=1.0, key=keys.zoom, format_func=lambda z: f"{z:g}x")
        st.button("Reset view", shortcut="V", on_click=_reset_view, args=(study, keys), key=keys.reset_view)
    cx = cy = 50
    if zoom > 1:
        with st.container(horizontal=True):
            cx = st.slider("Pan left-right", 0, 100, 50, key=keys.pan_x, format="%d%%")
            cy = st.slider("Pan up-down", 0, 100, 50, key=keys.pan_y, format="%d%%")
    window = None
    if study.raw is not None:
        c0, w0 = _clamped(study, _default_window(study))
        lo, hi = window_range(study)
        step = 1.0 if hi - lo > 50 else (hi - lo) / 500
        with st.expander("Window / level (fine)", expanded=False):
            st.caption(
                "In the file's stored values after the modality LUT. Changes the display only; the model "
                "always reads the file's default window."
            )
            cols = st.columns(2)
            center = cols[0].slider("Window center", float(lo), float(hi), c0, step, key=keys.window_center)
            width = cols[1].slider("Window width", float(step), float(2 * (hi - lo)), w0, step, key=keys.window_width)
        if (center, width) != (c0, w0):
            window = (float(center), float(width))
    elif preset != PRESET_DEFAULT:
        window = preset_window(study, preset)
    view = ViewState(window=window, invert=bool(invert), zoom=float(zoom), center_x=cx / 100, center_y=cy / 100)
    return view, window_text(study, window)


# -- findings, current finding, review -----------------------------------------------------------


def findings_dataframe(table: pd.DataFrame) -> None:
    """The findings table: readable names, probability bars red at/above the threshold, grey below (as the chart)."""
    st.dataframe(
        table,
        hide_index=True,
        height="content",
        column_order=["name", "above", "below", "threshold"],
        column_config={
            "name": st.column_config.TextColumn("Finding"),
            "above": st.column_config.ProgressColumn(
                "At/above threshold", format="%.3f", min_value=0.0, max_value=1.0, color=POSITIVE_COLOUR
            ),
            "below": st.column_config.ProgressColumn(
                "Below threshold", format="%.3f", min_value=0.0, max_value=1.0, color=NEGATIVE_COLOUR
            ),
            "threshold": st.column_config.NumberColumn("Threshold", format="%.2f", width="small"),
        },
    )


def current_finding(study: StudyImage, table: pd.DataFrame, where: Any) -> str:
    """The finding whose map is shown and which A/D/U apply to; each new image starts on its own top finding."""
    key = StudyKeys.for_sha256(study.sha256).current_finding
    names = list(table["finding"])
    if st.session_state.get(key) not in names:
        st.session_state[key] = names[0]
    return where.selectbox(
        "Current finding (map shown)",
        names,
        key=key,
        format_func=display_name,
        help="Ordered by probability. Down / Up move through them; A / D / U record a verdict.",
    )


def _step_finding(key: str, names: list[str], step: int) -> None:
    cur = st.session_state.get(key, names[0])
    i = names.index(cur) + step if cur in names else 0
    st.session_state[key] = names[min(max(i, 0), len(names) - 1)]


def _set_verdict(keys: StudyKeys, names: list[str], verdict: str) -> None:
    cur = st.session_state.get(keys.current_finding, names[0])
    st.session_state[keys.verdict(cur)] = verdict
    _step_finding(keys.current_finding, names, 1)


CHANGED_SINCE_REVIEW = (
    "The last review was saved on a different file with the same Study, Series and SOP "
    "Instance UIDs (a changed re-send or a re-export): check the image and review it again."
)


def _save(
    cfg: AppSettings,
    store: ReviewStore,
    study: StudyImage,
    pred: StudyPrediction,
    table: pd.DataFrame,
    who: tuple[str, str],
    advance_to: int | None,
) -> None:
    keys = StudyKeys.for_sha256(study.sha256)
    names = list(table["finding"])
    verdicts = {n: st.session_state.get(keys.verdict(n)) for n in names}
    verdicts = {n: v for n, v in verdicts.items() if v in ("agree", "disagree", "unsure")}
    name = st.session_state.get(AppKeys.REVIEWER_NAME, "") if who[1] == "typed" else who[0]
    if who[1] != "typed" and not name:  # the deployment could not name the reviewer: never fall back to a guess
        st.session_state[AppKeys.REVIEW_FLASH] = (
            "error",
            "Review not saved: the reviewer is unknown (see the message above the review).",
        )
        return
    try:
        saved = store.save(
            study.key,
            verdicts,
            reviewer=name,
            note=st.session_state.get(keys.note, ""),
            model_version=pred.model_version,
            probabilities=pred.as_dict(),
            thresholds=dict(zip(table["finding"], table["threshold"])),
            file_name=study.name,
            identity_source=who[1],
            content_sha256=study.sha256,
        )
    except MedxrayError as exc:
        st.session_state[AppKeys.REVIEW_FLASH] = ("error", f"Review not saved: {md_escape(exc)}")
        return
    n = len(saved.findings)
    plural = "s" if n != 1 else ""
    msg = f"Review saved for {md_escape(study.name or 'this image')} ({n} finding{plural}, review #{saved.review_id})."
    if advance_to is not None and st.session_state.get(AppKeys.AUTO_ADVANCE, True):
        st.session_state[AppKeys.STUDY_ROW] = int(advance_to)
        msg += " Opened the next unreviewed study."
    st.session_state[AppKeys.REVIEW_FLASH] = ("success", msg)


def show_flash() -> None:
    flash = st.session_state.pop(AppKeys.REVIEW_FLASH, None)
    if flash:
        (st.success if flash[0] == "success" else st.error)(flash[1])


def review_panel(
    cfg: AppSettings,
    study: StudyImage,
    pred: StudyPrediction,
    table: pd.DataFrame,
    advance_to: int | None,
    in_worklist: bool,
) -> None:
    """Per-finding verdicts (mouse or A/D/U), a note, the reviewer; Ctrl+Enter saves (one transaction)."""
    store = review_store(cfg)
    if store is None:
        return
    st.subheader("Review")
    who = reviewer(cfg)
    latest = store.latest(study.key.value)
    if latest is not None:
        _last_review_caption(latest, study)
    keys = StudyKeys.for_sha256(study.sha256)
    names = list(table["finding"])
    _verdict_buttons(keys, names)
    _finding_radios(table, keys, latest.verdicts if latest else {})
    st.text_area(
        "Note",
        value=latest.note if latest else "",
        key=keys.note,
        help="Do not type patient names or identifiers here.",
    )
    with st.container(horizontal=True, vertical_alignment="center"):
        st.button(
            "Save review",
            shortcut="Ctrl+Enter",
            type="primary",
            key=AppKeys.SAVE_REVIEW,
            on_click=_save,
            disabled=who[1] != "typed" and not who[0],
            args=(cfg, store, study, pred, table, who, advance_to if in_worklist else None),
        )
        if in_worklist:
            st.checkbox("Then open the next unreviewed study", value=True, key=AppKeys.AUTO_ADVANCE)
    _review_history(store, study)


def _last_review_caption(latest: Any, study: StudyImage) -> None:
    """Who reviewed the study last and when (shown as text); a warning when the file changed since."""
    st.caption(
        f"Last reviewed by {md_escape(latest.reviewer)} at {md_escape(latest.saved_at_utc)} (UTC); "
        "saving again adds a new review, the latest one counts, the history keeps every change."
    )
    if latest.content_sha256 and latest.content_sha256 != study.sha256:  # same UIDs, another file
        st.warning(CHANGED_SINCE_REVIEW)


def _verdict_buttons(keys: StudyKeys, names: list[str]) -> None:
    """One row of buttons with keyboard shortcuts: agree / disagree / unsure on the current finding
    (A/D/U), previous / next finding (Up/Down)."""
    with st.container(horizontal=True):
        st.button("Agree", shortcut="A", on_click=_set_verdict, args=(keys, names, "agree"), key=AppKeys.VERDICT_AGREE)
        st.button(
            "Disagree",
            shortcut="D",
            on_click=_set_verdict,
            args=(keys, names, "disagree"),
            key=AppKeys.VERDICT_DISAGREE,
        )
        st.button(
            "Unsure", shortcut="U", on_click=_set_verdict, args=(keys, names, "unsure"), key=AppKeys.VERDICT_UNSURE
        )
        st.button(
            "Previous finding",
            shortcut="Up",
            on_click=_step_finding,
            args=(keys.current_finding, names, -1),
            key=AppKeys.FINDING_PREV,
            icon=":material/arrow_upward:",
        )
        st.button(
            "Next finding",
            shortcut="Down",
            on_click=_step_finding,
            args=(keys.current_finding, names, 1),
            key=AppKeys.FINDING_NEXT,
            icon=":material/arrow_downward:",
        )


def _finding_radios(table: pd.DataFrame, keys: StudyKeys, previous: Mapping[str, str]) -> None:
    """One verdict radio per finding (probability, call at its threshold), preset from the latest
    review; the current finding is marked."""
    current = st.session_state.get(keys.current_finding)
    for _, r in table.iterrows():
        n = str(r["finding"])
        key = keys.verdict(n)
        if key not in st.session_state:
            st.session_state[key] = previous.get(n) if previous.get(n) in VERDICT_CHOICES else VERDICT_CHOICES[0]
        mark = "positive" if r["positive"] else "negative"
        label = f"{md_escape(display_name(n))}: p = {r['probability']:.3f} ({mark} at {r['threshold']:.2f})"
        st.radio(("▶ " if n == current else "") + label, VERDICT_CHOICES, horizontal=True, key=key)


def _review_history(store: ReviewStore, study: StudyImage) -> None:
    """Every stored change of the study's reviews, in an expander (nothing when never reviewed)."""
    history = list(store.iter_history_rows(study.key.value))
    if history:
        with st.expander(f"Review history ({len(history)} change{'s' if len(history) != 1 else ''})"):
            df = pd.DataFrame(history)[
                ["saved_at_utc", "reviewer", "identity_source", "change", "finding", "previous", "new"]
            ]
            df["finding"] = [display_name(f) if f else "" for f in df["finding"]]
            st.dataframe(df, hide_index=True, height="content")


def stored_overlay(folder: Path | None, row: dict | None, finding: str) -> np.ndarray | None:
    """score-dicom's stored overlay PNG for a finding (no model loaded); only from inside the results folder."""
    import io

    from medxray.review.safe import read_contained_bytes
    from medxray.review.worklist import stored_cam_path

    if folder is None or row is None:
        return None
    try:
        p = stored_cam_path(folder, row, finding)
        if not p.is_file():
            return None
        _, data = read_contained_bytes(str(p), [folder], max_bytes=MAX_OVERLAY_BYTES, what="stored map")
    except MedxrayError as exc:
        st.error(f"The stored map is not shown: {md_escape(exc)}")
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_OVERLAY_PIXELS:
                raise ValueError(f"{im.width}x{im.height} pixels")
            return np.asarray(im.convert("RGB"))
    except Exception as exc:  # a damaged or oversized PNG: say so, keep the page
        st.error(f"The stored map {md_escape(p.name)} cannot be shown: {md_escape(exc)}")
        return None


MAX_OVERLAY_BYTES = 64 * 2**20
MAX_OVERLAY_PIXELS = 16_000_000
