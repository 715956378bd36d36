"""Slides: pick a whole-slide image, pan and zoom over it, draw boxes around glomeruli and crop
them into the dataset at once. Boxes are stored the moment they are drawn (nothing is lost on a
reload) and export as QuPath GeoJSON.

The region view is a Plotly image with box-select as its drag mode: a drag is a selection, which
the ``on_select`` callback turns into a level-0 box (``ViewRender.view_box_to_level0``) and stores
with ``annotation_db.boxes.add_box``. The chart's key changes after each stored box, so the next
drag starts from a fresh selection and the stored box shows as a rectangle drawn by the page.
Cropping and the GeoJSON export are :mod:`core.slide_crops` (``crop_into_dataset``, shared with the
diagnosis viewer, at its ``SLIDE_CROP_SETTINGS``).
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from sqlalchemy.exc import SQLAlchemyError

from annotation_db import boxes as box_store
from annotation_db import store
from annotation_db.models import Slide, SlideBox, Stain
from app.session import current_dataset, who
from app.store_cache import DatasetView, get_sessionmaker
from core.errors import GlomError
from core.roots import OutsideRootError, confine, slides_root
from core.extract import clip_box
from core.slide_crops import SLIDE_CROP_SETTINGS, crop_into_dataset, export_boxes_geojson
from core.slide_view import ViewRender, render_view, thumbnail_png
from core.wsi import (
    OPENSLIDE_FORMATS,
    SlideReader,
    default_slides_dir,
    list_slide_files,
    open_slide,
    slide_name,
)

VIEW_PX = (800, 600)
THUMB_PX = 280
ZOOMS = (1, 2, 4, 8, 16, 32, 64, 128)  # level-0 px per view px
MIN_BOX_VIEW_PX = 6  # a smaller drag is a slip of the mouse, not a glomerulus
SHOWN_BOXES = 200
NEW = "#00c8ff"  # drawn, not cropped yet
CROPPED = "#3ddc84"

log = logging.getLogger(__name__)


def fit_zoom(dimensions: tuple[int, int], view_px: tuple[int, int] = VIEW_PX) -> int:
    """The smallest zoom step at which the whole slide fits in the view."""
    need = max(dimensions[0] / view_px[0], dimensions[1] / view_px[1])
    return next((z for z in ZOOMS if z >= need), ZOOMS[-1])


def zoom_step(downsample: int, steps: int, dimensions: tuple[int, int]) -> int:
    """``steps`` zoom steps in (negative) or out (positive), never past full resolution or the fit."""
    i = ZOOMS.index(downsample) + steps
    return ZOOMS[min(max(i, 0), ZOOMS.index(fit_zoom(dimensions)))]


def clamp_center(center: tuple[float, float], dimensions: tuple[int, int]) -> tuple[int, int]:
    return (round(min(max(center[0], 0), dimensions[0])), round(min(max(center[1], 0), dimensions[1])))


def selection_to_boxes(
    selected: list[dict], view: ViewRender, dimensions: tuple[int, int]
) -> tuple[list[tuple[int, int, int, int]], int]:
    """Level-0 boxes of Plotly box selections on the view (view px), clipped to the slide, and
    the number of selections dropped as too small or off the slide."""
    vw, vh = view.size_px
    out, dropped = [], 0
    for sel in selected:
        (x0, x1), (y0, y1) = sorted(sel["x"]), sorted(sel["y"])
        x0, x1, y0, y1 = max(x0, 0), min(x1, vw), max(y0, 0), min(y1, vh)
        if x1 - x0 < MIN_BOX_VIEW_PX or y1 - y0 < MIN_BOX_VIEW_PX:
            dropped += 1
            continue
        box = clip_box(view.view_box_to_level0(x0, y0, x1 - x0, y1 - y0), dimensions)
        if box is None:
            dropped += 1
            continue
        out.append(box)
    return out, dropped


# --- slide access (one reader per slide for the whole server) -------------------------------------


@st.cache_resource(max_entries=16, show_spinner="Opening the slide…")
def _reader(path: str) -> SlideReader:
    return open_slide(path)


@st.cache_data(max_entries=16, show_spinner=False)
def _thumbnail(path: str) -> bytes:
    return thumbnail_png(_reader(path), THUMB_PX)


@st.cache_data(max_entries=64, show_spinner=False)
def _view(path: str, center: tuple[int, int], downsample: int) -> ViewRender:
    return render_view(_reader(path), center, downsample, VIEW_PX)


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# --- state and callbacks -------------------------------------------------------------------------


def _init_state() -> None:
    for key, value in {"slides_view": None, "slides_draws": 0, "slides_flash": [], "slides_ids": {}}.items():
        if key not in st.session_state:
            st.session_state[key] = value


def _flash(kind: str, message: str) -> None:
    st.session_state.slides_flash.append((kind, message))


def _slides_folder() -> Path:
    """The folder typed on the page, confined to the server's slides folder (else OutsideRootError)."""
    root = slides_root()
    if root is None:
        raise OutsideRootError("the server has no slides folder: start the app with GLOM_SLIDES_DIR set")
    return confine(st.session_state.get("slides_dir") or root, root, "the slides folder")


def _slide_path() -> Path | None:
    name = st.session_state.get("slides_file")
    if not name:
        return None
    try:
        folder = _slides_folder()
        return confine(folder / name, folder, "the slides folder")
    except OutsideRootError:
        return None


def _slide_mpp(slide: SlideReader) -> float | None:
    """The slide's own µm/px, else what the user typed for it."""
    return slide.mpp or st.session_state.get("slides_mpp")


def _slide_id(path: Path, slide: SlideReader) -> int:
    """The store's row for this slide, registered the first time the slide is shown."""
    ids = st.session_state.slides_ids
    if str(path) not in ids:
        with get_sessionmaker()() as s, s.begin():
            row = store.get_or_create_slide(s, slide_name(path), path=str(path), mpp=slide.mpp)
            ids[str(path)] = row.id
    return ids[str(path)]


def _go(center: tuple[float, float], downsample: int, dimensions: tuple[int, int]) -> None:
    st.session_state.slides_view = (str(_slide_path()), clamp_center(center, dimensions), downsample)
    st.session_state.slides_draws += 1


def on_pick() -> None:
    st.session_state.slides_view = None
    st.session_state.pop("slides_mpp", None)
    _keep_picks()


def _keep_picks() -> None:
    # Streamlit drops a widget's key when another page runs: keep the picks in plain keys.
    st.session_state.slides_dir_kept = st.session_state.get("slides_dir")
    st.session_state.slides_file_kept = st.session_state.get("slides_file")


def on_pan(dx: float, dy: float, dimensions: tuple[int, int]) -> None:
    """Move by a fraction of the view: half a view per arrow press."""
    _, (cx, cy), ds = st.session_state.slides_view
    _go((cx + dx * VIEW_PX[0] * ds, cy + dy * VIEW_PX[1] * ds), ds, dimensions)


def on_zoom(steps: int, dimensions: tuple[int, int]) -> None:
    _, center, ds = st.session_state.slides_view
    _go(center, zoom_step(ds, steps, dimensions), dimensions)


def on_fit(dimensions: tuple[int, int]) -> None:
    _go((dimensions[0] / 2, dimensions[1] / 2), fit_zoom(dimensions), dimensions)


def on_thumb_click(key: str, thumb_scale: float, dimensions: tuple[int, int]) -> None:
    """A click on the navigation thumbnail centres the view there."""
    points = st.session_state[key].selection.points
    if points:
        _, _, ds = st.session_state.slides_view
        _go((points[0]["x"] / thumb_scale, points[0]["y"] / thumb_scale), ds, dimensions)


def on_draw(key: str, view: ViewRender, slide_id: int, dimensions: tuple[int, int]) -> None:
    """A box drawn on the view is stored at once (with the class chosen for new boxes)."""
    selected = st.session_state[key].selection.box
    new, dropped = selection_to_boxes(selected, view, dimensions)
    if dropped:
        _flash("warning", "A box too small or off the slide was not kept; drag around the whole glomerulus.")
    if not new:
        return
    me = who()
    try:
        with get_sessionmaker()() as s, s.begin():
            row = s.get(Slide, slide_id)
            for box in new:
                box_store.add_box(s, row, box, created_by=me.name, label=st.session_state.get("slides_label"))
    except (GlomError, SQLAlchemyError) as e:
        _flash("error", f"Box not saved — {e}")
        return
    st.session_state.slides_draws += 1  # a fresh chart: the next drag is a new selection


def on_delete(box_id: int) -> None:
    try:
        with get_sessionmaker()() as s, s.begin():
            box_store.delete_box(s, box_id)
    except (GlomError, SQLAlchemyError) as e:
        _flash("error", f"Box #{box_id} not deleted — {e}")
        return
    st.session_state.slides_draws += 1


def on_crop(path: str, slide_id: int, dataset_name: str, mpp: float | None, slide_has_mpp: bool) -> None:
    me = who()
    try:
        with get_sessionmaker()() as s, s.begin():
            row = s.get(Slide, slide_id)
            store.get_or_create_slide(s, row.name, mpp=mpp, stain=st.session_state.get("slides_stain"))
            todo = box_store.list_boxes(s, row, uncropped_only=True)
            report = crop_into_dataset(
                s, dataset_name, path, todo, annotator=me.name, settings=SLIDE_CROP_SETTINGS,
                mpp=None if slide_has_mpp else mpp, stain=st.session_state.get("slides_stain"),
            ).report
    except GlomError as e:
        _flash("error", f"Nothing cropped — {e}")
        return
    except SQLAlchemyError as e:  # the store is busy or down: say so, keep the trace in the log
        log.exception("cropping the boxes of %s failed", path)
        _flash("error", f"Nothing cropped — {e}")
        return
    written = report.written + report.skipped_existing
    _flash("success", f"{written} crops added to {dataset_name}: they are in the labeling queue now.")
    for problem in report.clipped + report.refused:
        _flash("warning", str(problem))
    st.session_state.slides_draws += 1


# --- panels --------------------------------------------------------------------------------------


def picker_panel() -> Path | None:
    c1, c2 = st.columns([3, 2])
    if "slides_dir" not in st.session_state:  # first visit, or back from another page
        st.session_state.slides_dir = st.session_state.get("slides_dir_kept") or default_slides_dir()
    c1.text_input("Slides folder on the server", key="slides_dir", on_change=on_pick)
    try:
        folder = _slides_folder()
    except OutsideRootError as e:
        st.error(str(e))
        return None
    files = list_slide_files(folder)
    if not files:
        st.info(f"No slide in `{folder}`. Put slides there ({OPENSLIDE_FORMATS}) or name another folder.")
        return None
    if "slides_file" not in st.session_state and st.session_state.get("slides_file_kept") in files:
        st.session_state.slides_file = st.session_state.slides_file_kept
    c2.selectbox("Slide", files, key="slides_file", index=None, placeholder="Pick a slide", on_change=on_pick)
    return _slide_path()


def options_panel(slide: SlideReader, dataset: DatasetView) -> None:
    c1, c2, c3 = st.columns(3)
    c1.selectbox("Class of new boxes", [None, *dataset.keys], key="slides_label",
                 format_func=lambda k: "none (label later)" if k is None else dataset.display(k))
    stains = [s.value for s in Stain]
    c2.selectbox("Stain", stains, key="slides_stain", index=stains.index(Stain.PAS.value))
    if slide.mpp is None:
        c3.number_input("µm per pixel of this slide", key="slides_mpp", value=None, min_value=0.01, max_value=20.0,
                        step=0.01, format="%.4f", placeholder="e.g. 0.25")
        if not st.session_state.get("slides_mpp"):
            st.warning("This slide does not record its µm per pixel. Enter it (from the scanner's "
                       "report) before cropping: crops are cut at 0.5 µm/px.")
    else:
        c3.caption(f"{slide.dimensions[0]}×{slide.dimensions[1]} px · {slide.mpp:.3f} µm/px · "
                   f"{slide.level_count} level(s)")


def navigation_panel(path: Path, slide: SlideReader, view: ViewRender, rows: list[SlideBox]) -> None:
    dims = slide.dimensions
    thumb = _thumbnail(str(path))
    tw, th = _png_size(thumb)
    scale = tw / dims[0]
    fig = go.Figure()
    step = 8  # thumbnail px between the invisible points a click snaps to
    xs, ys = np.meshgrid(np.arange(0, tw + 1, step), np.arange(0, th + 1, step))
    fig.add_trace(go.Scatter(x=xs.ravel(), y=ys.ravel(), mode="markers", marker={"opacity": 0, "size": step},
                             hoverinfo="none", showlegend=False))
    fig.add_layout_image(source=_data_url(thumb), x=0, y=0, sizex=tw, sizey=th, xref="x", yref="y",
                         sizing="stretch", layer="below")
    for b in rows:
        fig.add_shape(type="rect", x0=b.x0 * scale, y0=b.y0 * scale, x1=(b.x0 + b.box_w) * scale,
                      y1=(b.y0 + b.box_h) * scale, line={"color": CROPPED if b.image_id else NEW, "width": 1})
    x, y, w, h = view.box
    fig.add_shape(type="rect", x0=x * scale, y0=y * scale, x1=(x + w) * scale, y1=(y + h) * scale,
                  line={"color": "#ff4b4b", "width": 2})
    _frame(fig, tw, th, dragmode=False)
    key = f"slides_thumb_{st.session_state.slides_draws}"
    with st.container(key="slides_map"):
        st.plotly_chart(fig, key=key, on_select=lambda: on_thumb_click(key, scale, dims), selection_mode="points",
                        theme=None, width="content", config={"displayModeBar": False})
    st.caption("Click the map to go there.")
    c1, c2, c3 = st.columns(3)
    c2.button("", icon=":material/arrow_upward:", key="slides_up", on_click=on_pan, args=(0, -0.5, dims),
              help="Pan up", width="stretch")
    c1.button("", icon=":material/arrow_back:", key="slides_left", on_click=on_pan, args=(-0.5, 0, dims),
              help="Pan left", width="stretch")
    c3.button("", icon=":material/arrow_forward:", key="slides_right", on_click=on_pan, args=(0.5, 0, dims),
              help="Pan right", width="stretch")
    c2.button("", icon=":material/arrow_downward:", key="slides_down", on_click=on_pan, args=(0, 0.5, dims),
              help="Pan down", width="stretch")
    z1, z2, z3 = st.columns(3)
    z1.button("", icon=":material/zoom_in:", key="slides_zoom_in", on_click=on_zoom, args=(-1, dims),
              help="Zoom in", width="stretch", disabled=view.downsample <= ZOOMS[0])
    z2.button("", icon=":material/zoom_out:", key="slides_zoom_out", on_click=on_zoom, args=(1, dims),
              help="Zoom out", width="stretch", disabled=view.downsample >= fit_zoom(dims))
    z3.button("", icon=":material/fit_screen:", key="slides_fit", on_click=on_fit, args=(dims,),
              help="Whole slide", width="stretch")
    mpp = _slide_mpp(slide)
    res = f" · {mpp * view.downsample:.2f} µm/px" if mpp else ""
    st.caption(f"Zoom 1:{view.downsample:g}{res}")


def view_panel(view: ViewRender, slide_id: int, dims: tuple[int, int], rows: list[SlideBox],
               dataset: DatasetView) -> None:
    vw, vh = view.size_px
    fig = go.Figure()
    # Invisible points under the image: Plotly's box-select needs a trace to select from.
    xs, ys = np.meshgrid(np.arange(0, vw + 1, 40), np.arange(0, vh + 1, 40))
    fig.add_trace(go.Scatter(x=xs.ravel(), y=ys.ravel(), mode="markers", marker={"opacity": 0},
                             hoverinfo="none", showlegend=False))
    fig.add_layout_image(source=_data_url(view.png), x=0, y=0, sizex=vw, sizey=vh, xref="x", yref="y",
                         sizing="stretch", layer="below")
    for b in rows:
        (x0, y0), (x1, y1) = view.level0_to_view(b.x0, b.y0), view.level0_to_view(b.x0 + b.box_w, b.y0 + b.box_h)
        if x1 < 0 or y1 < 0 or x0 > vw or y0 > vh:
            continue
        color = CROPPED if b.image_id else NEW
        fig.add_shape(type="rect", x0=x0, y0=y0, x1=x1, y1=y1, line={"color": color, "width": 2})
        text = f"#{b.id}" + (f" {dataset.display(b.label)}" if b.label else "")
        fig.add_annotation(x=max(x0, 0), y=max(y0, 0), text=text, showarrow=False, xanchor="left", yanchor="bottom",
                           font={"color": color, "size": 12}, bgcolor="rgba(0,0,0,.45)")
    _frame(fig, vw, vh, dragmode=True)
    key = f"slides_view_{st.session_state.slides_draws}"
    with st.container(key="slides_canvas"):
        st.plotly_chart(fig, key=key, on_select=lambda: on_draw(key, view, slide_id, dims), selection_mode="box",
                        theme=None, width="content",
                        config={"displaylogo": False, "scrollZoom": False,
                                "modeBarButtonsToRemove": ["zoom2d", "pan2d", "lasso2d", "zoomIn2d", "zoomOut2d",
                                                           "autoScale2d", "resetScale2d", "toImage"]})
    st.caption("Drag a rectangle around a glomerulus: it is saved at once.")


def _frame(fig: go.Figure, w: int, h: int, *, dragmode: bool) -> None:
    """Axes in image pixels (y down), no margins, nothing for Plotly's own zoom to change."""
    fig.update_xaxes(range=[0, w], visible=False, fixedrange=True)
    fig.update_yaxes(range=[h, 0], visible=False, fixedrange=True)
    fig.update_layout(width=w, height=h, margin={"l": 0, "r": 0, "t": 0, "b": 0}, showlegend=False,
                      dragmode="select" if dragmode else False, plot_bgcolor="white", hovermode="closest",
                      activeselection={"fillcolor": NEW, "opacity": 0.15}, newselection={"line": {"color": NEW}})


def _png_size(png: bytes) -> tuple[int, int]:
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def boxes_panel(path: Path, slide: SlideReader, slide_id: int, rows: list[SlideBox], dataset: DatasetView) -> None:
    todo = sum(1 for b in rows if b.image_id is None)
    mpp = _slide_mpp(slide)
    c1, c2 = st.columns([3, 2])
    c1.button(f"Crop {todo} {'box' if todo == 1 else 'boxes'} into {dataset.name}", key="slides_crop", type="primary",
              icon=":material/content_cut:", disabled=todo == 0 or mpp is None, on_click=on_crop,
              args=(str(path), slide_id, dataset.name, mpp, slide.mpp is not None))
    with get_sessionmaker()() as s:
        geojson = export_boxes_geojson(s, s.get(Slide, slide_id))
    c2.download_button("QuPath GeoJSON", json.dumps(geojson, indent=1), file_name=f"{slide_name(path)}.geojson",
                       mime="application/geo+json", key="slides_geojson", icon=":material/download:", on_click="ignore",
                       disabled=not rows)
    st.markdown(f"**Boxes on this slide** · {len(rows)} drawn, {todo} not cropped yet")
    for b in rows[-SHOWN_BOXES:][::-1]:
        with st.container(key=f"slides_box_{b.id}", horizontal=True, vertical_alignment="center"):
            state = f"cropped (image #{b.image_id})" if b.image_id else "not cropped"
            label = dataset.display(b.label) if b.label else "no class"
            st.markdown(f"`#{b.id}` ({b.x0}, {b.y0}) {b.box_w}×{b.box_h} px · {label} · {b.created_by} · {state}")
            st.button("", icon=":material/delete:", key=f"slides_del_{b.id}", on_click=on_delete, args=(b.id,),
                      help="Delete this box (its crop stays in the dataset)", type="tertiary")


def page() -> None:
    _init_state()
    st.header("Slides")
    me, dataset = who(), current_dataset()
    if me is None or dataset is None:
        st.info("Pick a dataset in the sidebar.")
        return
    for kind, message in st.session_state.slides_flash:
        getattr(st, kind)(message)
    st.session_state.slides_flash = []
    path = picker_panel()
    if path is None:
        return
    try:
        slide = _reader(str(path))
    except GlomError as e:
        st.error(str(e))
        return
    dims = slide.dimensions
    if st.session_state.slides_view is None or st.session_state.slides_view[0] != str(path):
        st.session_state.slides_view = (str(path), (dims[0] // 2, dims[1] // 2), fit_zoom(dims))
    _, center, ds = st.session_state.slides_view
    options_panel(slide, dataset)
    try:
        view = _view(str(path), center, ds)
    except GlomError as e:
        st.error(str(e))
        return
    slide_id = _slide_id(path, slide)
    with get_sessionmaker()() as s:
        rows = box_store.list_boxes(s, s.get(Slide, slide_id))
        s.expunge_all()
    left, right = st.columns([1, 3])
    with left:
        navigation_panel(path, slide, view, rows)
    with right:
        view_panel(view, slide_id, dims, rows, dataset)
    boxes_panel(path, slide, slide_id, rows, dataset)


if __name__ == "__main__":  # run by st.navigation as a page script
    page()
