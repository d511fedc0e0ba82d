"""Study page: one image, its predictions with thresholds, CAM overlays, warnings and the review form."""

import streamlit as st

from medxray.review import ui
from medxray.review.study import (display_image, distribution_warnings, findings_table, probability_figure,
                                  safe_metadata_table, to_uint8)

cfg = ui.settings()
ms = ui.model_state(cfg)
st.title("Study")
ui.show_model_problem(ms)

folder, results, _ = ui.current_results(cfg)  # the worklist page explains a broken folder
UPLOAD, FROM_RESULTS = "Upload a file", "From the results folder"
sources = [UPLOAD] + ([FROM_RESULTS] if results is not None else [])
request = st.session_state.pop("study_request", None)  # set by the worklist
if request is not None and results is not None:
    st.session_state["study_source"] = FROM_RESULTS
    st.session_state["study_row"] = int(request["row"])
if st.session_state.get("study_source") not in sources:
    st.session_state["study_source"] = sources[0]
source = st.radio("Image source", sources, horizontal=True, key="study_source")

opened = ui.open_study(cfg, source == FROM_RESULTS, folder, results)
if opened is None:
    st.stop()
study, row = opened

pred = ui.prediction_for(ms, study, folder, row)
image_size = getattr(ms.predictor, "image_size", None)
for warning in distribution_warnings(study, image_size=image_size):
    st.warning(warning)

# -- image, window/level, CAM -------------------------------------------------------------------
window = ui.window_controls(study)
display = display_image(study, window)
_, defaults = ui.label_names_and_defaults(ms, pred.label_names if pred else None)
thr = ui.thresholds(pred.label_names, defaults) if pred else {}
table = findings_table(pred.label_names, pred.probabilities, thr) if pred else None

cam_cols = st.columns([2, 1, 1]) if pred is not None else None
finding = show_cam = None
alpha = 0.4
if pred is not None:
    finding = cam_cols[0].selectbox("CAM for finding", list(table["finding"]), key="cam_finding",
                                    help="Findings ordered by probability")
    show_cam = cam_cols[1].toggle("Show CAM overlay", value=True, key="cam_on")
    alpha = cam_cols[2].slider("CAM opacity", 0.0, 1.0, 0.4, 0.05, key="cam_alpha")

left, right = st.columns(2)
left.image(to_uint8(display), caption="Original" + (" (display window)" if window else ""), width="stretch")
if pred is not None and show_cam:
    p = pred.as_dict()[finding]
    overlay = ui.cam_image(study, pred, finding, display, alpha, folder, row)
    if overlay is not None:
        right.image(overlay, caption=f"CAM: {finding} (p = {p:.3f}, threshold {thr[finding]:.2f})", width="stretch")
    else:
        right.info("No CAM available for this finding (no model loaded and no stored overlay).")

# -- predictions --------------------------------------------------------------------------------
if pred is not None:
    st.subheader("Findings")
    c1, c2 = st.columns([5, 4])
    c1.pyplot(probability_figure(table), width="stretch")
    c2.dataframe(table, hide_index=True, height=36 * (len(table) + 1) + 4,
                 column_config={"probability": st.column_config.ProgressColumn("probability", format="%.3f",
                                                                               min_value=0.0, max_value=1.0),
                                "threshold": st.column_config.NumberColumn("threshold", format="%.2f", width="small"),
                                "positive": st.column_config.CheckboxColumn("positive", width="small")})
    src = "model" if pred.cams is not None else "stored results (no model loaded)"
    st.caption(f"Probabilities from the {src}. Positive = probability at or above the operating threshold.")

with st.expander("Image metadata (non-identifying)"):
    st.dataframe(safe_metadata_table(study), hide_index=True)

# -- review -------------------------------------------------------------------------------------
if pred is not None:
    ui.review_form(cfg, study, pred, table)
