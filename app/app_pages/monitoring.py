"""Monitoring page: the site monitor's latest figures and alerts (written by `medxray site monitor`, e.g. from cron).

The folder comes from $MEDXRAY_MONITOR_DIR or the text box. The page only reads the monitor's JSON and plots; it never
shows patient data (the monitor stores none).
"""

import os
from pathlib import Path

import streamlit as st

from medxray.errors import MedxrayError
from medxray.review.safe import md_escape
from medxray.site.monitor import monitor_view, read_monitor

st.title("Monitoring")
default = os.environ.get("MEDXRAY_MONITOR_DIR", "")
folder = st.text_input("Monitor folder (`medxray site monitor --out`)", value=default, key="monitor_dir")
if not folder:
    st.info(
        "Run `medxray site monitor --results OUT --reviews REVIEWS --checkpoint C --out MONITOR_DIR` (daily, from "
        "cron) and enter MONITOR_DIR here, or start the app with MEDXRAY_MONITOR_DIR set."
    )
    st.stop()
try:
    view = monitor_view(read_monitor(folder))
except (MedxrayError, ValueError, OSError) as exc:
    st.error(md_escape(exc))  # text from a file is shown as text (issue 19)
    st.stop()

st.caption(
    f"Model version {md_escape(view['model_version'])}; monitor last ran {md_escape(view['generated_utc'])} "
    f"(UTC); latest day with images: {md_escape(view['latest'] or 'none')}."
)
if view["alerts"]:
    for a in view["alerts"]:
        (st.error if a["level"] == "alert" else st.warning)(md_escape(a["message"]))
else:
    st.success("No alert on the latest day.")

out = Path(folder)
for name, caption in (
    ("volume_ood.png", "Images per day and the out-of-distribution flag rate"),
    ("psi.png", "Score shift from the checkpoint's validation distribution (PSI; dashed: 0.10 warn, 0.25 alert)"),
    ("positive_rate.png", "Positive-call rate per finding"),
):
    if (out / name).is_file():
        st.image(str(out / name), caption=caption)
st.subheader("Latest day per finding")
st.dataframe(view["per_finding"], hide_index=True)
st.subheader("Per day")
st.dataframe(view["daily"], hide_index=True)
