"""Per-browser state of the labeling app: who is signed in, which dataset and queue.

``init_state`` runs once per script run and only fills keys that are missing, so widgets keep
their values; every change happens in a callback (sign in, pick a dataset, pick a queue).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

import streamlit as st

from annotation_db import store
from annotation_db.queues import QueueSpec
from app.store_cache import DatasetView, dataset_names, dataset_view, get_sessionmaker, store_url

DEFAULTS = {
    "annotator_id": None,
    "annotator_name": "",
    "dataset_name": None,
    "queue_kind": "mine",
    "slide_id": None,
    "zoom": False,
    "contrast": False,
    "flash": [],  # (kind, message) shown once by the labeling panel
}


@dataclass(frozen=True)
class Who:
    annotator_id: int
    name: str


def init_state() -> None:
    for key, value in DEFAULTS.items():
        if key not in st.session_state:
            st.session_state[key] = list(value) if isinstance(value, list) else value


def app_settings() -> dict:
    """The ``[glomlab]`` table of ``.streamlit/secrets.toml`` (password, adjudicators), or {}."""
    try:
        return dict(st.secrets.get("glomlab", {}))
    except (FileNotFoundError, KeyError, AttributeError):
        return {}


def oidc_configured() -> bool:
    try:
        return "auth" in st.secrets
    except (FileNotFoundError, KeyError, AttributeError):
        return False


def password_ok(given: str) -> bool:
    expected = str(app_settings().get("password", ""))
    return not expected or hmac.compare_digest(given.encode(), expected.encode())


def sign_in(name: str) -> None:
    """Attribute everything from now on to ``name`` (created on first sign-in)."""
    Session = get_sessionmaker()
    with Session() as s, s.begin():
        annotator = store.get_or_create_annotator(s, name)
        st.session_state.annotator_id, st.session_state.annotator_name = annotator.id, annotator.name
    st.session_state.pop("trail", None)
    st.session_state.pop("progress", None)


def sign_out() -> None:
    for key in ("annotator_id", "annotator_name", "trail", "progress", "rate"):
        st.session_state.pop(key, None)
    st.query_params.pop("annotator", None)
    init_state()


def who() -> Who | None:
    if st.session_state.get("annotator_id") is None:
        return None
    return Who(st.session_state.annotator_id, st.session_state.annotator_name)


def is_adjudicator(name: str) -> bool:
    allowed = app_settings().get("adjudicators")
    return not allowed or name in allowed


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
