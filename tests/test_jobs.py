"""Training jobs: records on SQLite and PostgreSQL, a real tiny training run in a process of its
own that predicts the dataset, cancel, one job per device, failures as one error line, and a job
whose process vanished (an app or machine restart) found and marked failed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from annotation_db import jobs, queues, store
from annotation_db.db import create_store_engine, make_sessionmaker, upgrade
from annotation_db.models import Job, Prediction
from core import jobs as runner
from core.cli import main as glom

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = """\
name: tiny
seed: 0
data: {split: {ratios: [0.6, 0.2, 0.2], group_by: none, seed: 0}, cache: true, num_workers: 0}
model: {name: test_resnet, pretrained: false}
preprocess: {input_size: 40}
train: {epochs: 2, batch_size: 16, lr: 0.01, threads: 1}
evaluate: {tsne: false, calibrate: true, tta: false, bootstrap: 20}
"""


def write_tiny_recipe(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return path


def demo_store(url: str, folder: Path, n_per_class: int = 10) -> None:
    """The 4-class synthetic demo dataset at 40 px, labeled, in the store at ``url``."""
    assert glom(["--db", url, "demo", "--out", str(folder), "--n-per-class", str(n_per_class), "--size", "40"]) == 0


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_job_records_claim_cancel_and_a_lost_process(Session, tmp_path):
    recipe = write_tiny_recipe(tmp_path)
    with Session() as s, s.begin():
        ds = store.create_dataset(s, "d", ["a", "b"], root=tmp_path)
        first = jobs.submit_job(s, ds, created_by="dr_admin", recipe=recipe, label_source="final",
                                overrides=["train.epochs=3"], runs_dir=tmp_path / "runs")
        second = jobs.submit_job(s, ds, created_by="dr_admin", recipe=recipe, runs_dir=tmp_path / "runs")
        first_id, second_id = first.id, second.id
        with pytest.raises(jobs.JobError, match="label source"):
            jobs.submit_job(s, ds, created_by="x", recipe=recipe, label_source="annotator:bob")
        with pytest.raises(jobs.JobError, match="not found"):
            jobs.submit_job(s, ds, created_by="x", recipe=tmp_path / "nope.yaml")
    with Session() as s, s.begin():
        assert jobs.next_queued(s).id == first_id
        assert jobs.claim_job(s, first_id, device="cpu", pid=os.getpid(), log_path=tmp_path / "j.log")
        assert not jobs.claim_job(s, first_id, device="cpu", pid=os.getpid(), log_path=tmp_path / "j.log")
        assert jobs.running_on(s, "cpu").id == first_id and jobs.running_on(s, "cuda") is None
        jobs.set_stage(s, first_id, "training", run_dir="/x")
    with Session() as s, s.begin():
        job = jobs.get_job(s, first_id)
        assert (job.status, job.stage, job.run_dir, job.overrides, job.label_source) == \
            ("running", "training", "/x", ["train.epochs=3"], "final")
        assert job.created_by == "dr_admin" and job.started_at is not None
        # a queued job is cancelled at once; an ended one cannot be
        assert jobs.request_cancel(s, second_id).status == "cancelled"
        with pytest.raises(jobs.JobError, match="already ended"):
            jobs.request_cancel(s, second_id)
        # the process is alive (it is this one): nothing is reaped
        assert jobs.reap_lost(s) == []
        # restart survival: the row stays, its process is gone -> failed, with a reason, on next look
        s.get(Job, first_id).pid = _dead_pid()
    with Session() as s, s.begin():
        listed = jobs.list_jobs(s)
        assert [j.id for j in listed] == [second_id, first_id]
        lost = jobs.get_job(s, first_id)
        assert lost.status == "failed" and lost.error.startswith("lost:") and lost.finished_at is not None
        jobs.finish_job(s, first_id, "done")  # an ended job keeps its status
        assert jobs.get_job(s, first_id).status == "failed"


def test_overrides_are_checked_against_the_allow_lists():
    assert runner.job_overrides(5, 64, "resnet18") == [
        "train.epochs=5", "preprocess.input_size=64", "model.name=resnet18", "model.pretrained_file=",
        "model.pretrained=false"]
    with pytest.raises(jobs.JobError, match="epochs"):
        runner.job_overrides(0)
    with pytest.raises(jobs.JobError, match="input size"):
        runner.job_overrides(None, 65)
    with pytest.raises(jobs.JobError, match="architecture"):
        runner.job_overrides(None, None, "os.system")


@pytest.fixture
def job_env(tmp_path, monkeypatch):
    """A demo store, a tiny recipe and a runs folder; $GLOM_RUNS points there."""
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    demo_store(url, tmp_path / "demo")
    monkeypatch.setenv("GLOM_RUNS", str(tmp_path / "runs"))
    engine = create_store_engine(url)
    upgrade(engine)
    yield url, make_sessionmaker(engine), write_tiny_recipe(tmp_path / "recipes")
    engine.dispose()


def _submit(Session, recipe: Path, **kw) -> int:
    with Session() as s, s.begin():
        job = jobs.submit_job(s, store.get_dataset(s, "demo"), created_by="dr_admin", recipe=recipe,
                              runs_dir=runner.default_runs_dir(), **kw)
        return job.id


def _wait(Session, job_id: int, done, timeout: float = 90.0) -> Job:
    deadline = time.time() + timeout
    while True:
        with Session() as s, s.begin():
            jobs.reap_lost(s)
            job = jobs.get_job(s, job_id)
            s.expunge(job)
        if done(job):
            return job
        if time.time() > deadline:
            log = Path(job.log_path).read_text()[-3000:] if job.log_path and Path(job.log_path).is_file() else ""
            pytest.fail(f"job #{job_id} still {job.status}/{job.stage} after {timeout} s\n{log}")
        time.sleep(0.5)


def test_two_jobs_train_in_turn_and_predict_the_dataset(job_env, capsys):
    url, Session, recipe = job_env
    first = _submit(Session, recipe)
    second = _submit(Session, recipe, overrides=["train.epochs=1"])
    # two runners at once: one device, so the jobs must not overlap
    pids = [runner.start_runner(url), runner.start_runner(url)]
    assert all(pids)
    a = _wait(Session, first, lambda j: j.status not in jobs.ACTIVE_STATUSES)
    b = _wait(Session, second, lambda j: j.status not in jobs.ACTIVE_STATUSES)
    assert (a.status, b.status) == ("done", "done"), (a.error, b.error)
    assert b.started_at >= a.finished_at or a.started_at >= b.finished_at
    assert a.device == "cpu" and a.predictions == 40 and Path(a.checkpoint).is_file()
    assert a.checkpoint_id.startswith(f"jobs/job-{first}/best@")
    assert {"val_macro_f1", "test_macro_f1"} <= set(a.metrics)
    assert a.data_summary["sizes"] == {"train": 24, "val": 8, "test": 8}
    assert a.data_summary["label_source"] == "majority"
    rows = runner.read_metrics(a)
    assert [r["epoch"] for r in rows] == [0.0, 1.0] and "val_macro_f1" in rows[0]
    assert len(runner.read_metrics(b)) == 1
    with Session() as s, s.begin():
        n = s.scalar(select(func.count()).select_from(Prediction).where(Prediction.checkpoint_id == b.checkpoint_id))
        assert n == 40
        # the model-uncertain queue follows the newest predictions, least sure first
        ds = store.get_dataset(s, "demo")
        me = store.get_or_create_annotator(s, "someone_new")
        page = queues.next_image_ids(s, queues.QueueSpec("uncertain", ds.id, me.id), limit=40)
        assert queues.latest_checkpoint(s, ds.id) == b.checkpoint_id
        margins = [m for (m, _), _ in page]
        assert len(page) == 40 and margins == sorted(margins)
    assert glom(["--db", url, "jobs", "list"]) == 0
    out = capsys.readouterr().out
    assert f"#{first}" in out and "done" in out and "val macro-F1" in out


def test_a_worker_runs_what_is_queued_after_it_started(job_env, tmp_path):
    """`glom jobs run --worker` (a GPU server) polls the store and runs jobs queued elsewhere."""
    url, Session, recipe = job_env
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen([sys.executable, "-m", "core.cli", "jobs", "run", "--worker", "--poll", "0.5"],
                              cwd=REPO, env=dict(os.environ, GLOM_DB=url), stdout=log, stderr=subprocess.STDOUT)
    try:
        job_id = _submit(Session, recipe, overrides=["train.epochs=1"])
        job = _wait(Session, job_id, lambda j: j.status not in jobs.ACTIVE_STATUSES)
        assert job.status == "done" and job.predictions == 40, job.error
        assert worker.poll() is None  # still waiting for the next one
    finally:
        worker.terminate()
        worker.wait(timeout=20)
        log.close()


def test_cancel_stops_a_running_job_and_its_process(job_env):
    url, Session, recipe = job_env
    job_id = _submit(Session, recipe, overrides=["train.epochs=200"])
    runner.start_runner(url)
    running = _wait(Session, job_id, lambda j: j.status != "queued" and (
        j.status != "running" or len(runner.read_metrics(j)) >= 1))
    assert running.status == "running", running.error
    assert glom(["--db", url, "jobs", "cancel", str(job_id)]) == 0
    ended = _wait(Session, job_id, lambda j: j.status not in jobs.ACTIVE_STATUSES, timeout=30)
    assert ended.status == "cancelled" and ended.error == "cancelled"
    deadline = time.time() + 15  # the row says cancelled just before the process exits
    while jobs.pid_alive(ended.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not jobs.pid_alive(ended.pid)
    assert len(runner.read_metrics(ended)) < 200


def test_a_failure_shows_one_error_line_and_no_trace(job_env):
    url, Session, recipe = job_env
    job_id = _submit(Session, recipe, label_source="adjudicated")  # nothing is adjudicated yet
    with Session() as s:
        assert runner.run_job(Session, job_id, url, device="cpu") == "failed"
        job = jobs.get_job(s, job_id)
    assert job.error.startswith("error: ") and "adjudicated" in job.error
    assert "Traceback" not in job.error and "\n" not in job.error
    assert runner.log_error_line(job) == job.error
    assert job.error in Path(job.log_path).read_text()
    with pytest.raises(jobs.JobError, match="not queued"):
        runner.run_job(Session, job_id, url)
