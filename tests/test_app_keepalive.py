"""The labeling app's own server (``streamlit run app/asgi.py``, as ``make app`` starts it) answers
requests on a kept-alive connection at once, as a browser's tile and overlay requests arrive.

Streamlit binds its listening socket itself, without the protocol number, so asyncio's default
event loop leaves Nagle's algorithm on for each connection; uvicorn writes an answer's headers
and body separately, and the body then waits for the client's delayed ACK: ~40 ms for every
keep-alive answer (measured: 44 ms per tile, against 0.5 ms). uvloop (requirements.txt) turns
Nagle off on every TCP connection. This test fails if that regresses.
"""

from __future__ import annotations

import http.client
import os
import socket
import statistics
import subprocess
import time
from pathlib import Path

from core.tile_service import sign_token
from tests.servers import wait_until_healthy

REPO = Path(__file__).resolve().parents[1]
SLIDE = "cmu-1-small-region.svs"


def test_keep_alive_answers_do_not_wait_for_a_delayed_ack(tmp_path: Path, wsi_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("GLOM_TILE_SECRET", "keep-alive test key")  # the server checks the token we sign
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log_path = tmp_path / "streamlit.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "streamlit"), "run", "app/asgi.py", "--server.port", str(port),
             "--server.headless", "true"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, GLOM_SLIDES_DIR=str(wsi_dir), GLOM_DB=f"sqlite:///{tmp_path / 'store.db'}"))
    try:
        wait_until_healthy(port, proc, log_path)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        path = f"/api/slides/tile/9/0_0.jpeg?slide={SLIDE}&t={sign_token('ana', SLIDE)}"
        took, sizes = [], set()
        for _ in range(25):  # one connection, kept alive: the first answer decodes, the rest are cached
            t0 = time.perf_counter()
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            took.append((time.perf_counter() - t0) * 1000)
            assert resp.status == 200, body[:200]
            assert not resp.will_close  # the same connection serves the next request
            sizes.add(len(body))
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert len(sizes) == 1
    # a delayed ACK costs 40 ms per answer; a cached tile takes ~0.5 ms here, even on a loaded 2-core machine
    assert statistics.median(took[5:]) < 15, f"keep-alive answers took {statistics.median(took[5:]):.1f} ms (median)"
