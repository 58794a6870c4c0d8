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


def _photo_changed() -> None:
    """The uploader's own change (a photo dropped, replaced or removed): the previous photo and its
    results go. Leaving the page and coming back is no change: the photo and its results stay."""
    _forget_photo()
    uploaded = st.session_state.get("classify_file")
    if uploaded is None:
        return
    data = uploaded.getvalue()
    if len(data) > get_ui_settings().max_upload_bytes:
        st.session_state["upload_refused"] = f"{uploaded.name} is {len(data) / 2**20:.1f} MB"
        return
    st.session_state["upload"] = (uploaded.name, data)


def classify_page(api: Api) -> None:
    st.title("Classify a photo")
    settings = get_ui_settings()
    st.file_uploader(
        "Photo",
        type=UPLOAD_TYPES,
        key="classify_file",
        on_change=_photo_changed,
        help=f"JPEG, PNG, GIF, BMP, WebP or TIFF, up to {settings.max_upload_mb} MB.",
    )
    if refused := st.session_state.pop("upload_refused", None):
        st.error(f"{refused}; photos of up to {settings.max_upload_mb} MB are accepted.")
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
