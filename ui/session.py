"""What every page shares: the login session (kept across reloads in a cookie, renewed while used),
turning API errors into messages, logging out, and the cached model catalog.

Streamlit keeps ``st.session_state`` per browser connection, so a reload starts empty. The token
is therefore also kept in a cookie of the UI's own origin (``SameSite=Strict``, ``Secure`` over
HTTPS, expiring with the token): Streamlit reads the cookies a browser sends when it connects
(``st.context.cookies``), and one short script in ``st.html`` writes it. While a person uses the
portal the token is renewed (``POST /v1/auth/refresh``) once half its lifetime is gone, so the
session ends after that long without activity, not at a fixed time.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import TypeVar

import streamlit as st

from ui.client import Api, ApiError, Model, Session

T = TypeVar("T")

COOKIE = "portal_session"
"""The cookie that carries the token across reloads."""
EXPIRED = "Your session ended after a while without activity. Please log in again."


def _cookie_script(token: str | None, max_age: int) -> str:
    value = json.dumps(f"{COOKIE}={token or ''}; path=/; max-age={max_age}; SameSite=Strict")
    return f"<script>document.cookie = {value} + (location.protocol === 'https:' ? '; Secure' : '');</script>"


def _write_cookie(token: str | None, max_age: int) -> None:
    # Only the portal's own constant text and a token it was given go into this script.
    st.html(_cookie_script(token, max_age), unsafe_allow_javascript=True)


def _browser_cookie() -> str | None:
    """The token the browser sent when it connected, if any (Streamlit's test harness has no
    browser and answers with a stand-in that is not a mapping of strings)."""
    try:
        value = st.context.cookies.get(COOKIE)
    except Exception:
        return None
    return value if isinstance(value, str) and value else None


def start(api: Api, session: Session) -> None:
    """Keeps a fresh token (from a login or a refresh) for this connection and the next ones."""
    st.session_state["token"] = session["token"]
    st.session_state["token_lifetime"] = session["expires_in"]
    st.session_state["token_renew_at"] = time.time() + session["expires_in"] / 2
    api.token = session["token"]


def restore(api: Api) -> bool:
    """After a reload: takes the session back from the browser's cookie when its token still
    works (renewing it at once, which also says how long it lasts). A token refused once is not
    tried again on this connection."""
    token = _browser_cookie()
    if token is None or token == st.session_state.get("cookie_refused"):
        return False
    api.token = token
    try:
        start(api, api.refresh())
        st.session_state["user"] = api.me()
    except ApiError:
        api.token = None
        for key in ("token", "token_lifetime", "token_renew_at", "user"):
            st.session_state.pop(key, None)
        st.session_state["cookie_refused"] = token
        return False
    return True


def keep_alive(api: Api) -> None:
    """On each run of a page: renews the token once half its lifetime is gone, and keeps the
    cookie in step with it. A session that was left unused until its token expired ends here."""
    if time.time() >= st.session_state.get("token_renew_at", 0.0):
        try:
            start(api, api.refresh())
        except ApiError as exc:
            logout(api, EXPIRED if exc.status == 401 else exc.message)
    lifetime = int(st.session_state.get("token_lifetime", 0))
    remaining = max(0, int(st.session_state.get("token_renew_at", 0.0) + lifetime / 2 - time.time()))
    _write_cookie(st.session_state.get("token"), remaining)


def forget_cookie() -> None:
    """Deletes the cookie (on the login page, so that a logged-out browser keeps no token)."""
    _write_cookie(None, 0)


def logout(api: Api, message: str | None = None) -> None:
    """Ends the session (also when the token is already dead): revokes it at the API, clears
    everything this connection kept, deletes the cookie, and reruns into the login page, which
    shows ``message``."""
    with contextlib.suppress(ApiError):  # an expired token is already as good as logged out
        api.logout()
    refused = _browser_cookie()
    for key in list(st.session_state.keys()):
        del st.session_state[key]
    if refused:
        # The cookie this connection started with is revoked now: never take it back.
        st.session_state["cookie_refused"] = refused
    if message:
        st.session_state["login_message"] = message
    st.rerun()


def guarded(api: Api, action: Callable[[], T]) -> T | None:
    """Runs an API action; shows its error as a message, and sends a 401 back to the login page."""
    try:
        return action()
    except ApiError as exc:
        if exc.status == 401:
            logout(api, exc.message)
        st.error(exc.message)
        return None


def models(api: Api) -> list[Model]:
    """The model catalog, fetched once per session."""
    if "models" not in st.session_state:
        st.session_state["models"] = guarded(api, api.models) or []
    catalog: list[Model] = st.session_state["models"]
    return catalog


def display_name(api: Api, ref: str) -> str:
    """The name people read for a model version (``ref`` when the catalog does not know it)."""
    model = next((m for m in models(api) if m["ref"] == ref), None)
    return model["display_name"] if model else ref
