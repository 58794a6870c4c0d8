"""Classify an uploaded photo with the chosen model versions."""

from __future__ import annotations

import io

import streamlit as st
from PIL import Image

from ui.client import Api
from ui.results import choose_models, run_job, show_results

UPLOAD_TYPES = ["jpg", "jpeg", "png", "gif", "bmp", "webp"]


def classify_page(api: Api) -> None:
    st.title("Classify a photo")
    uploaded = st.file_uploader("Photo", type=UPLOAD_TYPES, key="classify_file")
    if uploaded is not None:
        st.session_state["upload"] = (uploaded.name, uploaded.getvalue())
    upload = st.session_state.get("upload")
    if upload is None:
        st.info("Upload a photo to begin.")
        return
    name, data = upload
    try:
        st.image(Image.open(io.BytesIO(data)), caption=name, width=320)
    except Exception:
        st.caption(f"{name} (no preview)")
    chosen = choose_models(api, "classify")
    if st.button("Classify", type="primary", disabled=not chosen, key="classify_submit"):
        run_job(api, "classify_job", name, data, chosen)
    if job := st.session_state.get("classify_job"):
        show_results(api, job)
