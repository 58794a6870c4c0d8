"""The login page: the only page without a token."""

from __future__ import annotations

import streamlit as st

from ui.client import Api, ApiError


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
