"""Grid mode: a page of thumbnails (4×4) from the current queue, each labeled with one click,
or all unlabeled ones of the page at once."""

from __future__ import annotations

import streamlit as st
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from annotation_db import queues, store
from annotation_db.models import Annotator, Image, Label
from app.session import current_dataset, flash, queue_spec, show_flash, who
from app.store_cache import DatasetView, crop_bytes, get_sessionmaker
from core.errors import GlomError

GRID_COLUMNS = 4
GRID_ROWS = 4


def _grid_state(spec: queues.QueueSpec) -> dict:
    grid = st.session_state.get("grid")
    if grid is None or grid["queue"] != spec:
        grid = st.session_state.grid = {"queue": spec, "starts": [0], "ids": None, "next": None}
    return grid


def _load_page(grid: dict, spec: queues.QueueSpec) -> None:
    if grid["ids"] is not None:
        return
    with get_sessionmaker()() as s:
        batch = queues.next_image_ids(s, spec, grid["starts"][-1], GRID_COLUMNS * GRID_ROWS)
    grid["ids"] = [i for _, i in batch]
    grid["next"] = batch[-1][0] if batch else None


def _write(rows: list[tuple[int, list[str]]]) -> None:
    me = who()
    try:
        with get_sessionmaker()() as s, s.begin():
            annotator = s.get(Annotator, me.annotator_id)
            for image_id, classes in rows:
                if classes:
                    store.set_label(s, s.get(Image, image_id), annotator, classes)
                else:
                    store.clear_label(s, s.get(Image, image_id), annotator)
    except (GlomError, SQLAlchemyError) as e:
        flash("error", f"Not saved — {e}")


def on_tile(image_id: int, multi: bool) -> None:
    value = st.session_state.get(f"grid_{image_id}")
    classes = list(value or []) if multi else ([value] if value else [])
    _write([(image_id, classes)])


def on_apply_all(ids: list[int], unlabeled: list[int]) -> None:
    key = st.session_state.get("grid_apply_class")
    if not key:
        return
    _write([(i, [key]) for i in unlabeled])
    for i in unlabeled:
        st.session_state.pop(f"grid_{i}", None)


def on_page(step: int) -> None:
    grid = st.session_state.grid
    if step > 0 and grid["next"] is not None:
        grid["starts"].append(grid["next"])
    elif step < 0 and len(grid["starts"]) > 1:
        grid["starts"].pop()
    grid["ids"] = None


def _my_labels(ids: list[int], annotator_id: int) -> dict[int, list[str]]:
    with get_sessionmaker()() as s:
        rows = s.execute(
            select(Label.image_id, Label.classes).where(Label.annotator_id == annotator_id, Label.image_id.in_(ids))
        )
        return {i: list(c) for i, c in rows}


def _tile(dataset: DatasetView, info: queues.CropInfo, mine: list[str] | None) -> None:
    try:
        st.image(crop_bytes(str(dataset.abspath(info.path)), st.session_state.contrast), width="stretch")
    except OSError:
        st.warning(f"File missing: `{info.path}`")
        return
    multi = dataset.multi_label
    st.pills(
        info.path,
        dataset.keys,
        selection_mode="multi" if multi else "single",
        default=(mine or []) if multi else (mine[0] if mine else None),
        format_func=dataset.display,
        key=f"grid_{info.image_id}",
        on_change=on_tile,
        args=(info.image_id, multi),
        label_visibility="collapsed",
    )


@st.fragment
def grid_panel() -> None:
    me, dataset = who(), current_dataset()
    spec = queue_spec(dataset, me)
    if spec is None:
        st.info("Pick a slide in the sidebar.")
        return
    grid = _grid_state(spec)
    _load_page(grid, spec)
    show_flash()
    ids = grid["ids"]
    if not ids:
        st.success("Nothing left in this queue.")
        st.button("Previous page", on_click=on_page, args=(-1,), disabled=len(grid["starts"]) <= 1)
        return
    mine = _my_labels(ids, me.annotator_id)
    unlabeled = [i for i in ids if i not in mine]
    top = st.columns([2, 2, 1, 1], vertical_alignment="bottom")
    top[0].selectbox("Label every unlabeled crop of this page as", dataset.keys, key="grid_apply_class",
                     format_func=dataset.display)
    top[1].button(f"Apply to {len(unlabeled)} unlabeled", on_click=on_apply_all, args=(ids, unlabeled),
                  disabled=not unlabeled, type="primary")
    top[2].button("Previous page", on_click=on_page, args=(-1,), disabled=len(grid["starts"]) <= 1,
                  shortcut="Left", icon=":material/arrow_back:")
    top[3].button("Next page", on_click=on_page, args=(1,), shortcut="Right", icon=":material/arrow_forward:")
    with get_sessionmaker()() as s:
        infos = [queues.crop_info(s, i) for i in ids]
    for r in range(0, len(infos), GRID_COLUMNS):
        cols = st.columns(GRID_COLUMNS)
        for col, info in zip(cols, infos[r : r + GRID_COLUMNS]):
            with col, st.container(border=True):
                _tile(dataset, info, mine.get(info.image_id))


def page() -> None:
    if current_dataset() is None:
        st.info("Pick a dataset in the sidebar.")
        return
    grid_panel()


if __name__ == "__main__":  # run by st.navigation as a page script
    page()
