"""GlomLab labeling app: ``streamlit run app/label.py [-- --db URL]`` (else ``$GLOM_DB``).

A thin page over ``annotation_db``: sign in, pick a dataset and a queue in the sidebar, label by
keyboard. Pages are listed in ``PAGES``; a new page (e.g. "Slide workspace") is one module with a
``page()`` function run under ``if __name__ == "__main__"``, and one line here.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `streamlit run app/label.py` puts app/ on sys.path, not the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st
from sqlalchemy.exc import SQLAlchemyError

from annotation_db.queues import QUEUE_KINDS, QUEUE_TITLES, slides_of
from app import session_cookie, signin_page
from app.session import (
    auth_mode,
    current_dataset,
    init_state,
    local_user_name,
    sign_in,
    sign_out,
    url_sign_in_allowed,
    who,
)
from app.store_cache import dataset_names, get_sessionmaker, store_url
from core.errors import GlomError

APP_DIR = Path(__file__).resolve().parent
PAGES = {
    "Labeling": [
        st.Page(APP_DIR / "labeling_page.py", title="Label", icon=":material/label:", url_path="label", default=True),
        st.Page(APP_DIR / "grid_page.py", title="Grid", icon=":material/grid_view:", url_path="grid"),
    ],
    "Review": [
        st.Page(APP_DIR / "agreement_page.py", title="Agreement", icon=":material/groups:", url_path="agreement"),
        st.Page(APP_DIR / "models_page.py", title="Models", icon=":material/model_training:", url_path="models"),
    ],
    "Data": [
        st.Page(APP_DIR / "import_page.py", title="Import", icon=":material/upload:", url_path="import"),
        st.Page(APP_DIR / "export_page.py", title="Export", icon=":material/download:", url_path="export"),
        st.Page(APP_DIR / "workspace_page.py", title="Slide workspace", icon=":material/zoom_in:", url_path="workspace"),
    ],
}

STYLE = """<style>
.block-container { padding-top: 2rem; padding-bottom: 1rem; }
.st-key-crop img { border-radius: 8px; box-shadow: 0 2px 12px rgba(60, 20, 70, .18); }
[class*="st-key-class_"] button { min-height: 3.4rem; font-size: 1.08rem; }
[class*="st-key-class_"] button p { font-size: 1.08rem; }
</style>"""

KEY_HELP = (
    "**1…N** class · **A** accept the model's suggestion · **Enter** save (multi-label) · **U** uncertain · **S** skip · "
    "**← / Backspace** previous · **→** next · **Z** full resolution · **K** contrast"
)


def _remembered_sign_in() -> None:
    """Sign-ins that need no form: the local user in single-user mode, and (tests only,
    ``GLOM_TEST_URL_SIGNIN=1`` on loopback) ``?annotator=NAME``. Never a sign-in by URL otherwise:
    a link must not make anyone someone else."""
    if who() is None:
        if auth_mode() == "single":
            sign_in(local_user_name(), role="admin")
        elif url_sign_in_allowed() and st.query_params.get("annotator"):
            sign_in(st.query_params["annotator"])
        elif auth_mode() == "accounts" and (name := session_cookie.remembered_name()):
            sign_in(name)  # this browser signed in with a password before the reload
    if st.session_state.dataset_name is None and st.query_params.get("dataset"):
        st.session_state.dataset_name = st.query_params["dataset"]


def _queue_from_url() -> None:
    """``?queue=uncertain`` (any queue kind) opens that queue once per browser session (links)."""
    kind = st.query_params.get("queue")
    if kind in QUEUE_KINDS and not st.session_state.get("queue_from_url_done"):
        st.session_state.queue_kind = kind
        st.session_state.queue_from_url_done = True


def _oidc_sign_in() -> None:
    name = signin_page.oidc_user_name()
    if name and who() is None:
        sign_in(name)


def _on_queue_change() -> None:
    st.session_state.slide_id = None


def _demo_dir() -> Path:
    """Where the demo images go: beside an SQLite store, else ``data/demo``."""
    from sqlalchemy.engine import make_url

    url = make_url(store_url())
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return Path(url.database).resolve().parent / "demo"
    return Path("data") / "demo"


def _create_demo() -> None:
    from core.demo import seed_demo_dataset

    try:
        seed_demo_dataset(get_sessionmaker(), _demo_dir(), if_empty=True)
    except (GlomError, SQLAlchemyError, OSError) as e:
        st.session_state.demo_error = f"Demo dataset not created — {e}"
        return
    st.session_state.demo_error = None
    dataset_names.clear()
    st.session_state.dataset_name = "demo"


def sidebar_panel() -> None:
    me = who()
    with st.sidebar:
        st.markdown(f"Signed in as **{me.name}** · {me.role}")
        if auth_mode() == "single":
            st.caption("Single-user mode (this computer only, no password)")
        else:
            st.button("Sign out", on_click=sign_out, type="tertiary", icon=":material/logout:")
        names = dataset_names(store_url())
        if not names:
            st.warning("The store holds no datasets yet.")
            st.button("Create the demo dataset", on_click=_create_demo, type="primary")
            if st.session_state.get("demo_error"):
                st.error(st.session_state.demo_error)
            return
        if st.session_state.dataset_name not in names:
            st.session_state.dataset_name = names[0]
        st.selectbox("Dataset", names, key="dataset_name")
        st.radio("Queue", QUEUE_KINDS, key="queue_kind", format_func=QUEUE_TITLES.get, on_change=_on_queue_change)
        if st.session_state.queue_kind == "slide":
            dataset = current_dataset()
            with get_sessionmaker()() as s:
                slides = {i: f"{n} ({c})" for i, n, c in slides_of(s, dataset.id)}
            if not slides:
                st.caption("No crop of this dataset names its slide.")
            st.selectbox("Slide", list(slides), key="slide_id", format_func=slides.get, index=None,
                         placeholder="Pick a slide")
        with st.expander("Keyboard", expanded=False):
            st.markdown(KEY_HELP)
        with st.expander("Store", expanded=False):
            st.caption(f"`{_safe_url()}`")


def _safe_url() -> str:
    from sqlalchemy.engine import make_url

    return make_url(store_url()).render_as_string(hide_password=True)


def main() -> None:
    st.set_page_config(page_title="GlomLab labeling", page_icon=":material/biotech:", layout="wide")
    st.html(STYLE)
    init_state()
    _oidc_sign_in()
    _remembered_sign_in()
    _queue_from_url()
    session_cookie.write_cookie()
    me = who()
    if me is None:
        # The same pages are registered signed in or not: switching the page set at sign-in
        # confuses the browser about which page the next fragment rerun belongs to.
        st.navigation(PAGES, position="hidden")
        signin_page.page()
        return
    if st.session_state.dataset_name:
        st.query_params["dataset"] = st.session_state.dataset_name
    sidebar_panel()
    st.navigation(PAGES).run()


main()
