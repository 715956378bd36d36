"""Start the viewer (`python app/viewer.py`) on a free loopback port for a test, and stop it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_viewer(root: Path, runs: Path, db_url: str, timeout_s: float = 120,
                   slides: Path | None = None, extra: tuple[str, ...] = (),
                   env_extra: dict | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yield ``(base URL, process)`` of a viewer serving ``runs`` (and the whole-slide images in
    ``slides``) over the store at ``db_url``; fails the test with the server's log if it does
    not answer within ``timeout_s``."""
    port = free_port()
    log_path = root / "viewer.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", TQDM_DISABLE="1")
    env.pop("GLOM_VIEWER_AUTH", None)
    env.pop("GLOM_SLIDES_DIR", None)
    env.pop("GLOM_SINGLE_USER", None)
    env.update(env_extra or {})
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "app/viewer.py", "--port", str(port), "--runs", str(runs), "--db", db_url,
             "--data-root", str(root / "data"), *(["--slides", str(slides)] if slides else []), *extra],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                urllib.request.urlopen(base + "gradio_api/info", timeout=2)
                break
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):  # up, behind its login
                    break
                time.sleep(0.5)
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail(f"viewer did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield base, proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)
