"""Choosing models, running a job with a progress bar, and showing its answers with a feedback form:
what the classify and sketch pages share."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from contracts.messages import PredictionStatus
from ui.client import Api, Job, Prediction
from ui.session import guarded, models


def choose_models(api: Api, keys_prefix: str, only: str | None = None) -> list[str]:
    """A checkbox per model version (of model ``only`` when given); returns the checked references."""
    chosen = []
    shown = [m for m in models(api) if only is None or m["name"] == only]
    columns = st.columns(min(len(shown), 4) or 1)
    for i, m in enumerate(shown):
        with columns[i % len(columns)]:
            label = f"{m['ref']} ({m['channel']})"
            help_text = m["description"] if m["available"] else f"Unavailable: {m['reason']}"
            default = m["available"] and (m["default"] or only is not None)
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


def _feedback_form(api: Api, result: Prediction) -> None:
    ref = f"{result['model']}@{result['version']}"
    key = f"fb_{result['id']}"
    if st.session_state.get(f"{key}_sent"):
        st.success("Thanks, your feedback was recorded.")
        return
    with st.form(key):
        verdict = st.radio("Was this right?", ["Correct", "Wrong"], horizontal=True, key=f"{key}_verdict")
        labels = _labels_of(api, ref)
        right = st.selectbox("If wrong, the right label", ["", *labels], key=f"{key}_label")
        comment = st.text_input("Comment (optional)", key=f"{key}_comment")
        if st.form_submit_button("Send feedback"):
            is_correct = verdict == "Correct"
            sent = guarded(
                api,
                lambda: api.feedback(
                    result["id"], is_correct, None if is_correct else (right or None), comment or None
                ),
            )
            if sent is not None:
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
