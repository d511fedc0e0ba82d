"""Study page: one image, its predictions with thresholds, CAM overlay, viewing controls and the keyboard review."""

import streamlit as st

from medxray.cam import no_evidence_text
from medxray.labels import display_name
from medxray.review import ui
from medxray.review import ui_study as us
from medxray.review.safe import md_escape
from medxray.review.session_keys import AppKeys
from medxray.review.study import (
    display_image,
    distribution_warnings,
    findings_table,
    probability_figure,
    safe_metadata_table,
    to_uint8,
)
from medxray.review.viewing import apply_view, cam_view
from medxray.review.worklist import filter_worklist, worklist_table

cfg = ui.settings()
ms = ui.model_state(cfg)
st.title("Study")
ui.show_model_problem(ms)
us.show_flash()

folder, results, _ = ui.current_results(cfg)  # the worklist page explains a broken folder
UPLOAD, FROM_RESULTS = "Upload a file", "From the results folder"
sources = [UPLOAD] + ([FROM_RESULTS] if results is not None else [])
request = st.session_state.pop(AppKeys.STUDY_REQUEST, None)  # set by the worklist
if results is not None and (request is not None or st.query_params.get("study")):
    if request is not None:
        st.session_state[AppKeys.STUDY_ROW] = int(request["row"])
    st.session_state[AppKeys.STUDY_SOURCE] = FROM_RESULTS
if st.session_state.get(AppKeys.STUDY_SOURCE) not in sources:
    st.session_state[AppKeys.STUDY_SOURCE] = sources[0]
source = st.radio("Image source", sources, horizontal=True, key=AppKeys.STUDY_SOURCE)

row = advance_to = None
if source == FROM_RESULTS:
    store = ui.review_store(cfg)
    reviews = store.latest_by_image(adopt=ui.results_row_keys(folder)) if store is not None else {}
    table_all = worklist_table(results, folder, {}, reviews, keys=ui.results_row_keys(folder))
    ok = table_all[table_all["status"] == "ok"]
    order = [
        r for r in st.session_state.get(AppKeys.WORKLIST_ORDER, {}).get(str(folder), []) if r in set(ok["row"])
    ] or list(filter_worklist(ok)["row"])
    reviewed_rows = set(int(r) for r in ok.loc[ok["reviewed"], "row"])
    row_idx = us.choose_results_study(results, order, reviewed_rows)
    if row_idx is None:
        st.stop()
    us.shortcut_help()
    advance_to = us.next_unreviewed(order, row_idx, reviewed_rows)
    row = results.loc[row_idx].to_dict()
    study = us.open_results_study(cfg, folder, row)
else:
    st.query_params.pop("study", None)
    study = us.open_upload(cfg)
if study is None:
    st.stop()

pred = us.prediction_for(ms, study, row)
image_size = getattr(ms.predictor, "image_size", None)
for warning in distribution_warnings(study, image_size=image_size, prediction=pred):  # OOD warning first
    st.warning(md_escape(warning))  # file text (DICOM attributes, results.csv): shown as text

# -- image, viewing, CAM ---------------------------------------------------------------------------
view, window_caption = us.view_controls(study)
display = display_image(study, view.window)
_, defaults = ui.label_names_and_defaults(ms, pred.label_names if pred else None)
thr = ui.thresholds(pred.label_names, defaults) if pred else {}
table = findings_table(pred.label_names, pred.probabilities, thr) if pred else None

finding = show_cam = None
if pred is not None:
    cam_cols = st.columns([2, 1, 1, 1], vertical_alignment="bottom")
    finding = us.current_finding(study, table, cam_cols[0])
    show_cam = cam_cols[1].toggle("Show CAM overlay", value=True, key=AppKeys.CAM_ON)
    style = cam_cols[2].radio("Map style", ["fill", "contour"], horizontal=True, key=AppKeys.CAM_STYLE)
    alpha = cam_cols[3].slider("CAM opacity", 0.0, 1.0, 0.4, 0.05, key=AppKeys.CAM_ALPHA, disabled=style == "contour")

left, right = st.columns(2)
extras = (", inverted" if view.invert else "") + (f", zoom {view.zoom:g}x" if view.zoom > 1 else "")
left.image(to_uint8(apply_view(display, view)), caption=f"Original ({window_caption}{extras})", width="stretch")
if pred is not None and show_cam:
    label = f"CAM: {md_escape(display_name(finding))} (p = {pred.as_dict()[finding]:.3f}, threshold {thr[finding]:.2f})"
    if pred.live or pred.cams is not None:
        cam = (
            pred.cams[pred.label_names.index(finding)]
            if pred.cams is not None
            else ui.finding_map(ms.fingerprint, study.sha256, finding, ms.predictor, study.pixels, pred.network_input)
        )
        right.image(
            cam_view(display, cam, view, alpha=alpha, style=style, finding=display_name(finding)),
            caption=label,
            width="stretch",
        )
        if not (cam > 0).any():
            right.caption(md_escape(no_evidence_text(display_name(finding))))
    else:
        overlay = us.stored_overlay(folder, row, finding)
        if overlay is not None:
            right.image(overlay, caption=label + ", stored by score-dicom", width="stretch")
        else:
            right.info("No CAM available for this finding (no model loaded and no stored overlay).")

# -- findings and review ----------------------------------------------------------------------------
if pred is not None:
    st.subheader("Findings")
    c1, c2 = st.columns([5, 4])
    c1.pyplot(probability_figure(table), width="stretch")
    with c2:
        us.findings_dataframe(table)
    src = "model" if pred.live or pred.cams is not None else "stored results of `medxray score-dicom` (no model loaded)"
    st.caption(f"Probabilities from the {src}. Red: at or above the operating threshold; grey: below it.")

with st.expander("Image details (no patient information)"):
    st.dataframe(safe_metadata_table(study), hide_index=True, height="content")

if pred is not None:
    us.review_panel(cfg, study, pred, table, advance_to, in_worklist=source == FROM_RESULTS)
