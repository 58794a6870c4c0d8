"""My API keys: make one for a script (a name, scopes within my role, a lifetime), see it once to
copy it, list them with when each was last used, and revoke one after a confirmation."""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime

import streamlit as st

from contracts.api_keys import SCOPE_WORDS, Scope
from ui.client import Api, ApiKey, NewApiKey, User
from ui.results import REPEAT_WINDOW_S, plain, readable_time
from ui.session import guarded, submits

EXPIRY_DAYS: dict[str, int | None] = {"30 days": 30, "90 days": 90, "1 year": 365, "Never": None}
"""The lifetimes offered, as people read them."""
DEFAULT_SCOPES = [Scope.read, Scope.predict]


def offered_scopes(user: User | None) -> list[Scope]:
    """The scopes this person's keys may have: admin only for admins."""
    return [s for s in Scope if s != Scope.admin or (user is not None and user["role"] == "admin")]


def key_state(key: ApiKey, now: datetime | None = None) -> str:
    """ "revoked", "expired" or "active"."""
    if key["revoked_at"]:
        return "revoked"
    if key["expires_at"] and datetime.fromisoformat(key["expires_at"]) <= (now or datetime.now(UTC)):
        return "expired"
    return "active"


def api_keys_page(api: Api) -> None:
    st.title("API keys")
    st.markdown(
        "A key lets a script use the portal without your password. Send it as "
        "`Authorization: Bearer <key>` or `X-API-Key: <key>`; it can do only what its scopes allow."
    )
    if revoked := st.session_state.pop("api_key_revoked", None):
        st.success(f"Revoked {plain(revoked)}: it no longer works.")
    new_key_notice()
    create_form(api)
    st.divider()
    key_list(api)


def new_key_notice() -> None:
    """The keys just made, shown until dismissed (or revoked: ``forget_secrets``), a key made
    while another was still shown not hiding it. They are held by this browser session only (the
    portal keeps their hashes): a reload of the page, closing it or logging out loses them, as the
    page says."""
    sent = submits().sent
    made: list[NewApiKey] = sent.get("api_key_new") or []
    if not made:
        return
    done = "I have copied it" if len(made) == 1 else "I have copied them"
    for new in made:
        st.success(f"Your new key “{plain(new['name'])}”. Copy it now: it will not be shown again.")
        st.code(new["key"], language=None)
    st.caption(
        f"Shown until you press “{done}”, or until this page is reloaded or closed, or you log out: "
        "the portal keeps only a hash of each key. A key lost so cannot be shown again; revoke it "
        "below and make another."
    )
    if st.button(done, key="api_key_dismiss"):
        sent.pop("api_key_new", None)
        st.rerun()


def create_form(api: Api) -> None:
    user: User | None = st.session_state.get("user")
    scopes = offered_scopes(user)
    # The name is emptied once its key is made, not by the submit (clear_on_submit): a double
    # click's second run may stop the first before it sends, and then found the name gone.
    if submits().sent.pop("api_key_clear", False):
        st.session_state["api_key_name"] = ""
    with st.form("api_key_create"):
        st.subheader("Make a key")
        name = st.text_input("Name", max_chars=100, placeholder="nightly import", key="api_key_name")
        chosen = st.multiselect(
            "Scopes",
            scopes,
            default=DEFAULT_SCOPES,
            format_func=lambda s: SCOPE_WORDS[Scope(s)],
            key="api_key_scopes",
        )
        expiry = st.selectbox("Expires after", list(EXPIRY_DAYS), index=1, key="api_key_expiry")
        submitted = st.form_submit_button("Make key")
    if not submitted:
        return
    once = submits()
    request = (name.strip(), tuple(sorted(chosen)), EXPIRY_DAYS[expiry])
    with once.lock:
        sent: tuple[tuple[str, tuple[Scope, ...], int | None], float] | None = once.sent.get("api_key_sent")
        if sent is not None and time.monotonic() - sent[1] < REPEAT_WINDOW_S and (not request[0] or sent[0] == request):
            # The second click of a double click (its form emptied after the first, or still filled):
            # the key it asks for is made; the page is drawn again to show it, its form emptied.
            once.sent["api_key_clear"] = True
            st.rerun()
        if not request[0]:
            st.error("Give the key a name, e.g. the script that will use it.")
            return
        if not chosen:
            st.error("Choose at least one scope.")
            return
        created = guarded(api, lambda: api.create_api_key(request[0], chosen, request[2]))
        if created is None:
            return
        # No Streamlit call until it is kept: a second click may stop this run at the next one.
        once.sent["api_key_new"] = [*once.sent.get("api_key_new", []), created]
        once.sent["api_key_sent"] = (request, time.monotonic())
        once.sent["api_key_clear"] = True
    st.rerun()


def key_list(api: Api) -> None:
    keys = guarded(api, api.api_keys)
    if keys is None:
        return
    if not keys:
        st.info("No keys yet.")
        return
    made = {k["id"] for k in submits().sent.get("api_key_new") or []}
    if gone := {k["id"] for k in keys if k["id"] in made and key_state(k) != "active"}:
        # Revoked since it was made (in another tab, say): its secret is shown no longer.
        forget_secrets(gone)
        st.rerun()
    st.subheader("My keys")
    for key in keys:
        key_row(api, key)


def forget_secrets(key_ids: set[str]) -> None:
    """The keys just made among ``key_ids`` (revoked, so of no use) are no longer shown; the
    others made stay."""
    sent = submits().sent
    left = [k for k in sent.get("api_key_new") or [] if k["id"] not in key_ids]
    if left:
        sent["api_key_new"] = left
    else:
        sent.pop("api_key_new", None)


def key_row(api: Api, key: ApiKey) -> None:
    state = key_state(key)
    info, action = st.columns([4, 1])
    with info:
        st.markdown(f"**{plain(key['name'])}** · `{key['prefix']}…` · {state}")
        used = readable_time(key["last_used_at"]) if key["last_used_at"] else "never"
        expires = readable_time(key["expires_at"]) if key["expires_at"] else "never"
        st.caption(
            f"Scopes: {', '.join(key['scopes'])} · made {readable_time(key['created_at'])} · "
            f"last used {used} · expires {expires}"
            + (f" · revoked {readable_time(key['revoked_at'])}" if key["revoked_at"] else "")
        )
    if state != "active":
        return
    with action:
        confirming = st.session_state.get("api_key_confirm") == key["id"]
        if not confirming and st.button("Revoke", key=f"revoke_{key['id']}"):
            st.session_state["api_key_confirm"] = key["id"]
            st.rerun()
    if confirming:
        st.warning(f"Revoke {plain(key['name'])}? Scripts using it will be refused at once.")
        yes, no = st.columns(2)
        if yes.button("Revoke", type="primary", key=f"revoke_yes_{key['id']}"):
            st.session_state.pop("api_key_confirm", None)
            if guarded(api, functools.partial(api.revoke_api_key, key["id"])) is not None:
                forget_secrets({key["id"]})
                st.session_state["api_key_revoked"] = key["name"]
                st.rerun()
        if no.button("Keep", key=f"revoke_no_{key['id']}"):
            st.session_state.pop("api_key_confirm", None)
            st.rerun()
