"""Per-browser state of the labeling app: who is signed in, which dataset and queue.

``init_state`` runs once per script run and only fills keys that are missing, so widgets keep
their values; every change happens in a callback (sign in, pick a dataset, pick a queue).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import streamlit as st

from annotation_db import store, users
from annotation_db.queues import QueueSpec
from app import session_cookie
from app.store_cache import (
    DatasetView,
    dataset_names,
    dataset_view,
    get_sessionmaker,
    store_url,
)

DEFAULTS = {
    "annotator_id": None,
    "annotator_name": "",
    "annotator_role": None,
    "dataset_name": None,
    "queue_kind": "mine",
    "slide_id": None,
    "zoom": False,
    "contrast": False,
    "flash": [],  # (kind, message): said once, on the page's next run (flash / show_flash)
}


@dataclass(frozen=True)
class Who:
    annotator_id: int
    name: str
    role: str = "annotator"

    def may(self, action: str) -> bool:
        """Whether this person's role allows ``action`` (see :mod:`annotation_db.users`)."""
        return users.may(self.role, action)


def init_state() -> None:
    for key, value in DEFAULTS.items():
        if key not in st.session_state:
            st.session_state[key] = list(value) if isinstance(value, list) else value


def oidc_configured() -> bool:
    try:
        return "auth" in st.secrets
    except (FileNotFoundError, KeyError, AttributeError):
        return False


def bind_address() -> str:
    """The address the server listens on ("" when Streamlit was left to choose: every interface)."""
    return str(st.get_option("server.address") or "")


def on_loopback() -> bool:
    """True only when the server is bound to a loopback address (reachable from this machine only)."""
    return users.is_loopback(bind_address())


def single_user_requested() -> bool:
    return os.environ.get("GLOM_SINGLE_USER", "") not in ("", "0")


def auth_mode() -> str:
    """How people sign in: ``oidc`` (an ``[auth]`` table in secrets.toml), ``single`` (asked for
    with ``GLOM_SINGLE_USER=1`` and bound to loopback: one local user, no password) or
    ``accounts`` (name and password checked against the store; the default, and always when the
    server is reachable beyond loopback)."""
    if oidc_configured():
        return "oidc"
    if single_user_requested() and on_loopback():
        return "single"
    return "accounts"


def local_user_name() -> str:
    return users.local_user_name()


def url_sign_in_allowed() -> bool:
    """``?annotator=NAME`` signs in only in tests (``GLOM_TEST_URL_SIGNIN=1``) on loopback."""
    return os.environ.get("GLOM_TEST_URL_SIGNIN", "") not in ("", "0") and on_loopback()


def sign_in(name: str, role: str | None = None) -> None:
    """Attribute everything from now on to ``name`` with the rights of ``role`` (the store's
    role of that account when None). Callers have checked who it is."""
    Session = get_sessionmaker()
    with Session() as s, s.begin():
        annotator = store.get_or_create_annotator(s, name)
        st.session_state.annotator_id, st.session_state.annotator_name = annotator.id, annotator.name
        st.session_state.annotator_role = role or annotator.role
    st.session_state.pop("trail", None)
    st.session_state.pop("progress", None)


def sign_in_with_password(name: str, password: str) -> bool:
    """Sign ``name`` in when ``password`` is theirs (argon2 hash in the store); False otherwise."""
    with get_sessionmaker()() as s, s.begin():
        account = users.authenticate(s, name, password)
        if account is None:
            return False
        account_name = account.name
        session_cookie.remember(account)  # a reload of the page keeps them signed in
    sign_in(account_name)
    return True


def sign_out() -> None:
    for key in ("annotator_id", "annotator_name", "annotator_role", "trail", "progress", "rate"):
        st.session_state.pop(key, None)
    st.query_params.pop("annotator", None)
    session_cookie.forget()
    init_state()


def who() -> Who | None:
    if st.session_state.get("annotator_id") is None:
        return None
    return Who(st.session_state.annotator_id, st.session_state.annotator_name,
               st.session_state.get("annotator_role") or "annotator")


def is_adjudicator(me: Who) -> bool:
    return me.may("adjudicate")


def flash(kind: str, message: str) -> None:
    """Say ``message`` (``st.<kind>``: info, warning, error, success) on the page's next run."""
    st.session_state.flash.append((kind, message))


def show_flash() -> None:
    """Show, once, what :func:`flash` queued."""
    for kind, message in st.session_state.flash:
        getattr(st, kind)(message)
    st.session_state.flash = []


def current_dataset() -> DatasetView | None:
    names = dataset_names(store_url())
    name = st.session_state.get("dataset_name")
    if name not in names:
        return None
    return dataset_view(store_url(), name)


def queue_spec(dataset: DatasetView, me: Who) -> QueueSpec | None:
    kind = st.session_state.queue_kind
    if kind == "slide" and st.session_state.slide_id is None:
        return None
    return QueueSpec(kind, dataset.id, me.annotator_id, st.session_state.slide_id if kind == "slide" else None)
