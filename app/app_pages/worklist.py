"""Worklist page: a score-dicom results folder as a filterable table with review state."""

import streamlit as st

from medxray.review import ui
from medxray.review.worklist import WORKLIST_COLUMNS, filter_worklist, result_label_names, worklist_table

cfg = ui.settings()
ms = ui.model_state(cfg)
st.title("Worklist")
ui.results_dir_input(cfg)
folder, results, error = ui.current_results(cfg)
if folder is None:
    st.info("No results folder configured: score a folder of DICOM files with "
            "`medxray score-dicom INPUT --checkpoint C --out OUT`, then start the app with "
            "`medxray app --results OUT` or type the folder above.")
    st.stop()
if error:
    st.error(error)
    st.stop()

store = ui.review_store(cfg)
reviews = store.latest_by_image() if store is not None else {}
result_labels = result_label_names(results)
labels, defaults = ui.label_names_and_defaults(ms, result_labels)
thr = ui.thresholds(result_labels, defaults)
table = worklist_table(results, folder, thr, reviews)

with st.container(horizontal=True):
    statuses = st.multiselect("Status", sorted(table["status"].unique()), default=sorted(table["status"].unique()),
                              key="wl_status")
    finding = st.selectbox("Finding", ["(any)"] + result_labels, key="wl_finding")
    reviewed = st.selectbox("Review state", ["all", "not reviewed", "reviewed"], key="wl_reviewed")
    sort_by = st.selectbox("Sort by", ["max_probability", "finding_probability", "n_positive", "file", "status"],
                           key="wl_sort")
    search = st.text_input("File name contains", key="wl_search")
positive_only = st.checkbox("Only images positive for the finding (any finding if none chosen)", key="wl_positive")

view = filter_worklist(table, statuses=statuses, finding=None if finding == "(any)" else finding,
                           positive_only=positive_only, reviewed=reviewed, search=search, sort_by=sort_by,
                           descending=sort_by not in ("file", "status"))
n_rev = int(table["reviewed"].sum())
st.caption(f"{len(view)} of {len(table)} images shown; {n_rev} reviewed; "
           f"{int((table['status'] != 'ok').sum())} failed to score. Choose a row to open it in the Study page.")
shown = list(WORKLIST_COLUMNS)
if finding != "(any)":
    shown.insert(3, f"p_{finding}")
event = st.dataframe(
    view, hide_index=True, column_order=shown, key="worklist_table", on_select="rerun",
    selection_mode="single-row",
    column_config={"max_probability": st.column_config.ProgressColumn("max probability", format="%.3f",
                                                                       min_value=0.0, max_value=1.0),
                   "reviewed": st.column_config.CheckboxColumn("reviewed")},
)
selected = event.selection.rows if event is not None else []
if selected:
    row = view.iloc[selected[0]]
    if row["status"] == "ok":
        st.session_state["study_request"] = {"row": int(row["row"])}
        st.switch_page(ui.STUDY_PAGE)
    else:
        st.warning(f"{row['file']} was not scored ({row['reason'] or 'error'}); there is nothing to review.")
ui.export_button(store, key="export_worklist")
