"""The UI's pages. Each takes the API client; errors become short messages, never tracebacks."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st
from PIL import Image

from ui.client import Api, ApiError

UPLOAD_TYPES = ["jpg", "jpeg", "png", "gif", "bmp", "webp"]


def logout(api: Api, message: str | None = None) -> None:
    with contextlib.suppress(ApiError):  # an expired token is already as good as logged out
        api.logout()
    for key in list(st.session_state.keys()):
        del st.session_state[key]
    if message:
        st.session_state["login_message"] = message
    st.rerun()


def guarded(api: Api, action: Callable[[], Any]) -> Any:
    """Runs an API action; shows its error as a message, and sends a 401 back to the login page."""
    try:
        return action()
    except ApiError as exc:
        if exc.status == 401:
            logout(api, exc.message)
        st.error(exc.message)
        return None


def login_page(api: Api) -> None:
    st.title("Image classification portal")
    if message := st.session_state.pop("login_message", None):
        st.warning(message)
    with st.form("login"):
        email = st.text_input("Email", key="login_email")
        password = st.text_input("Password", type="password", key="login_password")
        submitted = st.form_submit_button("Log in")
    if submitted:
        try:
            token = api.login(email, password)
            st.session_state["token"] = token
            st.session_state["user"] = api.me()
        except ApiError as exc:
            st.error("Wrong email or password." if exc.status == 401 else exc.message)
            return
        st.rerun()


def _models(api: Api) -> list[dict[str, Any]]:
    if "models" not in st.session_state:
        st.session_state["models"] = guarded(api, api.models) or []
    return st.session_state["models"]


def _choose_models(api: Api, keys_prefix: str, only: str | None = None) -> list[str]:
    chosen = []
    models = [m for m in _models(api) if only is None or m["name"] == only]
    columns = st.columns(min(len(models), 4) or 1)
    for i, m in enumerate(models):
        with columns[i % len(columns)]:
            label = f"{m['ref']} ({m['channel']})"
            help_text = m["description"] if m["available"] else f"Unavailable: {m['reason']}"
            default = m["available"] and (m["default"] or only is not None)
            if st.checkbox(
                label, value=default, disabled=not m["available"], help=help_text, key=f"{keys_prefix}_{m['ref']}"
            ):
                chosen.append(m["ref"])
    return chosen


def _run_job(api: Api, state_key: str, name: str, data: bytes, models: list[str]) -> None:
    """Uploads, predicts, waits with a progress bar; keeps the finished job under ``state_key``."""

    def run() -> dict[str, Any]:
        image = api.upload(name, data)
        job_id = api.predict(image["id"], models)
        bar = st.progress(0.0, text="Waiting for the models...")
        polls = {"n": 0}

        def tick(job: dict[str, Any]) -> None:
            polls["n"] += 1
            done = sum(r["status"] not in ("queued", "running") for r in job["results"])
            bar.progress(
                min(0.95, done / max(len(job["results"]), 1) + polls["n"] * 0.01), text=f"Status: {job['status']}"
            )

        job = api.wait(job_id, on_poll=tick)
        bar.empty()
        return job

    job = guarded(api, run)
    if job is not None:
        st.session_state[state_key] = job


def _bars(result: dict[str, Any]) -> alt.Chart:
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
    model = next((m for m in _models(api) if m["ref"] == ref), None)
    return list(model["labels"] or []) if model else []


def _feedback_form(api: Api, result: dict[str, Any]) -> None:
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


def show_results(api: Api, job: dict[str, Any]) -> None:
    results = job["results"]
    columns = st.columns(len(results))
    for column, result in zip(columns, results, strict=True):
        with column:
            st.subheader(f"{result['model']}@{result['version']}")
            if result["status"] != "done":
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
    chosen = _choose_models(api, "classify")
    if st.button("Classify", type="primary", disabled=not chosen, key="classify_submit"):
        _run_job(api, "classify_job", name, data, chosen)
    if job := st.session_state.get("classify_job"):
        show_results(api, job)


def sketch_page(api: Api) -> None:
    from streamlit_drawable_canvas import st_canvas

    st.title("Draw a sketch")
    sketch_models = [m for m in _models(api) if m["name"] == "sketch"]
    if sketch_models:
        st.caption("The sketch models know: " + ", ".join(sketch_models[0]["labels"] or []))
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
    chosen = _choose_models(api, "sketch", only="sketch")
    left, right = st.columns(2)
    if right.button("Clear", key="sketch_clear"):
        st.session_state["canvas_round"] = st.session_state.get("canvas_round", 0) + 1
        st.session_state.pop("sketch_job", None)
        st.rerun()
    if left.button("Predict", type="primary", disabled=not chosen, key="sketch_submit"):
        drawn = canvas.json_data and canvas.json_data.get("objects")
        if not drawn or canvas.image_bytes is None:
            st.warning("Draw something first.")
        else:
            _run_job(api, "sketch_job", "sketch.png", canvas.image_bytes, chosen)
    if job := st.session_state.get("sketch_job"):
        show_results(api, job)


def history_page(api: Api) -> None:
    st.title("My uploads")
    page = st.number_input("Page", min_value=1, value=1, step=1, key="history_page")
    listing = guarded(api, lambda: api.images(skip=(page - 1) * 12, limit=12))
    if not listing:
        return
    if not listing["data"]:
        st.info("Nothing here yet: classify a photo or draw a sketch.")
        return
    feedback = {f["prediction_id"]: f for f in guarded(api, api.my_feedback) or []}
    st.caption(f"{listing['count']} uploads")
    for image in listing["data"]:
        detail = guarded(api, lambda image=image: api.image(image["id"]))
        if detail is None:
            continue
        left, right = st.columns([1, 3])
        with left:
            data = guarded(api, lambda image=image: api.image_file(image["id"]))
            if data:
                try:
                    st.image(Image.open(io.BytesIO(data)), width=140)
                except Exception:
                    st.caption("(no preview)")
            if st.button("Delete", key=f"delete_{image['id']}") and guarded(
                api, lambda image=image: api.delete_image(image["id"])
            ):
                st.rerun()
        with right:
            st.markdown(
                f"**{image['filename'] or image['file_name']}** · {image['width']}x{image['height']} · {image['created_at'][:19]}"
            )
            for job in detail["jobs"]:
                for r in job["results"]:
                    verdict = feedback.get(r["id"])
                    note = ""
                    if verdict:
                        note = " · you said: " + (
                            "correct" if verdict["is_correct"] else f"wrong ({verdict['correct_label'] or '?'})"
                        )
                    answer = f"{r['label']} ({r['score']:.1%})" if r["status"] == "done" else r["status"]
                    st.write(f"{r['model']}@{r['version']}: {answer}{note}")
        st.divider()


def admin_page(api: Api) -> None:
    st.title("Administration")
    status_tab, users_tab, quality_tab = st.tabs(["System status", "Users", "Model quality"])
    with status_tab:
        ready = api.readiness()
        st.metric("Portal", "ready" if ready.get("status") == "ok" else "not ready")
        stats = guarded(api, api.stats)
        if stats:
            st.metric("Live workers", stats["live_workers"])
            st.dataframe(
                pd.DataFrame([{"model": k, "queued": v} for k, v in stats["queue_depth"].items()]), hide_index=True
            )
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "model": m["ref"],
                        "available": m["available"],
                        "workers": m["workers"],
                        "reason": m["reason"] or "",
                    }
                    for m in _models(api)
                ]
            ),
            hide_index=True,
        )
    with users_tab:
        users = guarded(api, api.users) or []
        st.dataframe(pd.DataFrame(users), hide_index=True)
        with st.form("create_user"):
            st.subheader("Create a user")
            email = st.text_input("Email", key="new_email")
            name = st.text_input("Name", key="new_name")
            password = st.text_input("Password", type="password", key="new_password")
            role = st.selectbox("Role", ["user", "admin"], key="new_role")
            if st.form_submit_button("Create") and guarded(api, lambda: api.create_user(email, password, name, role)):
                st.success(f"Created {email}.")
        with st.form("change_user"):
            st.subheader("Change a user")
            options = {f"{u['email']} (#{u['id']})": u for u in users}
            picked = st.selectbox("User", list(options), key="change_pick")
            role = st.selectbox("Role", ["user", "admin"], key="change_role")
            active = st.checkbox("Active", value=True, key="change_active")
            if (
                st.form_submit_button("Save")
                and picked
                and guarded(api, lambda: api.update_user(options[picked]["id"], role=role, is_active=active))
            ):
                st.success("Saved.")
    with quality_tab:
        stats = guarded(api, api.stats)
        if stats:
            st.subheader("Accuracy from feedback")
            st.dataframe(pd.DataFrame(stats["accuracy"]), hide_index=True)
            st.subheader("Most corrected labels")
            st.dataframe(pd.DataFrame(stats["most_corrected"]), hide_index=True)
            st.subheader("Latency")
            st.dataframe(pd.DataFrame(stats["latency"]), hide_index=True)
        st.subheader("Retraining data")
        st.caption("The images users labelled, a folder per model and label, with feedback.csv.")
        every = "every model"
        model = st.selectbox("Model", [every, *sorted({m["name"] for m in _models(api)})], key="export_model")
        if st.button("Prepare the download", key="export_prepare"):
            chosen = None if model == every else model
            data = guarded(api, lambda: api.feedback_export(chosen))
            if data is not None:
                st.session_state["export_zip"] = (f"feedback-{chosen or 'all'}.zip", data)
        if "export_zip" in st.session_state:
            name, data = st.session_state["export_zip"]
            st.download_button(f"Download {name}", data, file_name=name, mime="application/zip")
