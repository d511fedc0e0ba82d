"""medxray clinician-review app: `medxray app` or `streamlit run app/medxray_app.py`.

Thin entry point: page registry, the notices every page shows (not for clinical use, drawn
before the model loads; a banner when the model learned from synthetic images) and the shared
sidebar; all logic is in medxray.review (plain functions in settings/study/viewing/worklist/
model_card, Streamlit glue in medxray.review.ui and ui_study). Safe server defaults (loopback,
no usage statistics, minimal toolbar, one upload limit) are in app/.streamlit/config.toml,
which Streamlit reads for this script from any working directory; the icon is bundled.
"""

from pathlib import Path

import streamlit as st

from medxray.review import ui
from medxray.review.safe import md_escape
from medxray.review.session_keys import AppKeys

HERE = Path(__file__).resolve().parent  # absolute: pages are found whatever the working directory

st.set_page_config(page_title="medxray review", page_icon=str(HERE / "assets" / "medxray_icon.png"), layout="wide")
ui.clinical_use_notice()  # first, so it is on screen while the model loads

nav = st.navigation(
    [
        st.Page(HERE / ui.STUDY_PAGE, title="Study", icon=":material/radiology:", default=True),
        st.Page(HERE / ui.WORKLIST_PAGE, title="Worklist", icon=":material/list_alt:"),
        st.Page(HERE / ui.MODEL_CARD_PAGE, title="Model card", icon=":material/description:"),
        st.Page(HERE / "app_pages" / "monitoring.py", title="Monitoring", icon=":material/monitoring:"),
    ]
)

cfg = ui.settings()
ms = ui.model_state(cfg)
ui.model_banner(ms)
labels, defaults = ui.label_names_and_defaults(ms, ui.results_labels(cfg))
if ms.predictor is not None:
    st.sidebar.caption(
        f"Model: {md_escape(ms.predictor.architecture)}, "  # checkpoint text: shown as text
        f"version {md_escape(ms.predictor.metadata.get('model_version', '?'))}"
    )
ui.threshold_controls(labels, defaults)
ui.export_buttons(ui.review_store(cfg), key=AppKeys.EXPORT_SIDEBAR, where=st.sidebar)
nav.run()
