"""End to end in real Chromium: an admin starts a tiny training job from the Models page, the app
server restarts while it runs, the job is still there and finishes; its checkpoint becomes the
dataset's model, suggestions are switched on, and a suggestion is accepted by key on the
labeling page and recorded with the label.

Needs Debian's ``chromium`` and the ``playwright`` package (see tests/test_label_e2e.py).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from annotation_db import jobs, users
from annotation_db.db import create_store_engine, make_sessionmaker
from annotation_db.models import Annotator, Job, Label
from annotation_db.suggestions import is_blind
from tests.servers import wait_until_healthy
from tests.test_jobs import demo_store, write_tiny_recipe
from tests.test_label_e2e import (
    CHROMIUM,
    CHROMIUM_ARGS,
    E2E_PASSWORD,
    _free_port,
    _shown,
    _wait_change,
)

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'


class App:
    """The labeling app's Streamlit server in a subprocess; ``restart`` is a new server process."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env, self.log_path = env, log_path
        self.proc = None
        self.start()

    def start(self) -> None:
        self.port = _free_port()
        self.log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "streamlit"), "run", "app/label.py", "--server.port", str(self.port),
             "--server.headless", "true"],
            cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_until_healthy(self.port, self.proc, self.log_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.log.close()

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def app(tmp_path: Path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: `apt-get install chromium` (Debian's build; never `playwright install`)")
    url = f"sqlite:///{tmp_path / 'models.db'}"
    demo_store(url, tmp_path / "demo")
    engine = create_store_engine(url)
    with make_sessionmaker(engine)() as s, s.begin():
        users.add_user(s, "dr_admin", E2E_PASSWORD, "admin")
    engine.dispose()
    write_tiny_recipe(tmp_path / "recipes")
    env = dict(os.environ, GLOM_DB=url, GLOM_RUNS=str(tmp_path / "runs"), GLOM_RECIPES_DIR=str(tmp_path / "recipes"),
               GLOM_DATA_ROOT=str(tmp_path / "data"))
    server = App(env, tmp_path / "streamlit.log")
    try:
        yield server, url
    finally:
        server.stop()


def _sign_in(page, base: str) -> None:
    page.goto(base)
    page.get_by_label("Your name").fill("dr_admin")
    page.get_by_label("Password", exact=True).fill(E2E_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_selector(".st-key-crop_caption", timeout=30_000)


def _job(url: str) -> Job:
    engine = create_store_engine(url)
    with make_sessionmaker(engine)() as s:
        job = s.scalar(select(Job).order_by(Job.id.desc()).limit(1))
        s.expunge_all()
    engine.dispose()
    return job


def test_train_from_the_models_page_then_accept_a_suggestion_by_key(app):
    from playwright.sync_api import sync_playwright

    server, url = app
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1440, "height": 1000}).new_page()
        _sign_in(page, server.url)
        page.get_by_role("link", name="Models").click()
        page.get_by_role("button", name="Start training").click()
        page.get_by_text("Job #1 started.").wait_for(timeout=30_000)
        job = _job(url)
        assert job.status in ("queued", "running") and job.created_by == "dr_admin"

        # The app server restarts mid-job: the job runs on in its own process, and the new
        # server shows it from the store.
        server.restart()
        assert _job(url).status in ("queued", "running")
        _sign_in(page, server.url)
        page.get_by_role("link", name="Models").click()
        page.wait_for_selector(".st-key-ckpt_1", timeout=120_000)  # done: its checkpoint is listed
        job = _job(url)
        assert job.status == "done" and job.predictions == 40, job.error
        for _ in range(75):  # the row says done just before the process exits
            if not jobs.pid_alive(job.pid):
                break
            page.wait_for_timeout(200)
        assert not jobs.pid_alive(job.pid)
        page.locator(".st-key-ckpt_1").get_by_role("button", name="Make active").click()
        page.locator(".st-key-ckpt_1").get_by_text("active", exact=False).wait_for(timeout=15_000)

        page.get_by_text("Before I label").click()
        page.get_by_role("button", name="Save", exact=True).click()
        page.get_by_text("Suggestion settings saved.").wait_for(timeout=15_000)

        # Labeling: a crop outside the blind slice shows the model's class; A takes it.
        page.get_by_role("link", name="Label").click()
        shown = _shown(page)
        assert not is_blind(shown, 0, 0.1), "the first demo crop is outside seed 0's blind slice"
        suggestion = page.locator(".st-key-suggestion")
        suggestion.get_by_text("Model suggests", exact=False).wait_for(timeout=15_000)
        page.wait_for_selector(IDLE, timeout=30_000)
        page.keyboard.press("a")
        _wait_change(page, shown)
        browser.close()

    engine = create_store_engine(url)
    with make_sessionmaker(engine)() as s:
        label = s.scalar(select(Label).join(Annotator).where(Annotator.name == "dr_admin", Label.image_id == shown))
        from annotation_db.suggestions import prediction_for

        predicted = prediction_for(s, shown, job.checkpoint_id)
    engine.dispose()
    assert label is not None and label.classes == [predicted.key]
    assert (label.suggested, label.suggested_by) == (predicted.key, job.checkpoint_id)
