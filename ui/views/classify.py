"""Classify an uploaded photo (or an example) with the chosen model versions: the photo on the
left, its results beside it."""

from __future__ import annotations

import streamlit as st

from contracts.imaging import UPLOAD_EXTENSIONS, ImageRejected
from ui.client import Api
from ui.config import get_ui_settings
from ui.examples import PHOTOS, example_png
from ui.results import (
    choose_models,
    nothing_to_choose,
    plain,
    run_job,
    scroll_to_results,
    show_results,
    upright,
)

UPLOAD_TYPES = list(UPLOAD_EXTENSIONS)


def _forget_photo() -> None:
    """The photo and its results go together: neither outlives the other."""
    for key in ("upload", "classify_job", "classify_error"):
        st.session_state.pop(key, None)


def _uploader_key() -> str:
    # A new key empties the uploader (an example replaces the file it showed).
    return f"classify_file_{st.session_state.get('uploader_round', 0)}"


def _photo_changed() -> None:
    """The uploader's own change (a photo dropped, replaced or removed): the previous photo and its
    results go. Leaving the page and coming back is no change: the photo and its results stay."""
    _forget_photo()
    uploaded = st.session_state.get(_uploader_key())
    if uploaded is None:
        return
    data = uploaded.getvalue()
    if len(data) > get_ui_settings().max_upload_bytes:
        st.session_state["upload_refused"] = f"{uploaded.name} is {len(data) / 2**20:.1f} MiB"
        return
    st.session_state["upload"] = (uploaded.name, data)


def _example_chosen(name: str) -> None:
    _forget_photo()
    st.session_state["uploader_round"] = st.session_state.get("uploader_round", 0) + 1
    st.session_state["upload"] = (f"{name.lower()}.png", example_png("photo", name))


def classify_page(api: Api) -> None:
    st.title("Classify a photo")
    settings = get_ui_settings()
    st.file_uploader(
        f"Drop a photo here: JPEG, PNG, GIF, BMP, WebP or TIFF, up to {settings.max_upload_mb} MiB",
        type=UPLOAD_TYPES,
        key=_uploader_key(),
        on_change=_photo_changed,
        max_upload_size=settings.uploader_mb,
    )
    # A row that wraps on a narrow screen, where columns would stack one per line.
    with st.container(horizontal=True, vertical_alignment="center"):
        st.caption("Or try an example:")
        for name in PHOTOS:
            st.button(name, key=f"example_{name}", on_click=_example_chosen, args=(name,))
    if refused := st.session_state.pop("upload_refused", None):
        st.error(f"{refused}; photos of up to {settings.max_upload_mb} MiB are accepted.")
    upload = st.session_state.get("upload")
    if upload is None:
        st.info("Upload a photo, or try an example, to begin.")
        return
    name, data = upload
    photo, answers = st.columns([1, 2], gap="large")
    with photo:
        try:
            st.image(upright(data, 800), caption=plain(name), width="stretch")
        except Exception as exc:
            st.caption(f"{plain(name)} (no preview)")
            if isinstance(exc, ImageRejected) and exc.status == 413:
                # Too many pixels: the API refuses it too, so it is said at once and not offered.
                st.error(exc.message)
                return
        chosen = choose_models(api, "classify", mode="RGB")
        classify = st.button("Classify", type="primary", disabled=not chosen, key="classify_submit")
    with answers:
        # The API judges what it can read (a file without a preview may still be one): its
        # refusal is this photo's answer, said here until the photo changes or is classified.
        if classify:
            st.session_state.pop("classify_job", None)  # a failed attempt leaves no older results behind
            run_job(api, "classify_job", name, data, chosen, keep_error="classify_error")
        elif error := st.session_state.get("classify_error"):
            st.error(error)
        if job := st.session_state.get("classify_job"):
            show_results(api, job, image=data, file_name=name)
            scroll_to_results(job["job_id"])
        elif "classify_error" not in st.session_state and not nothing_to_choose(api, "RGB"):
            st.caption("Choose the models and press Classify: the answers appear here.")
