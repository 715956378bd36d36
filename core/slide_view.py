"""Showing a slide: PNG bytes of the whole slide and of region views, and Deep Zoom tiles.

Built on the reader interface of :mod:`core.wsi` (plain functions; no Streamlit in core/):

* ``thumbnail_png(slide, max_size_px)`` for the navigation map.
* ``render_view(slide, center_xy, downsample, view_size_px)`` -> :class:`ViewRender`: PNG bytes
  of a region view plus the level-0 ``box`` it shows. ``view_box_to_level0(x, y, w, h)`` turns a
  rectangle drawn on the view (view pixels) into a level-0 box; ``view_to_level0`` /
  ``level0_to_view`` map points (clicks, drawing existing boxes).
* ``DeepZoomTiles(slide)`` for a Deep Zoom viewer (OpenSeadragon): ``dzi_xml()`` and
  ``tile_png(dz_level, col, row)``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from core.wsi import MPP_TOLERANCE, Box, OpenSlideReader, ReadPlan, RegionError, SlideReader, SlideReadError

__all__ = ["DeepZoomTiles", "ViewRender", "render_view", "thumbnail_png", "to_png"]


def to_png(img: Image.Image | np.ndarray, *, compress_level: int = 1) -> bytes:
    """PNG bytes of a PIL image or an HWC uint8 array (fast compression: views are made per request)."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def thumbnail_png(slide: SlideReader, max_size_px: int = 1024) -> bytes:
    """PNG bytes of the whole slide, longer side at most ``max_size_px`` (navigation map)."""
    return to_png(slide.thumbnail_image(max_size_px))


@dataclass(frozen=True)
class ViewRender:
    """A rendered view: PNG bytes, the level-0 box it shows and level-0 px per view px."""

    png: bytes
    box: Box
    downsample: float
    size_px: tuple[int, int]

    def view_to_level0(self, x_px: float, y_px: float) -> tuple[int, int]:
        """Level-0 (x, y) of a point in the view (e.g. a mouse position)."""
        return (round(self.box[0] + x_px * self.downsample), round(self.box[1] + y_px * self.downsample))

    def level0_to_view(self, x: float, y: float) -> tuple[float, float]:
        return ((x - self.box[0]) / self.downsample, (y - self.box[1]) / self.downsample)

    def view_box_to_level0(self, x_px: float, y_px: float, w_px: float, h_px: float) -> Box:
        """A rectangle drawn on the view (view pixels) as a level-0 box (x, y, w, h)."""
        x0, y0 = self.view_to_level0(x_px, y_px)
        x1, y1 = self.view_to_level0(x_px + w_px, y_px + h_px)
        return (x0, y0, x1 - x0, y1 - y0)


def render_view(
    slide: SlideReader,
    center_xy: tuple[float, float],
    downsample: float,
    view_size_px: tuple[int, int] = (1024, 768),
) -> ViewRender:
    """A region view of ``view_size_px`` centred on level-0 ``center_xy`` at ``downsample``
    (level-0 px per view px; 1 = full resolution). The centre is clamped to the slide."""
    if downsample <= 0:
        raise RegionError(f"downsample must be positive, got {downsample}")
    vw, vh = view_size_px
    w0, h0 = slide.dimensions
    span_w, span_h = vw * downsample, vh * downsample
    cx = min(max(center_xy[0], span_w / 2), max(w0 - span_w / 2, span_w / 2))
    cy = min(max(center_xy[1], span_h / 2), max(h0 - span_h / 2, span_h / 2))
    x0, y0 = round(cx - span_w / 2), round(cy - span_h / 2)
    level = 0
    for lv, ds in enumerate(slide.level_downsamples):
        if ds <= downsample * (1 + MPP_TOLERANCE):
            level = lv
    ds = slide.level_downsamples[level]
    level_size = (max(1, round(span_w / ds)), max(1, round(span_h / ds)))
    img = slide.read_plan((x0, y0), ReadPlan(level, level_size, (vw, vh)))
    return ViewRender(to_png(img), (x0, y0, round(span_w), round(span_h)), float(downsample), (vw, vh))


class _AbstractSlideAdapter:
    """Presents a SlideReader as an ``openslide.AbstractSlide`` for DeepZoomGenerator.

    ``read_region`` hands over the backend's raw RGBA (``SlideReader._read_level``), as
    OpenSlide's does: DeepZoomGenerator lays transparent areas on the slide's background itself.
    """

    def __init__(self, reader: SlideReader) -> None:
        self._reader = reader

    level_count = property(lambda self: self._reader.level_count)
    level_dimensions = property(lambda self: self._reader.level_dimensions)
    level_downsamples = property(lambda self: self._reader.level_downsamples)
    dimensions = property(lambda self: self._reader.dimensions)
    properties = property(lambda self: self._reader.properties)

    def get_best_level_for_downsample(self, downsample: float) -> int:
        best = 0
        for lv, ds in enumerate(self._reader.level_downsamples):
            if ds <= downsample:
                best = lv
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        return self._reader._read_level(location, level, size)


class DeepZoomTiles:
    """Deep Zoom tiles of a slide as PNG bytes, for a pan-and-zoom viewer (OpenSeadragon).

    A thin wrapper over ``openslide.deepzoom.DeepZoomGenerator``: an :class:`OpenSlideReader`
    hands it the OpenSlide handle itself, any other reader (e.g. :class:`NumpySlideReader` in
    tests) goes through an adapter with the same geometry. What it adds is the reader
    interface, named errors (:class:`RegionError` for a tile outside the pyramid,
    :class:`SlideReadError` for a tile that cannot be decoded) and PNG bytes. Kept for the
    deep-zoom slide workspace that builds on DeepZoomGenerator + OpenSeadragon; nothing in the
    apps calls it yet (``tests/test_wsi.py`` checks its tiles against the slide's pixels).
    """

    def __init__(self, slide: SlideReader, *, tile_size: int = 254, overlap: int = 1, limit_bounds: bool = True) -> None:
        from openslide.deepzoom import DeepZoomGenerator

        osr = slide.openslide if isinstance(slide, OpenSlideReader) else _AbstractSlideAdapter(slide)
        self.slide = slide
        self.generator = DeepZoomGenerator(osr, tile_size=tile_size, overlap=overlap, limit_bounds=limit_bounds)

    @property
    def level_count(self) -> int:
        return self.generator.level_count

    def dzi_xml(self) -> str:
        """The ``.dzi`` descriptor (size, tile size, overlap) announcing PNG tiles."""
        return self.generator.get_dzi("png")

    def tile_image(self, dz_level: int, col: int, row: int) -> Image.Image:
        """RGB tile ``(col, row)`` of Deep Zoom level ``dz_level`` (the last level is full resolution)."""
        if not 0 <= dz_level < self.generator.level_count:
            raise RegionError(f"Deep Zoom level {dz_level} does not exist (0..{self.generator.level_count - 1})")
        cols, rows = self.generator.level_tiles[dz_level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise RegionError(f"Deep Zoom tile ({col}, {row}) outside level {dz_level} ({cols}x{rows} tiles)")
        import openslide

        try:
            return self.generator.get_tile(dz_level, (col, row))
        except openslide.OpenSlideError as e:
            raise SlideReadError(f"{self.slide.path or self.slide.name}: cannot decode tile: {e}") from None

    def tile_png(self, dz_level: int, col: int, row: int) -> bytes:
        """:meth:`tile_image` as PNG bytes."""
        return to_png(self.tile_image(dz_level, col, row))
