"""medxray clinician-review app: `medxray app` or `streamlit run app/medxray_app.py`.

Thin entry point: page registry and the shared sidebar; all logic is in medxray.appsupport
(plain functions) and medxray.appui (Streamlit glue).
"""

from pathlib import Path

import streamlit as st

from medxray import appsupport as sup
from medxray import appui

HERE = Path(__file__).parent

st.set_page_config(page_title="medxray review", page_icon=":material/radiology:", layout="wide")

nav = st.navigation([
    st.Page(HERE / appui.STUDY_PAGE, title="Study", icon=":material/radiology:", default=True),
    st.Page(HERE / appui.WORKLIST_PAGE, title="Worklist", icon=":material/list_alt:"),
    st.Page(HERE / appui.MODEL_CARD_PAGE, title="Model card", icon=":material/description:"),
])

cfg = appui.settings()
ms = appui.model_state(cfg)
labels, defaults = appui.label_names_and_defaults(ms, appui.results_labels(cfg))
with st.sidebar:
    st.caption(sup.NOT_FOR_CLINICAL_USE)
    if ms.predictor is not None:
        st.caption(f"Model: {ms.predictor.architecture}, "
                   f"version {ms.predictor.metadata.get('model_version', '?')}")
appui.threshold_controls(labels, defaults)
appui.export_button(appui.review_store(cfg), key="export_sidebar", where=st.sidebar)
nav.run()
