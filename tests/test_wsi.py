"""Slide readers: real Aperio slides, a synthetic pyramidal tiled TIFF, and the numpy reader."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from core.slide_view import DeepZoomTiles, render_view, thumbnail_png
from core.wsi import (
    MissingMppError,
    NumpySlideReader,
    RegionError,
    SlideOpenError,
    SlideReadError,
    open_slide,
)

CMU = "cmu-1-small-region.svs"  # 2220x2967, one level, 0.499 µm/px
TCGA = "tcga-cr-7395-01a-01-ts1.svs"  # 4443x3567 + 2221x1783, JPEG 2000, no µm/px


def synthetic_rgb(width: int = 1024, height: int = 768, seed: int = 0) -> np.ndarray:
    """Gradients plus noise, so any off-by-one or resampling shows up in pixel comparisons."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([(xx * 255 // width), (yy * 255 // height), ((xx + yy) % 256)], axis=-1).astype(np.int16)
    rgb += rng.integers(-20, 21, rgb.shape, dtype=np.int16)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def write_pyramid_tiff(path: Path, rgb: np.ndarray, *, mpp: float | None = 0.5, levels: int = 3) -> Path:
    """A generic tiled TIFF pyramid (one IFD per level, 2x steps) that OpenSlide opens."""
    res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    img = Image.fromarray(rgb)
    with tifffile.TiffWriter(path) as tw:
        for level in range(levels):
            if level:
                img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)
            tw.write(
                np.asarray(img),
                tile=(256, 256),
                photometric="rgb",
                compression="zlib",
                subfiletype=1 if level else 0,
                metadata=None,
                **(res if level == 0 else {}),
            )
    return path


@pytest.fixture
def pyramid_tiff(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rgb = synthetic_rgb()
    return write_pyramid_tiff(tmp_path / "synthetic.tif", rgb), rgb


def openslide_rgb(path: Path, location, level, size) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as osr:
        return np.asarray(osr.read_region(location, level, size).convert("RGB"))


# --- real slides ------------------------------------------------------------------------------


def test_aperio_slide_geometry_and_mpp(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / CMU) as slide:
        assert slide.dimensions == (2220, 2967)
        assert slide.level_count == 1
        assert slide.mpp == pytest.approx(0.499)
        assert slide.name == "cmu-1-small-region"
        assert slide.properties["openslide.vendor"] == "aperio"


@pytest.mark.parametrize(
    ("name", "location", "level", "size"),
    [(CMU, (313, 1207), 0, (97, 131)), (TCGA, (1501, 999), 0, (120, 80)), (TCGA, (1501, 999), 1, (64, 50))],
)
def test_read_region_matches_openslide(wsi_dir: Path, name, location, level, size) -> None:
    with open_slide(wsi_dir / name) as slide:
        ours = slide.read_region(location, size, level=level)
    assert ours.dtype == np.uint8 and ours.shape == (size[1], size[0], 3)
    np.testing.assert_array_equal(ours, openslide_rgb(wsi_dir / name, location, level, size))


def test_slide_without_mpp_says_so_and_accepts_one(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / TCGA) as slide:
        assert slide.mpp is None
        with pytest.raises(MissingMppError, match=r"tcga-cr-7395.*µm/px.*--slide-mpp"):
            slide.read_region((0, 0), (32, 32), mpp=0.5)
    with open_slide(wsi_dir / TCGA, mpp=0.25) as slide:
        assert slide.mpp == 0.25
        assert slide.best_level_for_mpp(0.5) == 1
        # 0.5 µm/px is level 1 (downsample 2.0005): read as-is, no resampling.
        ours = slide.read_box((2000, 1600, 200, 100), mpp=0.5)
    np.testing.assert_array_equal(ours, openslide_rgb(wsi_dir / TCGA, (2000, 1600), 1, (100, 50)))


def test_fallback_mpp_only_fills_in_a_missing_value(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / CMU, fallback_mpp=0.25) as slide:
        assert slide.mpp == pytest.approx(0.499)  # recorded wins
    with open_slide(wsi_dir / TCGA, fallback_mpp=0.25) as slide:
        assert slide.mpp == 0.25
    with open_slide(wsi_dir / CMU, mpp=0.25) as slide:
        assert slide.mpp == 0.25  # an explicit mpp overrides


def test_mpp_between_levels_resamples_to_the_requested_size(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / CMU) as slide:
        out = slide.read_box((400, 400, 500, 300), mpp=1.0)
    assert out.shape == (150, 250, 3)  # 500 px * 0.499 / 1.0 = 249.5 -> 250


# --- bad files --------------------------------------------------------------------------------


def test_missing_and_non_slide_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SlideOpenError, match="nope.svs: file not found"):
        open_slide(tmp_path / "nope.svs")
    bad = tmp_path / "notes.svs"
    bad.write_text("not a slide")
    with pytest.raises(SlideOpenError, match=r"notes\.svs.*not a whole-slide format"):
        open_slide(bad)


def test_truncated_slide_is_refused_on_open(wsi_dir: Path, tmp_path: Path) -> None:
    data = (wsi_dir / CMU).read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideOpenError, match=r"cut\.svs.*truncated"):
        open_slide(cut)


def test_corrupt_tiles_raise_a_read_error_naming_the_file(wsi_dir: Path, tmp_path: Path) -> None:
    data = bytearray((wsi_dir / CMU).read_bytes())
    data[300_000:900_000] = bytes(600_000)  # zero the tile data, keep the directory
    bad = tmp_path / "zeroed.svs"
    bad.write_bytes(bytes(data))
    with open_slide(bad) as slide, pytest.raises(SlideReadError, match=r"zeroed\.svs.*corrupt"):
        slide.read_region((0, 0), (2220, 2967))


# --- synthetic pyramidal TIFF -----------------------------------------------------------------


def test_pyramid_tiff_levels_mpp_and_pixels(pyramid_tiff) -> None:
    path, rgb = pyramid_tiff
    with open_slide(path) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.level_dimensions == ((1024, 768), (512, 384), (256, 192))
        assert slide.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(slide.read_region((100, 50), (300, 200)), rgb[50:250, 100:400])
        assert slide.best_level_for_mpp(1.0) == 1 and slide.best_level_for_mpp(2.0) == 2
        assert slide.best_level_for_mpp(1.5) == 1
        lvl2 = slide.read_region((256, 128), (40, 30), mpp=2.0)
    np.testing.assert_array_equal(lvl2, openslide_rgb(path, (256, 128), 2, (40, 30)))


def test_bad_region_arguments(pyramid_tiff) -> None:
    with open_slide(pyramid_tiff[0]) as slide:
        with pytest.raises(RegionError, match="level 5 does not exist"):
            slide.read_region((0, 0), (10, 10), level=5)
        with pytest.raises(RegionError, match="not both"):
            slide.read_region((0, 0), (10, 10), level=1, mpp=1.0)
        with pytest.raises(RegionError, match="empty box"):
            slide.read_box((0, 0, 0, 10))


# --- numpy reader, thumbnails, viewing -------------------------------------------------------


def test_numpy_reader_behaves_like_a_slide() -> None:
    rgb = synthetic_rgb(200, 120)
    with NumpySlideReader(rgb, mpp=0.5, downsamples=(1, 2)) as slide:
        assert slide.level_dimensions == ((200, 120), (100, 60))
        np.testing.assert_array_equal(slide.read_region((10, 20), (30, 40)), rgb[20:60, 10:40])
        outside = slide.read_region((190, -5), (20, 10))
        np.testing.assert_array_equal(outside[5:, :10], rgb[0:5, 190:200])
        assert (outside[:5] == 255).all() and (outside[:, 10:] == 255).all()  # white glass outside
        assert slide.read_region((0, 0), (50, 30), mpp=1.0).shape == (30, 50, 3)
        assert max(slide.thumbnail(64).shape[:2]) == 64


def test_thumbnail_and_region_view(pyramid_tiff) -> None:
    path, rgb = pyramid_tiff
    with open_slide(path) as slide:
        thumb = Image.open(io.BytesIO(thumbnail_png(slide, 128)))
        assert thumb.size == (128, 96)
        view = render_view(slide, (512, 384), 2.0, (200, 100))
        assert view.box == (312, 284, 400, 200)
        assert view.view_to_level0(0, 0) == (312, 284)
        assert view.view_to_level0(100, 50) == (512, 384)
        assert view.level0_to_view(512, 384) == (100, 50)
        assert view.view_box_to_level0(10, 20, 30, 40) == (332, 324, 60, 80)
        shown = np.asarray(Image.open(io.BytesIO(view.png)).convert("RGB"))
        # Downsample 2 on a 2x pyramid is level 1 as stored, no resampling.
        np.testing.assert_array_equal(shown, openslide_rgb(path, (312, 284), 1, (200, 100)))
        edge = render_view(slide, (0, 0), 1.0, (100, 100))  # clamped into the slide
        assert edge.box[:2] == (0, 0)


@pytest.mark.parametrize("backend", ["openslide", "numpy"])
def test_deep_zoom_tiles(pyramid_tiff, backend: str) -> None:
    path, rgb = pyramid_tiff
    slide = open_slide(path) if backend == "openslide" else NumpySlideReader(rgb, mpp=0.5, downsamples=(1, 2, 4))
    with slide:
        tiles = DeepZoomTiles(slide, tile_size=254, overlap=1)
        dzi = tiles.dzi_xml()
        assert 'Width="1024" Height="768"' in dzi and 'Format="png"' in dzi  # the format tile_png serves
        top = tiles.level_count - 1  # full resolution
        tile = np.asarray(Image.open(io.BytesIO(tiles.tile_png(top, 0, 0))).convert("RGB"))
        assert tile.shape == (255, 255, 3)  # 254 + 1 overlap on the right/bottom
        np.testing.assert_array_equal(tile, rgb[:255, :255])
        with pytest.raises(RegionError, match="outside level"):
            tiles.tile_png(top, 99, 0)

