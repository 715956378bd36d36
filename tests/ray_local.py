"""A real Ray cluster on loopback for the Ray test and benchmark: a head and more nodes, ``ray start`` each.

Every process of the cluster (GCS, raylets, workers, monitors) carries the cluster's own temp dir
on its command line, so stopping kills exactly those: ``ray stop`` would kill every Ray process of
the user on the machine, another test's or benchmark's cluster included. The temp dir is short
(``/tmp/rayXXXX``): Ray's unix sockets live under it and a socket path holds at most 107 bytes.
``RAY_ADDRESS`` is removed from the environment of the ``ray`` commands and never set here, so
nothing else connects to this cluster by accident.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RAY = Path(sys.executable).parent / "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([str(RAY), *args], check=False, env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode:
        raise RuntimeError(f"ray {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def _pids_of(temp_dir: Path, port: int) -> list[int]:
    """The Ray processes naming ``temp_dir`` or the head's ``port`` on their command line (the client server
    names only the address), and their descendants (workers and agents rename themselves ``ray::...``)."""
    parent, mine = {}, set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state, ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state == "Z":  # exited, waiting for its parent: nothing to stop
            continue
        parent[int(proc.name)] = int(ppid)
        if str(temp_dir).encode() in cmdline or (b"ray" in cmdline and f":{port}\0".encode() in cmdline):
            mine.add(int(proc.name))
    grew = True
    while grew:
        new = {pid for pid, ppid in parent.items() if ppid in mine} - mine
        mine |= new
        grew = bool(new)
    return sorted(mine)


def stop_cluster(temp_dir: Path, port: int, grace_s: float = 2.0) -> None:
    """SIGTERM every process of the cluster (``temp_dir``, head ``port``), SIGKILL what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _pids_of(temp_dir, port):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while _pids_of(temp_dir, port) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _pids_of(temp_dir, port):
            break
    shutil.rmtree(temp_dir, ignore_errors=True)


@contextmanager
def local_ray_cluster(nodes: int = 2, cpus_per_node: int = 1) -> Iterator[str]:
    """``nodes`` Ray nodes on 127.0.0.1 (the first is the head), ``cpus_per_node`` CPUs each; the address."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port = free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus_per_node), "--num-gpus", "0",
              "--temp-dir", str(temp_dir), "--object-store-memory", str(100 * 2**20), "--disable-usage-stats"]
    try:
        # every fixed default port (dashboard 8265, client 10001, agent 52365) chosen free: two clusters can coexist
        _ray("start", "--head", "--port", str(port), "--include-dashboard=false", "--dashboard-port", str(free_port()),
             "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()), *common)
        for _ in range(nodes - 1):
            _ray("start", "--address", f"127.0.0.1:{port}", "--dashboard-agent-listen-port", str(free_port()), *common)
        yield f"127.0.0.1:{port}"
    finally:
        stop_cluster(temp_dir, port)
