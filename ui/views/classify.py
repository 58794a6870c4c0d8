"""Classify an uploaded photo with the chosen model versions."""

from __future__ import annotations

import io

import streamlit as st
from PIL import Image

from contracts.imaging import UPLOAD_EXTENSIONS
from ui.client import Api
from ui.config import get_ui_settings
from ui.results import choose_models, run_job, show_results

UPLOAD_TYPES = list(UPLOAD_EXTENSIONS)


def _forget_photo() -> None:
    """The photo and its results go together: neither outlives the other."""
    for key in ("upload", "classify_job"):
        st.session_state.pop(key, None)


def classify_page(api: Api) -> None:
    st.title("Classify a photo")
    settings = get_ui_settings()
    uploaded = st.file_uploader(
        "Photo",
        type=UPLOAD_TYPES,
        key="classify_file",
        help=f"JPEG, PNG, GIF, BMP, WebP or TIFF, up to {settings.max_upload_mb} MB.",
    )
    if uploaded is not None:
        st.session_state["classify_file_seen"] = True
        data = uploaded.getvalue()
        if len(data) > settings.max_upload_bytes:
            _forget_photo()
            st.error(
                f"{uploaded.name} is {len(data) / 2**20:.1f} MB; photos of up to {settings.max_upload_mb} MB are accepted."
            )
            return
        if st.session_state.get("upload") != (uploaded.name, data):
            _forget_photo()  # a new photo: the last one's results are not its results
            st.session_state["upload"] = (uploaded.name, data)
    elif st.session_state.pop("classify_file_seen", False):
        _forget_photo()  # the person removed the photo
    upload = st.session_state.get("upload")
    if upload is None:
        st.info(f"Upload a photo to begin (up to {settings.max_upload_mb} MB).")
        return
    name, data = upload
    try:
        st.image(Image.open(io.BytesIO(data)), caption=name, width=320)
    except Exception:
        st.caption(f"{name} (no preview)")
    chosen = choose_models(api, "classify", mode="RGB")
    if st.button("Classify", type="primary", disabled=not chosen, key="classify_submit"):
        st.session_state.pop("classify_job", None)  # a failed attempt leaves no older results behind
        run_job(api, "classify_job", name, data, chosen)
    if job := st.session_state.get("classify_job"):
        show_results(api, job)
