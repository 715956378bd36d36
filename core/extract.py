"""Glomerulus crops from whole-slide images: one crop per annotation, parallel and resumable.

A crop is the annotation's level-0 bounding box plus padding (points: a fixed square around
the centre), clipped to the slide, read at a ``level`` or a target ``mpp`` and written as PNG
or JPEG to ``OUT/<slide>/<slide>_x<X>_y<Y>_w<W>_h<H>_<resolution>.<ext>``. The name holds the
slide, the final box and the settings, so a re-run finds finished crops and skips them.

Safety: crops are written to a hidden temp file and renamed into place (``os.replace``), so a
crash leaves either a complete crop or no crop (stale temp files are swept on the next run).
A slide's ``register`` callback (the store rows: :mod:`core.slide_crops`) runs once all its
crops exist; a slide that fails (unreadable, truncated tiles) is never registered, and its crops
from this run are removed. This module knows nothing of the store.

Parallelism: worker processes, each keeping one slide handle open, fed chunks of boxes in
slide order; ``workers=1`` runs in this process.
"""

from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from core.annotations import Annotation
from core.errors import GlomError
from core.wsi import Box, SlideError, SlideReader, open_slide, slide_name

log = logging.getLogger(__name__)

TEMP_MARK = ".tmp"


def die_with_parent(parent_pid: int) -> None:
    """Run in each crop worker: end when the parent process ends, even by ``kill -9``.

    A killed parent cannot shut its pool down; its workers would live on (parent pid 1), holding
    slide files and the store. Linux delivers SIGKILL to the worker at once (``PR_SET_PDEATHSIG``);
    elsewhere, and as a second guard, a thread notices the new parent within half a second.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()

class ExtractError(GlomError):
    """Invalid extraction settings or a run that cannot go on; the message says what to change."""


@dataclass(frozen=True)
class CropSettings:
    """How boxes become crops. Sizes in level-0 pixels unless the name says ``um``."""

    level: int | None = None  # pyramid level to read at (default 0 when mpp is None)
    mpp: float | None = None  # or a target µm per output pixel
    pad_px: int = 0  # level-0 px added on each side of a region's bounding box
    pad_frac: float = 0.0  # or a fraction of the box's width/height on each side
    point_size_px: int | None = None  # side of the square cut around a point annotation
    point_size_um: float | None = None
    image_format: str = "png"  # png | jpeg
    jpeg_quality: int = 90
    png_compress_level: int = 6
    max_box_px: int = 4096  # refuse boxes with a longer level-0 side (a likely mistake)
    tissue_min_fraction: float | None = None  # skip boxes with less tissue (Otsu mask); None: no mask

    def __post_init__(self) -> None:
        if self.level is not None and self.mpp is not None:
            raise ExtractError("Give a level or an mpp for the crops, not both.")
        if self.mpp is not None and self.mpp <= 0:
            raise ExtractError(f"mpp must be positive, got {self.mpp}")
        if self.level is not None and self.level < 0:
            raise ExtractError(f"level must be >= 0, got {self.level}")
        if self.image_format not in ("png", "jpeg"):
            raise ExtractError(f"image_format must be png or jpeg, got {self.image_format!r}")
        if self.pad_px < 0 or self.pad_frac < 0:
            raise ExtractError("padding cannot be negative")
        if self.max_box_px <= 0:
            raise ExtractError(f"max_box_px must be positive, got {self.max_box_px}")
        if self.tissue_min_fraction is not None and not 0 <= self.tissue_min_fraction <= 1:
            raise ExtractError(f"tissue_min_fraction must be in [0, 1], got {self.tissue_min_fraction}")

    @property
    def tag(self) -> str:
        """The resolution/format part of crop file names (same settings -> same names)."""
        res = f"mpp{self.mpp:g}" if self.mpp is not None else f"L{self.level or 0}"
        return res + (f"-q{self.jpeg_quality}" if self.image_format == "jpeg" else "")

    @property
    def suffix(self) -> str:
        return ".jpg" if self.image_format == "jpeg" else ".png"


@dataclass(frozen=True)
class CropJob:
    """One crop to make: the final (padded, clipped) level-0 box and where it goes."""

    slide: str
    box: Box
    label: str | None
    path: Path
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class Problem:
    """An annotation not cropped as drawn: refused, clipped, or on empty glass."""

    slide: str
    source: str
    box: Box | None
    reason: str

    def __str__(self) -> str:
        return f"{self.slide}: {self.source or 'box'} {self.box or ''}: {self.reason}"


@dataclass
class ExtractReport:
    jobs: list[CropJob] = field(default_factory=list)  # every crop that exists at the end
    written: int = 0
    skipped_existing: int = 0
    registered: int = 0
    refused: list[Problem] = field(default_factory=list)
    clipped: list[Problem] = field(default_factory=list)
    no_tissue: list[Problem] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # slide path -> error message
    seconds: float = 0.0

    @property
    def crops_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"{self.written} crops written, {self.skipped_existing} already there, {self.registered} registered, "
            f"{len(self.clipped)} clipped, {len(self.refused)} refused, {len(self.no_tissue)} without tissue, "
            f"{len(self.failed)} slides failed ({self.crops_per_s:.1f} crops/s)"
        )


@dataclass(frozen=True)
class SlideTask:
    """A slide file and its annotations; ``mpp`` is used only when the slide records no µm/px."""

    path: Path
    annotations: Sequence[Annotation]
    mpp: float | None = None

    @property
    def name(self) -> str:
        return slide_name(self.path)


@dataclass
class SlidePlan:
    jobs: list[CropJob] = field(default_factory=list)
    refused: list[Problem] = field(default_factory=list)
    clipped: list[Problem] = field(default_factory=list)
    no_tissue: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class SlideInfo:
    """What registration needs to know about a slide, without an open handle."""

    path: Path
    name: str
    mpp: float | None
    dimensions: tuple[int, int]


# --- planning -----------------------------------------------------------------------------------


def crop_box(
    annotation: Annotation, settings: CropSettings, mpp: float | None
) -> tuple[int, int, int, int]:
    """The padded level-0 box (x, y, w, h) of ``annotation`` before clipping to the slide."""
    if annotation.kind == "point":
        if settings.point_size_px:
            side = float(settings.point_size_px)
        elif settings.point_size_um:
            if mpp is None:
                raise ExtractError(
                    f"{annotation.source}: a point size in µm needs the slide's µm/px; pass --slide-mpp or --point-size"
                )
            side = settings.point_size_um / mpp
        else:
            raise ExtractError(
                f"{annotation.source}: point annotations need a crop size (--point-size PX or --point-size-um UM)"
            )
        cx, cy = annotation.vertices[0]
        x0, y0, x1, y1 = cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
    else:
        x0, y0, x1, y1 = annotation.bounds
        pad_x = settings.pad_px + settings.pad_frac * (x1 - x0)
        pad_y = settings.pad_px + settings.pad_frac * (y1 - y0)
        if x1 > x0 and y1 > y0:
            x0, y0, x1, y1 = x0 - pad_x, y0 - pad_y, x1 + pad_x, y1 + pad_y
    ix0, iy0 = math.floor(round(x0, 6)), math.floor(round(y0, 6))
    ix1, iy1 = math.ceil(round(x1, 6)), math.ceil(round(y1, 6))
    return (ix0, iy0, ix1 - ix0, iy1 - iy0)


def clip_box(box: Box, dimensions: tuple[int, int]) -> Box | None:
    """``box`` clipped to the slide's level-0 ``dimensions``; None when nothing is left."""
    x, y, w, h = box
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(dimensions[0], x + w), min(dimensions[1], y + h)
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1 - x0, y1 - y0)


def crop_path(out_dir: Path, slide: str, box: Box, settings: CropSettings) -> Path:
    x, y, w, h = box
    return out_dir / slide / f"{slide}_x{x}_y{y}_w{w}_h{h}_{settings.tag}{settings.suffix}"


def tissue_mask(slide: SlideReader, max_size_px: int = 1024) -> np.ndarray:
    """Boolean tissue mask of the slide's thumbnail: saturation above its Otsu threshold.

    Glass is white or grey (unsaturated) whatever the stain; the threshold is capped so a slide
    that is nearly all tissue does not lose its paler half to Otsu's split.
    """
    from skimage.filters import threshold_otsu

    rgb = slide.thumbnail(max_size_px).astype(np.float32) / 255.0
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    if float(sat.max() - sat.min()) < 1e-3:
        return np.zeros(sat.shape, dtype=bool)
    return sat > min(float(threshold_otsu(sat)), 0.1)


def tissue_fraction(mask: np.ndarray, box: Box, dimensions: tuple[int, int]) -> float:
    """Fraction of tissue pixels of ``mask`` (the whole slide) inside the level-0 ``box``."""
    sy, sx = mask.shape[0] / dimensions[1], mask.shape[1] / dimensions[0]
    x, y, w, h = box
    c0, r0 = int(x * sx), int(y * sy)
    c1, r1 = max(c0 + 1, math.ceil((x + w) * sx)), max(r0 + 1, math.ceil((y + h) * sy))
    window = mask[r0:r1, c0:c1]
    return float(window.mean()) if window.size else 0.0


def plan_slide(slide: SlideReader, annotations: Sequence[Annotation], settings: CropSettings, out_dir: Path) -> SlidePlan:
    """Crop jobs for one slide, with the boxes refused or clipped and why."""
    name = slide.name
    dims = slide.dimensions
    if settings.mpp is not None:
        slide.require_mpp()
    if settings.level is not None:
        slide.plan_box((0, 0, 1, 1), level=settings.level)  # RegionError if the level is missing
    mask = tissue_mask(slide) if settings.tissue_min_fraction is not None else None
    plan = SlidePlan()
    by_box: dict[Box, int] = {}
    for ann in annotations:
        raw = crop_box(ann, settings, slide.mpp)
        if raw[2] <= 0 or raw[3] <= 0:
            plan.refused.append(Problem(name, ann.source, raw, "empty box (zero width or height)"))
            continue
        if max(raw[2], raw[3]) > settings.max_box_px:
            plan.refused.append(
                Problem(name, ann.source, raw, f"box larger than the limit of {settings.max_box_px} level-0 px (--max-box)")
            )
            continue
        box = clip_box(raw, dims)
        if box is None:
            plan.refused.append(Problem(name, ann.source, raw, f"box wholly outside the slide ({dims[0]}x{dims[1]})"))
            continue
        if box != raw:
            plan.clipped.append(Problem(name, ann.source, raw, f"clipped to {box} (slide is {dims[0]}x{dims[1]})"))
        if mask is not None and tissue_fraction(mask, box, dims) < settings.tissue_min_fraction:
            plan.no_tissue.append(Problem(name, ann.source, box, "no tissue in the box (thumbnail Otsu mask)"))
            continue
        if box in by_box:
            i = by_box[box]
            prev = plan.jobs[i]
            if ann.label and prev.label and ann.label != prev.label:
                plan.refused.append(
                    Problem(name, ann.source, box, f"same box as {prev.sources[0]} but labelled {ann.label!r}, not {prev.label!r}")
                )
                continue
            plan.jobs[i] = CropJob(prev.slide, box, prev.label or ann.label, prev.path, prev.sources + (ann.source,))
            continue
        by_box[box] = len(plan.jobs)
        plan.jobs.append(CropJob(name, box, ann.label, crop_path(out_dir, name, box, settings), (ann.source,)))
    return plan


# --- cropping (runs in workers) -----------------------------------------------------------------

_WORKER_READER: tuple[tuple[str, float | None], SlideReader] | None = None


def _worker_reader(path: str, mpp: float | None) -> SlideReader:
    """This process's one open slide: reopened only when the chunk is from another slide."""
    global _WORKER_READER
    key = (path, mpp)
    if _WORKER_READER is None or _WORKER_READER[0] != key:
        if _WORKER_READER is not None:
            _WORKER_READER[1].close()
            _WORKER_READER = None
        _WORKER_READER = (key, open_slide(path, fallback_mpp=mpp))
    return _WORKER_READER[1]


def _close_worker_reader() -> None:
    global _WORKER_READER
    if _WORKER_READER is not None:
        _WORKER_READER[1].close()
        _WORKER_READER = None


def save_atomic(img: Image.Image, path: Path, settings: CropSettings) -> None:
    """Write ``img`` to a hidden temp file beside ``path``, then rename it into place."""
    # Unique per writer: the app may crop the same box from two threads of one process.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMP_MARK}")
    try:
        if settings.image_format == "jpeg":
            img.save(tmp, format="JPEG", quality=settings.jpeg_quality)
        else:
            img.save(tmp, format="PNG", compress_level=settings.png_compress_level)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _crop_chunk(slide_path: str, slide_mpp: float | None, items: list[tuple[Box, str]], settings: CropSettings) -> list[str]:
    done: list[str] = []
    try:
        reader = _worker_reader(slide_path, slide_mpp)
        for box, path in items:
            img = reader.read_box_image(box, level=settings.level, mpp=settings.mpp)
            save_atomic(img, Path(path), settings)
            done.append(path)
    except SlideError:
        # The slide is failing: none of its crops from this run may stay behind.
        for p in done:
            Path(p).unlink(missing_ok=True)
        _close_worker_reader()
        raise
    return done


def sweep_temp_files(folder: Path) -> int:
    """Remove temp files a killed run left behind (never a finished crop)."""
    n = 0
    if folder.is_dir():
        for p in folder.glob(f".*{TEMP_MARK}"):
            p.unlink(missing_ok=True)
            n += 1
    if n:
        log.info("%s: removed %d unfinished temp files from an interrupted run", folder, n)
    return n


# --- orchestration ------------------------------------------------------------------------------


def extract_crops(
    tasks: Sequence[SlideTask],
    out_dir: str | Path,
    settings: CropSettings,
    *,
    workers: int = 1,
    register: Callable[[SlideInfo, list[CropJob]], int] | None = None,
    progress: bool = True,
    chunk_size: int | None = None,
) -> ExtractReport:
    """Crop every annotation of every slide into ``out_dir``; see the module docstring.

    ``register(slide_info, jobs)`` is called once per slide whose crops all exist (written now
    or before) and returns how many rows it added; a slide that fails is reported in
    ``report.failed`` and never registered.
    """
    if workers < 1:
        raise ExtractError(f"workers must be >= 1, got {workers}")
    run = _ExtractRun(Path(out_dir).resolve(), settings, register)
    for task in tasks:
        run.plan(task)
    run.make_chunks(workers, chunk_size)
    try:
        if workers == 1 or len(run.chunks) <= 1:
            run.crop_inline(progress)
        else:
            run.crop_in_pool(workers, progress)
    finally:
        run.remove_crops_of_failed_slides()
    report = run.report
    report.written = sum(len(v) for k, v in run.written.items() if k not in report.failed)
    report.seconds = time.perf_counter() - run.t0
    log.info("%s", report.summary())
    return report


class _ExtractRun:
    """State of one :func:`extract_crops` call, keyed by slide path."""

    def __init__(self, out_dir: Path, settings: CropSettings, register: Callable[[SlideInfo, list[CropJob]], int] | None) -> None:
        self.t0 = time.perf_counter()
        self.out_dir = out_dir
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.register = register
        self.report = ExtractReport()
        self.infos: dict[str, SlideInfo] = {}
        self.mpp: dict[str, float | None] = {}
        self.jobs: dict[str, list[CropJob]] = {}  # all crops of a slide, existing or to write
        self.todo: dict[str, list[CropJob]] = {}
        self.written: dict[str, list[str]] = defaultdict(list)
        self.remaining: dict[str, int] = {}  # chunks still out, per slide
        self.chunks: list[tuple[str, list[CropJob]]] = []

    def plan(self, task: SlideTask) -> None:
        key = str(task.path)
        if key in self.jobs or key in self.report.failed:
            log.warning("%s: slide given twice; cropping it once", key)
            return
        try:
            with open_slide(task.path, fallback_mpp=task.mpp) as slide:
                plan = plan_slide(slide, task.annotations, self.settings, self.out_dir)
                info = SlideInfo(Path(task.path).resolve(), slide.name, slide.mpp, slide.dimensions)
        except SlideError as e:
            self.fail(key, e)
            return
        for p in plan.refused:
            log.warning("refused %s", p)
        for p in plan.clipped:
            log.warning("clipped %s", p)
        for p in plan.no_tissue:
            log.info("skipped %s", p)
        self.report.refused += plan.refused
        self.report.clipped += plan.clipped
        self.report.no_tissue += plan.no_tissue
        folder = self.out_dir / info.name
        sweep_temp_files(folder)
        if plan.jobs:
            folder.mkdir(parents=True, exist_ok=True)
        self.infos[key], self.mpp[key], self.jobs[key] = info, task.mpp, plan.jobs
        self.todo[key] = [j for j in plan.jobs if not j.path.is_file()]
        self.report.skipped_existing += len(plan.jobs) - len(self.todo[key])

    def make_chunks(self, workers: int, chunk_size: int | None) -> None:
        n = sum(len(v) for v in self.todo.values())
        # Several chunks per worker balance the load; chunks stay within one slide (one handle).
        size = chunk_size or max(1, min(16, math.ceil(n / (workers * 4))))
        for key, jobs in self.todo.items():
            parts = [jobs[i : i + size] for i in range(0, len(jobs), size)]
            self.remaining[key] = len(parts)
            self.chunks += [(key, p) for p in parts]
            if not parts:  # everything was already there
                self.finish(key)

    def chunk_args(self, key: str, jobs: list[CropJob]) -> tuple:
        return (key, self.mpp[key], [(j.box, str(j.path)) for j in jobs], self.settings)

    def done(self, key: str, paths: list[str], bar: tqdm) -> None:
        self.written[key] += paths
        bar.update(len(paths))
        self.remaining[key] -= 1
        if self.remaining[key] == 0 and key not in self.report.failed:
            self.finish(key)

    def finish(self, key: str) -> None:
        if self.register is not None and self.jobs[key]:
            self.report.registered += self.register(self.infos[key], self.jobs[key])
        self.report.jobs += self.jobs[key]

    def fail(self, key: str, err: Exception) -> None:
        if key not in self.report.failed:
            self.report.failed[key] = str(err)
            log.error("%s", err)

    def progress_bar(self, progress: bool) -> tqdm:
        total = sum(len(v) for v in self.todo.values())
        return tqdm(total=total, unit="crop", desc="extract", disable=not progress)

    def crop_inline(self, progress: bool) -> None:
        with self.progress_bar(progress) as bar:
            try:
                for key, jobs in self.chunks:
                    if key in self.report.failed:
                        continue
                    try:
                        paths = _crop_chunk(*self.chunk_args(key, jobs))
                    except SlideError as e:
                        self.fail(key, e)
                        continue
                    self.done(key, paths, bar)
            finally:
                _close_worker_reader()

    def crop_in_pool(self, workers: int, progress: bool) -> None:
        # fork: workers start in milliseconds; the parent holds no slide handle at this point.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        queue = list(self.chunks)
        pending: dict[Future, str] = {}

        def submit_more(pool: ProcessPoolExecutor) -> None:
            # A bounded number in flight, so the rest of a failed slide is never started.
            while queue and len(pending) < workers * 2:
                key, jobs = queue.pop(0)
                if key not in self.report.failed:
                    pending[pool.submit(_crop_chunk, *self.chunk_args(key, jobs))] = key

        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method),
                                 initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
            submit_more(pool)  # forks the workers before the progress bar starts its thread
            with self.progress_bar(progress) as bar:
                try:
                    while pending:
                        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            key = pending.pop(fut)
                            try:
                                paths = fut.result()
                            except SlideError as e:
                                self.fail(key, e)
                                continue
                            self.done(key, paths, bar)
                        submit_more(pool)
                except BrokenProcessPool as e:
                    raise ExtractError(f"a crop worker died ({e}); finished crops are kept, re-run to resume") from None
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise

    def remove_crops_of_failed_slides(self) -> None:
        for key in self.report.failed:
            for p in self.written.get(key, []):
                Path(p).unlink(missing_ok=True)
