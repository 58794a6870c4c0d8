"""The portal's Streamlit UI. Run with ``python -m ui``."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

import streamlit as st
from streamlit.navigation.page import StreamlitPage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ui import results, session
from ui.client import Api, User
from ui.config import get_ui_settings
from ui.views.admin import admin_page, admins_only
from ui.views.api_keys import api_keys_page
from ui.views.batch import batch_page
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

# A verdict whose Send met the end of the session is kept for the next login, whichever call met it.
session.keep_at_session_end(results.verdict_being_sent)
signed_in = bool(token)
if not signed_in and session.restore(api):
    signed_in = True
    # Taken back from the cookie, as a login would be: a verdict kept when an earlier session
    # ended (this page's, before a reload, say) goes now.
    results.send_unsent_verdict(api)
user: User | None = st.session_state.get("user")
is_admin = bool(user and user["role"] == "admin")


def _page(view: Callable[[Api], None], title: str, url_path: str, default: bool = False) -> StreamlitPage:
    """A page of the portal; the login form in its place until someone is signed in, so that a
    deep link leads to its page right after the login."""
    if not signed_in:
        view = login_page
    elif url_path == "admin" and not is_admin:
        view = admins_only
    return st.Page(functools.partial(view, api), title=title, url_path=url_path, default=default)


# Streamlit serves the default page at "/" only (its url_path must still be unique): the
# Classify page is also at "/classify", as every other page is at its own address.
home = _page(classify_page, "Classify", "home", default=True)
pages = [
    home,
    _page(classify_page, "Classify", "classify"),
    _page(sketch_page, "Sketch", "sketch"),
    _page(batch_page, "Batch", "batch"),
    _page(history_page, "History", "history"),
    _page(api_keys_page, "API keys", "api-keys"),
    _page(admin_page, "Admin", "admin"),
]
# Every page is known whether or not someone is signed in (no "page not found" for a deep link);
# the menu is drawn here so that it lists only the pages this person may open.
navigation = st.navigation(pages, position="hidden")
if signed_in:
    session.keep_alive(api)
    results.show_after_login_note()
    shown = [p for p in pages if p.url_path != "classify" and (p.url_path != "admin" or is_admin)]
    st.session_state["page_titles"] = [p.title for p in shown]
    with st.sidebar:
        for p in shown:
            st.page_link(p, label=p.title)
        st.divider()
        # Plain text: Markdown would make the address a mailto link to oneself.
        st.text(f"Signed in as {user['email'] if user else ''}")
        if st.button("Log out", key="logout"):
            session.logout(api)
else:
    session.forget_cookie()
navigation.run()
