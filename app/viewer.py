"""Diagnosis viewer: a classifier's predictions and heatmaps on glomerulus crops, for clinicians.

    python app/viewer.py [--checkpoint PATH] [--runs runs] [--slides DIR] [--host 127.0.0.1] [--port 7860]

``demo`` is built at import (tests import it); nothing is loaded until a request needs it.
Named API endpoints (``gradio_client``): ``/checkpoints``, ``/predict``, ``/cam``, ``/batch``,
``/store_batch``, ``/slide_batch``, ``/slides``, ``/disagree``, ``/slide_summary``. This file is the
layout and thin handlers; the work (inference, store writes, the CSV, cutting slides) is
:mod:`core.diagnosis`. ``main`` passes the command line to the handlers as a :class:`Settings`
(:func:`configure`); a process that only imports ``demo`` reads them from the environment:
``GLOM_RUNS`` (runs folder), ``GLOM_VIEWER_CHECKPOINT``, ``GLOM_DB`` (the store), ``GLOM_DATA_ROOT``
(where uploaded crops and crops cut from slides are kept), ``GLOM_SLIDES_DIR`` (the whole-slide
images on the server), ``GLOM_VIEWER_MAX_UPLOADS`` (distinct uploaded crops kept),
``GLOM_SINGLE_USER`` and ``GLOM_VIEWER_AUTH``.

Login: the store's accounts (``glom user add``) once any exists, or ``GLOM_VIEWER_AUTH``
(``user:password[,user:password]``). Without a login the viewer binds loopback only, and "I
disagree" writes nothing unless ``--single-user`` names the local user.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path

if __package__ in (None, ""):  # `python app/viewer.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradio as gr
import numpy as np
from sqlalchemy.exc import SQLAlchemyError

from annotation_db.db import StoreError, open_store
from annotation_db.store import get_dataset, list_datasets
from annotation_db.suggestions import active_checkpoint
from annotation_db.users import authenticate, has_accounts, is_loopback, local_user_name
from core.annotations import AnnotationFormatError
from core.checkpoint import CheckpointError
from core.diagnosis import (
    BatchCrop,
    BatchDiagnosis,
    CropResult,
    UploadsPolicy,
    ViewerCheckpoint,
    diagnose,
    diagnose_batch,
    diagnose_slide,
    find_checkpoints,
    load_viewer_checkpoint,
)
from core.errors import GlomError
from core.explain import CAM_METHODS, CLASS_AGNOSTIC, ExplainError, overlay
from core.extract import ExtractError
from core.slide_summary import DECISION_SUPPORT_NOTE, SlideSummary
from core.uploads import CheckedImage, UploadError, UploadLimits, check_upload
from core.viewer_store import (
    dataset_crops,
    dataset_slides,
    image_for_crop,
    record_disagreement,
    record_predictions,
)
from core.wsi import SlideError, default_slides_dir, is_slide_file, list_slide_files, open_slide

log = logging.getLogger("glomlab.viewer")

PREDICTED = "__predicted__"  # target-class choice: explain whatever the model predicts
NONE = "__none__"  # "versus" choice: no contrast
MAX_BATCH = 200
UPLOAD_LIMITS = UploadLimits()
STORE_REF_PREFIX = "store:"
MAX_ANNOTATION_BYTES = 50 * 1024 * 1024
ANNOTATION_TYPES = [".geojson", ".json", ".xml", ".csv", ".tsv"]
# Uploaded crops are kept by content hash (one file per distinct crop) so their predictions feed
# the labeling app's queues; past this many the viewer still predicts but keeps no new upload.
DEFAULT_MAX_UPLOADS = 10_000


# --- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What the viewer serves and where it writes; ``main`` builds it from the command line."""

    runs_dir: Path
    checkpoint: Path | None
    data_root: Path
    db_url: str | None
    slides_dir: Path | None
    max_uploads: int = DEFAULT_MAX_UPLOADS  # distinct uploaded crops kept (0: none)
    single_user: bool = False  # loopback without a login: disagreements are the local user's
    auth: str | None = None  # user:password[,user:password]; None: the store's accounts, if any

    @classmethod
    def from_env(cls) -> Settings:
        """The environment's settings: what a process that imports ``demo`` (tests) serves."""
        ckpt = os.environ.get("GLOM_VIEWER_CHECKPOINT")
        slides = default_slides_dir()
        return cls(Path(os.environ.get("GLOM_RUNS", "runs")), Path(ckpt) if ckpt else None,
                   Path(os.environ.get("GLOM_DATA_ROOT", "data")), os.environ.get("GLOM_DB"),
                   Path(slides) if slides else None,
                   int(os.environ.get("GLOM_VIEWER_MAX_UPLOADS") or DEFAULT_MAX_UPLOADS),
                   os.environ.get("GLOM_SINGLE_USER", "") not in ("", "0"), os.environ.get("GLOM_VIEWER_AUTH"))


_configured: Settings | None = None


def configure(settings: Settings | None) -> None:
    """Serve every request of this process with ``settings`` (``main`` does); None: the environment's."""
    global _configured
    _configured = settings


def current_settings() -> Settings:
    return _configured if _configured is not None else Settings.from_env()


def parse_auth(text: str | None) -> list[tuple[str, str]] | None:
    """``user:password[,user:password]`` → Gradio's auth list (None: no login)."""
    if not text:
        return None
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise SystemExit("GLOM_VIEWER_AUTH must be user:password[,user:password]")
        pairs.append((user, password))
    return pairs


def _store_login(username: str, password: str) -> bool:
    """Gradio's login check against the store's accounts (argon2id)."""
    with _sessionmaker().begin() as s:
        return authenticate(s, username, password) is not None


def viewer_auth(settings: Settings):
    """The login: ``settings.auth`` pairs when set, else the store's accounts once any exists,
    else None (no login: allowed on loopback only, and then nothing is written in anyone's name)."""
    pairs = parse_auth(settings.auth)
    if pairs is not None:
        return pairs
    with _sessionmaker()() as s:
        return _store_login if has_accounts(s) else None


# --- errors in the page, not stack traces ------------------------------------------------------

NOT_KEPT = ("<small>This upload was not kept (the viewer's limit of stored uploads is reached): its prediction "
            "is not stored for the labeling app.</small>")

def _clinician_errors(fn: Callable) -> Callable:
    """Show named errors (:class:`GlomError`) as a message in the page; log any other exception,
    a bug, with its trace and say only that something unexpected happened."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except GlomError as e:
            raise gr.Error(str(e), title=_error_title(e)) from None
        except Exception as e:  # noqa: BLE001 - the page must say something; the log keeps the trace
            log.exception("viewer request failed")
            raise gr.Error(f"Unexpected error ({type(e).__name__}); the server log has the details.") from None

    return wrapper


def _error_title(e: Exception) -> str:
    if isinstance(e, UploadError):
        return "Image refused"
    if isinstance(e, CheckpointError):
        return "Checkpoint problem"
    if isinstance(e, StoreError):
        return "Store"
    if isinstance(e, (SlideError, ExtractError)):
        return "Slide"
    if isinstance(e, AnnotationFormatError):
        return "Annotations"
    if isinstance(e, SignInRequired):
        return "Sign in"
    return "Cannot do that"


# --- helpers -------------------------------------------------------------------------------------


def _sessionmaker():
    return open_store(current_settings().db_url)


def _checkpoint(value: str | None) -> ViewerCheckpoint:
    """The checkpoint the dropdown names; only files under the runs folder or the --checkpoint one."""
    settings = current_settings()
    if not value:
        if settings.checkpoint is None:
            raise CheckpointError("choose a checkpoint first (none found under "
                                  f"{settings.runs_dir}/; train one with `glom train --recipe recipes/quick.yaml`)")
        value = str(settings.checkpoint)
    path = Path(value)
    if not path.is_absolute() and not path.exists():
        path = settings.runs_dir / path
    path = path.with_suffix(".safetensors").resolve()
    allowed = path.is_relative_to(settings.runs_dir.resolve()) or (
        settings.checkpoint is not None and path == settings.checkpoint.with_suffix(".safetensors").resolve())
    if not allowed:
        raise CheckpointError(f"{value} is not a checkpoint under the runs folder {settings.runs_dir}")
    return load_viewer_checkpoint(path, settings.runs_dir)


def _image(path: str | None) -> CheckedImage:
    if not path:
        raise UploadError("upload a crop first (PNG, JPEG, TIFF, BMP or WebP)")
    return check_upload(path, UPLOAD_LIMITS)


def _label_value(ckpt: ViewerCheckpoint, r: CropResult) -> dict[str, float]:
    names = ckpt.display_names
    return {_pretty(names.get(k, k), k): p for k, p in r.ranked}


def _pretty(display: str, key: str) -> str:
    return display if display == key else f"{display} ({key})"


def _result_markdown(ckpt: ViewerCheckpoint, r: CropResult, extra: str = "") -> str:
    names = ckpt.display_names
    top, p = r.ranked[0]
    second, p2 = r.ranked[1] if len(r.ranked) > 1 else (top, 0.0)
    sure = "uncertain, review closely" if r.margin < 0.2 else ("fairly sure" if r.margin < 0.6 else "confident")
    cal = (f"calibrated (temperature {ckpt.predictor.temperature:.2f})" if ckpt.calibrated
           else "not calibrated (no temperature in the checkpoint)")
    lines = [f"### Predicted: **{_pretty(names.get(top, top), top)}** — {100 * p:.1f}%",
             f"Runner-up {_pretty(names.get(second, second), second)} {100 * p2:.1f}% · margin {r.margin:.2f} ({sure})",
             f"<small>Checkpoint `{ckpt.id}` · {ckpt.predictor.meta.architecture} · probabilities {cal}</small>"]
    if extra:
        lines.append(extra)
    return "\n\n".join(lines)


def _class_choices(ckpt: ViewerCheckpoint) -> list[tuple[str, str]]:
    return [(_pretty(ckpt.display_names.get(k, k), k), k) for k in ckpt.classes]


def _target(value: str | None) -> str | None:
    return None if value in (None, "", PREDICTED) else value


def _versus(value: str | None) -> str | None:
    return None if value in (None, "", NONE) else value


class SignInRequired(GlomError, ValueError):
    """A write that is attributed to a person needs to know who that is."""


def _signed_in_user(request: gr.Request | None) -> str:
    """Who is logged in (Gradio's login); in single-user mode the local user. Never a name typed
    into the page or sent to the API: labels are written only in the name of whoever signed in."""
    user = (getattr(request, "username", None) or "").strip() if request is not None else ""
    if user:
        return user
    if current_settings().single_user:
        return local_user_name()
    raise SignInRequired("sign in to record a disagreement: this viewer runs without a login, so it cannot tell "
                         "who you are (start it with accounts: `glom user add NAME`, or --single-user on loopback)")


def _store_image_for(session, ckpt: ViewerCheckpoint, crop: CheckedImage, ref: str | None, *, keep: bool = False):
    """The store row for this crop: the picked store crop (``store:<id>``) or the stored upload
    (None when the upload cap is reached, unless ``keep``: a disagreement always keeps its crop)."""
    settings = current_settings()
    image_id = int(ref.removeprefix(STORE_REF_PREFIX)) if ref and ref.startswith(STORE_REF_PREFIX) else None
    return image_for_crop(session, crop, image_id, ckpt.classes, ckpt.display_names, settings.data_root,
                          None if keep else settings.max_uploads)


# --- handlers (one per endpoint) -----------------------------------------------------------------


def _active_models() -> dict[str, list[str]]:
    """Checkpoint path → the datasets whose active model it is."""
    out: dict[str, list[str]] = {}
    with _sessionmaker()() as s:
        for ds in list_datasets(s):
            path = active_checkpoint(s, ds)
            if path:
                out.setdefault(str(Path(path).resolve()), []).append(ds.name)
    return out


@_clinician_errors
def list_checkpoints() -> gr.Dropdown:
    """Checkpoints under the runs folder, newest first, the datasets' active models before the rest;
    the one given on the command line first of all."""
    settings = current_settings()
    paths = find_checkpoints(settings.runs_dir)
    choices = []
    for p in paths:
        try:
            choices.append((p.relative_to(settings.runs_dir).as_posix(), str(p)))
        except ValueError:
            choices.append((str(p), str(p)))
    # The datasets' active models (set on the labeling app's Models page) come first, named so;
    # one outside the runs folder, or gone, is not offered.
    try:
        active = _active_models()
    except (StoreError, SQLAlchemyError):
        log.warning("could not read the datasets' active models", exc_info=True)
        active = {}
    first = [(f"{label} (active model of {', '.join(active[str(Path(v).resolve())])})", v)
             for label, v in choices if str(Path(v).resolve()) in active]
    choices = first + [c for c in choices if str(Path(c[1]).resolve()) not in active]
    if settings.checkpoint is not None and str(settings.checkpoint) not in [v for _, v in choices]:
        choices.insert(0, (f"{settings.checkpoint} (command line)", str(settings.checkpoint)))
    value = str(settings.checkpoint) if settings.checkpoint else (choices[0][1] if choices else None)
    return gr.Dropdown(choices=choices, value=value)


@_clinician_errors
def checkpoint_info(checkpoint: str | None):
    """What the chosen checkpoint is, and its classes for the target / disagree selectors."""
    if not checkpoint:
        return ("No checkpoint yet: train one (`glom train --recipe recipes/quick.yaml`) or start the "
                "viewer with `--checkpoint`.", gr.Dropdown(), gr.Dropdown(), gr.Dropdown())
    ckpt = _checkpoint(checkpoint)
    meta = ckpt.predictor.meta
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in (meta.metrics or {}).items()
                        if isinstance(v, (int, float)) and k.startswith(("test_", "val_")))
    size = meta.preprocess.get("input_size", ["?"])[-1]
    info = (f"**{meta.architecture}** · input {size} px · classes: "
            + ", ".join(f"`{k}`" for k in ckpt.classes)
            + (f" · temperature {ckpt.predictor.temperature:.2f}" if ckpt.calibrated else " · uncalibrated")
            + (f"<br><small>{metrics}</small>" if metrics else ""))
    choices = _class_choices(ckpt)
    return (info, gr.Dropdown(choices=[("Predicted class", PREDICTED), *choices], value=PREDICTED),
            gr.Dropdown(choices=[("—", NONE), *choices], value=NONE), gr.Dropdown(choices=choices, value=None))


@_clinician_errors
def predict(checkpoint: str | None, image: str | None, crop_ref: str | None = "") -> tuple[dict, str]:
    """Class probabilities for one crop; the prediction is stored for the labeling app's queues."""
    ckpt, crop = _checkpoint(checkpoint), _image(image)
    [r] = diagnose(ckpt, [crop.rgb], method=None)
    with _sessionmaker().begin() as s:
        stored = _store_image_for(s, ckpt, crop, crop_ref)
        if stored is not None:
            record_predictions(s, [(stored, r.probs)], ckpt.id)
    return _label_value(ckpt, r), _result_markdown(ckpt, r, "" if stored is not None else NOT_KEPT)


def _analyse(checkpoint, image, method, target, versus, opacity, crop_ref, record: bool):
    ckpt, crop = _checkpoint(checkpoint), _image(image)
    method = method or "gradcam"
    [r] = diagnose(ckpt, [crop.rgb], method=method, target_class=_target(target), versus_class=_versus(versus))
    if record:
        with _sessionmaker().begin() as s:
            stored = _store_image_for(s, ckpt, crop, crop_ref)
            if stored is not None:
                record_predictions(s, [(stored, r.probs)], ckpt.id)
    names = ckpt.display_names
    explained = _target(target) or r.predicted
    what = f"Heatmap: **{CAM_METHODS[method][1]}** for *{names.get(explained, explained)}*"
    if _versus(versus) and method not in CLASS_AGNOSTIC:
        what += f" rather than *{names.get(_versus(versus), _versus(versus))}*"
    if method in CLASS_AGNOSTIC:
        what += " (this method ignores the class choice)"
    what += ". Warm colours: regions that raised the score."
    shown = _display_rgb(crop.rgb)
    return (_label_value(ckpt, r), _result_markdown(ckpt, r, what), shown,
            overlay(shown, r.heat, float(opacity)), {"heat": r.heat, "rgb": shown})


@_clinician_errors
def cam(checkpoint: str | None, image: str | None, method: str = "gradcam", target: str | None = PREDICTED,
        versus: str | None = NONE, opacity: float = 0.45):
    """Probabilities plus the heatmap beside the original (API: writes nothing to the store)."""
    return _analyse(checkpoint, image, method, target, versus, opacity, "", record=False)


@_clinician_errors
def analyse_in_page(checkpoint, image, method, target, versus, opacity, crop_ref):
    return _analyse(checkpoint, image, method, target, versus, opacity, crop_ref, record=True)


def reblend(state: dict | None, opacity: float):
    """Opacity changes redraw the overlay from the kept heatmap; nothing is recomputed."""
    if not state:
        return gr.Image()
    return overlay(state["rgb"], state["heat"], float(opacity))


def _display_rgb(rgb: np.ndarray, max_side_px: int = 512) -> np.ndarray:
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side_px:
        return rgb
    from PIL import Image as PILImage

    scale = max_side_px / max(h, w)
    return np.asarray(PILImage.fromarray(rgb).resize((round(w * scale), round(h * scale)), PILImage.BILINEAR))


def _uploads_policy() -> UploadsPolicy:
    settings = current_settings()
    return UploadsPolicy(settings.data_root, settings.max_uploads)


def _batch_outputs(ckpt: ViewerCheckpoint, out: BatchDiagnosis, opacity: float, notes: str = ""):
    """Gallery (most uncertain first, heatmaps blended), CSV, summary and the gallery's state:
    for each shown crop its own file and store reference, so a click opens that very crop."""
    names = ckpt.display_names
    gallery = []
    for d in out.shown:
        r, c = d.result, d.crop
        pic = _display_rgb(c.image.rgb, 256)
        pic = overlay(pic, r.heat, float(opacity)) if r.heat is not None else pic
        note = "" if c.annotated is None else f" · annotated {names.get(c.annotated, c.annotated)}"
        gallery.append((pic, f"#{d.rank} {names.get(r.predicted, r.predicted)} {100 * r.probs[r.predicted]:.0f}% "
                             f"(margin {r.margin:.2f}){note} · {c.image.name}"))
    md, table = _summary_outputs(ckpt, out.summaries)
    if out.agreement is not None:
        agree, n = out.agreement
        md = (f"Annotated classes: the model agrees on **{agree} of {n}** annotated glomeruli "
              f"(the CSV's `annotated` column beside `predicted`).\n\n") + md
    if out.n_shown < len(out.crops):
        md = (f"Gallery: the {out.n_shown} most uncertain of {len(out.crops)} crops; the CSV and the summary cover "
              "all.\n\n") + md
    state = {"refs": [f"{STORE_REF_PREFIX}{d.image_id}" if d.image_id is not None else "" for d in out.shown],
             "names": [d.crop.image.name for d in out.shown], "files": [str(d.crop.file) for d in out.shown]}
    return gallery, str(out.csv_path), (notes + "\n\n" + md) if notes else md, table, state


@_clinician_errors
def batch(checkpoint: str | None, files: list[str] | None, method: str | None = "gradcam", opacity: float = 0.45):
    """Many uploaded crops: gallery most-uncertain first with heatmaps, CSV of every prediction,
    and the counts summary. Predictions (and the crops) go to the store."""
    ckpt = _checkpoint(checkpoint)
    if not files:
        raise UploadError("add one or more crops first")
    if len(files) > MAX_BATCH:
        raise UploadError(f"{len(files)} files: at most {MAX_BATCH} crops per batch")
    crops = [BatchCrop(check_upload(f, UPLOAD_LIMITS), Path(f)) for f in files]
    out = diagnose_batch(ckpt, crops, _sessionmaker(), uploads=_uploads_policy(), method=method)
    return _batch_outputs(ckpt, out, opacity)


@_clinician_errors
def store_batch(checkpoint: str | None, dataset: str | None, slide: str | None = "", method: str | None = "gradcam",
                opacity: float = 0.45, limit: int = 64):
    """Crops of a store dataset (one slide, or all): same outputs as /batch, summary per slide."""
    ckpt = _checkpoint(checkpoint)
    if not dataset:
        raise StoreError("choose a dataset from the store")
    with _sessionmaker()() as s:
        ds = get_dataset(s, dataset)
        missing = set(ckpt.classes) - set(ds.class_keys)
        if missing:
            raise StoreError(f"dataset {dataset!r} (classes {ds.class_keys}) does not have this checkpoint's "
                             f"classes {sorted(missing)}")
        items = dataset_crops(s, dataset, slide or None, limit=int(limit))
    if not items:
        raise StoreError(f"no crops in {dataset!r}" + (f" for slide {slide!r}" if slide else ""))
    crops = [BatchCrop(check_upload(it.path, UPLOAD_LIMITS), it.path, it.slide, it.image_id) for it in items]
    out = diagnose_batch(ckpt, crops, _sessionmaker(), uploads=None, method=method)
    return _batch_outputs(ckpt, out, opacity)


def _slide_file(name: str | None) -> Path:
    """A slide of the server's slides folder, by file name (nothing outside that folder)."""
    folder = current_settings().slides_dir
    if folder is None or not folder.is_dir():
        raise SlideError("no slides folder on the server: start the viewer with --slides DIR (or set GLOM_SLIDES_DIR)")
    if not name:
        raise SlideError(f"choose a slide from {folder}")
    if Path(name).name != name or not is_slide_file(folder / name):  # one file of that folder, nothing else
        raise SlideError(f"{name!r} is not a slide in {folder} (pick one from the list)")
    return folder / name


def _annotation_file(path: str | None) -> Path | None:
    if not path:
        return None
    f = Path(path)
    if f.suffix.lower() not in ANNOTATION_TYPES:
        raise AnnotationFormatError(f"{f.name}: annotations must be QuPath GeoJSON (.geojson/.json), Aperio ImageScope "
                                    "or ASAP XML (.xml) or a CSV of boxes (.csv)")
    if f.stat().st_size > MAX_ANNOTATION_BYTES:
        raise AnnotationFormatError(f"{f.name}: {f.stat().st_size / 2**20:.0f} MB, at most "
                                    f"{MAX_ANNOTATION_BYTES // 2**20} MB of annotations")
    return f


@_clinician_errors
def slide_batch(checkpoint: str | None, slide: str | None, annotations: str | None = None,
                slide_mpp: float | None = None, method: str | None = "gradcam", opacity: float = 0.45,
                limit: int = 64, progress: gr.Progress = gr.Progress()):
    """A whole slide with its annotations: one crop per annotated glomerulus (through the whole-slide
    code, kept in the store with slide and box), predicted; same outputs as /batch, the summary
    for this slide. Annotations: an uploaded file, else the boxes drawn in the labeling app."""
    ckpt = _checkpoint(checkpoint)
    path = _slide_file(slide)
    ann_file = _annotation_file(annotations)
    mpp = float(slide_mpp) if slide_mpp else None
    if mpp is not None and not 0.01 <= mpp <= 100:
        raise SlideError(f"slide µm/px {mpp} is not plausible (0.01–100)")
    with open_slide(path, fallback_mpp=mpp) as wsi:
        if wsi.mpp is None:
            raise SlideError(f"{path.name} records no µm/px: enter it under 'Slide µm/px' (about 0.25 for a 40× "
                             "scan, 0.5 for 20×) so its glomeruli are cut at 0.5 µm/px like the training crops")
    done = diagnose_slide(ckpt, path, ann_file, _sessionmaker(), data_root=current_settings().data_root, mpp=mpp,
                          method=method, show=int(limit or 64), limits=UPLOAD_LIMITS,
                          on_progress=lambda fraction, message: progress(fraction, desc=message))
    cut, rep = done.cut, done.cut.report
    notes = [f"**{path.name}**: {len(cut.crops)} glomeruli from {cut.n_annotations} annotations ({done.origin}); "
             f"{rep.written} crops cut now, {rep.skipped_existing} reused."]
    for kind, problems in (("clipped at the slide edge", rep.clipped), ("refused", rep.refused)):
        if problems:
            notes.append(f"{len(problems)} {kind}: " + "; ".join(p.reason for p in problems[:3])
                         + (" …" if len(problems) > 3 else ""))
    if cut.ignored_labels:
        notes.append("Annotation classes that are not classes of this checkpoint (shown as unannotated): "
                     + ", ".join(f"{k} ×{n}" for k, n in sorted(cut.ignored_labels.items())))
    return _batch_outputs(ckpt, done.batch, opacity, "\n\n".join(notes))


def list_wsi() -> gr.Dropdown:
    """Whole-slide images in the server's slides folder."""
    folder = current_settings().slides_dir
    names = list_slide_files(folder) if folder is not None else []
    return gr.Dropdown(choices=names, value=names[0] if names else None)


def _summary_outputs(ckpt: ViewerCheckpoint, summaries: list[SlideSummary]):
    names = ckpt.display_names
    parts = []
    for sm in summaries:
        counts = ", ".join(f"{names.get(k, k)} {n} ({sm.percent[k]:.0f}%)" for k, n in sm.counts.items())
        parts.append(f"**{sm.slide}** — {sm.n_glomeruli} glomeruli: {counts}")
        if sm.mestc is not None:
            parts.append(f"&nbsp;&nbsp;MEST-C-style: **{sm.mestc.code}** — " + " ".join(sm.mestc.explain()))
    parts.append(f"<small>⚠ {DECISION_SUPPORT_NOTE}</small>")
    header = ["slide", "glomeruli", *[f"{k} n (%)" for k in ckpt.classes], "MEST-C-style"]
    table = [[sm.slide, sm.n_glomeruli, *[f"{sm.counts[k]} ({sm.percent[k]:.0f}%)" for k in ckpt.classes],
              sm.mestc.code if sm.mestc else "n/a (schema)"] for sm in summaries]
    return "\n\n".join(parts), gr.Dataframe(value=table, headers=header)


@_clinician_errors
def slide_summary(checkpoint: str | None, dataset: str | None, slide: str | None = ""):
    """Per slide: number of glomeruli, counts and percentages per class, MEST-C-style summary."""
    _, _, md, table, _ = store_batch(checkpoint, dataset, slide, None, 0.0, limit=MAX_BATCH * 5)
    return md, table


@_clinician_errors
def disagree(checkpoint: str | None, image: str | None, correct: str | None, crop_ref: str | None = "",
             request: gr.Request = None) -> str:
    """The signed-in clinician's class for this crop; the crop enters the disagreement queue."""
    who = _signed_in_user(request)
    ckpt, crop = _checkpoint(checkpoint), _image(image)
    if not correct or correct not in ckpt.classes:
        raise ExplainError(f"pick the right class (one of {', '.join(ckpt.classes)})")
    [r] = diagnose(ckpt, [crop.rgb], method=None)
    with _sessionmaker().begin() as s:
        image_row = _store_image_for(s, ckpt, crop, crop_ref, keep=True)
        res = record_disagreement(s, image_row, who, correct, r.predicted, r.probs, ckpt.id)
    names = ckpt.display_names
    return (f"✔ Recorded: **{who}** labels this crop *{names.get(correct, correct)}* (model: "
            f"*{names.get(r.predicted, r.predicted)}*). Crop #{res.image_id} in dataset `{res.dataset}` is now in "
            "the labeling app's disagreement queue.")


def list_store_datasets() -> gr.Dropdown:
    try:
        with _sessionmaker()() as s:
            names = [d.name for d in list_datasets(s)]
    except StoreError as e:
        log.warning("store unavailable: %s", e)
        names = []
    return gr.Dropdown(choices=names, value=names[0] if names else None)


def list_slides(dataset: str | None) -> gr.Dropdown:
    if not dataset:
        return gr.Dropdown(choices=[("All slides", "")], value="")
    try:
        with _sessionmaker()() as s:
            slides = dataset_slides(s, dataset)
    except StoreError:
        slides = []
    return gr.Dropdown(choices=[("All slides", ""), *[(x, x) for x in slides]], value="")


def pick_from_gallery(state: dict | None, evt: gr.SelectData):
    """A click in the gallery opens that crop in the single-crop view (with its store reference)."""
    if not state or evt.index is None or evt.index >= len(state["files"]):
        return gr.File(), "", gr.Tabs()
    src = Path(state["files"][evt.index])
    # Store crops live under their dataset root, which Gradio does not serve: hand it a copy
    # (same bytes, so the store reference still matches by content hash).
    copy = Path(tempfile.mkdtemp(prefix="glom-viewer-pick-")) / src.name
    copy.write_bytes(src.read_bytes())
    return str(copy), state["refs"][evt.index], gr.Tabs(selected="crop")


# --- the page ------------------------------------------------------------------------------------

THEME = gr.themes.Soft(primary_hue="teal", secondary_hue="slate", neutral_hue="slate",
                       font=["system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"])
CSS = """
#glom-header {border-bottom: 2px solid var(--color-accent-soft); padding-bottom: 2px}
.glom-note {font-size: 0.85em; color: var(--body-text-color-subdued)}
footer {display: none !important}
"""

with gr.Blocks(title="GlomLab · Diagnosis viewer", analytics_enabled=False) as demo:
    gr.Markdown("## GlomLab · Diagnosis viewer\n"
                "<span class='glom-note'>Model predictions with heatmaps for glomerulus crops. Decision support for "
                "review by a nephropathologist, not a diagnosis.</span>", elem_id="glom-header")
    with gr.Row():
        checkpoint_dd = gr.Dropdown(label="Checkpoint (runs folder)", choices=[], allow_custom_value=True, scale=3)
        refresh_btn = gr.Button("↻ Refresh", scale=0, min_width=90)
        checkpoint_md = gr.Markdown(elem_classes="glom-note")
    crop_ref = gr.Textbox(visible=False, value="")
    heat_state = gr.State(None)
    batch_state = gr.State(None)
    with gr.Tabs() as tabs:
        with gr.Tab("Crop", id="crop"):
            with gr.Row():
                with gr.Column(scale=2):
                    # A file input, not gr.Image: every upload reaches core.uploads' checks before
                    # anything decodes it (the original is shown on the right once it passed).
                    image_in = gr.File(label="Glomerulus crop (PNG, JPEG, TIFF, BMP, WebP)", file_count="single",
                                       file_types=["image"], type="filepath", height=120, elem_id="crop-input")
                    method_dd = gr.Dropdown(label="Heatmap method", value="gradcam",
                                            choices=[(label, k) for k, (_, label) in CAM_METHODS.items()])
                    with gr.Row():
                        target_dd = gr.Dropdown(label="Explain class (why this?)", value=PREDICTED,
                                                choices=[("Predicted class", PREDICTED)], allow_custom_value=True)
                        versus_dd = gr.Dropdown(label="…rather than (why not that?)", value=NONE,
                                                choices=[("—", NONE)], allow_custom_value=True)
                    opacity = gr.Slider(0.0, 1.0, value=0.45, step=0.05, label="Heatmap opacity")
                    analyse_btn = gr.Button("Analyse crop", variant="primary", elem_id="analyse")
                with gr.Column(scale=3):
                    probs_out = gr.Label(label="Class probabilities", num_top_classes=6, elem_id="probs")
                    result_md = gr.Markdown(elem_id="result")
                    with gr.Row():
                        original_out = gr.Image(label="Original", interactive=False, height=280)
                        overlay_out = gr.Image(label="Heatmap", interactive=False, height=280, elem_id="heatmap")
                    with gr.Accordion("I disagree", open=False):
                        correct_radio = gr.Dropdown(label="The right class is", choices=[], allow_custom_value=True)
                        disagree_btn = gr.Button("Record my label", variant="stop")
                        disagree_md = gr.Markdown()
        with gr.Tab("Batch", id="batch"):
            with gr.Row():
                with gr.Column():
                    files_in = gr.File(label="Crops (several)", file_count="multiple", file_types=["image"],
                                       height=140)
                    batch_btn = gr.Button("Predict uploaded crops", variant="primary")
                with gr.Column():
                    dataset_dd = gr.Dropdown(label="…or a dataset from the store", choices=[], allow_custom_value=True)
                    slide_dd = gr.Dropdown(label="Slide / biopsy", choices=[("All slides", "")], value="",
                                           allow_custom_value=True)
                    limit_nb = gr.Number(label="At most this many crops (store) · in the gallery (slide)", value=64,
                                         precision=0, minimum=1, maximum=MAX_BATCH)
                    store_btn = gr.Button("Predict store crops")
                with gr.Column():
                    wsi_dd = gr.Dropdown(label="…or a whole slide (server's slides folder)", choices=[],
                                         allow_custom_value=True, elem_id="wsi")
                    ann_in = gr.File(label="Its annotations (GeoJSON, XML, CSV)", file_count="single",
                                     file_types=ANNOTATION_TYPES, type="filepath", height=120,
                                     elem_id="wsi-annotations")
                    mpp_nb = gr.Number(label="Slide µm/px (0: the slide's own; needed only when it records none)",
                                       value=None, minimum=0, elem_id="wsi-mpp")
                    wsi_btn = gr.Button("Cut and predict the slide's glomeruli", elem_id="wsi-run")
            gr.Markdown("<span class='glom-note'>Whole slide: annotations from QuPath (GeoJSON), Aperio ImageScope or "
                        "ASAP (XML) or a CSV of boxes; without a file, the boxes drawn on the slide in the labeling "
                        "app's Slide workspace. Its glomeruli are cut at 0.5 µm/px and kept in the store (dataset "
                        "`viewer-slides`) with their slide and position. Larger runs: `glom extract`, then pick the "
                        "dataset above.</span>")
            batch_method = gr.Dropdown(label="Heatmap in gallery", value="gradcam",
                                       choices=[("None (faster)", ""), *[(lbl, k) for k, (_, lbl) in CAM_METHODS.items()
                                                                        if k != "scorecam"]])
            gallery = gr.Gallery(label="Most uncertain first (click to open)", columns=6, height=420,
                                 object_fit="contain", elem_id="gallery")
            csv_out = gr.File(label="All predictions (CSV)")
            summary_md = gr.Markdown()
            summary_table = gr.Dataframe(label="Per slide / biopsy", interactive=False)

    # Page load: fill the pickers (nothing is loaded at import).
    demo.load(list_checkpoints, None, checkpoint_dd, api_name="checkpoints")
    demo.load(list_store_datasets, None, dataset_dd, api_visibility="private")
    demo.load(list_wsi, None, wsi_dd, api_name="slides")
    refresh_btn.click(list_checkpoints, None, checkpoint_dd, api_visibility="private")
    checkpoint_dd.change(checkpoint_info, checkpoint_dd, [checkpoint_md, target_dd, versus_dd, correct_radio],
                         api_name="checkpoint_info")
    dataset_dd.change(list_slides, dataset_dd, slide_dd, api_visibility="private")

    analysis_outputs = [probs_out, result_md, original_out, overlay_out, heat_state]
    image_in.upload(lambda: "", None, crop_ref, api_visibility="private").then(
        analyse_in_page, [checkpoint_dd, image_in, method_dd, target_dd, versus_dd, opacity, crop_ref],
        analysis_outputs, api_visibility="private")
    analyse_btn.click(analyse_in_page, [checkpoint_dd, image_in, method_dd, target_dd, versus_dd, opacity, crop_ref],
                      analysis_outputs, api_visibility="private")
    opacity.release(reblend, [heat_state, opacity], overlay_out, api_visibility="private")
    disagree_btn.click(disagree, [checkpoint_dd, image_in, correct_radio, crop_ref], disagree_md,
                       api_name="disagree")
    batch_outputs = [gallery, csv_out, summary_md, summary_table, batch_state]
    batch_btn.click(batch, [checkpoint_dd, files_in, batch_method, opacity], batch_outputs, api_name="batch")
    store_btn.click(store_batch, [checkpoint_dd, dataset_dd, slide_dd, batch_method, opacity, limit_nb],
                    batch_outputs, api_name="store_batch")
    wsi_btn.click(slide_batch, [checkpoint_dd, wsi_dd, ann_in, mpp_nb, batch_method, opacity, limit_nb],
                  batch_outputs, api_name="slide_batch")
    gallery.select(pick_from_gallery, batch_state, [image_in, crop_ref, tabs], api_visibility="private")

    # API-only endpoints on hidden triggers, so inputs go through the same components
    # (upload checks, file handling) as in the page.
    api_predict, api_cam, api_summary = (gr.Button(visible=False) for _ in range(3))
    api_predict.click(predict, [checkpoint_dd, image_in, crop_ref], [probs_out, result_md], api_name="predict")
    api_cam.click(cam, [checkpoint_dd, image_in, method_dd, target_dd, versus_dd, opacity],
                  [probs_out, result_md, original_out, overlay_out], api_name="cam")
    api_summary.click(slide_summary, [checkpoint_dd, dataset_dd, slide_dd], [summary_md, summary_table],
                      api_name="slide_summary")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a .safetensors checkpoint (with its .json) to open first")
    parser.add_argument("--runs", default=os.environ.get("GLOM_RUNS", "runs"), help="folder of training runs")
    parser.add_argument("--db", help="store URL (default $GLOM_DB or sqlite:///data/glomlab.db)")
    parser.add_argument("--data-root", default=os.environ.get("GLOM_DATA_ROOT", "data"),
                        help="where uploaded crops are kept (under <data-root>/viewer-uploads*)")
    parser.add_argument("--slides", default=os.environ.get("GLOM_SLIDES_DIR"),
                        help="folder of whole-slide images to offer (default $GLOM_SLIDES_DIR, else ../shared/data/wsi)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--single-user", action="store_true",
                        help="loopback only: no login, disagreements attributed to $GLOM_LOCAL_USER (or your login)")
    parser.add_argument("--max-uploads", type=int, default=None,
                        help=f"distinct uploaded crops kept in the store (default {DEFAULT_MAX_UPLOADS}; 0: none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.single_user and not is_loopback(args.host):
        parser.error(f"--single-user needs a loopback address, not {args.host}")
    slides = args.slides or default_slides_dir()
    settings = Settings(
        runs_dir=Path(args.runs), checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        data_root=Path(args.data_root), db_url=args.db or os.environ.get("GLOM_DB"),
        slides_dir=Path(slides) if slides else None,
        max_uploads=args.max_uploads if args.max_uploads is not None
        else int(os.environ.get("GLOM_VIEWER_MAX_UPLOADS") or DEFAULT_MAX_UPLOADS),
        single_user=args.single_user, auth=os.environ.get("GLOM_VIEWER_AUTH"))
    configure(settings)
    auth = None if args.single_user else viewer_auth(settings)
    if auth is None and not is_loopback(args.host):
        parser.error(f"binding {args.host} needs a login: create accounts (`glom user add NAME`) or set "
                     "GLOM_VIEWER_AUTH=user:password")
    demo.queue(default_concurrency_limit=2).launch(
        server_name=args.host, server_port=args.port, auth=auth, max_file_size=UPLOAD_LIMITS.max_bytes,
        theme=THEME, css=CSS, footer_links=["api"], show_error=False, ssr_mode=False)


if __name__ == "__main__":
    main()
