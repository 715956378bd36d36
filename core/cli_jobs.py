"""``glom jobs list | submit | cancel | run``: training jobs from the command line (core.jobs).

``register(subparsers, parents)`` adds them to the ``glom`` parser (core/cli.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["register"]


def _store(args: argparse.Namespace):
    from annotation_db.db import open_store, resolve_url

    url = resolve_url(getattr(args, "db", None))
    return open_store(url), url


def _row(job) -> dict:
    m = job.metrics or {}
    return {"id": job.id, "dataset": job.dataset.name, "status": job.status, "stage": job.stage,
            "created_by": job.created_by, "created_at": job.created_at.isoformat(), "recipe": job.recipe,
            "overrides": job.overrides, "label_source": job.label_source, "device": job.device, "host": job.host,
            "pid": job.pid, "log": job.log_path, "checkpoint": job.checkpoint, "checkpoint_id": job.checkpoint_id,
            "val_macro_f1": m.get("val_macro_f1"), "test_macro_f1": m.get("test_macro_f1"),
            "predictions": job.predictions, "error": job.error}


def _cmd_list(args: argparse.Namespace) -> int:
    from annotation_db import jobs, store

    Session, _ = _store(args)
    with Session() as s, s.begin():
        dataset = store.get_dataset(s, args.dataset) if args.dataset else None
        rows = [_row(j) for j in jobs.list_jobs(s, dataset, limit=args.limit)]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return 0
    if not rows:
        print("no jobs yet: `glom jobs submit --dataset NAME --recipe recipes/quick.yaml`")
    for r in rows:
        f1 = f" val macro-F1 {r['val_macro_f1']:.3f}" if r["val_macro_f1"] is not None else ""
        where = f" on {r['device']}@{r['host']} pid {r['pid']}" if r["status"] == "running" else ""
        print(f"#{r['id']:<4} {r['status']:<9} {r['dataset']:<20} {r['label_source']:<11} by {r['created_by']}"
              f"{where}{f1}" + (f"  {r['error']}" if r["error"] else ""))
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from annotation_db import jobs, store
    from core.jobs import default_runs_dir, job_overrides, start_runner

    Session, url = _store(args)
    overrides = job_overrides(args.epochs, args.input_size, args.architecture) + list(args.overrides)
    with Session() as s, s.begin():
        dataset = store.get_dataset(s, args.dataset)
        job = jobs.submit_job(s, dataset, created_by=args.by, recipe=args.recipe, label_source=args.label_source,
                              overrides=overrides, runs_dir=default_runs_dir())
        job_id = job.id
    print(f"job #{job_id} queued")
    if args.start:
        print(f"runner started (pid {start_runner(url)})")
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from core.jobs import cancel_job

    Session, _ = _store(args)
    job = cancel_job(Session, args.job)
    print(f"job #{job.id}: {job.status if job.status != 'running' else 'cancel requested'}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from core.jobs import run_job, run_queue

    Session, url = _store(args)
    if args.job is not None:
        status = run_job(Session, args.job, url, device=args.device)
        print(f"job #{args.job}: {status}")
        return 0 if status == "done" else 1
    if not (args.worker or args.until_empty):
        raise SystemExit("glom jobs run: name a job id, or --worker (run queued jobs forever) or --until-empty")
    n = run_queue(Session, url, device=args.device, forever=args.worker, poll_s=args.poll)
    print(f"{n} jobs run")
    return 0


def _guarded(func):
    def run(args: argparse.Namespace) -> int:
        from core.errors import GlomError

        try:
            return func(args)
        except GlomError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


def register(subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add ``glom jobs ...``."""
    from core.jobs import ARCHITECTURES, INPUT_SIZES_PX

    parents = list(parents)
    jobs = subparsers.add_parser("jobs", parents=parents, help="training jobs: list, submit, cancel, run")
    sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")

    p = sub.add_parser("list", parents=parents, help="jobs, newest first (a job whose process is gone is marked failed)")
    p.add_argument("--dataset")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guarded(_cmd_list))

    p = sub.add_parser("submit", parents=parents, help="queue a training job on a store dataset")
    p.add_argument("--dataset", required=True)
    p.add_argument("--recipe", required=True, help="recipes/*.yaml")
    p.add_argument("--label-source", default="majority", choices=("majority", "adjudicated", "final"))
    p.add_argument("--epochs", type=int)
    p.add_argument("--input-size", type=int, choices=INPUT_SIZES_PX)
    p.add_argument("--architecture", choices=ARCHITECTURES)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any other recipe key (the command line is trusted; the Models page offers only the three above)")
    p.add_argument("--by", default="cli", help="who the job is recorded as started by")
    p.add_argument("--start", action="store_true", help="also start a runner here (else: `glom jobs run --worker`)")
    p.set_defaults(func=_guarded(_cmd_submit))

    p = sub.add_parser("cancel", parents=parents, help="cancel a queued or running job")
    p.add_argument("job", type=int)
    p.set_defaults(func=_guarded(_cmd_cancel))

    p = sub.add_parser("run", parents=parents, help="run one job, or queued jobs (--worker: forever, for a GPU server)")
    p.add_argument("job", type=int, nargs="?")
    p.add_argument("--worker", action="store_true", help="keep running queued jobs, polling the store")
    p.add_argument("--until-empty", action="store_true", help="run queued jobs, then exit")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (one job at a time per device)")
    p.add_argument("--poll", type=float, default=3.0, help="seconds between looks at the queue (--worker)")
    p.set_defaults(func=_guarded(_cmd_run))
