"""Whole-slide images: one small reader interface over OpenSlide and over numpy arrays.

Coordinates are always level-0 pixels ``(x, y)`` of the top-left corner; a *box* is the
level-0 tuple ``(x, y, w, h)``. A resolution is either a pyramid ``level`` or a target
``mpp`` (µm per output pixel). Images are HWC uint8 RGB numpy arrays.

Reading::

    with open_slide("slide.svs") as slide:           # SlideOpenError if unreadable/truncated
        rgb = slide.read_region((x, y), (w, h), level=1)      # w, h in level-1 pixels
        rgb = slide.read_region((x, y), (256, 256), mpp=0.5)  # MissingMppError without µm/px
        rgb = slide.read_box((x, y, w, h), mpp=0.5)           # a level-0 box, resampled
        thumb = slide.thumbnail(1024)
    open_slide("no-mpp.svs", mpp=0.25)               # the user supplies µm/px
    NumpySlideReader(rgb, mpp=0.5, downsamples=(1, 2, 4))     # same interface, for tests

Slide files: :data:`SLIDE_SUFFIXES` is the one list of slide formats (:data:`OPENSLIDE_FORMATS`
is the same list as text for messages); ``is_slide_file``, ``list_slide_files``,
``default_slides_dir``; ``slide_name(path)`` is the name a slide is registered under
(``annotation_db.store.get_or_create_slide(session, slide_name(path), path=str(path),
stain=..., mpp=slide.mpp)``). Apps keep one reader per slide in ``@st.cache_resource``
(``open_slide(path, fallback_mpp=...)``; OpenSlide is thread-safe).

Showing a slide (PNG views, Deep Zoom tiles) is :mod:`core.slide_view`; cutting annotated
boxes into a dataset is :mod:`core.extract` and :mod:`core.slide_crops`.
"""
from __future__ import annotations

import logging
import os
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image

from core.errors import GlomError

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # level-0 (x, y, w, h)

# A pyramid level is used as-is (no resampling) when its µm/px is this close to the target.
MPP_TOLERANCE = 0.01
# The file suffixes OpenSlide reads (``.tif``/``.tiff`` when tiled and pyramidal); the one list.
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff")
OPENSLIDE_FORMATS = ", ".join(suffix[1:] for suffix in SLIDE_SUFFIXES)  # for messages


class SlideError(GlomError):
    """Base class of whole-slide errors; the message names the file and what to do."""


class SlideOpenError(SlideError):
    """The file is missing, not a slide format OpenSlide reads, or truncated/corrupt."""


class SlideReadError(SlideError):
    """The slide opened but pixels could not be decoded (corrupt or truncated tiles)."""


class MissingMppError(SlideError):
    """A µm/px resolution was asked of a slide that does not record its µm/px."""


class RegionError(SlideError, ValueError):
    """Invalid region arguments: level out of range, non-positive size, both level and mpp."""


@dataclass(frozen=True)
class ReadPlan:
    """How a level-0 region is read: from ``level`` at ``level_size``, resampled to ``out_size``."""

    level: int
    level_size: tuple[int, int]
    out_size: tuple[int, int]

    @property
    def resample(self) -> bool:
        return self.level_size != self.out_size


class SlideReader(ABC):
    """One open slide. Subclasses provide the pyramid geometry and ``_read_level``."""

    name: str = "slide"
    path: Path | None = None

    # --- what a backend provides ------------------------------------------------------------

    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]: ...

    @property
    @abstractmethod
    def level_downsamples(self) -> tuple[float, ...]: ...

    @property
    @abstractmethod
    def mpp(self) -> float | None:
        """µm per level-0 pixel, or None when the slide does not say (and nobody supplied it)."""

    @property
    @abstractmethod
    def properties(self) -> Mapping[str, str]: ...

    @abstractmethod
    def _read_level(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """RGBA PIL image of ``size`` pixels at ``level``, top-left at level-0 ``location``."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        pass

    # --- shared behaviour --------------------------------------------------------------------

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.dimensions[0]}x{self.dimensions[1]}, mpp={self.mpp})"

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        hex_color = self.properties.get("openslide.background-color", "ffffff")
        return tuple(int(hex_color[i : i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]

    def require_mpp(self) -> float:
        if self.mpp is None:
            raise MissingMppError(
                f"{self.path or self.name}: the slide records no µm/px (no openslide.mpp-x property), "
                "so a resolution in µm/px cannot be honoured. Pass it yourself "
                "(`open_slide(path, mpp=0.25)`, `glom extract --slide-mpp 0.25`) or read by --level."
            )
        return self.mpp

    def level_mpp(self, level: int) -> float:
        return self.require_mpp() * self.level_downsamples[self._check_level(level)]

    def _check_level(self, level: int) -> int:
        if not 0 <= level < self.level_count:
            raise RegionError(
                f"{self.path or self.name}: level {level} does not exist (the slide has levels 0..{self.level_count - 1})"
            )
        return level

    def best_level_for_mpp(self, mpp: float) -> int:
        """The coarsest level at least as fine as ``mpp`` (within :data:`MPP_TOLERANCE`)."""
        if mpp <= 0:
            raise RegionError(f"mpp must be positive, got {mpp}")
        base = self.require_mpp()
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if base * ds <= mpp * (1 + MPP_TOLERANCE):
                best = level
        return best

    def plan_box(self, box: Box, *, level: int | None = None, mpp: float | None = None) -> ReadPlan:
        """How :meth:`read_box` reads the level-0 ``box`` at ``level`` or ``mpp``."""
        x, y, w, h = box
        if w <= 0 or h <= 0:
            raise RegionError(f"{self.path or self.name}: empty box {box} (width and height must be > 0)")
        if level is not None and mpp is not None:
            raise RegionError("give a level or an mpp, not both")
        if mpp is None:
            level = self._check_level(level or 0)
            ds = self.level_downsamples[level]
            size = (max(1, round(w / ds)), max(1, round(h / ds)))
            return ReadPlan(level, size, size)
        level = self.best_level_for_mpp(mpp)
        ds = self.level_downsamples[level]
        level_size = (max(1, round(w / ds)), max(1, round(h / ds)))
        if abs(self.level_mpp(level) / mpp - 1) <= MPP_TOLERANCE:
            return ReadPlan(level, level_size, level_size)
        scale = self.require_mpp() / mpp
        return ReadPlan(level, level_size, (max(1, round(w * scale)), max(1, round(h * scale))))

    def read_box_image(self, box: Box, *, level: int | None = None, mpp: float | None = None) -> Image.Image:
        """The level-0 ``box`` as an RGB PIL image at ``level`` or ``mpp`` (see :meth:`read_box`)."""
        plan = self.plan_box(box, level=level, mpp=mpp)
        return self.read_plan(box[:2], plan)

    def read_box(self, box: Box, *, level: int | None = None, mpp: float | None = None) -> np.ndarray:
        """HWC uint8 RGB of the level-0 ``box`` (x, y, w, h) at ``level`` (default 0) or ``mpp``."""
        return np.asarray(self.read_box_image(box, level=level, mpp=mpp))

    def read_region(
        self,
        location: tuple[int, int],
        size: tuple[int, int],
        *,
        level: int | None = None,
        mpp: float | None = None,
    ) -> np.ndarray:
        """HWC uint8 RGB of ``size`` = (w, h) output pixels, top-left at level-0 ``location``.

        ``size`` is in pixels of ``level`` (default 0) or of the target ``mpp``; areas outside
        the slide come back in the slide's background colour.
        """
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise RegionError(f"{self.path or self.name}: region size must be positive, got {size}")
        if level is not None and mpp is not None:
            raise RegionError("give a level or an mpp, not both")
        if mpp is None:
            level = self._check_level(level or 0)
            return np.asarray(self.read_plan(location, ReadPlan(level, (w, h), (w, h))))
        level = self.best_level_for_mpp(mpp)
        factor = mpp / self.level_mpp(level)  # output px -> level px
        if abs(factor - 1) <= MPP_TOLERANCE:
            plan = ReadPlan(level, (w, h), (w, h))
        else:
            plan = ReadPlan(level, (max(1, round(w * factor)), max(1, round(h * factor))), (w, h))
        return np.asarray(self.read_plan(location, plan))

    def read_plan(self, location: tuple[int, int], plan: ReadPlan) -> Image.Image:
        """RGB PIL image read as ``plan`` says, top-left at level-0 ``location`` (see :meth:`plan_box`)."""
        rgba = self._read_level((int(location[0]), int(location[1])), plan.level, plan.level_size)
        rgb = _flatten_rgba(rgba, self.background_rgb)
        if plan.resample:
            rgb = rgb.resize(plan.out_size, Image.Resampling.LANCZOS)
        return rgb

    def thumbnail(self, max_size_px: int = 1024) -> np.ndarray:
        """HWC uint8 RGB of the whole slide, its longer side at most ``max_size_px``."""
        return np.asarray(self.thumbnail_image(max_size_px))

    def thumbnail_image(self, max_size_px: int = 1024) -> Image.Image:
        w0, h0 = self.dimensions
        downsample = max(w0, h0) / max_size_px
        level = 0
        for lv, ds in enumerate(self.level_downsamples):
            if ds <= max(downsample, 1.0) * (1 + MPP_TOLERANCE):
                level = lv
        img = _flatten_rgba(self._read_level((0, 0), level, self.level_dimensions[level]), self.background_rgb)
        img.thumbnail((max_size_px, max_size_px), Image.Resampling.LANCZOS)
        return img


def _flatten_rgba(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """RGB: transparent (outside the slide / empty tiles) becomes the background colour."""
    if rgba.mode == "RGB":
        return rgba
    if rgba.getchannel("A").getextrema()[0] == 255:
        return rgba.convert("RGB")
    out = Image.new("RGB", rgba.size, background)
    out.paste(rgba, None, rgba)
    return out


class OpenSlideReader(SlideReader):
    """A slide in any format OpenSlide reads; keep one per process (handles are not picklable)."""

    def __init__(self, path: str | Path, *, mpp: float | None = None, fallback_mpp: float | None = None) -> None:
        import openslide

        self.path = Path(path)
        self.name = slide_name(self.path)
        if not self.path.exists():
            raise SlideOpenError(f"{self.path}: file not found")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideOpenError(
                f"{self.path}: OpenSlide cannot open this file: it is not a whole-slide format it reads "
                f"({OPENSLIDE_FORMATS}), or it is truncated or corrupt"
            ) from None
        except openslide.OpenSlideError as e:
            raise SlideOpenError(f"{self.path}: the slide is corrupt or truncated ({e})") from None
        self._properties = MappingProxyType(dict(self._osr.properties))
        self._mpp = self._resolve_mpp(mpp, fallback_mpp)

    def _resolve_mpp(self, given: float | None, fallback: float | None) -> float | None:
        recorded = None
        try:
            recorded = float(self._properties["openslide.mpp-x"])
            mpp_y = float(self._properties.get("openslide.mpp-y", recorded))
            if abs(mpp_y / recorded - 1) > 0.01:
                log.warning("%s: non-square pixels (mpp-x %.4f, mpp-y %.4f); using mpp-x", self.path, recorded, mpp_y)
        except (KeyError, ValueError, ZeroDivisionError):
            recorded = None
        if recorded is not None and recorded <= 0:
            recorded = None
        if given is None:
            if recorded is None and fallback is not None:
                if fallback <= 0:
                    raise RegionError(f"{self.path}: mpp must be positive, got {fallback}")
                log.debug("%s: records no µm/px; using the given %.4f", self.path, fallback)
                return float(fallback)
            return recorded
        if given <= 0:
            raise RegionError(f"{self.path}: mpp must be positive, got {given}")
        if recorded and abs(given / recorded - 1) > 0.05:
            log.warning("%s: using the given %.4f µm/px instead of the recorded %.4f", self.path, given, recorded)
        return float(given)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._osr.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._osr.level_downsamples

    @property
    def mpp(self) -> float | None:
        return self._mpp

    @property
    def properties(self) -> Mapping[str, str]:
        return self._properties

    @property
    def openslide(self):  # noqa: ANN201 - openslide.OpenSlide, for DeepZoomGenerator
        return self._osr

    def _read_level(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        import openslide

        try:
            return self._osr.read_region(location, level, size)
        except openslide.OpenSlideError as e:
            raise SlideReadError(
                f"{self.path}: cannot decode the region at level-0 {location}, level {level}, size {size}: {e} "
                "(the file is probably truncated or corrupt)"
            ) from None

    def close(self) -> None:
        self._osr.close()


class NumpySlideReader(SlideReader):
    """An in-memory 'slide' over an HWC uint8 RGB array; pyramid levels by box downsampling."""

    def __init__(
        self,
        rgb: np.ndarray,
        *,
        mpp: float | None = None,
        downsamples: Sequence[int] = (1,),
        name: str = "array",
        properties: Mapping[str, str] | None = None,
    ) -> None:
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise RegionError(f"NumpySlideReader needs an HWC uint8 RGB array, got {rgb.dtype} {rgb.shape}")
        if not downsamples or downsamples[0] != 1:
            raise RegionError("the first downsample must be 1 (level 0 is the array itself)")
        self.name = name
        base = Image.fromarray(rgb).convert("RGBA")
        self._levels = [base]
        for ds in downsamples[1:]:
            size = (max(1, rgb.shape[1] // ds), max(1, rgb.shape[0] // ds))
            self._levels.append(base.resize(size, Image.Resampling.BOX))
        w0, h0 = base.size
        self._downsamples = tuple(
            1.0 if i == 0 else (w0 / im.size[0] + h0 / im.size[1]) / 2 for i, im in enumerate(self._levels)
        )
        self._mpp = mpp
        props = {"openslide.vendor": "numpy", "openslide.level-count": str(len(self._levels))}
        if mpp is not None:
            props["openslide.mpp-x"] = props["openslide.mpp-y"] = str(mpp)
        props.update(properties or {})
        self._properties = MappingProxyType(props)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(im.size for im in self._levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downsamples

    @property
    def mpp(self) -> float | None:
        return self._mpp

    @property
    def properties(self) -> Mapping[str, str]:
        return self._properties

    def _read_level(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        # Same addressing as OpenSlide: level-0 top-left, size in level pixels, transparent outside.
        ds = self._downsamples[level]
        lx, ly = math.floor(location[0] / ds), math.floor(location[1] / ds)
        src = self._levels[level]
        out = Image.new("RGBA", size, (0, 0, 0, 0))
        out.paste(src.crop((lx, ly, lx + size[0], ly + size[1])), (0, 0))
        # PIL.crop pads outside with zeros (transparent in RGBA), exactly what we want.
        return out


def slide_name(path: str | Path) -> str:
    """The name a slide is registered under: its file name without the extension."""
    return Path(path).stem


def is_slide_file(path: str | Path) -> bool:
    """Whether ``path`` is a file OpenSlide recognises (suffix and header check, nothing decoded)."""
    import openslide

    p = Path(path)
    return p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES and bool(openslide.OpenSlide.detect_format(str(p)))


def list_slide_files(folder: str | Path) -> list[str]:
    """File names in ``folder`` that OpenSlide recognises (header check, nothing decoded)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if is_slide_file(p))


def default_slides_dir() -> str:
    """``$GLOM_SLIDES_DIR``, else ``../shared/data/wsi`` beside the checkout when it exists, else ``""``."""
    env = os.environ.get("GLOM_SLIDES_DIR")
    if env:
        return env
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi"
    return str(shared) if shared.is_dir() else ""


def open_slide(path: str | Path, mpp: float | None = None, *, fallback_mpp: float | None = None) -> SlideReader:
    """Open a whole-slide image with OpenSlide (any format it reads).

    ``mpp`` sets µm per level-0 pixel, overriding the slide's own value (with a warning when
    they differ); ``fallback_mpp`` is used only when the slide records none (batch runs).
    Raises :class:`SlideOpenError` naming the file when it is missing, unreadable or truncated.
    """
    return OpenSlideReader(path, mpp=mpp, fallback_mpp=fallback_mpp)
