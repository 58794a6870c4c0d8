"""Draw a sketch on a canvas and classify it with the sketch model versions."""

from __future__ import annotations

import hashlib

import streamlit as st

from ui.client import Api
from ui.results import choose_models, run_job, show_results
from ui.session import models


def sketch_page(api: Api) -> None:
    from streamlit_drawable_canvas import st_canvas

    st.title("Draw a sketch")
    sketch_models = [m for m in models(api) if m["name"] == "sketch"]
    if sketch_models:
        stable = next((m for m in sketch_models if m["channel"] == "stable"), sketch_models[0])
        known = ", ".join(label.replace("_", " ") for label in stable["labels"] or [])
        st.caption(f"Draw one of: {known}.")
    canvas = st_canvas(
        stroke_width=12,
        stroke_color="#000000",
        background_color="#FFFFFF",
        height=280,
        width=280,
        drawing_mode="freedraw",
        return_image_data=True,
        key=f"canvas_{st.session_state.get('canvas_round', 0)}",
    )
    chosen = choose_models(api, "sketch", mode="L")
    left, right = st.columns(2)
    if right.button("Clear", key="sketch_clear"):
        st.session_state["canvas_round"] = st.session_state.get("canvas_round", 0) + 1
        st.session_state.pop("sketch_job", None)
        st.rerun()
    drawing = canvas.image_bytes if canvas.json_data and canvas.json_data.get("objects") else None
    drawn = hashlib.sha256(drawing).hexdigest() if drawing is not None else None
    if st.session_state.get("sketch_job_of") != drawn:
        st.session_state.pop("sketch_job", None)  # the results belong to the drawing they answered
    if left.button("Predict", type="primary", disabled=not chosen, key="sketch_submit"):
        st.session_state.pop("sketch_job", None)
        if drawing is None:
            st.warning("Draw something first.")
        else:
            run_job(api, "sketch_job", "sketch.png", drawing, chosen)
            st.session_state["sketch_job_of"] = drawn
    if job := st.session_state.get("sketch_job"):
        show_results(api, job)
