"""Training jobs in the store: what was asked, by whom, and where it stands.

A job is queued by the Models page or ``glom jobs submit``, claimed by a runner process
(``core.jobs``) that records its pid and host, and ends ``done``, ``failed`` or ``cancelled``. The
store is the only shared state, so a page reload, an app restart or a runner on another machine
all see the same rows. A job whose runner died without a word (killed, machine restarted) is found
by :func:`reap_lost` the next time anyone looks, and marked failed.

Functions take a session; the caller owns the transaction.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from annotation_db.db import StoreError
from annotation_db.label_resolution import LABEL_SOURCES as RESOLVED_SOURCES
from annotation_db.models import JOB_STATUSES, Dataset, Job, utcnow

__all__ = [
    "ACTIVE_STATUSES",
    "JOB_STATUSES",
    "LABEL_SOURCES",
    "JobError",
    "claim_job",
    "finish_job",
    "get_job",
    "job_process_alive",
    "list_jobs",
    "next_queued",
    "pid_alive",
    "reap_lost",
    "request_cancel",
    "running_on",
    "set_stage",
    "submit_job",
    "this_host",
]

ACTIVE_STATUSES = ("queued", "running")
# What a job may learn from: the resolved sources (one annotator's labels are not a training set).
LABEL_SOURCES = tuple(s for s in RESOLVED_SOURCES if not s.startswith("annotator:"))
LOST_MESSAGE = "the job's process ended without reporting (killed, or the machine restarted); start it again"


class JobError(StoreError):
    """A job cannot be submitted, found or changed as asked; the message says why."""


def this_host() -> str:
    return socket.gethostname()


def pid_alive(pid: int | None) -> bool:
    """Whether process ``pid`` exists on this machine and has not ended (a zombie has ended)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): existence is all we can tell
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def job_process_alive(pid: int | None) -> bool:
    """Whether ``pid`` is alive and still a GlomLab job (after a reboot the number may belong to
    another program)."""
    if not pid_alive(pid):
        return False
    if pid == os.getpid():  # run_job called in this very process (a library caller)
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"jobs" in cmdline


def submit_job(
    session: Session,
    dataset: Dataset,
    *,
    created_by: str,
    recipe: str | Path,
    label_source: str = "majority",
    overrides: Sequence[str] = (),
    runs_dir: str | Path = "runs",
) -> Job:
    """Queue a training job on ``dataset``'s labels (``label_source``) with ``recipe`` + ``overrides``."""
    if label_source not in LABEL_SOURCES:
        raise JobError(f"label source {label_source!r}: use one of {', '.join(LABEL_SOURCES)}")
    recipe = Path(recipe)
    if not recipe.is_file():
        raise JobError(f"recipe {recipe} not found")
    job = Job(dataset_id=dataset.id, created_by=created_by, recipe=str(recipe.resolve()), overrides=list(overrides),
              label_source=label_source, status="queued", runs_dir=str(Path(runs_dir).expanduser().resolve()))
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobError(f"no job #{job_id} in the store (`glom jobs list` shows them)")
    return job


def list_jobs(session: Session, dataset: Dataset | None = None, limit: int = 50) -> list[Job]:
    """Newest first; after :func:`reap_lost`, so a dead job does not show as running."""
    reap_lost(session)
    stmt = select(Job).order_by(Job.id.desc()).limit(limit)
    if dataset is not None:
        stmt = stmt.where(Job.dataset_id == dataset.id)
    return list(session.scalars(stmt))


def running_on(session: Session, device: str, host: str | None = None) -> Job | None:
    """The job running on ``device`` of ``host`` (default: this machine), if any."""
    return session.scalar(select(Job).where(Job.status == "running", Job.device == device,
                                            Job.host == (host or this_host())).limit(1))


def next_queued(session: Session) -> Job | None:
    return session.scalar(select(Job).where(Job.status == "queued").order_by(Job.id).limit(1))


def claim_job(session: Session, job_id: int, *, device: str, pid: int, log_path: str | Path) -> bool:
    """Mark a queued job running here (``pid`` on this host, ``device``); False if it was no
    longer queued (another runner took it, or it was cancelled). One UPDATE guarded by the
    status, so two runners cannot both claim it on SQLite or PostgreSQL."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(status="running", stage="starting", device=device, host=this_host(), pid=pid,
                log_path=str(log_path), started_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.expire_all()
    return result.rowcount == 1


def set_stage(session: Session, job_id: int, stage: str, **fields) -> None:
    """Record progress of a running job (``stage`` and any of run_dir, checkpoint, metrics...)."""
    session.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(stage=stage, **fields)
                    .execution_options(synchronize_session=False))
    session.expire_all()


def finish_job(session: Session, job_id: int, status: str, *, error: str = "", **fields) -> None:
    """End a job ``done``, ``failed`` or ``cancelled``; a job already ended keeps its status
    (a cancel that raced the last epoch stays cancelled)."""
    if status not in ("done", "failed", "cancelled"):
        raise JobError(f"a job ends done, failed or cancelled, not {status!r}")
    session.execute(update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE_STATUSES))
                    .values(status=status, error=error, finished_at=utcnow(), stage="", **fields)
                    .execution_options(synchronize_session=False))
    session.expire_all()


def request_cancel(session: Session, job_id: int) -> Job:
    """Cancel a job: a queued one at once; a running one is flagged, and the caller signals its
    process group (``core.jobs.cancel``). Ended jobs are refused."""
    job = get_job(session, job_id)
    if job.status not in ACTIVE_STATUSES:
        raise JobError(f"job #{job_id} has already ended ({job.status})")
    job.cancel_requested = True
    if job.status == "queued":
        job.status, job.finished_at, job.error = "cancelled", utcnow(), "cancelled before it started"
    session.flush()
    return job


def reap_lost(session: Session) -> list[int]:
    """Mark failed the running jobs of this host whose process is gone; their ids.

    Jobs on other hosts are left alone: only their own runner can tell.
    """
    host = this_host()
    lost = [j for j in session.scalars(select(Job).where(Job.status == "running", Job.host == host))
            if not job_process_alive(j.pid)]
    for job in lost:
        if job.cancel_requested:
            finish_job(session, job.id, "cancelled", error="cancelled")
        else:
            finish_job(session, job.id, "failed", error=f"lost: {LOST_MESSAGE}")
    return [j.id for j in lost]
