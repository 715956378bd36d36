"""Waiting for a server a test started in a subprocess (the labeling app's Streamlit server)."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def wait_until_healthy(port: int, proc: subprocess.Popen, log_path: Path, what: str = "streamlit",
                       timeout: float = 60.0) -> None:
    """Poll Streamlit's health endpoint on 127.0.0.1:``port``; fail the test with the log's tail if
    the process dies or ``timeout`` seconds pass first."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1)
            return
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                pytest.fail(f"{what} did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.3)
