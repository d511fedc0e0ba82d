"""medxray clinician-review app: `medxray app` or `streamlit run app/medxray_app.py`.

Thin entry point: page registry and the shared sidebar; all logic is in medxray.review (plain
functions in settings/study/worklist/model_card, Streamlit glue in medxray.review.ui).
"""

from pathlib import Path

import streamlit as st

from medxray.review import ui
from medxray.review.settings import NOT_FOR_CLINICAL_USE

HERE = Path(__file__).resolve().parent  # absolute: pages are found whatever the working directory

st.set_page_config(page_title="medxray review", page_icon=":material/radiology:", layout="wide")

nav = st.navigation([
    st.Page(HERE / ui.STUDY_PAGE, title="Study", icon=":material/radiology:", default=True),
    st.Page(HERE / ui.WORKLIST_PAGE, title="Worklist", icon=":material/list_alt:"),
    st.Page(HERE / ui.MODEL_CARD_PAGE, title="Model card", icon=":material/description:"),
])

cfg = ui.settings()
ms = ui.model_state(cfg)
labels, defaults = ui.label_names_and_defaults(ms, ui.results_labels(cfg))
with st.sidebar:
    st.caption(NOT_FOR_CLINICAL_USE)
    if ms.predictor is not None:
        st.caption(f"Model: {ms.predictor.architecture}, "
                   f"version {ms.predictor.metadata.get('model_version', '?')}")
ui.threshold_controls(labels, defaults)
ui.export_button(ui.review_store(cfg), key="export_sidebar", where=st.sidebar)
nav.run()
