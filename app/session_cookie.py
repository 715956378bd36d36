"""Stay signed in across reloads: a signed token in a cookie of this site.

A reload opens a new Streamlit session, which knows nobody. After a password sign-in the page
writes ``glom_session`` (:func:`annotation_db.users.issue_session_token`: name and expiry, signed
with this server's secret and the account's password hash) with a tiny component; the next
session reads it from the request that opened it (``st.context.cookies``) and signs the same
person in without asking again. Signing out clears the cookie. The secret is
``GLOM_SESSION_SECRET`` when set, else a random one per server process (a restart signs
everyone out); a new password ends every earlier session of that account.
"""

from __future__ import annotations

import os
import secrets

import streamlit as st

from annotation_db import users
from annotation_db.models import Annotator
from app.store_cache import get_sessionmaker

COOKIE = "glom_session"

# Written by the browser itself (Streamlit sets no cookies of its own); Secure when served by https.
_JS = r"""
export default function (component) {
  const { data } = component;
  if (!data) return;
  const secure = window.location.protocol === "https:" ? "; Secure" : "";
  const value = data.token ? `${data.token}; Max-Age=${data.max_age}` : "; Max-Age=0";
  document.cookie = `${data.name}=${value}; Path=/; SameSite=Strict${secure}`;
}
"""

_component = st.components.v2.component("glomlab_session_cookie", js=_JS)


@st.cache_resource
def _secret() -> bytes:
    raw = os.environ.get("GLOM_SESSION_SECRET", "")
    return raw.encode() if raw else secrets.token_bytes(32)


def remember(account: Annotator) -> None:
    """After ``account`` signed in with its password: the page writes its cookie from now on."""
    st.session_state.session_cookie = users.issue_session_token(account, _secret())
    st.session_state.session_cookie_off = False


def forget() -> None:
    """On sign-out: clear the cookie, and do not sign in from the one this session was opened with."""
    st.session_state.session_cookie = ""
    st.session_state.session_cookie_off = True


def write_cookie() -> None:
    """Render the cookie writer while there is something to write (every run: a run the browser
    never finished must not lose it)."""
    token = st.session_state.get("session_cookie")
    if token is None:
        return
    _component(key="session_cookie", data={"name": COOKIE, "token": token, "max_age": int(users.SESSION_TTL_S)})


def remembered_name() -> str | None:
    """The account this browser signed in as, from a valid cookie; None otherwise."""
    if st.session_state.get("session_cookie_off"):
        return None
    try:
        token = st.context.cookies.get(COOKIE)
    except (AttributeError, RuntimeError):
        return None
    if not token:
        return None
    with get_sessionmaker()() as s:
        account = users.verify_session_token(s, token, _secret())
        if account is None:
            return None
        st.session_state.session_cookie = token  # keep writing the one it came with
        return account.name
