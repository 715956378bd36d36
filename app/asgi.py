"""The labeling app as an ASGI application: ``streamlit run app/asgi.py [-- --db URL]``.

Streamlit (1.67) serves an ``st.App`` found in the script it is given, with extra routes beside its
own: here the slide workspace's tiles, overlays and vendored viewer (:mod:`app.slide_api`), served
by the same process, port and bind address as the pages. ``app/serve.py`` and ``make app`` start
this file; ``streamlit run app/label.py`` still runs the pages without the workspace routes.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st

from app.slide_api import routes

app = st.App(Path(__file__).resolve().parent / "label.py", routes=routes())
