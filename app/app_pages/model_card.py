"""Model card page: what the checkpoint is, what it was trained on, how it was evaluated, and what it is not for."""

import streamlit as st

from medxray.review import ui
from medxray.review.model_card import metrics_overview, model_card
from medxray.review.safe import md_escape
from medxray.review.session_keys import AppKeys
from medxray.review.settings import NOT_FOR_CLINICAL_USE

cfg = ui.settings()
ms = ui.model_state(cfg)
st.title("Model card")
st.error(NOT_FOR_CLINICAL_USE)
if ms.predictor is None:
    ui.show_model_problem(ms)
    st.stop()

card = model_card(ms.predictor.metadata, checkpoint_path=cfg.checkpoint)
st.subheader(md_escape(card.title))
st.dataframe(card.summary, hide_index=True, key=AppKeys.CARD_SUMMARY, height="content")
st.subheader("Training data")
if len(card.provenance):
    st.dataframe(card.provenance, hide_index=True, key=AppKeys.CARD_PROVENANCE, height="content")
else:
    st.warning(
        "The checkpoint does not record what it was trained on (real or synthetic images, data root, "
        "manifest hash, images per split): it was written before medxray recorded provenance."
    )
if len(card.training):
    st.dataframe(card.training, hide_index=True, key=AppKeys.CARD_TRAINING, height="content")
st.subheader("Metrics")
if len(card.metrics):
    overall, per_finding = metrics_overview(card.metrics)
    if card.synthetic:
        st.caption("Measured on synthetic phantom images, not radiographs.")
    if len(overall):
        st.dataframe(overall, hide_index=True, height="content")
    if len(per_finding):
        st.dataframe(per_finding, hide_index=True, height="content")
    st.caption(
        "In brackets: the 95% bootstrap confidence interval recorded by `medxray evaluate` "
        "(none for validation metrics logged during training)."
    )
else:
    st.warning("No evaluation metrics are stored in this checkpoint; run `medxray evaluate` on it.")
st.subheader("Localisation of the maps")
st.caption(md_escape(card.localisation_note))  # holds checkpoint text
st.dataframe(card.localisation, hide_index=True, key=AppKeys.CARD_LOCALISATION, height="content")
st.subheader("Operating thresholds")
st.dataframe(card.thresholds, hide_index=True, key=AppKeys.CARD_THRESHOLDS, height="content")
st.subheader("Intended use")
st.markdown(card.intended_use)
st.subheader("Limitations")
st.markdown("\n".join(f"- {x}" for x in card.limitations))
