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
import functools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import streamlit as st

from ui.client import Api, ApiError, Model, Session, User, VersionLabels

T = TypeVar("T")
P = ParamSpec("P")

COOKIE = "portal_session"
"""The cookie that carries the token across reloads."""
EXPIRED = "Your session ended after a while without activity. Please log in again."


def _cookie_script(token: str, max_age: int) -> str:
    value = json.dumps(f"{COOKIE}={token}; path=/; max-age={max_age}; SameSite=Strict")
    return f"<script>document.cookie = {value} + (location.protocol === 'https:' ? '; Secure' : '');</script>"


def _forget_script(token: str) -> str:
    # Only when the cookie still holds this token: another tab may have stored a newer one since.
    held = json.dumps(f"{COOKIE}={token}")
    gone = json.dumps(f"{COOKIE}=; path=/; max-age=0; SameSite=Strict")
    return f"<script>if (document.cookie.split('; ').includes({held})) {{ document.cookie = {gone}; }}</script>"


def _run_script(script: str) -> None:
    # Only the portal's own constant text and a token it was given go into these scripts.
    st.html(script, unsafe_allow_javascript=True)


def _browser_cookie() -> str | None:
    """The token the browser sent when it connected, if any (Streamlit's test harness has no
    browser and answers with a stand-in that is not a mapping of strings)."""
    try:
        value = st.context.cookies.get(COOKIE)
    except Exception:
        return None
    return value if isinstance(value, str) and value else None


def start(api: Api, session: Session) -> None:
    """Keeps a fresh token (from a login or a refresh) for this connection, and for the next ones
    through the cookie, written once per new token (a tab never writes back a token it held)."""
    st.session_state["token"] = session["token"]
    st.session_state["token_lifetime"] = session["expires_in"]
    st.session_state["token_renew_at"] = time.time() + session["expires_in"] / 2
    st.session_state["cookie_to_write"] = (session["token"], session["expires_in"])
    api.token = session["token"]


def restore(api: Api) -> bool:
    """After a reload: takes the session back from the browser's cookie when its token still
    works (renewing it at once, which also says how long it lasts). A token the API refuses (401)
    is not tried again on this connection and leaves the cookie; when the API cannot answer, the
    login page says so and the cookie stays for the next reload."""
    token = _browser_cookie()
    if token is None or token == st.session_state.get("cookie_refused"):
        return False
    api.token = token
    try:
        start(api, api.refresh())
        st.session_state["user"] = api.me()
    except ApiError as exc:
        api.token = None
        for key in ("token", "token_lifetime", "token_renew_at", "user", "cookie_to_write"):
            st.session_state.pop(key, None)
        if exc.status == 401:
            st.session_state["cookie_refused"] = token
            st.session_state["cookie_to_forget"] = token
        else:
            st.session_state["login_message"] = f"{exc.message} Reload the page to try again."
        return False
    return True


_find_carried: Callable[[], Carried | None] | None = None


def keep_at_session_end(find: Callable[[], Carried | None]) -> None:
    """Registers what a run that meets the end of its session keeps for the next login, when the
    call that met the end names nothing itself (``find``: what this run was sending, such as a
    verdict whose Send was pressed): the token's renewal, or a page's first API call (History
    reads the pictures before it draws the form the verdict came from). ``find`` reads the
    connection's own ``st.session_state``, so one serves every session."""
    global _find_carried
    _find_carried = find


def _carried_at_end() -> Carried | None:
    return _find_carried() if _find_carried is not None else None


def keep_alive(api: Api, *, in_place: bool = False) -> None:
    """On each run of a page (and of a part that redraws itself: ``keeps_session``): renews the
    token once half its lifetime is gone (reading the user's role again with it), and stores a
    new token in the cookie. A session left unused until its token expired, or revoked, ends
    here, keeping what this run was sending for the next login (``keep_at_session_end``); an API
    that cannot answer now is retried on the next run and ends nothing. What it draws (the
    cookie's script, a failed renewal's message) goes into the sidebar, or with ``in_place``
    where the caller is drawing."""
    # In the sidebar by default: an element that comes and goes in the main area (shown on one
    # run only) moves the page's own elements, and the sketch canvas, mounted anew, would lose
    # what was drawn on it.
    area: contextlib.AbstractContextManager[object] = contextlib.nullcontext() if in_place else st.sidebar
    if time.time() >= st.session_state.get("token_renew_at", 0.0):
        try:
            start(api, api.refresh())
            st.session_state["user"] = api.me()
        except ApiError as exc:
            if exc.status == 401:
                # A deactivated account is told so; anything else is a session that lapsed.
                logout(api, exc.message if "deactivated" in exc.message else EXPIRED, carry=_carried_at_end())
            with area:
                st.warning(exc.message)
    if pending := st.session_state.pop("cookie_to_write", None):
        with area:
            _run_script(_cookie_script(*pending))


def keeps_session(part: Callable[Concatenate[Api, P], None]) -> Callable[Concatenate[Api, P], None]:
    """For a part of a page that redraws itself (``st.fragment`` with ``run_every``: a batch's
    progress, say), placed under ``st.fragment``: each of its runs first does what every run of
    the whole page does (``keep_alive``: the token renewed once half its lifetime is gone, the new
    one written to the cookie), since a redraw of the part alone does not run the page. Without
    it, a person watching the part, and so using the portal, would be logged out once the token
    they had when the page last ran expired. The part's first argument is the ``Api``."""

    @functools.wraps(part)
    def run(api: Api, /, *args: P.args, **kwargs: P.kwargs) -> None:
        if st.session_state.get("token"):  # signed in, as ui/app.py asks before its keep_alive
            # Drawn at the part's top, not in the sidebar: Streamlit lets a part that redraws
            # itself write outside itself only where it wrote on the page's last full run.
            keep_alive(api, in_place=True)
        part(api, *args, **kwargs)

    return run


def forget_cookie() -> None:
    """On the login page: deletes the cookie when it still holds the token this connection just
    gave up (logged out, or refused); a newer one from another tab stays."""
    if token := st.session_state.pop("cookie_to_forget", None):
        _run_script(_forget_script(token))


def logout(api: Api, message: str | None = None, *, carry: Carried | None = None) -> None:
    """Ends the session (also when the token is already dead): revokes it at the API, clears
    everything this connection kept, has ``carry`` put away what it keeps for the next login,
    has the login page delete the cookie if it still holds this token, and reruns into the login
    page, which shows ``message`` (and ``carry``'s note)."""
    with contextlib.suppress(ApiError):  # an expired token is already as good as logged out
        api.logout()
    mine = st.session_state.get("token")
    refused = _browser_cookie()
    for key in list(st.session_state.keys()):
        del st.session_state[key]
    if refused:
        # The cookie this connection started with is no good now: never take it back.
        st.session_state["cookie_refused"] = refused
    if mine:
        st.session_state["cookie_to_forget"] = mine
    if carry is not None:
        carry.keep()
        message = f"{message or ''} {carry.note}".strip()
    if message:
        st.session_state["login_message"] = message
    st.rerun()


@dataclass(frozen=True)
class Carried:
    """What a request that met an ended session keeps for the next login, so that nothing the
    person sent is lost: ``keep`` puts it away outside this connection's ``st.session_state``
    (which the logout clears and a reload of the page starts anew), and ``note`` is what the
    login page says of it."""

    keep: Callable[[], None]
    note: str


_SUBMITS = "submits"
_SUBMITS_GUARD = threading.Lock()


@dataclass(frozen=True)
class Submits:
    """This browser session's record of requests that must go once per click (a photo to
    classify, a key to make), and the lock around sending one.

    A second click that comes while the first click's run still sends starts another run of the
    page, in another thread, and stops the first at its next Streamlit call, reading or writing
    ``st.session_state`` included. So ``sent`` is a plain dict taken from the session state before
    the request: what the first run sent is written there with no Streamlit call in between, and
    the second run, waiting on ``lock``, finds it (``ui.results.REPEAT_WINDOW_S``) instead of
    sending it again."""

    lock: threading.Lock
    sent: dict[str, Any]


def submits() -> Submits:
    """This session's ``Submits``, made on first use."""
    with _SUBMITS_GUARD:
        held = st.session_state.get(_SUBMITS)
        if held is None:
            held = st.session_state[_SUBMITS] = Submits(threading.Lock(), {})
    return cast(Submits, held)


def guarded(api: Api, action: Callable[[], T], *, keep: str | None = None, carry: Carried | None = None) -> T | None:
    """Runs an API action; shows its error as a message, and sends a 401 back to the login page
    (with ``carry``, else what ``keep_at_session_end`` finds, kept for the next login). With ``keep``, the message also stays in
    ``st.session_state[keep]`` until the action succeeds, for a part of the page that redraws
    itself (and would drop the message at its next redraw)."""
    try:
        result = action()
    except ApiError as exc:
        if keep is not None:
            st.session_state[keep] = exc.message
        if exc.status == 401:
            logout(api, exc.message, carry=carry or _carried_at_end())
        if exc.status == 403:
            _notice_role_change(api)
        st.error(exc.message)
        return None
    if keep is not None:
        st.session_state.pop(keep, None)
    return result


def _notice_role_change(api: Api) -> None:
    """After a 403: when an admin made this person's role another since they signed in, the
    menu and the pages follow it at once."""
    known: User | None = st.session_state.get("user")
    try:
        fresh = api.me()
    except ApiError:
        return
    if known is not None and fresh["role"] != known["role"]:
        st.session_state["user"] = fresh
        st.rerun()


CATALOG_SECONDS = 30.0
"""How long a session reuses the model catalog: a version trained, promoted or rolled back since
shows after at most this long."""


CATALOG_RETRY_SECONDS = 3.0
"""After the catalog could not be fetched (its error shown), how long before it is asked again:
long enough that one page's run asks once, short enough that the models come back with the API."""


def models(api: Api, *, max_age: float = CATALOG_SECONDS) -> list[Model]:
    """The model catalog, fetched again once it is ``max_age`` seconds old (CATALOG_SECONDS unless
    a part of a page waits for it to change); the one held before (or none) while the API cannot
    give it, asked again CATALOG_RETRY_SECONDS on (a failure kept as an empty catalog hid every
    model, without a word, for CATALOG_SECONDS after the API was back)."""
    now = time.monotonic()
    fetched = st.session_state.get("models_at")
    failed = st.session_state.get("models_failed_at")
    stale = "models" not in st.session_state or fetched is None or now - fetched >= max_age
    if stale and (failed is None or now - failed >= CATALOG_RETRY_SECONDS):
        fresh = guarded(api, api.models)
        if fresh is None:
            st.session_state["models_failed_at"] = now
        else:
            st.session_state["models"], st.session_state["models_at"] = fresh, now
            st.session_state["models_fetched_on"] = time.time()
            st.session_state.pop("models_failed_at", None)
    catalog: list[Model] = st.session_state.get("models", [])
    return catalog


def held_models() -> tuple[list[Model], float | None]:
    """The model catalog as last fetched, without asking the API (for a page that knows the API
    cannot answer now), and when it was fetched, in seconds since the epoch; ``([], None)``
    before the first fetch."""
    catalog: list[Model] = st.session_state.get("models", [])
    return catalog, st.session_state.get("models_fetched_on") if catalog else None


def display_name(api: Api, ref: str) -> str:
    """The name people read for a model version: the catalog's, else (a version retired or
    disabled since) the registry's (``unlisted_version``), else ``ref``."""
    model = next((m for m in models(api) if m["ref"] == ref), None)
    if model is not None:
        return model["display_name"]
    unlisted = unlisted_version(api, ref)
    return (unlisted["display_name"] if unlisted else None) or ref


def unlisted_version(api: Api, ref: str) -> VersionLabels | None:
    """A version the catalog lists no more (retired, disabled), as ``GET /v1/models/{ref}/labels``
    gives it; asked once per session; None when the API does not know it."""
    known: dict[str, VersionLabels | None] = st.session_state.setdefault("unlisted_versions", {})
    if ref not in known:
        try:
            known[ref] = api.version_labels(ref)
        except ApiError as exc:
            if exc.status != 404:
                return None  # asked again next time: the API may answer then
            known[ref] = None
    return known[ref]
