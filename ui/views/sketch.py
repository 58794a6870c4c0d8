"""Draw a sketch on a canvas (or take an example drawing) and classify it with the sketch model
versions: the drawing on the left, its results beside it."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import streamlit as st

from ui.client import Api
from ui.examples import SKETCHES, example_png, sketches_for
from ui.results import choose_models, nothing_to_choose, run_job, scroll_to_results, show_results, words
from ui.session import models

if TYPE_CHECKING:
    from streamlit_drawable_canvas import CanvasResult


def _new_canvas() -> None:
    st.session_state["canvas_round"] = st.session_state.get("canvas_round", 0) + 1
    for key in ("sketch_job", "sketch_example", "sketch_strokes"):
        st.session_state.pop(key, None)


def _drawn(canvas: CanvasResult) -> bytes | None:
    """The picture on the canvas as a PNG, or None while it is empty. What is drawn is kept in
    ``st.session_state["sketch_strokes"]`` (the strokes and their picture), so that the canvas,
    mounted anew when the page is left and opened again, draws them again: the drawing and its
    results stay, as a photo and its results stay on the Classify page."""
    strokes = canvas.json_data
    if not strokes or not strokes.get("objects"):
        st.session_state.pop("sketch_strokes", None)  # emptied on the canvas (undone, reset)
        return None
    if canvas.image_bytes is not None:
        st.session_state["sketch_strokes"] = (strokes, canvas.image_bytes)
        return canvas.image_bytes
    # Mounted anew with the strokes kept: it gives them back, but no picture until the next stroke.
    kept = st.session_state.get("sketch_strokes")
    return kept[1] if kept is not None else None


def _strokes_to_draw(key: str) -> dict[str, Any] | None:
    """What the canvas ``key`` starts with: nothing, or (mounted anew on coming back to the page)
    the strokes kept. The same for as long as it stays mounted: a canvas given other strokes to
    start with draws them in place of its own, losing its undo history, on every run."""
    if key not in st.session_state:  # its state goes with it when the page is left
        kept = st.session_state.get("sketch_strokes")
        st.session_state["sketch_start"] = (key, kept[0] if kept is not None else None)
    start_key, strokes = st.session_state.get("sketch_start", (key, None))
    return strokes if start_key == key else None


def _example_chosen(name: str) -> None:
    _new_canvas()
    st.session_state["sketch_example"] = name


def sketch_page(api: Api) -> None:
    from streamlit_drawable_canvas import st_canvas

    st.title("Draw a sketch")
    # Filled once the models are chosen (below the canvas): the categories they know.
    categories = st.container()
    # Wide enough for the 280-px canvas and the models' full names beside a 1,400-px window's sidebar.
    drawing_side, answers = st.columns([2, 3], gap="large")
    with drawing_side:
        key = f"canvas_{st.session_state.get('canvas_round', 0)}"
        canvas = st_canvas(
            stroke_width=12,
            stroke_color="#000000",
            background_color="#FFFFFF",
            height=280,
            width=280,
            drawing_mode="freedraw",
            initial_drawing=_strokes_to_draw(key),
            return_image_data=True,
            key=key,
        )
        examples = st.container(horizontal=True, vertical_alignment="center")
        drawn = _drawn(canvas)
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
        known = known_categories(api, chosen)
        with examples:
            st.caption("Or try:")
            everyone_knows = set.intersection(*(set(labels) for _, labels in known)) if known else None
            for example_name in sketches_for(everyone_knows) if everyone_knows is not None else SKETCHES:
                st.button(
                    example_name, key=f"sketch_example_{example_name}", on_click=_example_chosen, args=(example_name,)
                )
        with categories:
            for names, labels in known:
                # Names joined with "and": a version's name may hold a comma.
                heading = "Draw one of" if len(known) == 1 else f"{' and '.join(names)} know{'s' * (len(names) == 1)}"
                st.caption(f"{heading}: {', '.join(words(label) for label in labels)}.")
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
        elif not nothing_to_choose(api, "L"):
            st.caption("Draw, choose the models and press Predict: the answers appear here.")


def known_categories(api: Api, chosen: list[str]) -> list[tuple[list[str], list[str]]]:
    """The categories the chosen drawing versions know (their labels are known once a worker
    loaded them), as (the versions' names, their labels) for each distinct set of labels; while
    none is chosen or known, those of the stable version, or of one that serves while it does not."""
    drawing_models = [m for m in models(api) if m["input"]["mode"] == "L" and m["labels"]]
    picked = [m for m in drawing_models if m["ref"] in chosen]
    if not picked:
        stand_in = next((m for m in drawing_models if m["channel"] == "stable" and m["available"]), None) or next(
            (m for m in drawing_models if m["available"]), None
        )
        picked = [stand_in] if stand_in is not None else []
    known: dict[tuple[str, ...], list[str]] = {}
    for m in picked:
        known.setdefault(tuple(m["labels"] or []), []).append(m["display_name"])
    return [(names, list(labels)) for labels, names in known.items()]
