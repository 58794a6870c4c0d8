"""Administration, for admins only: system status, users, and model quality with retraining data."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ui.client import Api, Role, Stats
from ui.session import guarded, models

ROLES: list[Role] = ["user", "admin"]


def admin_page(api: Api) -> None:
    st.title("Administration")
    # Every tab runs on every rerun: the stats two of them show are fetched once.
    stats = guarded(api, api.stats)
    status, users, quality = st.tabs(["System status", "Users", "Model quality"])
    with status:
        status_tab(api, stats)
    with users:
        users_tab(api)
    with quality:
        quality_tab(api, stats)


def status_tab(api: Api, stats: Stats | None) -> None:
    """Readiness, live workers, queue depths, and which model versions are served."""
    ready = api.readiness()
    st.metric("Portal", "ready" if ready["status"] == "ok" else "not ready")
    if stats:
        st.metric("Live workers", stats["live_workers"])
        st.dataframe(
            pd.DataFrame([{"model": k, "queued": v} for k, v in stats["queue_depth"].items()]), hide_index=True
        )
    st.dataframe(
        pd.DataFrame(
            [
                {"model": m["ref"], "available": m["available"], "workers": m["workers"], "reason": m["reason"] or ""}
                for m in models(api)
            ]
        ),
        hide_index=True,
    )


def users_tab(api: Api) -> None:
    """Every user, and forms to create one or change one's role and whether it is active."""
    users = guarded(api, api.users) or []
    st.dataframe(pd.DataFrame(users), hide_index=True)
    with st.form("create_user"):
        st.subheader("Create a user")
        email = st.text_input("Email", key="new_email")
        name = st.text_input("Name", key="new_name")
        password = st.text_input("Password", type="password", key="new_password")
        role = st.selectbox("Role", ROLES, key="new_role")
        submitted = st.form_submit_button("Create")
        if submitted and guarded(api, lambda: api.create_user(email, password, name, role)) is not None:
            st.success(f"Created {email}.")
    with st.form("change_user"):
        st.subheader("Change a user")
        options = {f"{u['email']} (#{u['id']})": u for u in users}
        picked = st.selectbox("User", list(options), key="change_pick")
        new_role = st.selectbox("Role", ROLES, key="change_role")
        active = st.checkbox("Active", value=True, key="change_active")
        submitted = st.form_submit_button("Save")
        if submitted and picked:
            changed = guarded(api, lambda: api.update_user(options[picked]["id"], role=new_role, is_active=active))
            if changed is not None:
                st.success("Saved.")


def quality_tab(api: Api, stats: Stats | None) -> None:
    """Accuracy from feedback, the most corrected labels, latency, and the retraining download."""
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
    model = st.selectbox("Model", [every, *sorted({m["name"] for m in models(api)})], key="export_model")
    if st.button("Prepare the download", key="export_prepare"):
        chosen = None if model == every else model
        data = guarded(api, lambda: api.feedback_export(chosen))
        if data is not None:
            st.session_state["export_zip"] = (f"feedback-{chosen or 'all'}.zip", data)
    if "export_zip" in st.session_state:
        name, data = st.session_state["export_zip"]
        st.download_button(f"Download {name}", data, file_name=name, mime="application/zip")
