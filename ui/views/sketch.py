"""Draw a sketch on a canvas (or take an example drawing) and classify it with the sketch model
versions: the drawing on the left, its results beside it."""

from __future__ import annotations

import hashlib

import streamlit as st

from ui.client import Api
from ui.examples import SKETCHES, example_png, sketches_for
from ui.results import choose_models, run_job, scroll_to_results, show_results, words
from ui.session import models


def _new_canvas() -> None:
    st.session_state["canvas_round"] = st.session_state.get("canvas_round", 0) + 1
    for key in ("sketch_job", "sketch_example"):
        st.session_state.pop(key, None)


def _example_chosen(name: str) -> None:
    _new_canvas()
    st.session_state["sketch_example"] = name


def sketch_page(api: Api) -> None:
    from streamlit_drawable_canvas import st_canvas

    st.title("Draw a sketch")
    drawing_models = [m for m in models(api) if m["input"]["mode"] == "L"]
    # The categories of the stable version, or of one that serves while it does not (its labels
    # are known once a worker loaded it).
    shown = next(
        (m for m in drawing_models if m["channel"] == "stable" and m["available"] and m["labels"]), None
    ) or next((m for m in drawing_models if m["available"] and m["labels"]), None)
    if shown is not None:
        st.caption(f"Draw one of: {', '.join(words(label) for label in shown['labels'] or [])}.")
    # Wide enough for the 280-px canvas and the models' full names beside a 1,400-px window's sidebar.
    drawing_side, answers = st.columns([2, 3], gap="large")
    with drawing_side:
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
        with st.container(horizontal=True, vertical_alignment="center"):
            st.caption("Or try:")
            for name in sketches_for(shown["labels"] or []) if shown is not None else SKETCHES:
                st.button(name, key=f"sketch_example_{name}", on_click=_example_chosen, args=(name,))
        drawn = canvas.image_bytes if canvas.json_data and canvas.json_data.get("objects") else None
        example = st.session_state.get("sketch_example")
        if drawn is not None:
            name, drawing = "sketch.png", drawn
        elif example is not None:
            name, drawing = f"{example.lower().replace(' ', '-')}.png", example_png("sketch", example)
            st.image(drawing, caption=f"Example: {example.lower()}", width=140)
        else:
            name, drawing = "sketch.png", None
        digest = hashlib.sha256(drawing).hexdigest() if drawing is not None else None
        if st.session_state.get("sketch_job_of") != digest:
            st.session_state.pop("sketch_job", None)  # the results belong to the drawing they answered
        chosen = choose_models(api, "sketch", mode="L")
        with st.container(horizontal=True):
            predict = st.button("Predict", type="primary", disabled=not chosen, key="sketch_submit")
            st.button("Clear", key="sketch_clear", on_click=_new_canvas)
        if predict:
            st.session_state.pop("sketch_job", None)
            if drawing is None:
                st.warning("Draw something first, or try an example.")
            else:
                run_job(api, "sketch_job", name, drawing, chosen)
                st.session_state["sketch_job_of"] = digest
    with answers:
        if (job := st.session_state.get("sketch_job")) and drawing is not None:
            show_results(api, job, image=drawing, file_name=name)
            scroll_to_results(job["job_id"])
        else:
            st.caption("Draw, choose the models and press Predict: the answers appear here.")
