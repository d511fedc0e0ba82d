"""Model card page: what the checkpoint is, how it was trained and evaluated, and what it is not for."""

import streamlit as st

from medxray.review import ui
from medxray.review.model_card import metrics_overview, model_card
from medxray.review.settings import NOT_FOR_CLINICAL_USE

cfg = ui.settings()
ms = ui.model_state(cfg)
st.title("Model card")
st.error(NOT_FOR_CLINICAL_USE)
if ms.predictor is None:
    ui.show_model_problem(ms)
    st.stop()

card = model_card(ms.predictor.metadata, checkpoint_path=cfg.checkpoint)
st.subheader(card.title)
st.dataframe(card.summary, hide_index=True, key="card_summary")
st.subheader("Training data and split")
if len(card.training):
    st.dataframe(card.training, hide_index=True, key="card_training")
else:
    st.info("The checkpoint does not record its training data.")
st.subheader("Metrics")
if len(card.metrics):
    overall, per_finding = metrics_overview(card.metrics)
    if len(overall):
        st.dataframe(overall, hide_index=True)
    if len(per_finding):
        st.dataframe(per_finding, hide_index=True, height=36 * (len(per_finding) + 1) + 4)
    st.caption("In brackets: the 95% bootstrap confidence interval recorded by `medxray evaluate` "
               "(none for validation metrics logged during training).")
else:
    st.warning("No evaluation metrics are stored in this checkpoint; run `medxray evaluate` on it.")
st.subheader("Operating thresholds")
st.dataframe(card.thresholds, hide_index=True, key="card_thresholds")
st.subheader("Intended use")
st.markdown(card.intended_use)
st.subheader("Limitations")
st.markdown("\n".join(f"- {x}" for x in card.limitations))
