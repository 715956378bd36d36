"""Sign in: name and password of an account in the store, or OIDC via st.login.

Single-user mode (``GLOM_SINGLE_USER=1`` on loopback) needs no page: ``app/label.py`` signs the
local user in.
"""

from __future__ import annotations

import math

import streamlit as st

from annotation_db import users
from app.session import auth_mode, on_loopback, sign_in_with_password
from app.store_cache import get_sessionmaker, store_url
from core.errors import GlomError

FIRST_ADMIN_HINT = (
    "No account can sign in yet. An administrator creates the first one on the server: "
    "`glom user add NAME --role admin` (then `glom user add` for each clinician)."
)


@st.cache_resource
def sign_in_throttle(url: str) -> users.SignInThrottle:
    """Failed sign-ins to the accounts of the store at ``url``, for every browser of this server."""
    return users.SignInThrottle()


def _client_address() -> str | None:
    """The browser's address as the server sees it (None on localhost, where Streamlit gives none)."""
    try:
        return st.context.ip_address
    except (AttributeError, RuntimeError):
        return None


def _on_sign_in() -> None:
    name = (st.session_state.get("signin_name") or "").strip()
    password = st.session_state.get("signin_password") or ""
    if not name:
        st.session_state.signin_error = "Type your name: every label is attributed to it."
        return
    throttle, address = sign_in_throttle(store_url()), _client_address()
    wait_s = throttle.wait_s(name, address)
    if wait_s > 0:  # refused before the password is checked: guessing gets no answer while it waits
        st.session_state.signin_error = f"Too many failed sign-ins: try again in {math.ceil(wait_s)} s."
        return
    try:
        ok = sign_in_with_password(name, password)
    except GlomError as e:
        st.session_state.signin_error = str(e)
        return
    throttle.record(name, address, ok=ok)
    # One message for an unknown name and a wrong password: the page does not say who exists.
    st.session_state.signin_error = "" if ok else "Wrong name or password."


def oidc_user_name() -> str | None:
    """The signed-in OIDC user's e-mail (or name), when OIDC is configured and they logged in."""
    if auth_mode() != "oidc":
        return None
    try:
        if st.user.is_logged_in:
            return st.user.get("email") or st.user.get("name")
    except (AttributeError, KeyError):
        return None
    return None


def _has_accounts() -> bool:
    with get_sessionmaker()() as s:
        return users.has_accounts(s)


def page() -> None:
    st.title("GlomLab labeling")
    st.write("Label glomerulus crops by keyboard. Every click is stored at once and attributed to you.")
    with st.container(border=True, width=440):
        if auth_mode() == "oidc":
            st.button("Sign in with your organisation", on_click=st.login, icon=":material/login:", width="stretch")
            st.divider()
        if not _has_accounts():
            st.info(FIRST_ADMIN_HINT)
            if on_loopback():
                st.caption("Working alone on this computer? `make app` starts the single-user mode (no password).")
        with st.form("signin", border=False):
            st.text_input("Your name", key="signin_name", placeholder="e.g. dr.chen")
            st.text_input("Password", key="signin_password", type="password")
            st.form_submit_button("Sign in", on_click=_on_sign_in, type="primary", width="stretch")
        if st.session_state.get("signin_error"):
            st.error(st.session_state.signin_error)
