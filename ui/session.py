"""What every page shares: turning API errors into messages, logging out, the cached model catalog."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeVar

import streamlit as st

from ui.client import Api, ApiError, Model

T = TypeVar("T")


def logout(api: Api, message: str | None = None) -> None:
    """Ends the session (also when the token is already dead) and reruns into the login page,
    which shows ``message``."""
    with contextlib.suppress(ApiError):  # an expired token is already as good as logged out
        api.logout()
    for key in list(st.session_state.keys()):
        del st.session_state[key]
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
