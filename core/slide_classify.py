"""One slide's glomeruli cropped into a dataset and classified: the unit of work of ``glom classify-slides``.

The step after detection: a slide's glomeruli in the store (boxes and outlines drawn, imported, or
accepted from the detector's proposals: :func:`annotation_db.boxes.list_boxes`) not cropped yet are
cut into the dataset (:func:`core.slide_crops.crop_into_dataset`, the one crop path), then every
crop of that slide in the dataset without a prediction of this classifier is predicted and stored
(:func:`core.diagnosis.classify_crops`). A second run crops nothing and predicts nothing, so a run
stopped halfway resumes per slide.

The in-process loop, the local worker processes (``--workers``) and the Ray tasks (``--ray``,
:func:`classify_on_ray`) all call :func:`classify_slide` with a :class:`ClassifyJob` (plain,
picklable data: paths, store URL). The classifier is loaded once per process and kept
(:func:`core.diagnosis.load_viewer_checkpoint` caches it), so a worker given several slides loads
it once.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from annotation_db.db import StoreError
from core.errors import GlomError

log = logging.getLogger(__name__)

__all__ = ["ClassifyJob", "ClassifySlideError", "SlideClassified", "check_classes", "classify_on_ray",
           "classify_slide", "describe"]

SOURCE = "cli:classify-slides"
SHARED_STORAGE_HINT = ("slides, the checkpoint and the dataset's crop folder must be on storage every worker sees, "
                       "at the same path (a shared filesystem)")


class ClassifySlideError(GlomError):
    """One slide could not be cropped or classified; the message names it."""


@dataclass(frozen=True)
class ClassifyJob:
    """How every slide of one ``glom classify-slides`` run is cropped and classified (the same for each worker)."""

    checkpoint: str  # the classifier's .safetensors, absolute
    dataset: str
    db_url: str  # resolved on the driver (an SQLite file made absolute)
    mpp: float | None = None  # µm/px for a slide whose file and store row record none
    out_dir: str | None = None  # crops' folder (default <dataset root>/wsi), absolute
    annotator: str | None = None  # store the boxes' classes as this person's labels (None: no labels)
    threads: int = 0  # torch threads in a worker (0: torch's default)
    device: str = "auto"  # auto (CUDA when the worker has it) | cpu | cuda | cuda:N, resolved in each worker


@dataclass
class SlideClassified:
    """What :func:`classify_slide` did with one slide."""

    slide: str  # the slide's name in the store
    cropped: int  # crops made now
    predicted: int  # crops predicted now
    counts: dict[str, int] = field(default_factory=dict)  # class -> crops of the slide predicted so by this classifier
    unpredicted: int = 0  # crops of the slide in the dataset still without this classifier's prediction (none)
    refused: list[str] = field(default_factory=list)  # boxes refused or clipped while cropping


def check_classes(checkpoint: str | Path, dataset_classes: Sequence[str], dataset: str) -> None:
    """Raise :class:`GlomError` when a class of the classifier is none of the dataset's."""
    from core.checkpoint import read_meta

    unknown = set(read_meta(checkpoint).classes) - set(dataset_classes)
    if unknown:
        raise GlomError(f"{checkpoint}: classes {sorted(unknown)} are none of dataset {dataset!r}'s "
                        f"({', '.join(dataset_classes)}): pick another checkpoint or dataset")


def _slide_and_path(s, slide: str) -> tuple[object, Path]:
    """The store's row of ``slide`` (a file, or a slide name the store knows) and the file to read."""
    from annotation_db.models import Slide
    from core.wsi import slide_name

    name = slide_name(slide)
    row = s.scalar(select(Slide).where(Slide.name == name))
    if row is None:
        raise ClassifySlideError(f"{slide}: no slide {name!r} in the store (store its glomeruli first: "
                                 "glom detect --dataset, the slide workspace or an outline import)")
    given = Path(slide)
    if not (given.is_file() or "/" in slide or given.suffix):  # a slide name: the file the store records
        if not row.path:
            raise ClassifySlideError(f"{slide}: the store records no file for this slide; pass its path")
        given = Path(row.path)
    path = given
    if not path.is_file():
        raise ClassifySlideError(f"{slide}: file {path} not found on this machine: {SHARED_STORAGE_HINT}")
    return row, path


def classify_slide(slide: str, job: ClassifyJob) -> SlideClassified:
    """Crop the slide's uncropped glomeruli into ``job.dataset``, predict its crops lacking this classifier's
    prediction, store the predictions. ``slide``: a slide file, or the name of a slide the store has a path for.

    Raises :class:`ClassifySlideError` naming the slide (not in the store, file missing, unreadable,
    classifier classes not the dataset's, store errors).
    """
    from annotation_db import boxes as box_store
    from annotation_db import store
    from annotation_db.db import open_store
    from annotation_db.models import Image, Prediction
    from core.detection.inference import resolve_device
    from core.diagnosis import checkpoint_id, classify_crops
    from core.slide_crops import crop_into_dataset

    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    try:
        device = str(resolve_device(job.device))
        Session = open_store(job.db_url, create=False)  # the driver migrated it: workers never race a migration
        with Session() as s:
            ds = store.get_dataset(s, job.dataset)
            check_classes(job.checkpoint, ds.class_keys, ds.name)
        with Session() as s, s.begin():
            row, path = _slide_and_path(s, slide)
            name, slide_id = row.name, row.id
            todo = box_store.list_boxes(s, row, uncropped_only=True)
            refused: list[str] = []
            cropped = 0
            if todo:
                done = crop_into_dataset(s, job.dataset, path, todo, annotator=job.annotator, mpp=job.mpp or row.mpp,
                                         out_dir=job.out_dir, source=SOURCE)
                cropped = len(done.crops)
                refused = [str(p) for p in done.report.clipped + done.report.refused]
        ckpt_id = checkpoint_id(job.checkpoint)
        with Session() as s:
            ds = store.get_dataset(s, job.dataset)
            mine = select(Image.id).where(Image.slide_id == slide_id, Image.dataset_id == ds.id)
            have = select(Prediction.image_id).where(Prediction.checkpoint_id == ckpt_id)
            todo_ids = list(s.scalars(mine.where(Image.id.not_in(have)).order_by(Image.id)))
        classify_crops(Session, todo_ids, job.checkpoint, device=device)
        with Session() as s:
            # the latest prediction of this classifier per crop (a crop predicted twice counts once)
            latest: dict[int, str] = {}
            for image_id, predicted in s.execute(select(Prediction.image_id, Prediction.predicted)
                                                 .where(Prediction.checkpoint_id == ckpt_id,
                                                        Prediction.image_id.in_(mine))
                                                 .order_by(Prediction.id)):
                latest[image_id] = predicted
            n_crops = len(list(s.scalars(mine)))
    except ClassifySlideError:
        raise
    except (GlomError, StoreError, OSError) as e:
        raise ClassifySlideError(f"{slide}: {e}") from e
    except Exception as e:  # SQLAlchemy errors and the like: still name the slide
        from sqlalchemy.exc import SQLAlchemyError

        if isinstance(e, SQLAlchemyError):
            raise ClassifySlideError(f"{slide}: the store could not be read or written: {type(e).__name__}: "
                                     f"{str(e)[:300]}") from e
        raise
    counts = dict(sorted(Counter(latest.values()).items()))
    return SlideClassified(name, cropped, len(todo_ids), counts, n_crops - len(latest), refused)


def describe(r: SlideClassified, dataset: str) -> str:
    """One line for the terminal: what was cropped and predicted, and the slide's counts per class."""
    counts = ", ".join(f"{k} {v}" for k, v in r.counts.items()) or "no crops"
    return (f"{r.slide}: {r.cropped} cropped into {dataset!r}, {r.predicted} predicted; "
            f"{sum(r.counts.values())} glomeruli: {counts}"
            + (f"; {len(r.refused)} boxes refused or clipped" if r.refused else ""))


def classify_on_ray(job: ClassifyJob, slides: Sequence[str], *, address: str, num_cpus: int = 1) -> Iterator:
    """``glom classify-slides --ray``: one task per slide (:func:`classify_slide`), a ``TaskResult`` per slide as
    they finish. The store must be one every node reaches (PostgreSQL); each worker process loads the
    classifier once. A GPU is requested per task when the cluster has one and ``job.device`` is not ``cpu``."""
    from dataclasses import replace

    from core.detection.cluster import connect, gpus_per_task, run_on_ray

    job = replace(job, threads=num_cpus)
    with connect(address) as ray:
        num_gpus = gpus_per_task(ray, job.device, address)
        log.info("%d slides to crop and classify on the Ray cluster at %s (%d CPU, %d GPU per task)", len(slides),
                 address, num_cpus, num_gpus)
        yield from run_on_ray(classify_slide, list(slides), args=(job,), num_cpus=num_cpus, num_gpus=num_gpus,
                              label="glom classify-slides")
