"""One slide detected and its findings stored: the unit of work of ``glom detect``.

The in-process loop, the local worker processes (``--workers``) and the Ray tasks (``--ray``,
:mod:`core.detection.cluster`) all call :func:`detect_and_store` with a :class:`DetectJob` (plain,
picklable data: paths, settings, store URL). The predictor is loaded once per process and kept, so a
worker that is given several slides loads the model once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from annotation_db.db import StoreError
from core.detection.inference import Predictor
from core.detection.slides import (
    DetectSettings,
    DetectSlideError,
    read_done,
    result_path,
    slide_run_info,
)
from core.errors import GlomError

log = logging.getLogger(__name__)

__all__ = ["DetectJob", "SlideOutcome", "describe", "detect_and_store", "predictor_for", "store_proposals"]

SHARED_STORAGE_HINT = ("slides, the checkpoint and --out must be on storage every worker sees, at the same path "
                       "(a shared filesystem)")


@dataclass(frozen=True)
class DetectJob:
    """How every slide of one ``glom detect`` run is detected and stored (the same for each worker)."""

    weights: str  # the checkpoint's .safetensors, absolute: the path every worker loads
    checkpoint: str  # the checkpoint as the user named it (stem): recorded in the GeoJSON, part of the resume key
    digest: str  # checkpoint_digest of the weights the driver read
    settings: DetectSettings
    out_dir: str  # absolute
    source: str  # proposals' source, model:<checkpoint name>
    slide_mpp: float | None = None
    resume: bool = True
    device: str = "auto"
    threads: int = 0  # torch threads in a worker (0: torch's default)
    dataset: str | None = None  # store the findings as proposals in this dataset
    db_url: str | None = None  # the store, resolved on the driver (an SQLite file made absolute)

    def result_path(self, slide: str | Path) -> Path:
        return result_path(self.out_dir, slide)

    def done(self, slide: str | Path) -> bool:
        """Whether the slide's GeoJSON was already written by this checkpoint with these settings."""
        return self.resume and read_done(self.result_path(slide),
                                         slide_run_info(self.checkpoint, self.digest, self.settings))


@dataclass
class SlideOutcome:
    """What :func:`detect_and_store` did with one slide."""

    slide: str
    n: int  # glomeruli found
    skipped: bool  # already done the same way: nothing detected again
    out: str  # the GeoJSON
    seconds: float = 0.0
    tiles: int = 0
    stored: int | None = None  # proposals stored (None: no --dataset)


_PREDICTORS: dict[tuple[str, str, int], Predictor] = {}


def predictor_for(job: DetectJob) -> Predictor:
    """The job's predictor, loaded on first use in this process and kept for the next slides."""
    key = (job.digest, job.device, job.threads, job.settings.tta)
    if key not in _PREDICTORS:
        import torch

        from core.checkpoint import CheckpointError
        from core.detection.inference import resolve_device
        from core.detection.model import load_detector
        from core.detection.slides import checkpoint_digest

        weights = Path(job.weights).with_suffix(".safetensors")
        if not weights.is_file():
            raise CheckpointError(f"checkpoint {weights} not found on this machine: {SHARED_STORAGE_HINT}")
        if checkpoint_digest(weights) != job.digest:
            raise CheckpointError(f"checkpoint {weights} on this machine is not the one the run started with "
                                  f"(SHA-256 {checkpoint_digest(weights)}…, expected {job.digest}…): "
                                  "was it overwritten, or is this node's copy stale?")
        if job.threads:
            torch.set_num_threads(job.threads)
        dev = resolve_device(job.device)
        model, meta = load_detector(weights, dev)
        _PREDICTORS.clear()  # one model per process: a run with another checkpoint replaces it
        # the run's TTA setting (the checkpoint's unless --tta / --no-tta)
        _PREDICTORS[key] = Predictor(model, meta, dev, tta=job.settings.tta)
    return _PREDICTORS[key]


def store_proposals(job: DetectJob, slide: str, geojson: str | Path) -> int:
    """Replace the slide's still-proposed findings in ``job.dataset`` by those of ``geojson``."""
    from annotation_db.db import open_store
    from annotation_db.proposals import replace_proposals
    from core.detection.slides import _instances_from_doc
    from core.wsi import slide_name

    doc = json.loads(Path(geojson).read_text())
    Session = open_store(job.db_url, create=False)  # the driver migrated it: workers never race a migration
    with Session() as s, s.begin():
        return replace_proposals(s, job.dataset, slide_name(slide), _instances_from_doc(doc), source=job.source,
                                 checkpoint_sha256=doc["glomlab"]["checkpoint_sha256"],
                                 slide_path=str(Path(slide).resolve()))


def detect_and_store(slide: str, job: DetectJob, *, progress: bool = False, position: int = 0) -> SlideOutcome:
    """Detect one slide into its GeoJSON (skipped when already done) and, with a dataset, store the proposals.

    Raises :class:`DetectSlideError` naming the slide, whether detecting or storing failed.
    """
    from core.detection.slides import detect_slide

    if job.done(slide):  # before loading any model: a resumed run costs a file read per slide
        out = job.result_path(slide)
        try:
            n = len(json.loads(out.read_text())["features"])
        except (OSError, ValueError, KeyError) as e:
            raise DetectSlideError(f"{slide}: reading its finished result {out}: {e}") from e
        outcome = SlideOutcome(slide, n, True, str(out))
    else:
        if not Path(slide).is_file():
            raise DetectSlideError(f"{slide}: file not found on this machine: {SHARED_STORAGE_HINT}")
        det, out = detect_slide(slide, predictor_for(job), job.settings, Path(job.out_dir), checkpoint=job.checkpoint,
                                digest=job.digest, slide_mpp=job.slide_mpp, resume=job.resume, progress=progress,
                                position=position)
        outcome = SlideOutcome(slide, len(det.instances), det.skipped, str(out), det.seconds, det.tiles_read)
    if job.dataset:
        try:
            outcome.stored = store_proposals(job, slide, outcome.out)
        except (StoreError, GlomError) as e:
            raise DetectSlideError(f"{slide}: storing proposals: {e}") from e
    return outcome


def describe(outcome: SlideOutcome, dataset: str | None = None) -> str:
    """One line for the terminal: what was found, how, where it went."""
    what = "already done" if outcome.skipped else f"{outcome.tiles} tiles, {outcome.seconds:.1f} s"
    stored = f", {outcome.stored} proposals stored in dataset {dataset!r}" if outcome.stored is not None else ""
    return f"{outcome.slide}: {outcome.n} glomeruli ({what}) -> {outcome.out}{stored}"
