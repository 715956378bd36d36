"""Running training jobs outside the app: one process per job, the store as the only shared state.

    glom jobs run 7             # run job 7 here, in the foreground
    glom jobs run --worker      # a GPU server: run queued jobs one at a time, forever
    glom jobs run --until-empty # what the Models page starts: run what is queued, then exit

A job process claims its row (pid, host, device), writes everything it says to
``<runs>/jobs/job-<id>.log``, trains ``core.train.run_training`` into ``<runs>/jobs/job-<id>/``, then
predicts every image of the dataset with the best checkpoint (batched, on the GPU when there is
one) into ``Prediction`` rows, so the model-uncertain queue re-orders at once. A named error ends
the job ``failed`` with its one ``error:`` line; anything else keeps its traceback in the log and
the page says where to look.

One job at a time per device: a runner holds an exclusive lock file per (host, device) while its
job runs, so two runners on one machine queue instead of sharing a GPU. Cancelling signals the
job's process group (it runs in a session of its own); a runner on another machine sees the
store's cancel flag after the next epoch.
"""

from __future__ import annotations

import csv
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from annotation_db import jobs as job_store
from annotation_db.models import Dataset, Image, Job, Prediction
from annotation_db.store import prediction_margin
from core.errors import GlomError

log = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURES",
    "INPUT_SIZES_PX",
    "JobCancelled",
    "cancel_job",
    "default_runs_dir",
    "job_overrides",
    "list_recipes",
    "log_error_line",
    "predict_dataset",
    "read_metrics",
    "recipes_dir",
    "resolve_device",
    "run_job",
    "run_queue",
    "start_runner",
]

REPO = Path(__file__).resolve().parents[1]
# What the Models page lets a user change in a recipe: small, safe, typed.
ARCHITECTURES = ("efficientnet_lite0", "resnet18", "resnet50", "test_resnet")
INPUT_SIZES_PX = (64, 96, 128, 160, 224, 256, 299, 384)
MAX_EPOCHS = 200
PREDICT_BATCH = 64


class JobCancelled(GlomError):
    """The job was cancelled while it ran."""


def default_runs_dir() -> Path:
    """``$GLOM_RUNS`` (default ``runs``): where the viewer looks for checkpoints, too."""
    return Path(os.environ.get("GLOM_RUNS") or "runs").expanduser().resolve()


def recipes_dir() -> Path:
    """``$GLOM_RECIPES_DIR`` (tests point it at a tiny recipe), else the repository's ``recipes/``."""
    return Path(os.environ.get("GLOM_RECIPES_DIR") or REPO / "recipes").expanduser().resolve()


def list_recipes() -> list[Path]:
    return sorted(recipes_dir().glob("*.yaml"))


def job_overrides(epochs: int | None = None, input_size_px: int | None = None,
                  architecture: str | None = None) -> list[str]:
    """The Models page's overrides as ``key=value`` strings, checked against the allow-lists."""
    out = []
    if epochs is not None:
        if not 1 <= int(epochs) <= MAX_EPOCHS:
            raise job_store.JobError(f"epochs: {epochs} is outside 1…{MAX_EPOCHS}")
        out.append(f"train.epochs={int(epochs)}")
    if input_size_px is not None:
        if int(input_size_px) not in INPUT_SIZES_PX:
            raise job_store.JobError(f"input size: {input_size_px} px is not one of {INPUT_SIZES_PX}")
        out.append(f"preprocess.input_size={int(input_size_px)}")
    if architecture is not None:
        if architecture not in ARCHITECTURES:
            raise job_store.JobError(f"architecture {architecture!r} is not one of {', '.join(ARCHITECTURES)}")
        # another architecture cannot load the recipe's pretrained file
        out += [f"model.name={architecture}", "model.pretrained_file=", "model.pretrained=false"]
    return out


def resolve_device(pref: str = "auto") -> str:
    """The device name a job runs on (``auto`` resolved, a named one validated: :mod:`core.devices`)."""
    from core.devices import resolve_device as _resolve

    return str(_resolve(pref))


def jobs_dir(runs_dir: str | Path) -> Path:
    return Path(runs_dir) / "jobs"


# --- starting a runner from the app ---------------------------------------------------------------


def start_runner(db_url: str, *, device: str = "auto", log_dir: str | Path | None = None) -> int:
    """Start ``glom jobs run --until-empty`` detached (its own session: it outlives the app and
    a page reload); its pid. The store URL travels in the environment, not on the command line."""
    log_dir = Path(log_dir or jobs_dir(default_runs_dir()))
    log_dir.mkdir(parents=True, exist_ok=True)
    out = (log_dir / "runner.log").open("a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "core.cli", "jobs", "run", "--until-empty", "--device", device],
        cwd=REPO, env=dict(os.environ, GLOM_DB=db_url), stdout=out, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    out.close()
    # Reap it when it ends, so it does not linger as a zombie of a long-lived app process.
    threading.Thread(target=proc.wait, daemon=True).start()
    return proc.pid


# --- one job ---------------------------------------------------------------------------------------


@contextmanager
def _device_lock(runs_dir: Path, device: str, wait: bool) -> Iterator[bool]:
    """Hold ``<runs>/jobs/.device-<device>.lock`` (one job per device on this machine)."""
    path = jobs_dir(runs_dir) / f".device-{device.replace(':', '_')}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _spawn_job(job_id: int, device: str, db_url: str) -> int:
    """Run one job in a child process with a session (process group) of its own; its exit status."""
    proc = subprocess.Popen([sys.executable, "-m", "core.cli", "jobs", "run", str(job_id), "--device", device],
                            cwd=REPO, env=dict(os.environ, GLOM_DB=db_url), start_new_session=True,
                            stdin=subprocess.DEVNULL)
    return proc.wait()


def run_queue(Session: sessionmaker[Session], db_url: str, *, device: str = "auto", forever: bool = False,
              poll_s: float = 3.0, wait_for_device: bool = True) -> int:
    """Run queued jobs one after another, each in its own process; returns how many ran.

    ``forever``: keep polling (a GPU server); else stop when the queue is empty.
    """
    device = resolve_device(device)
    ran = 0
    while True:
        with Session() as s, s.begin():
            job_store.reap_lost(s)
            job = job_store.next_queued(s)
            job_id, runs_dir = (job.id, Path(job.runs_dir)) if job else (None, None)
        if job_id is None:
            if not forever:
                return ran
            time.sleep(poll_s)
            continue
        with _device_lock(runs_dir, device, wait_for_device) as held:
            if not held:
                return ran
            _spawn_job(job_id, device, db_url)
            ran += 1


def _job_config(job: Job, dataset_name: str, db_url: str, device: str):
    from core.config import load_config

    fixed = ["data.kind=store", f"data.dataset={dataset_name}", f"data.label_source={job.label_source}",
             f"output_dir={jobs_dir(job.runs_dir)}", f"name=job-{job.id}", f"train.device={device}",
             "data.path=", "data.root=", "data.centre_pattern="]
    cfg = load_config(job.recipe, list(job.overrides) + fixed)
    cfg.data.db_url = db_url
    return cfg


def _summary(meta: Any, label_source: str) -> dict[str, Any]:
    split = meta.split or {}
    return {"label_source": label_source, "sizes": split.get("sizes", {}), "group_by": split.get("group_by"),
            "classes": list(meta.classes), "epoch": meta.epoch, "architecture": meta.architecture,
            "input_size": (meta.preprocess or {}).get("input_size")}


def run_job(Session: sessionmaker[Session], job_id: int, db_url: str, *, device: str = "auto",
            predict_batch: int = PREDICT_BATCH) -> str:
    """Claim job ``job_id`` and run it in this process (train, then predict the dataset); the
    status it ended with. Errors end the job; they are recorded, not raised."""
    device = resolve_device(device)
    with Session() as s, s.begin():
        job = job_store.get_job(s, job_id)
        log_path = jobs_dir(job.runs_dir) / f"job-{job.id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if not job_store.claim_job(s, job_id, device=device, pid=os.getpid(), log_path=log_path):
            raise job_store.JobError(f"job #{job_id} is {job.status}, not queued: nothing to run")
    with _log_to(log_path), _cancel_on_sigterm():
        log.info("job %d on %s (pid %d)", job_id, device, os.getpid())
        try:
            _train_and_predict(Session, job_id, db_url, device, predict_batch)
        except (JobCancelled, KeyboardInterrupt):  # SIGTERM from cancel_job, or Ctrl-C in a terminal
            log.info("job %d cancelled", job_id)
            _finish(Session, job_id, "cancelled", error="cancelled")
            return "cancelled"
        except GlomError as e:
            line = f"error: {e}"
            log.error("%s", line)
            _finish(Session, job_id, "failed", error=line)
            return "failed"
        except Exception as e:  # noqa: BLE001 - a bug: its traceback belongs in the log, not on the page
            log.error("%s", traceback.format_exc())
            line = f"error: internal error ({type(e).__name__}); the traceback is in {log_path}"
            log.error("%s", line)
            _finish(Session, job_id, "failed", error=line)
            return "failed"
    _finish(Session, job_id, "done")
    return "done"


def _finish(Session: sessionmaker[Session], job_id: int, status: str, **kw: Any) -> None:
    with Session() as s, s.begin():
        job_store.finish_job(s, job_id, status, **kw)


def _check_cancel(Session: sessionmaker[Session], job_id: int) -> None:
    with Session() as s:
        if s.scalar(select(Job.cancel_requested).where(Job.id == job_id)):
            raise JobCancelled(f"job #{job_id} was cancelled")


def _train_and_predict(Session: sessionmaker[Session], job_id: int, db_url: str, device: str,
                       predict_batch: int) -> None:
    from core.checkpoint import read_meta
    from core.diagnosis import checkpoint_id
    from core.train import run_training

    with Session() as s:
        job = job_store.get_job(s, job_id)
        dataset_name, runs_dir, label_source = job.dataset.name, job.runs_dir, job.label_source
        cfg = _job_config(job, dataset_name, db_url, device)
    run_dir = Path(cfg.output_dir) / cfg.name
    with Session() as s, s.begin():
        job_store.set_stage(s, job_id, "training", run_dir=str(run_dir))
    result = run_training(cfg, progress=False, on_epoch=lambda _row: _check_cancel(Session, job_id))
    meta = read_meta(result.checkpoint)
    ckpt_id = checkpoint_id(result.checkpoint, runs_dir)
    metrics = {k: v for k, v in (meta.metrics or {}).items() if isinstance(v, (int, float))}
    with Session() as s, s.begin():
        job_store.set_stage(s, job_id, "predicting", run_dir=str(result.run_dir), checkpoint=str(result.checkpoint),
                            checkpoint_id=ckpt_id, metrics=metrics, data_summary=_summary(meta, label_source))
    _check_cancel(Session, job_id)
    n = predict_dataset(Session, dataset_name, result.checkpoint, ckpt_id, device, predict_batch,
                        on_batch=lambda: _check_cancel(Session, job_id))
    with Session() as s, s.begin():
        job_store.set_stage(s, job_id, "predicted", predictions=n)
    log.info("job %d done: %s, %d predictions", job_id, ckpt_id, n)


def predict_dataset(Session: sessionmaker[Session], dataset_name: str, checkpoint: str | Path, ckpt_id: str,
                    device: str = "cpu", batch_size: int = PREDICT_BATCH, on_batch=None) -> int:
    """Predict every image of ``dataset_name`` with ``checkpoint``; one ``Prediction`` row each,
    written a batch per transaction; how many were written. Images whose file is missing are
    skipped (and counted in the log)."""
    from annotation_db.images import image_abspath
    from annotation_db.store import get_dataset
    from core.predict import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, device)
    with Session() as s:
        dataset = get_dataset(s, dataset_name)
        keys = set(dataset.class_keys)
        unknown = set(predictor.classes) - keys
        if unknown:
            raise job_store.JobError(f"{checkpoint}: classes {sorted(unknown)} are not in dataset {dataset_name}")
        images = [(img.id, image_abspath(dataset, img)) for img in
                  s.scalars(select(Image).where(Image.dataset_id == dataset.id).order_by(Image.id))]
    written = missing = 0
    for i in range(0, len(images), batch_size):
        chunk = [(image_id, p) for image_id, p in images[i:i + batch_size] if Path(p).is_file()]
        missing += min(batch_size, len(images) - i) - len(chunk)
        if not chunk:
            continue
        results = predictor.predict_paths([p for _, p in chunk], batch_size=batch_size)
        rows = [{"image_id": image_id, "checkpoint_id": ckpt_id, "probs": r["probs"], "predicted": r["predicted"],
                 "margin": prediction_margin(r["probs"])} for (image_id, _), r in zip(chunk, results)]
        with Session() as s, s.begin():
            s.execute(insert(Prediction), rows)
        written += len(rows)
        if on_batch is not None:
            on_batch()
    if missing:
        log.warning("%d images of %s have no file under the dataset root: not predicted", missing, dataset_name)
    return written


@contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Everything logged in this process goes to ``path`` too (the page reads it)."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(min(previous, logging.INFO) if previous else logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()


@contextmanager
def _cancel_on_sigterm() -> Iterator[None]:
    def handler(signum, frame):
        raise JobCancelled("cancelled")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- cancel, progress ----------------------------------------------------------------------------------


def cancel_job(Session: sessionmaker[Session], job_id: int) -> Job:
    """Cancel job ``job_id``: flag it, and signal its process group when it runs on this machine."""
    with Session() as s, s.begin():
        job = job_store.request_cancel(s, job_id)
        pid, host, running = job.pid, job.host, job.status == "running"
    if running and pid and host == job_store.this_host():
        try:
            os.killpg(pid, signal.SIGTERM)  # the job leads its own session: its data workers go too
        except ProcessLookupError:
            pass
        except PermissionError as e:
            raise job_store.JobError(f"job #{job_id}: not allowed to signal process {pid} ({e})") from None
    with Session() as s:
        return job_store.get_job(s, job_id)


def read_metrics(job: Job) -> list[dict[str, float]]:
    """The epochs so far (``<run>/metrics.csv``): one dict per epoch, numbers only."""
    path = Path(job.run_dir or "") / "metrics.csv"
    if not job.run_dir or not path.is_file():
        return []
    rows = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            out = {}
            for k, v in row.items():
                try:
                    out[k] = float(v)
                except (TypeError, ValueError):
                    continue
            rows.append(out)
    return rows


def log_error_line(job: Job) -> str:
    """The job's ``error:`` line (from the store, else the last one in its log); "" when none."""
    if job.error:
        return job.error
    path = Path(job.log_path or "")
    if job.log_path and path.is_file():
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if "error: " in ln]
        if lines:
            return lines[-1][lines[-1].index("error: "):]
    return ""


def dataset_of(session: Session, job: Job) -> Dataset:
    return session.get(Dataset, job.dataset_id)
