"""End to end in real Chromium: two clinicians label real crops by keyboard at the same time,
one goes back and changes a label, reloads the page, and exports JSONL; nothing is lost.

Needs Debian's ``chromium`` (``apt-get install chromium``) and the ``playwright`` package; the
browser is never downloaded. Set ``GLOM_UPDATE_SCREENSHOT=1`` to refresh ``docs/label_app.png``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import func, select

from annotation_db import importer, users
from annotation_db.db import create_store_engine, make_sessionmaker, upgrade
from annotation_db.formats import Record, read_csv
from annotation_db.models import Annotator, Dataset, Image, Label, LabelEvent
from tests.servers import wait_until_healthy

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
CAPTION = ".st-key-crop_caption"
CLASSES = ["globally_sclerotic", "non_globally_sclerotic"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store_url(tmp_path: Path, bueno_dir: Path) -> str:
    """All 789 real crops registered without labels (images stay in ../shared/data)."""
    url = f"sqlite:///{tmp_path / 'e2e.db'}"
    engine = create_store_engine(url)
    upgrade(engine)
    records = [Record(r.image, None, r.where, slide=r.slide) for r in read_csv(bueno_dir / "labels.csv")]
    with make_sessionmaker(engine)() as s, s.begin():
        dataset = importer.ensure_dataset(s, "bueno", class_names=CLASSES, root=bueno_dir)
        importer.import_records(s, dataset, records, annotator="unused", source="test")
    engine.dispose()
    return url


E2E_PASSWORD = "correct horse battery"
E2E_ACCOUNTS = {"alice": "annotator", "bob": "annotator", "carol": "annotator", "dr_import": "admin"}


def _accounts(url: str) -> None:
    engine = create_store_engine(url)
    with make_sessionmaker(engine)() as s, s.begin():
        for name, role in E2E_ACCOUNTS.items():
            users.add_user(s, name, E2E_PASSWORD, role)
    engine.dispose()


@pytest.fixture
def app_url(store_url: str, tmp_path: Path):
    _accounts(store_url)
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: `apt-get install chromium` (Debian's build; never `playwright install`)")
    port = _free_port()
    log = (tmp_path / "streamlit.log").open("w")
    proc = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "streamlit"), "run", "app/label.py", "--server.port", str(port)],
        cwd=REPO, env=dict(os.environ, GLOM_DB=store_url, GLOM_DATA_ROOT=str(tmp_path / "data")), stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_healthy(port, proc, tmp_path / "streamlit.log")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def _shown(page) -> int:
    """The id of the crop on screen (its alt text), once the keyboard listens (app/hotkeys.py)."""
    page.wait_for_function(
        "() => { const s = window.__glomHotkeys; const img = document.querySelector('.st-key-crop img');"
        " return !!(s && s.el && s.el.isConnected && img && /#\\d+/.test(img.alt)); }",
        timeout=15_000,
    )
    return int(page.get_attribute(".st-key-crop img", "alt").split("#")[1])


def _wait_change(page, before: int) -> int:
    page.wait_for_function(
        "(before) => { const img = document.querySelector('.st-key-crop img');"
        " return !!(img && img.alt && !img.alt.endsWith('#' + before)); }",
        arg=before, timeout=15_000,
    )
    return _shown(page)


def _settle(page) -> None:
    """Wait out the rerun a widget change starts (e.g. a note committed on blur): keys pressed while
    the page rebuilds are dropped on purpose, so a test must not type into that window."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    try:  # the rerun may already be over on a fast machine
        page.wait_for_selector('[data-testid="stApp"]:not([data-test-script-state="notRunning"])', timeout=2_000)
    except PlaywrightTimeoutError:
        pass
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=30_000)
    _shown(page)


def _sign_in(page, base: str, name: str) -> None:
    page.goto(base)
    page.get_by_label("Your name").fill(name)
    page.get_by_label("Password", exact=True).fill(E2E_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_selector(CAPTION, timeout=30_000)


def _labels(url: str, name: str) -> dict[str, list[str]]:
    engine = create_store_engine(url)
    with make_sessionmaker(engine)() as s:
        rows = s.execute(
            select(Image.path, Label.classes).join(Label, Label.image_id == Image.id)
            .join(Annotator, Annotator.id == Label.annotator_id).where(Annotator.name == name)
        ).all()
    engine.dispose()
    return {p: list(c) for p, c in rows}


def test_two_clinicians_label_by_keyboard_and_nothing_is_lost(app_url, store_url, tmp_path):
    from playwright.sync_api import sync_playwright

    alice_keys = ["1", "2", "1", "1", "2"]
    bob_keys = ["2", "2", "2", "1", "1"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        alice = browser.new_context(viewport={"width": 1440, "height": 900}, accept_downloads=True).new_page()
        bob = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
        _sign_in(alice, app_url, "alice")
        _sign_in(bob, app_url, "bob")

        # Both press their keys at the same time: each press is sent before either page updates.
        seen = {"alice": [], "bob": []}
        for ka, kb in zip(alice_keys, bob_keys):
            a0, b0 = _shown(alice), _shown(bob)
            seen["alice"].append(a0)
            seen["bob"].append(b0)
            alice.keyboard.press(ka)
            bob.keyboard.press(kb)
            _wait_change(alice, a0)
            _wait_change(bob, b0)
        assert len(set(seen["alice"])) == 5, "alice was shown the same crop twice"

        # Back twice (← then Backspace) to the fourth crop and change its label.
        now = _shown(alice)
        alice.keyboard.press("ArrowLeft")
        now = _wait_change(alice, now)
        assert now == seen["alice"][4]
        alice.keyboard.press("Backspace")
        now = _wait_change(alice, now)
        assert now == seen["alice"][3]
        # The caption is a later part of the same page update than the image: wait for it.
        alice.get_by_text("Your label: globally_sclerotic", exact=False).wait_for(timeout=15_000)
        note = alice.get_by_placeholder("Note (optional)", exact=False)
        note.fill("capsule torn")
        alice.keyboard.press("2")  # typed into the note, not a label
        alice.keyboard.press("Escape")  # back to the keys
        _settle(alice)  # leaving the note commits it: a rerun, during which keys are dropped
        alice.keyboard.press("2")
        _wait_change(alice, now)

        # A reload is a new browser session: the signed session cookie keeps alice signed in
        # without the password (no URL signs anyone in), and everything stored is still there.
        alice.reload()
        alice.wait_for_selector(CAPTION, timeout=30_000)
        alice.get_by_text("5 / 789").wait_for(timeout=15_000)
        shot = tmp_path / "label_app.png"
        alice.wait_for_timeout(300)
        alice.screenshot(path=str(shot))

        # Export through the page: JSONL in the original labeling system's format.
        alice.get_by_role("link", name="Export").click()
        alice.get_by_text("annotator:alice").click()
        alice.get_by_role("button", name="Prepare export").click()
        with alice.expect_download() as download:
            alice.get_by_role("button", name="Download bueno.jsonl").click()
        exported = tmp_path / "bueno.jsonl"
        download.value.save_as(exported)
        browser.close()

    if os.environ.get("GLOM_UPDATE_SCREENSHOT"):
        (REPO / "docs").mkdir(exist_ok=True)
        (REPO / "docs" / "label_app.png").write_bytes(shot.read_bytes())

    engine = create_store_engine(store_url)
    with make_sessionmaker(engine)() as s:
        paths = dict(s.execute(select(Image.id, Image.path)).all())
        n_events = s.scalar(
            select(func.count()).select_from(LabelEvent).join(Annotator).where(Annotator.name == "alice")
        )
    engine.dispose()
    expected_alice = {paths[i]: [CLASSES[int(k) - 1]] for i, k in zip(seen["alice"], alice_keys)}
    expected_alice[paths[seen["alice"][3]]] = ["non_globally_sclerotic"]  # the edit
    assert _labels(store_url, "alice") == expected_alice
    assert _labels(store_url, "bob") == {paths[i]: [CLASSES[int(k) - 1]] for i, k in zip(seen["bob"], bob_keys)}
    assert n_events == 6  # five labels and one edit, all kept in the history
    engine = create_store_engine(store_url)
    with make_sessionmaker(engine)() as s:
        notes = dict(s.execute(select(Label.image_id, Label.note).where(Label.note != "")).all())
    engine.dispose()
    assert notes == {seen["alice"][3]: "capsule torn2"}

    lines = [json.loads(line) for line in exported.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 789
    by_name = {obj["image_name"]: obj for obj in lines}
    for path, classes in expected_alice.items():
        assert by_name[path] == {"image_name": path, **{c: int(c in classes) for c in CLASSES}}
    assert sum(any(v for k, v in obj.items() if k != "image_name") for obj in lines) == 5


# Records the id of every crop the page displays (from the crop's alt text).
RECORD_SHOWN = """() => {
  window.__shown = new Set();
  const rec = () => {
    const img = document.querySelector('.st-key-crop img');
    const m = img && img.alt.match(/#(\\d+)$/);
    if (m) window.__shown.add(Number(m[1]));
  };
  rec();
  new MutationObserver(rec).observe(document.body, {subtree: true, childList: true, attributes: true});
}"""


def test_keys_faster_than_the_screen_never_label_an_unseen_crop(app_url, store_url):
    """Presses 30 ms apart outrun the page: some are dropped, but none lands on a crop not yet
    shown, and none meant for the next crop relabels the one before it."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        _sign_in(page, app_url, "carol")
        _shown(page)
        page.evaluate(RECORD_SHOWN)
        for k in range(30):
            page.keyboard.press("1" if k % 2 else "2")
            page.wait_for_timeout(30)
        page.wait_for_timeout(2000)
        shown = set(page.evaluate("Array.from(window.__shown)"))
        browser.close()
    engine = create_store_engine(store_url)
    with make_sessionmaker(engine)() as s:
        labeled = set(
            s.scalars(select(Label.image_id).join(Annotator).where(Annotator.name == "carol")).all()
        )
        events_per_crop = s.execute(
            select(LabelEvent.image_id, func.count()).join(Annotator).where(Annotator.name == "carol")
            .group_by(LabelEvent.image_id)
        ).all()
    engine.dispose()
    assert labeled, "no key press was taken at all"
    assert labeled <= shown, f"labeled without being shown: {sorted(labeled - shown)}"
    assert all(n == 1 for _, n in events_per_crop), f"a crop was labeled twice: {events_per_crop}"


def test_import_page_takes_an_uploaded_zip_and_label_files(app_url, store_url, tmp_path, bueno_dir):
    """Upload through the page (the part AppTest cannot drive): a zip of 6 real crops becomes a
    new dataset, a CSV labels them, a CSV with an unknown class is refused with its line and
    changes nothing, and a dataset name that would escape the data folder is refused."""
    from playwright.sync_api import expect, sync_playwright

    crops = sorted(bueno_dir.rglob("*.png"))
    crops = [p for p in crops if "_mask" not in str(p)][:6]
    zpath = tmp_path / "crops.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in crops:
            zf.write(p, f"batch1/{p.name}")
    good = tmp_path / "labels.csv"
    good.write_text("image,label\n" + "".join(f"batch1/{p.name},{CLASSES[i % 2]}\n" for i, p in enumerate(crops)))
    bad = tmp_path / "bad.csv"
    bad.write_text(f"image,label\nbatch1/{crops[0].name},{CLASSES[1]}\nbatch1/{crops[1].name},normal\n")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        _sign_in(page, app_url, "dr_import")
        page.get_by_role("link", name="Import").click()
        main = page.get_by_test_id("stMain")

        def set_text(label: str, value: str) -> None:
            box = page.get_by_label(label)
            box.fill(value)
            box.press("Enter")

        def upload(path: Path, expect_text: str) -> None:
            page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(str(path))
            expect(main.get_by_text(path.name).first).to_be_visible(timeout=15_000)
            page.get_by_role("button", name="Import upload").click()
            expect(main.get_by_text(expect_text, exact=False).first).to_be_visible(timeout=30_000)

        set_text("Dataset (existing, or a new name)", "../escape")
        set_text("Classes of a new dataset (comma-separated; default: from the file)", ", ".join(CLASSES))
        page.get_by_role("tab", name="Upload").click()
        upload(zpath, "cannot name a folder")
        set_text("Dataset (existing, or a new name)", "pas-upload")
        upload(zpath, "6 images added")
        upload(good, "6 labels written")
        upload(bad, "Nothing imported: bad.csv:3: field 'label': unknown class 'normal'")
        browser.close()

    engine = create_store_engine(store_url)
    with make_sessionmaker(engine)() as s:
        ds = s.scalar(select(Dataset).where(Dataset.name == "pas-upload"))
        assert ds is not None and ds.class_keys == CLASSES
        assert Path(ds.root) == (tmp_path / "data" / "uploads" / "pas-upload").resolve()
        rows = s.execute(select(Image.path, Label.classes).join(Label, Label.image_id == Image.id)
                         .join(Annotator, Annotator.id == Label.annotator_id)
                         .where(Image.dataset_id == ds.id, Annotator.name == "imported").order_by(Image.path)).all()
        n_images = s.scalar(select(func.count()).select_from(Image).where(Image.dataset_id == ds.id))
        names = set(s.scalars(select(Dataset.name)))
    engine.dispose()
    assert n_images == 6
    # The bad file changed nothing: its first (valid) line did not land either.
    assert {p: list(c) for p, c in rows} == {f"batch1/{p.name}": [CLASSES[i % 2]] for i, p in enumerate(crops)}
    assert all((Path(ds.root) / "batch1" / p.name).read_bytes() == p.read_bytes() for p in crops)
    assert names == {"bueno", "pas-upload"} and not (tmp_path / "data" / "escape").exists()


def test_a_reload_keeps_the_clinician_signed_in_until_they_sign_out(app_url):
    """The password is asked once: a reload (a new Streamlit session) signs the same person in
    from the signed cookie; after "Sign out" a reload asks again, and a forged cookie is ignored."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        _sign_in(page, app_url, "alice")
        page.wait_for_function("() => document.cookie.includes('glom_session=')", timeout=15_000)
        page.reload()
        page.wait_for_selector(CAPTION, timeout=30_000)
        # the sidebar may render after the page's caption: wait for the button, not count it at once
        page.get_by_role("button", name="Sign out").wait_for(timeout=30_000)
        assert page.get_by_role("button", name="Sign out").count() == 1
        assert page.get_by_label("Password", exact=True).count() == 0

        page.get_by_role("button", name="Sign out").click()
        page.get_by_role("button", name="Sign in").wait_for(timeout=30_000)
        page.wait_for_function("() => !document.cookie.includes('glom_session=')", timeout=15_000)
        page.reload()
        page.get_by_role("button", name="Sign in").wait_for(timeout=30_000)

        host = app_url.split("//")[1].split(":")[0]
        context.add_cookies([{"name": "glom_session", "value": "YWxpY2U.forged", "domain": host, "path": "/"}])
        page.reload()
        page.get_by_role("button", name="Sign in").wait_for(timeout=30_000)
        assert page.locator(CAPTION).count() == 0
        browser.close()
