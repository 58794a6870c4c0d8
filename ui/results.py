"""Choosing models, running a job with a progress bar, and showing its answers with a feedback form:
what the classify and sketch pages share."""

from __future__ import annotations

from datetime import datetime

import altair as alt
import pandas as pd
import streamlit as st

from contracts.messages import PredictionStatus
from ui.client import Api, Job, Prediction
from ui.session import guarded, models


def readable_time(iso: str) -> str:
    """``2026-12-01T10:17:33.52+00:00`` as ``1 Dec 2026, 10:17 UTC`` (the API's times are UTC)."""
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    return f"{moment.day} {moment:%b %Y, %H:%M} UTC"


def choose_models(api: Api, keys_prefix: str, mode: str) -> list[str]:
    """Under a "Models" heading, a checkbox per model version that reads ``mode`` input ("RGB":
    photos, "L": drawings), as the registry says; the default ones (photos) or the stable ones
    (drawings) checked. Returns the checked references."""
    st.markdown("**Models**")
    chosen = []
    shown = [m for m in models(api) if m["input"]["mode"] == mode]
    columns = st.columns(min(len(shown), 4) or 1)
    for i, m in enumerate(shown):
        with columns[i % len(columns)]:
            label = f"{m['ref']} ({m['channel']})"
            help_text = m["description"] if m["available"] else f"Unavailable: {m['reason']}"
            default = m["available"] and (m["default"] if mode == "RGB" else m["channel"] == "stable")
            if st.checkbox(
                label, value=default, disabled=not m["available"], help=help_text, key=f"{keys_prefix}_{m['ref']}"
            ):
                chosen.append(m["ref"])
    return chosen


def run_job(api: Api, state_key: str, name: str, data: bytes, chosen: list[str]) -> None:
    """Uploads, predicts, waits with a progress bar; keeps the finished job under ``state_key``."""

    def run() -> Job:
        image = api.upload(name, data)
        job_id = api.predict(image["id"], chosen)
        bar = st.progress(0.0, text="Waiting for the models...")
        polls = {"n": 0}

        def tick(job: Job) -> None:
            polls["n"] += 1
            done = sum(r["status"].terminal for r in job["results"])
            bar.progress(
                min(0.95, done / max(len(job["results"]), 1) + polls["n"] * 0.01), text=f"Status: {job['status']}"
            )

        job = api.wait(job_id, on_poll=tick)
        bar.empty()
        return job

    job = guarded(api, run)
    if job is not None:
        st.session_state[state_key] = job


def _bars(result: Prediction) -> alt.Chart:
    frame = pd.DataFrame(result["top_k"])
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X("score:Q", scale=alt.Scale(domain=[0, 1]), title="score"), y=alt.Y("label:N", sort="-x", title=None)
        )
        .properties(height=32 * len(frame))
    )


def _labels_of(api: Api, ref: str) -> list[str]:
    model = next((m for m in models(api) if m["ref"] == ref), None)
    return list(model["labels"] or []) if model else []


NONE_OF_THESE = "None of these"
"""The answer to "what is right" when the model does not know the right label."""


def _feedback_form(api: Api, result: Prediction) -> None:
    ref = f"{result['model']}@{result['version']}"
    key = f"fb_{result['id']}"
    if st.session_state.get(f"{key}_sent"):
        st.success("Thanks, your feedback was recorded.")
        return
    with st.form(key):
        # Nothing preselected: a verdict is what the person says, never a default.
        verdict = st.radio("Was this right?", ["Correct", "Wrong"], index=None, horizontal=True, key=f"{key}_verdict")
        # The predicted label is no answer to "wrong"; the list filters as one types.
        choices = ["", *(label for label in _labels_of(api, ref) if label != result["label"]), NONE_OF_THESE]
        right = st.selectbox(
            "If wrong, the right label",
            choices,
            format_func=lambda label: label.replace("_", " ") if label else "Type to search…",
            key=f"{key}_label",
        )
        comment = st.text_input("Comment (optional)", key=f"{key}_comment")
        if st.form_submit_button("Send feedback"):
            if verdict is None:
                st.error("Choose Correct or Wrong first.")
                return
            is_correct = verdict == "Correct"
            if not is_correct and not right:
                st.error(f"Choose the right label, or “{NONE_OF_THESE}”.")
                return
            label = None if is_correct or right == NONE_OF_THESE else right
            if guarded(api, lambda: api.feedback(result["id"], is_correct, label, comment or None)) is not None:
                st.session_state[f"{key}_sent"] = True
                st.success("Thanks, your feedback was recorded.")


def show_results(api: Api, job: Job) -> None:
    """A column per model version: its top answer, the top-k bars, timings and a feedback form."""
    results = job["results"]
    columns = st.columns(len(results))
    for column, result in zip(columns, results, strict=True):
        with column:
            st.subheader(f"{result['model']}@{result['version']}")
            if result["status"] != PredictionStatus.done:
                st.warning(f"{result['status']}: {result.get('error') or 'no answer'}")
                continue
            st.metric("Top prediction", result["label"], f"{result['score']:.1%}", delta_color="off")
            st.altair_chart(_bars(result), use_container_width=True)
            t = result["timings"]
            if result["cached"]:
                st.caption("Answered from the cache.")
            else:
                st.caption(
                    f"Queue {t['queue_ms']:.0f} ms · inference {t['inference_ms']:.0f} ms · total {t['total_ms']:.0f} ms"
                )
            _feedback_form(api, result)
