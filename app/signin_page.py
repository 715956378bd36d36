"""Sign in: an annotator name (plus the shared password when one is set), or OIDC via st.login."""

from __future__ import annotations

import streamlit as st

from annotation_db.db import StoreError
from app.session import app_settings, oidc_configured, password_ok, sign_in


def _on_sign_in() -> None:
    name = (st.session_state.get("signin_name") or "").strip()
    if not name:
        st.session_state.signin_error = "Type your name: every label is attributed to it."
        return
    if not password_ok(st.session_state.get("signin_password") or ""):
        st.session_state.signin_error = "Wrong password."
        return
    try:
        sign_in(name)
    except StoreError as e:
        st.session_state.signin_error = str(e)
        return
    st.session_state.signin_error = ""


def oidc_user_name() -> str | None:
    """The signed-in OIDC user's e-mail (or name), when OIDC is configured and they logged in."""
    if not oidc_configured():
        return None
    try:
        if st.user.is_logged_in:
            return st.user.get("email") or st.user.get("name")
    except (AttributeError, KeyError):
        return None
    return None


def page() -> None:
    st.title("GlomLab labeling")
    st.write("Label glomerulus crops by keyboard. Every click is stored at once and attributed to you.")
    with st.container(border=True, width=420):
        if oidc_configured():
            st.button("Sign in with your organisation", on_click=st.login, icon=":material/login:", width="stretch")
            st.divider()
        with st.form("signin", border=False):
            st.text_input("Your name", key="signin_name", placeholder="e.g. dr.chen")
            if app_settings().get("password"):
                st.text_input("Shared password", key="signin_password", type="password")
            st.form_submit_button("Sign in", on_click=_on_sign_in, type="primary", width="stretch")
        if st.session_state.get("signin_error"):
            st.error(st.session_state.signin_error)
