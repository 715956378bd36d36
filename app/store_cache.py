"""The app's one door to the store: the cached sessionmaker, and cached, serializable reads.

Engines live in ``st.cache_resource`` (one per URL for the whole server); what a rerun reads
often and rarely changes (a dataset's schema, image bytes, slide thumbnails) lives in
``st.cache_data``. Writes never go through a cache: callers open ``with Session() as s, s.begin()``.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
from PIL import Image as PILImage
from PIL import ImageDraw, ImageOps
from sqlalchemy.orm import Session, sessionmaker

from annotation_db import store
from annotation_db.db import open_store, resolve_url

THUMB_MAX_PX = 480


def store_url() -> str:
    """The store URL: ``streamlit run app/label.py -- --db URL``, else ``$GLOM_DB``, else the default."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--db", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:])
    return resolve_url(args.db)


@st.cache_resource(show_spinner="Opening the annotation store…")
def _sessionmaker(url: str) -> sessionmaker[Session]:
    return open_store(url)


def get_sessionmaker() -> sessionmaker[Session]:
    return _sessionmaker(store_url())


@dataclass(frozen=True)
class ClassView:
    key: str
    display_name: str
    hotkey: str | None


@dataclass(frozen=True)
class DatasetView:
    """What the pages need of a dataset, detached from any session."""

    id: int
    name: str
    root: str
    multi_label: bool
    classes: tuple[ClassView, ...]

    @property
    def keys(self) -> list[str]:
        return [c.key for c in self.classes]

    def display(self, key: str) -> str:
        return next((c.display_name for c in self.classes if c.key == key), key)

    def abspath(self, rel_path: str) -> Path:
        return Path(self.root or ".") / rel_path


@st.cache_data(ttl=10, show_spinner=False)
def dataset_names(url: str) -> list[str]:
    with _sessionmaker(url)() as s:
        return [d.name for d in store.list_datasets(s)]


@st.cache_data(ttl=60, show_spinner=False)
def dataset_view(url: str, name: str) -> DatasetView:
    with _sessionmaker(url)() as s:
        d = store.get_dataset(s, name)
        classes = tuple(ClassView(c.key, c.display_name, c.hotkey) for c in d.classes)
        return DatasetView(d.id, d.name, d.root, bool(d.multi_label), classes)


@st.cache_data(max_entries=512, show_spinner=False)
def crop_bytes(abs_path: str, contrast: bool = False) -> bytes:
    """The crop's file bytes, or a contrast-stretched PNG; raises FileNotFoundError if it vanished."""
    data = Path(abs_path).read_bytes()
    if not contrast:
        return data
    with PILImage.open(io.BytesIO(data)) as im:
        out = ImageOps.autocontrast(im.convert("RGB"), cutoff=2)
    buf = io.BytesIO()
    out.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@st.cache_data(max_entries=512, show_spinner=False)
def crop_data_url(abs_path: str, contrast: bool = False) -> str:
    """The crop as a ``data:`` URL: it arrives with the page update, with no second request."""
    data = crop_bytes(abs_path, contrast)
    return f"data:{_mimetype(data)};base64,{base64.b64encode(data).decode('ascii')}"


def _mimetype(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    with PILImage.open(io.BytesIO(data)) as im:
        return PILImage.MIME.get(im.format or "", "application/octet-stream")


@st.cache_data(max_entries=32, show_spinner=False)
def _slide_thumbnail(slide_path: str) -> tuple[bytes, tuple[int, int]]:
    from core.slide_view import to_png
    from core.wsi import open_slide

    with open_slide(slide_path) as slide:
        return to_png(slide.thumbnail_image(THUMB_MAX_PX)), slide.dimensions


@st.cache_data(max_entries=256, show_spinner=False)
def slide_thumbnail_with_box(slide_path: str, box: tuple[int, int, int, int] | None) -> bytes:
    """A thumbnail of the slide with the crop's level-0 box drawn on it (PNG)."""
    png, (w0, h0) = _slide_thumbnail(slide_path)
    with PILImage.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
    if box is not None:
        sx, sy = im.width / w0, im.height / h0
        x, y, w, h = box
        rect = [x * sx, y * sy, (x + w) * sx, (y + h) * sy]
        # Never smaller than a few pixels, so a tiny crop on a big slide stays visible.
        cx, cy = (rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2
        half_w, half_h = max((rect[2] - rect[0]) / 2, 4), max((rect[3] - rect[1]) / 2, 4)
        ImageDraw.Draw(im).rectangle(
            [cx - half_w, cy - half_h, cx + half_w, cy + half_h], outline=(0, 200, 255), width=3
        )
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
