"""What the diagnosis viewer computes: calibrated probabilities, uncertainty and a CAM per crop,
and the batch and whole-slide workflows around them (store writes and the CSV).

    ckpt = load_viewer_checkpoint("runs/quick/best.safetensors")
    [result] = diagnose(ckpt, [rgb], method="gradcam")
    result.predicted, result.probs, result.margin, result.heat   # heat: (H, W) in [0, 1]

    out = diagnose_batch(ckpt, [BatchCrop(checked, path)], Session, uploads=UploadsPolicy(data_root))
    out.crops[0].rank, out.csv_path, out.summaries               # most uncertain first
    diagnose_slide(ckpt, slide_path, annotation_file, Session, data_root=data_root)

The viewer (``app/viewer.py``) only lays these out. Checkpoints are found under a runs folder (``<stem>.safetensors`` next to ``<stem>.json``) and
loaded through :mod:`core.checkpoint` (safetensors + JSON; nothing is unpickled). Loaded models
are cached per file (path, size, modification time), like a resource cache in a web app.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import tempfile
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from sqlalchemy.orm import Session, sessionmaker

from annotation_db.db import StoreError
from annotation_db.models import Image
from annotation_db.store import prediction_margin
from core.checkpoint import CheckpointError, read_meta
from core.explain import CAM_METHODS, ExplainError, TargetLayers, find_target_layers, open_cam
from core.extract import ExtractError
from core.predict import Predictor
from core.slide_crops import SlideCrops, slide_annotations
from core.slide_summary import SlideSummary, summarize_by_slide
from core.uploads import CheckedImage, UploadLimits, check_upload
from core.viewer_store import crop_slide_for_viewer, image_for_crop, record_predictions

log = logging.getLogger(__name__)

__all__ = [
    "MAX_SLIDE_GLOMERULI",
    "BatchCrop",
    "BatchDiagnosis",
    "CheckpointError",
    "CropResult",
    "DiagnosedCrop",
    "SlideDiagnosis",
    "UploadsPolicy",
    "ViewerCheckpoint",
    "checkpoint_id",
    "classify_crops",
    "diagnose",
    "diagnose_batch",
    "diagnose_slide",
    "find_checkpoints",
    "load_viewer_checkpoint",
    "write_predictions_csv",
]


@dataclass
class ViewerCheckpoint:
    """A loaded checkpoint with what the viewer needs around it."""

    path: Path  # the .safetensors file
    id: str  # "<run>/<stem>@<sha256 prefix of the weights>": stable name in the store
    predictor: Predictor
    target: TargetLayers
    lock: threading.Lock = field(default_factory=threading.Lock)  # one request at a time on the model: CAM hooks

    @property
    def classes(self) -> list[str]:
        return self.predictor.classes

    @property
    def display_names(self) -> dict[str, str]:
        return dict(zip(self.predictor.classes, self.predictor.display_names))

    @property
    def calibrated(self) -> bool:
        return bool(self.predictor.meta.temperature)


@dataclass
class CropResult:
    """One crop's prediction, most probable class first in ``ranked``."""

    probs: dict[str, float]
    predicted: str
    margin: float  # top-1 minus top-2 probability: small = uncertain
    heat: np.ndarray | None = None  # (H, W) in [0, 1] at the model's input resolution

    @property
    def ranked(self) -> list[tuple[str, float]]:
        return sorted(self.probs.items(), key=lambda kv: -kv[1])


def find_checkpoints(runs_dir: str | Path) -> list[Path]:
    """``.safetensors`` files with a JSON sidecar under ``runs_dir``, newest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.rglob("*.safetensors") if p.with_suffix(".json").is_file()]
    return sorted(found, key=lambda p: (-p.stat().st_mtime, str(p)))


def checkpoint_id(path: str | Path, runs_dir: str | Path | None = None) -> str:
    """``<run>/<stem>@<12 hex of the weights' sha256>``: changes when the weights do."""
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    name = path.with_suffix("").name
    if runs_dir is not None:
        try:
            name = path.with_suffix("").resolve().relative_to(Path(runs_dir).resolve()).as_posix()
        except ValueError:
            pass
    else:
        name = f"{path.parent.name}/{name}"
    return f"{name}@{digest.hexdigest()[:12]}"


def load_viewer_checkpoint(path: str | Path, runs_dir: str | Path | None = None,
                           device: str = "cpu") -> ViewerCheckpoint:
    """Load (or reuse) the checkpoint at ``path`` on ``device`` (``cpu``, ``cuda``, ``cuda:N``; the viewer's
    default is the CPU); raises :class:`CheckpointError` in plain words."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    st = path.stat()
    return _load_cached(str(path.resolve()), st.st_size, st.st_mtime_ns, str(runs_dir) if runs_dir else None,
                        device)


# What a damaged or foreign checkpoint raises while loading: a truncated or non-safetensors file
# (SafetensorError), a sidecar that is not JSON (ValueError), shapes that do not fit the
# architecture (RuntimeError from torch), an unreadable file (OSError). Anything else is a bug
# and keeps its traceback.
_LOAD_FAILURES = (SafetensorError, ValueError, RuntimeError, OSError)


@lru_cache(maxsize=4)
def _load_cached(path: str, size: int, mtime_ns: int, runs_dir: str | None, device: str = "cpu") -> ViewerCheckpoint:
    try:
        read_meta(path)  # a missing or newer-format sidecar fails here, before any weights are read
        predictor = Predictor.from_checkpoint(path, device)
    except CheckpointError:
        raise
    except _LOAD_FAILURES as e:
        log.warning("checkpoint %s could not be loaded: %s: %s", path, type(e).__name__, e)
        raise CheckpointError(f"{Path(path).name} could not be loaded: {type(e).__name__}: {str(e)[:200]}") from None
    try:
        target = find_target_layers(predictor.model, predictor.meta.architecture)
    except ExplainError as e:
        raise CheckpointError(f"{Path(path).name}: no heatmap layer for {predictor.meta.architecture}: {e}") from None
    log.info("loaded %s (%s, classes %s)", path, predictor.meta.architecture, predictor.classes)
    return ViewerCheckpoint(Path(path), checkpoint_id(path, runs_dir), predictor, target)


def classify_crops(Session: sessionmaker, image_ids: Sequence[int], checkpoint: str | Path,
                   runs_dir: str | Path | None = None, device: str = "cpu") -> list[str]:
    """Predict the stored crops ``image_ids`` with ``checkpoint`` (loaded once per process, cached) and
    store one ``Prediction`` row each, under the checkpoint's id (the Label queue's model-uncertain
    order, the workspace's per-biopsy summary and ``glom classify-slides`` read them).

    Returns the predicted class key of each crop, in order. Raises :class:`GlomError` naming the
    checkpoint when one of its classes is none of the crops' dataset's (nothing is stored then).
    """
    from annotation_db.images import image_abspath
    from core.errors import GlomError

    if not image_ids:
        return []
    ckpt = load_viewer_checkpoint(checkpoint, runs_dir, device)
    with Session() as s:
        images = [s.get(Image, i) for i in image_ids]
        paths = [str(image_abspath(img.dataset, img)) for img in images]
        datasets = {img.dataset.name: set(img.dataset.class_keys) for img in images}
    for name, keys in datasets.items():
        unknown = set(ckpt.predictor.classes) - keys
        if unknown:
            raise GlomError(f"{checkpoint}: classes {sorted(unknown)} are none of dataset {name!r}'s: "
                            "pick another checkpoint")
    with ckpt.lock:  # one request at a time on a shared model
        results = ckpt.predictor.predict_paths(paths)
    with Session() as s, s.begin():
        record_predictions(s, [(s.get(Image, i), r["probs"]) for i, r in zip(image_ids, results, strict=True)],
                           ckpt.id)
    return [r["predicted"] for r in results]


def diagnose(ckpt: ViewerCheckpoint, rgbs: Sequence[np.ndarray], *, method: str | None = "gradcam",
             target_class: str | None = None, versus_class: str | None = None,
             batch_size: int = 16) -> list[CropResult]:
    """Predict (calibrated when the checkpoint has a temperature) and, with ``method``, explain.

    The CAM explains ``target_class`` when given, else each crop's predicted class; with
    ``versus_class`` it explains "target rather than versus". Probabilities come from the same
    forward pass as the CAM, so a crop costs one forward and a backward through the head.
    """
    pred = ckpt.predictor
    if method is not None and method not in CAM_METHODS:
        raise ExplainError(f"unknown heatmap method {method!r}")
    for key in (target_class, versus_class):
        if key is not None and key not in pred.classes:
            raise ExplainError(f"class {key!r} is not one of this checkpoint's classes {pred.classes}")
    out: list[CropResult] = []
    for i in range(0, len(rgbs), batch_size):
        batch = torch.stack([pred.preprocess(rgb) for rgb in rgbs[i:i + batch_size]])
        heats: np.ndarray | None = None
        if method is None:
            with ckpt.lock:  # a CAM in another thread has hooks on this model while it runs
                probs = pred.predict_batch(batch)
        else:
            versus = pred.classes.index(versus_class) if versus_class is not None else None
            with ckpt.lock, open_cam(pred.model, pred.meta.architecture, method, ckpt.target) as cam:
                targets: int | list[int] | None = None
                if target_class is not None:
                    targets = pred.classes.index(target_class)
                elif versus is not None:
                    with torch.no_grad():
                        targets = pred.model(batch.to(pred.device)).argmax(1).tolist()
                heats = cam(batch, target_class=targets, versus_class=versus)
                # The CAM's own forward pass gives the logits (no second forward).
                logits = cam.outputs.detach().float()
            # A TTA checkpoint's probabilities are the 8-view mean, not the CAM's single view.
            if pred.tta:
                with ckpt.lock:
                    probs = pred.predict_batch(batch)
            else:
                probs = pred.probabilities(logits)
        for j, p in enumerate(probs):
            scores = {k: float(v) for k, v in zip(pred.classes, p)}
            out.append(CropResult(scores, pred.classes[int(p.argmax())], prediction_margin(scores),
                                  None if heats is None else heats[j]))
    return out


# --- batches: inference, the store and the CSV ---------------------------------------------------


@dataclass(frozen=True)
class BatchCrop:
    """One crop of a batch: the checked image, the file it was read from, and its place in the store."""

    image: CheckedImage
    file: Path  # what the viewer opens when the crop is picked in the gallery
    slide: str | None = None
    image_id: int | None = None  # its store row; None: an upload, kept in the viewer's uploads dataset
    annotated: str | None = None  # the class key its slide annotation names


@dataclass(frozen=True)
class DiagnosedCrop:
    crop: BatchCrop
    result: CropResult  # ``heat`` only for the crops the gallery shows
    rank: int  # 1 = the most uncertain crop of the batch
    image_id: int | None  # the store row its prediction was written for; None: an upload not kept


@dataclass
class BatchDiagnosis:
    """A batch's predictions, most uncertain first, with where they were written."""

    crops: list[DiagnosedCrop]
    n_shown: int  # the first ``n_shown`` crops are the gallery's (with heatmaps when a method was asked)
    csv_path: Path
    summaries: list[SlideSummary]

    @property
    def shown(self) -> list[DiagnosedCrop]:
        return self.crops[: self.n_shown]

    @property
    def agreement(self) -> tuple[int, int] | None:
        """(crops whose prediction is the annotated class, annotated crops); None without annotations."""
        pairs = [(d.crop.annotated, d.result.predicted) for d in self.crops if d.crop.annotated is not None]
        return (sum(a == p for a, p in pairs), len(pairs)) if pairs else None


@dataclass(frozen=True)
class UploadsPolicy:
    """Where uploaded crops are kept and how many distinct ones (None: no limit)."""

    data_root: Path
    max_uploads: int | None = None


def _results_with_heat(ckpt: ViewerCheckpoint, rgbs: list[np.ndarray], method: str | None, show: int) -> list[CropResult]:
    """Probabilities for every crop; heatmaps only for the ``show`` most uncertain."""
    if show == len(rgbs):
        return diagnose(ckpt, rgbs, method=method)
    results = diagnose(ckpt, rgbs, method=None)
    if method is not None and show:
        shown = sorted(range(len(results)), key=lambda i: (results[i].margin, i))[:show]
        for i, r in zip(shown, diagnose(ckpt, [rgbs[i] for i in shown], method=method), strict=True):
            results[i] = replace(results[i], heat=r.heat)
    return results


def _store_rows(session: Session, ckpt: ViewerCheckpoint, crops: Sequence[BatchCrop],
                uploads: UploadsPolicy | None) -> list[Image | None]:
    """Each crop's store row: the image it was read from, or its upload kept now (None: not kept)."""
    rows: list[Image | None] = []
    for c in crops:
        if c.image_id is not None:  # read from the store by id just now: nothing to check
            image = session.get(Image, c.image_id)
            if image is None:
                raise StoreError(f"crop store:{c.image_id} ({c.image.name}) is no longer in the store")
            rows.append(image)
        elif uploads is not None:
            rows.append(image_for_crop(session, c.image, None, ckpt.classes, ckpt.display_names, uploads.data_root,
                                       uploads.max_uploads))
        else:
            rows.append(None)
    return rows


def write_predictions_csv(path: Path, ckpt: ViewerCheckpoint, crops: Sequence[DiagnosedCrop]) -> Path:
    """One row per crop, in the order given: rank, name, slide, annotated and predicted class,
    probabilities, store image id, sha256 and checkpoint."""
    header = ["uncertainty_rank", "name", "slide", "annotated", "predicted", "p_predicted", "margin",
              *[f"p_{k}" for k in ckpt.classes], "store_image_id", "sha256", "checkpoint"]
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for d in crops:
            r, c = d.result, d.crop
            w.writerow([d.rank, c.image.name, c.slide or "", c.annotated or "", r.predicted,
                        round(r.probs[r.predicted], 4), round(r.margin, 4), *[round(r.probs[k], 4) for k in ckpt.classes],
                        "" if d.image_id is None else d.image_id, c.image.sha256, ckpt.id])
    return path


def diagnose_batch(ckpt: ViewerCheckpoint, crops: Sequence[BatchCrop], Session: sessionmaker, *,
                   uploads: UploadsPolicy | None, method: str | None = "gradcam", show: int | None = None,
                   out_dir: Path | None = None) -> BatchDiagnosis:
    """Predict every crop, write each prediction to the store and all of them to a CSV.

    Crops with an ``image_id`` are store crops; the others are uploads, kept (content-addressed)
    in the viewer's uploads dataset under ``uploads`` (None: not kept, not recorded). ``show``:
    how many of the most uncertain crops get a heatmap (``method``) for the gallery (default
    all). The CSV (``out_dir``, default a new temporary folder) and the per-slide summaries
    cover every crop. Each crop keeps its own file and store row, whatever its name.
    """
    if not crops:
        raise ExplainError("no crops to predict")
    show = len(crops) if show is None else max(0, min(int(show), len(crops)))
    results = _results_with_heat(ckpt, [c.image.rgb for c in crops], method or None, show)
    with Session.begin() as s:
        rows = _store_rows(s, ckpt, crops, uploads)
        record_predictions(s, [(img, r.probs) for img, r in zip(rows, results, strict=True) if img is not None],
                           ckpt.id)
        image_ids = [img.id if img is not None else None for img in rows]
    order = sorted(range(len(results)), key=lambda i: (results[i].margin, i))
    ranked = [DiagnosedCrop(crops[i], results[i], rank, image_ids[i]) for rank, i in enumerate(order, 1)]
    out_dir = out_dir or Path(tempfile.mkdtemp(prefix="glom-viewer-"))
    csv_path = write_predictions_csv(out_dir / "predictions.csv", ckpt, ranked)
    summaries = summarize_by_slide([(c.slide, r.predicted) for c, r in zip(crops, results, strict=True)],
                                   ckpt.classes, no_slide="uploaded crops")
    return BatchDiagnosis(ranked, show, csv_path, summaries)


# --- whole slides -------------------------------------------------------------------------------

MAX_SLIDE_GLOMERULI = 1000  # per slide (decoded crops stay in memory: ~0.5 MB each at 0.5 µm/px)

# One slide request at a time per slide file: two clinicians opening the same slide at once would
# otherwise race to register the same crops (the second waits, then reuses the first one's crops).
_SLIDE_LOCKS: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)


@dataclass
class SlideDiagnosis:
    """A slide's glomeruli cut into the viewer's slides dataset, and their batch diagnosis."""

    batch: BatchDiagnosis
    cut: SlideCrops
    origin: str  # where the annotations came from (a file name, or the boxes drawn in the labeling app)


def diagnose_slide(ckpt: ViewerCheckpoint, slide_path: Path, annotation_file: Path | None,
                   Session: sessionmaker, *, data_root: Path, mpp: float | None = None,
                   method: str | None = "gradcam", show: int | None = None,
                   limits: UploadLimits = UploadLimits(),
                   on_progress: Callable[[float, str], None] | None = None) -> SlideDiagnosis:
    """One crop per annotated glomerulus of ``slide_path`` (from ``annotation_file``, else the
    boxes drawn in the labeling app), cut into the ``viewer-slides`` dataset of this checkpoint's
    schema (:func:`core.slide_crops.crop_into_dataset`), then :func:`diagnose_batch`.

    Annotation classes (key or display name, any case) that are classes of the checkpoint are
    shown beside the predictions (never stored as labels); others are counted in
    ``cut.ignored_labels``. ``mpp``: µm/px for a slide that records none. Raises
    :class:`AnnotationFormatError`, :class:`SlideError` or :class:`ExtractError` in plain words.
    """
    progress = on_progress or (lambda fraction, message: None)
    with _SLIDE_LOCKS[str(slide_path)], Session.begin() as s:
        anns, origin = slide_annotations(s, slide_path, annotation_file)
        if len(anns) > MAX_SLIDE_GLOMERULI:
            raise ExtractError(f"{len(anns)} annotations on {slide_path.name}: at most {MAX_SLIDE_GLOMERULI} per "
                               "slide here; use `glom extract` and `glom predict` for larger runs")
        progress(0.0, f"Cutting {len(anns)} glomeruli from {slide_path.name}…")
        cut = crop_slide_for_viewer(s, slide_path, anns, ckpt.classes, ckpt.display_names, data_root, mpp=mpp)
    # Checked like uploads; the file bytes are not needed again (the crops are in the store).
    crops = [BatchCrop(replace(check_upload(c.path, limits), data=b""), c.path, c.slide, c.image_id, c.label)
             for c in cut.crops]
    progress(0.5, f"Predicting {len(crops)} glomeruli…")
    return SlideDiagnosis(diagnose_batch(ckpt, crops, Session, uploads=None, method=method, show=show), cut, origin)
