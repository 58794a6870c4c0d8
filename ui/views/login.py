"""The login page: what the portal does, and the form. It stands in for every page until someone is
signed in, so that a deep link opens its own page right after the login."""

from __future__ import annotations

import streamlit as st

from ui import results, session
from ui.client import Api, ApiError


def login_page(api: Api) -> None:
    st.title("Image classification portal")
    st.write(
        "Upload a photo or draw a sketch, see what several models make of it side by side, "
        "and tell us when one is wrong: your verdicts train the next versions."
    )
    if message := st.session_state.pop("login_message", None):
        st.warning(message)
    with st.form("login"):
        email = st.text_input("Email", key="login_email")
        password = st.text_input("Password", type="password", key="login_password")
        submitted = st.form_submit_button("Log in")
    if submitted and not (email.strip() and password):
        st.error("Enter your email and password.")
        return
    if submitted:
        try:
            session.start(api, api.login(email, password))
            st.session_state["user"] = api.me()
        except ApiError as exc:
            st.session_state.pop("token", None)
            st.error("Wrong email or password." if exc.status == 401 else exc.message)
            return
        results.send_unsent_verdict(api)
        st.rerun()
