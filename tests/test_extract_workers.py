"""`kill -9` of `glom extract --workers 2` takes its crop workers with it (issue 11): before, both
workers lived on under pid 1, holding the slide files and the store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CMU = "cmu-1-small-region.svs"  # 2220 × 2967 level-0 px


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_workers_die_with_a_killed_parent(tmp_path: Path, wsi_dir: Path) -> None:
    rng = np.random.default_rng(0)
    boxes = tmp_path / "boxes.csv"  # enough boxes that the run is still going when killed
    boxes.write_text("x,y,w,h\n" + "".join(
        f"{rng.integers(0, 1700)},{rng.integers(0, 2400)},{rng.integers(300, 500)},{rng.integers(300, 500)}\n"
        for _ in range(20_000)))
    cmd = [sys.executable, "-m", "core.cli", "--db", f"sqlite:///{tmp_path / 'store.db'}", "extract",
           str(wsi_dir / CMU), "--annotations", str(boxes), "--out", str(tmp_path / "crops"), "--workers", "2",
           "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, TQDM_DISABLE="1"))
    workers: set[int] = set()
    try:
        deadline = time.time() + 120
        while len(workers) < 2 and time.time() < deadline and proc.poll() is None:
            workers = _children(proc.pid)
            time.sleep(0.1)
        assert len(workers) >= 2, "the workers never started"
        time.sleep(1.0)  # they are cutting crops now
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 15
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        survivors = [w for w in workers if _alive(w)]
        assert not survivors, f"workers {survivors} outlived their killed parent"
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
