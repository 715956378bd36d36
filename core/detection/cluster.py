"""Per-slide work on an existing Ray cluster: one task per slide, results as they finish.

:func:`run_on_ray` is generic: it runs any importable ``fn(item, *args)`` once per item as a Ray
task and yields a :class:`TaskResult` per item in the order they finish; a failing item comes back
as an error naming it and the node it ran on, and the others go on. :func:`detect_on_ray` is
``glom detect --ray``: :func:`core.detection.slide_job.detect_and_store` per slide, the same code
the local workers run.

Ray is imported here only, and only when called: nothing else in GlomLab needs it. Slides, the
checkpoint and the output folder must be on storage every node sees, at the same path; the store is
reached from inside each task (PostgreSQL for a cluster; an SQLite file only on one machine).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from core.errors import GlomError

if TYPE_CHECKING:
    from core.detection.slide_job import DetectJob

log = logging.getLogger(__name__)

__all__ = ["RayClusterError", "TaskResult", "connect", "detect_on_ray", "gpus_per_task", "run_on_ray"]

RAY_REQUIREMENT = "ray==2.60.0"
DRIVER = "driver"  # TaskResult.node of an item the driver settled itself (already done)


class RayClusterError(GlomError):
    """Ray is missing, or the cluster cannot be reached or cannot run the tasks."""


@dataclass
class TaskResult:
    """One item's task: its return value, or an error message naming the item and the node."""

    item: str
    value: Any = None
    error: str | None = None
    node: str = ""  # "<ip> <node id, 8 hex>" of the node that ran it


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise RayClusterError(f"--ray needs the ray package, which is not installed here: "
                              f"pip install {RAY_REQUIREMENT} (it is in requirements.txt)") from e
    return ray


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on an address nobody answers at (ray.init itself retries for minutes)."""
    if address == "auto":
        return
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RayClusterError(f"--ray {address!r}: expected HOST:PORT (the head's GCS port, e.g. 10.0.0.5:6379), "
                              "ray://HOST:PORT (Ray Client) or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RayClusterError(f"cannot reach the Ray cluster at {address}: {e} (is `ray start --head` running "
                              "there, and is the port open from this machine?)") from None


@contextmanager
def connect(address: str) -> Iterator[Any]:
    """``ray.init(address=...)`` on an existing cluster (never starts one); the ``ray`` module while connected."""
    ray = _import_ray()
    _check_reachable(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        raise RayClusterError(f"cannot connect to the Ray cluster at {address}: {e}") from e
    try:
        yield ray
    finally:
        ray.shutdown()


def gpus_per_task(ray: Any, device: str, address: str) -> int:
    """A GPU per task when the connected cluster has one and ``device`` is not ``cpu``; raises
    :class:`RayClusterError` when ``device`` names CUDA and the cluster has no GPU."""
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if device.startswith("cuda") and not gpus:
        raise RayClusterError(f"--device {device}: the Ray cluster at {address} has no GPU")
    return 1 if gpus and device != "cpu" else 0


def _node() -> str:
    import ray

    return f"{ray.util.get_node_ip_address()} {ray.get_runtime_context().get_node_id()[:8]}"


def _run_one(fn: Callable[..., Any], item: str, args: tuple[Any, ...]) -> TaskResult:
    """The Ray task: ``fn(item, *args)``; every failure comes back as a message naming the item and the node."""
    node = _node()
    try:
        return TaskResult(item, value=fn(item, *args), node=node)
    except Exception as e:  # noqa: BLE001 - a failing item is reported, never lost; the others go on
        msg = str(e) if item in str(e) else f"{item}: {type(e).__name__}: {e}"
        return TaskResult(item, error=f"{msg} [on Ray node {node}]", node=node)


def run_on_ray(fn: Callable[..., Any], items: Sequence[str], *, args: tuple[Any, ...] = (), num_cpus: float = 1,
               num_gpus: float = 0, label: str = "") -> Iterator[TaskResult]:
    """One Ray task per item, ``fn(item, *args)``; results as they finish.

    ``fn`` travels by reference when it is importable (GlomLab installed on every node, as for
    :func:`~core.detection.slide_job.detect_and_store`), by value otherwise (a local function).

    Call while connected (:func:`connect`). Leaving the loop early (an error, Ctrl-C) cancels the
    tasks still pending or running.
    """
    ray = _import_ray()
    task = ray.remote(_run_one)
    pending = {task.options(num_cpus=num_cpus, num_gpus=num_gpus, name=f"{label or fn.__name__} {item}")
               .remote(fn, item, args): item for item in items}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                item = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as e:  # the worker or its node died, or the task was cancelled
                    result = TaskResult(item, error=f"{item}: the Ray task failed: {type(e).__name__}: {e}")
                yield result
    finally:
        if pending:
            log.warning("cancelling %d Ray tasks", len(pending))
            for ref in pending:
                ray.cancel(ref, force=True)


def detect_on_ray(job: DetectJob, slides: Sequence[str], *, address: str, num_cpus: int = 1) -> Iterator[TaskResult]:
    """``glom detect --ray``: one task per slide not already done; a ``TaskResult`` of a ``SlideOutcome`` per slide.

    A slide already done the same way is settled on the driver (its proposals stored again with a
    dataset, as the local path does) and never submitted; each task checks again before detecting.
    A GPU is requested per task when the cluster has one and ``job.device`` is not ``cpu``.
    """
    from core.detection.slide_job import detect_and_store

    job = replace(job, threads=num_cpus)
    todo = []
    for slide in slides:
        if job.done(slide):
            try:
                yield TaskResult(slide, value=detect_and_store(slide, job), node=DRIVER)
            except GlomError as e:
                yield TaskResult(slide, error=str(e), node=DRIVER)
        else:
            todo.append(slide)
    if not todo:
        return
    with connect(address) as ray:
        num_gpus = gpus_per_task(ray, job.device, address)
        log.info("%d slides to detect on the Ray cluster at %s (%d CPU, %d GPU per task)", len(todo), address,
                 num_cpus, num_gpus)
        yield from run_on_ray(detect_and_store, todo, args=(job,), num_cpus=num_cpus, num_gpus=num_gpus,
                              label="glom detect")
