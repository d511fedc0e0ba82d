"""Worklist page: a score-dicom results folder (inside the configured roots) as a filterable table with review state."""

import streamlit as st

from medxray.dicom.codes import WARNING_PREFIXES
from medxray.labels import display_name
from medxray.review import ui
from medxray.review.safe import md_escape
from medxray.review.session_keys import AppKeys, WorklistKeys
from medxray.review.worklist import WORKLIST_COLUMNS, filter_worklist, result_label_names, worklist_table

cfg = ui.settings()
ms = ui.model_state(cfg)
st.title("Worklist")
if not cfg.results:
    st.info(
        "No results folder configured: score a folder of DICOM files with "
        "`medxray score-dicom INPUT --checkpoint C --out OUT`, then start the app with "
        "`medxray app --results OUT` (repeat --results to offer several folders)."
    )
    st.stop()
ui.results_folder_picker(cfg)
folder, results, error = ui.current_results(cfg)
if error:
    st.error(md_escape(error))
    st.stop()

store = ui.review_store(cfg)
reviews = store.latest_by_image(adopt=ui.results_row_keys(folder)) if store is not None else {}
result_labels = result_label_names(results)
labels, defaults = ui.label_names_and_defaults(ms, result_labels)
thr = ui.thresholds(result_labels, defaults)
table = worklist_table(results, folder, thr, reviews, keys=ui.results_row_keys(folder))

# Filter widgets are keyed per folder and per set of values, so a new folder starts with its own
# values (all statuses chosen) and the chips always describe the rows below.
statuses_here = sorted(table["status"].unique())
keys = WorklistKeys.for_folder(folder, statuses_here)
SORTS = {
    "max_probability": "Highest probability",
    "finding_probability": "Probability of the chosen finding",
    "n_positive": "Number of positive findings",
    "file": "File name",
    "status": "Status",
}
with st.container(horizontal=True):
    statuses = st.multiselect("Status", statuses_here, default=statuses_here, key=keys.status)
    finding = st.selectbox(
        "Finding",
        ["(any)"] + result_labels,
        key=keys.finding,
        format_func=lambda n: n if n == "(any)" else display_name(n),
    )
    reviewed = st.selectbox("Review state", ["all", "not reviewed", "reviewed"], key=keys.reviewed)
    sort_by = st.selectbox("Sort by", list(SORTS), key=keys.sort, format_func=SORTS.get)
    search = st.text_input("File name contains", key=keys.search)
    warning = st.selectbox(
        "Warnings",
        ["all", "any", "none", *WARNING_PREFIXES],
        key=keys.warning,
        help="the warnings column of results.csv (same texts as on the study page)",
    )
positive_only = st.checkbox("Only images positive for the finding (any finding if none chosen)", key=keys.positive_only)

view = filter_worklist(
    table,
    statuses=statuses,
    finding=None if finding == "(any)" else finding,
    positive_only=positive_only,
    reviewed=reviewed,
    search=search,
    sort_by=sort_by,
    descending=sort_by not in ("file", "status"),
    warning=None if warning == "all" else warning,
)
order = [int(r) for r, s in zip(view["row"], view["status"]) if s == "ok"]
st.session_state.setdefault(AppKeys.WORKLIST_ORDER, {})[str(folder)] = order  # the Study page steps in this order
n_rev = int(table["reviewed"].sum())
st.caption(
    f"{len(view)} of {len(table)} images shown; {n_rev} reviewed; "
    f"{int((table['status'] != 'ok').sum())} failed to score. Choose a row to open it, or press N "
    "to open the first unreviewed one."
)
unreviewed = [int(r) for r, done, s in zip(view["row"], view["reviewed"], view["status"]) if s == "ok" and not done]
if st.button(
    "Review the first unreviewed study",
    shortcut="N",
    disabled=not unreviewed,
    type="primary",
    icon=":material/play_arrow:",
    key=AppKeys.WORKLIST_START,
):
    st.session_state[AppKeys.STUDY_REQUEST] = {"row": unreviewed[0]}
    st.switch_page(ui.STUDY_PAGE, query_params={"study": str(results.at[unreviewed[0], "path"])})
shown = list(WORKLIST_COLUMNS)
if finding != "(any)":
    shown.insert(3, f"p_{finding}")
headers = {
    "file": "File",
    "status": "Status",
    "top_finding": "Top finding",
    "n_positive": "Positives",
    "positive_findings": "Positive findings",
    "modality": "Modality",
    "view": "View",
    "reviewer": "Reviewer",
    "review_summary": "Review",
    "reason": "Why it was not scored",
}
event = st.dataframe(
    view,
    hide_index=True,
    column_order=shown,
    key=keys.table,
    on_select="rerun",
    selection_mode="single-row",
    column_config={
        **{k: st.column_config.TextColumn(v) for k, v in headers.items()},
        **{
            f"p_{n}": st.column_config.ProgressColumn(display_name(n), format="%.3f", min_value=0.0, max_value=1.0)
            for n in result_labels
        },
        "max_probability": st.column_config.ProgressColumn(
            "Highest probability", format="%.3f", min_value=0.0, max_value=1.0
        ),
        "reviewed": st.column_config.CheckboxColumn("Reviewed"),
    },
)
selected = event.selection.rows if event is not None else []
if selected:
    row = view.iloc[selected[0]]
    if row["status"] == "ok":
        st.session_state[AppKeys.STUDY_REQUEST] = {"row": int(row["row"])}
        st.switch_page(ui.STUDY_PAGE, query_params={"study": str(results.at[int(row["row"]), "path"])})
    else:
        st.warning(
            f"{md_escape(row['file'])} was not scored: {md_escape(row['reason'] or 'no reason recorded.')} "
            "There is nothing to review."
        )
ui.export_buttons(store, key=AppKeys.EXPORT_WORKLIST)
