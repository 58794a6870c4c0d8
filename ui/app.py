"""The portal's Streamlit UI. Run with ``python -m ui``."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ui import views
from ui.client import Api
from ui.config import get_ui_settings

st.set_page_config(page_title="Image classification portal", page_icon="🖼️", layout="wide")

settings = get_ui_settings()
token = st.session_state.get("token")
api = Api(settings.api_url, token, timeout=settings.api_timeout_seconds)

if not token:
    navigation = st.navigation([st.Page(lambda: views.login_page(api), title="Log in", url_path="login")])
else:
    user = st.session_state.get("user", {})
    pages = [
        st.Page(lambda: views.classify_page(api), title="Classify", url_path="classify", default=True),
        st.Page(lambda: views.sketch_page(api), title="Sketch", url_path="sketch"),
        st.Page(lambda: views.history_page(api), title="History", url_path="history"),
    ]
    if user.get("role") == "admin":
        pages.append(st.Page(lambda: views.admin_page(api), title="Admin", url_path="admin"))
    st.session_state["page_titles"] = [p.title for p in pages]
    with st.sidebar:
        st.caption(f"Signed in as {user.get('email', '')}")
        if st.button("Log out", key="logout"):
            views.logout(api)
    navigation = st.navigation(pages)
navigation.run()
