"""The portal's Streamlit UI. Run with ``python -m ui``."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ui.client import Api, User
from ui.config import get_ui_settings
from ui.session import logout
from ui.views.admin import admin_page
from ui.views.classify import classify_page
from ui.views.history import history_page
from ui.views.login import login_page
from ui.views.sketch import sketch_page

st.set_page_config(page_title="Image classification portal", page_icon="🖼️", layout="wide")

settings = get_ui_settings()
token = st.session_state.get("token")
# The browser's address goes to the API with each call, so that people behind one UI are not one
# client to the login throttle (None when the browser is on this machine).
# (Streamlit's test harness has no connection and answers with a stand-in that is not a string.)
browser = st.context.ip_address
api = Api(
    settings.api_url,
    token,
    timeout=settings.api_timeout_seconds,
    client_address=browser if isinstance(browser, str) else None,
)

if not token:
    navigation = st.navigation([st.Page(lambda: login_page(api), title="Log in", url_path="login")])
else:
    user: User | None = st.session_state.get("user")
    pages = [
        st.Page(lambda: classify_page(api), title="Classify", url_path="classify", default=True),
        st.Page(lambda: sketch_page(api), title="Sketch", url_path="sketch"),
        st.Page(lambda: history_page(api), title="History", url_path="history"),
    ]
    if user and user["role"] == "admin":
        pages.append(st.Page(lambda: admin_page(api), title="Admin", url_path="admin"))
    st.session_state["page_titles"] = [p.title for p in pages]
    with st.sidebar:
        st.caption(f"Signed in as {user['email'] if user else ''}")
        if st.button("Log out", key="logout"):
            logout(api)
    navigation = st.navigation(pages)
navigation.run()
