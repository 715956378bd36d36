"""The labeling app's flows through Streamlit's AppTest: sign in, label, back, edit, skip,
multi-label, a vanished file, adjudication, grid, export. Each test checks what the store holds."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from annotation_db import store, users
from annotation_db.db import create_store_engine, make_sessionmaker, upgrade
from annotation_db.label_resolution import dataset_stats
from annotation_db.models import Adjudication, Annotator, Image, Label, LabelEvent

APP = str(Path(__file__).resolve().parents[1] / "app" / "label.py")
N_CROPS = 6
MULTI_CLASSES = ["crescent", "sclerosis", "proliferation"]


@pytest.fixture
def crops(bueno_dir: Path) -> list[str]:
    return sorted(p.relative_to(bueno_dir).as_posix() for p in bueno_dir.glob("non_globally_sclerotic/*.png"))[:N_CROPS]


@pytest.fixture
def app_store(tmp_path: Path, bueno_dir: Path, crops: list[str], monkeypatch):
    """A store with a single-label dataset over real crops (unlabeled) and a multi-label one."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = create_store_engine(url)
    upgrade(engine)
    Session = make_sessionmaker(engine)
    multi_root = tmp_path / "multi"
    multi_root.mkdir()
    for name in crops[:3]:
        shutil.copy(bueno_dir / name, multi_root / Path(name).name)  # a temp copy: this test deletes one
    with Session() as s, s.begin():
        ds = store.create_dataset(s, "bueno", ["globally_sclerotic", "non_globally_sclerotic"], root=bueno_dir)
        slide = store.get_or_create_slide(s, "SAS_21883_001", stain="PAS")
        for i, name in enumerate(crops):
            store.add_image(s, ds, name, slide=slide, box=(1000 * i, 500, 224, 224))
        multi = store.create_dataset(s, "multi", MULTI_CLASSES, multi_label=True, root=multi_root)
        for p in sorted(multi_root.iterdir()):
            store.add_image(s, multi, p.name)
    monkeypatch.setenv("GLOM_DB", url)
    yield Session, multi_root
    engine.dispose()


PASSWORD = "correct horse battery"


def account(name: str, role: str = "annotator", password: str = PASSWORD) -> None:
    """An account ``name`` in the store the app uses ($GLOM_DB), unless it exists."""
    engine = create_store_engine(os.environ["GLOM_DB"])
    with make_sessionmaker(engine)() as s, s.begin():
        if users.authenticate(s, name, password) is None:
            users.add_user(s, name, password, role)
    engine.dispose()


def signed_in(name: str = "alice", dataset: str = "bueno", role: str = "annotator") -> AppTest:
    account(name, role)
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception, at.exception
    at.text_input(key="signin_name").input(name)
    at.text_input(key="signin_password").input(PASSWORD)
    next(b for b in at.button if b.label == "Sign in").click()
    at.run()
    assert any(f"Signed in as **{name}**" in m.value for m in at.sidebar.markdown), "sign-in did not take"
    if at.session_state.dataset_name != dataset:
        at.sidebar.selectbox(key="dataset_name").select(dataset).run()
    return at


def shown_image_id(at: AppTest) -> int:
    caption = next(c.value for c in at.caption if " · #" in c.value)
    return int(caption.split(" · #")[1].split(" ")[0])


def labels_of(Session, name: str) -> dict[str, list[str]]:
    with Session() as s:
        rows = s.execute(
            select(Image.path, Label.classes).join(Label, Label.image_id == Image.id)
            .join(Annotator, Annotator.id == Label.annotator_id).where(Annotator.name == name)
        )
        return {p: list(c) for p, c in rows}


def test_sign_in_is_required_and_attributed(app_store):
    Session, _ = app_store
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.sidebar.radio, "queues shown before anyone signed in"
    next(b for b in at.button if b.label == "Sign in").click()
    at.run()
    assert any("Type your name" in e.value for e in at.error)
    at = signed_in("dr.chen")
    with Session() as s:
        assert s.scalar(select(Annotator.name).where(Annotator.name == "dr.chen")) == "dr.chen"


def test_label_back_edit_and_skip_write_the_store(app_store, crops):
    Session, _ = app_store
    at = signed_in("alice")
    first = shown_image_id(at)
    at.button(key="class_non_globally_sclerotic").click().run()
    second = shown_image_id(at)
    assert second != first
    assert labels_of(Session, "alice") == {crops[0]: ["non_globally_sclerotic"]}

    at.button(key="class_globally_sclerotic").click().run()
    at.button(key="skip").click().run()  # the third crop stays unlabeled
    assert len(labels_of(Session, "alice")) == 2

    at.button(key="back").click().run()
    at.button(key="back").click().run()
    assert shown_image_id(at) == second
    assert any("Your label: **globally_sclerotic**" in c.value for c in at.caption)
    at.text_input(key=f"note_{second}").input("capsule torn").run()
    at.button(key="class_non_globally_sclerotic").click().run()  # edit: changes it, keeps history
    assert labels_of(Session, "alice")[crops[1]] == ["non_globally_sclerotic"]
    with Session() as s:
        events = s.execute(select(LabelEvent.classes, LabelEvent.note).where(LabelEvent.image_id == second)).all()
        assert [list(c) for c, _ in events] == [["globally_sclerotic"], ["non_globally_sclerotic"]]
        assert events[-1][1] == "capsule torn"
    # After the edit the trail goes on where it was: the skipped crop, still unlabeled.
    assert shown_image_id(at) != second
    assert at.session_state.progress["done"] == 2


def test_previous_survives_a_new_session(app_store, crops):
    """Reload = a new browser session: 'previous' still reaches the last labels from the store."""
    Session, _ = app_store
    at = signed_in("alice")
    at.button(key="class_globally_sclerotic").click().run()
    at.button(key="class_globally_sclerotic").click().run()
    at = signed_in("alice")
    third = shown_image_id(at)
    at.button(key="back").click().run()
    assert shown_image_id(at) != third
    at.button(key="class_non_globally_sclerotic").click().run()
    assert labels_of(Session, "alice")[crops[1]] == ["non_globally_sclerotic"]


def test_blind_queue_hides_other_labels_and_skips_mine(app_store, crops):
    Session, _ = app_store
    with Session() as s, s.begin():
        ds = store.get_dataset(s, "bueno")
        img = store.find_image(s, ds, crops[0])
        store.set_label(s, img, "bob", ["globally_sclerotic"])
        store.set_label(s, store.find_image(s, ds, crops[1]), "alice", ["globally_sclerotic"])
    at = signed_in("alice")
    with Session() as s:
        first = s.scalar(select(Image.id).where(Image.path == crops[0]))
    assert shown_image_id(at) == first  # bob's label does not take it out of my queue
    assert not any("bob" in m.value for m in at.markdown)
    at.button(key="class_globally_sclerotic").click().run()
    with Session() as s:
        assert shown_image_id(at) == s.scalar(select(Image.id).where(Image.path == crops[2]))


def test_multi_label_toggles_then_enter_saves(app_store):
    Session, _ = app_store
    at = signed_in("alice", dataset="multi")
    first = shown_image_id(at)
    at.button(key="class_crescent").click().run()
    at.button(key="class_sclerosis").click().run()
    at.button(key="class_crescent").click().run()  # toggled off again
    at.button(key="class_proliferation").click().run()
    assert labels_of(Session, "alice") == {}, "a toggle must not save before Enter"
    at.button(key="save_enter").click().run()
    assert sorted(labels_of(Session, "alice").values()) == [["sclerosis", "proliferation"]]
    assert shown_image_id(at) != first


def test_uncertain_is_stored(app_store):
    Session, _ = app_store
    at = signed_in("alice")
    at.button(key="uncertain").click().run()
    with Session() as s:
        assert s.scalar(select(Label.uncertain)) is True


def test_vanished_file_is_reported_and_skipped(app_store):
    Session, multi_root = app_store
    first = sorted(multi_root.iterdir())[0]
    first.unlink()
    at = signed_in("alice", dataset="multi")
    assert any("Image file missing" in w.value and first.name in w.value for w in at.warning)
    assert first.name not in next(c.value for c in at.caption if " · #" in c.value)


def test_adjudicator_decides_disagreements(app_store, crops):
    Session, _ = app_store
    with Session() as s, s.begin():
        ds = store.get_dataset(s, "bueno")
        img = store.find_image(s, ds, crops[3])
        store.set_label(s, img, "alice", ["globally_sclerotic"])
        store.set_label(s, img, "bob", ["non_globally_sclerotic"])
        agree = store.find_image(s, ds, crops[4])
        store.set_label(s, agree, "alice", ["globally_sclerotic"])
        store.set_label(s, agree, "bob", ["globally_sclerotic"])
        target = img.id
    at = signed_in("dr.adj", role="adjudicator")
    at.sidebar.radio(key="queue_kind").set_value("disagreements").run()
    assert shown_image_id(at) == target
    assert any("**alice**" in m.value and "**bob**" in m.value for m in at.markdown)
    at.button(key="class_non_globally_sclerotic").click().run()
    with Session() as s:
        adj = s.scalar(select(Adjudication).where(Adjudication.image_id == target))
        assert adj.classes == ["non_globally_sclerotic"] and adj.decided_by.name == "dr.adj"
    assert any("Nothing left" in m.value for m in at.success)


def test_grid_labels_a_page_at_once(app_store, crops):
    Session, _ = app_store
    at = signed_in("alice")
    at.switch_page("grid_page.py").run()
    assert not at.exception, at.exception
    at.selectbox(key="grid_apply_class").select("globally_sclerotic").run()
    next(b for b in at.button if b.label.startswith("Apply to")).click().run()
    assert labels_of(Session, "alice") == {c: ["globally_sclerotic"] for c in crops}


def test_export_jsonl_in_the_original_format(app_store, crops):
    Session, _ = app_store
    at = signed_in("alice")
    at.button(key="class_globally_sclerotic").click().run()
    at.switch_page("export_page.py").run()
    at.radio(key="export_source").set_value("annotator:alice").run()
    next(b for b in at.button if b.label == "Prepare export").click().run()
    lines = [json.loads(x) for x in at.session_state.export["data"].decode().splitlines()]
    assert len(lines) == N_CROPS
    assert lines[0] == {"image_name": crops[0], "globally_sclerotic": 1, "non_globally_sclerotic": 0}
    assert all(v == 0 for line in lines[1:] for k, v in line.items() if k != "image_name")


def test_agreement_page_shows_kappa_and_confusion(app_store, crops):
    Session, _ = app_store
    with Session() as s, s.begin():
        ds = store.get_dataset(s, "bueno")
        for i, name in enumerate(crops):
            img = store.find_image(s, ds, name)
            store.set_label(s, img, "alice", ["globally_sclerotic" if i < 3 else "non_globally_sclerotic"])
            store.set_label(s, img, "bob", ["globally_sclerotic" if i < 2 else "non_globally_sclerotic"])
    at = signed_in("alice", role="adjudicator")
    at.switch_page("agreement_page.py").run()
    assert not at.exception, at.exception
    assert at.metric[0].value not in ("n/a", "")
    assert at.metric[2].value == "1"  # one disagreement
    assert len(at.dataframe) == 4  # kappa per class, confusion; suggestions: blind slice vs rest, bias
    with Session() as s:
        target = store.find_image(s, store.get_dataset(s, "bueno"), crops[2]).id
    at.button_group(key=f"final_{target}").set_value("globally_sclerotic").run()
    at.button(key=f"decide_{target}").click().run()
    with Session() as s:
        adj = s.scalar(select(Adjudication).where(Adjudication.image_id == target))
        assert adj.classes == ["globally_sclerotic"] and adj.decided_by.name == "alice"
    assert any(m.value == "Final: globally_sclerotic — alice" for m in at.success)


def test_model_uncertain_queue_shows_least_sure_first(app_store, crops, monkeypatch):
    Session, _ = app_store
    with Session() as s, s.begin():
        ds = store.get_dataset(s, "bueno")
        probs = {crops[0]: 0.95, crops[1]: 0.52, crops[2]: 0.70}
        for name, p in probs.items():
            store.add_prediction(
                s, store.find_image(s, ds, name), "ckpt-1", {"globally_sclerotic": p, "non_globally_sclerotic": 1 - p}
            )
        ids = {name: store.find_image(s, ds, name).id for name in probs}
    at = signed_in("alice")
    at.sidebar.radio(key="queue_kind").set_value("uncertain").run()
    assert shown_image_id(at) == ids[crops[1]]
    at.button(key="class_globally_sclerotic").click().run()
    assert shown_image_id(at) == ids[crops[2]]
    with Session() as s, s.begin():  # the viewer predicts another crop meanwhile (margin 0.5: before crops[0])
        ds = store.get_dataset(s, "bueno")
        img = store.find_image(s, ds, crops[3])
        store.add_prediction(s, img, "ckpt-1", {"globally_sclerotic": 0.75, "non_globally_sclerotic": 0.25})
        ids[crops[3]] = img.id
    at.button(key="class_globally_sclerotic").click().run()
    assert shown_image_id(at) == ids[crops[3]]  # it joins the queue at once, in its place
    at.button(key="class_globally_sclerotic").click().run()
    assert shown_image_id(at) == ids[crops[0]]

    # A link can open the queue: ?queue=uncertain (the benchmark and the viewer use it).
    monkeypatch.setenv("GLOM_TEST_URL_SIGNIN", "1")  # sign-in by URL: a test-only switch
    linked = AppTest.from_file(APP, default_timeout=30)
    linked.query_params["annotator"] = "bob"
    linked.query_params["dataset"] = "bueno"
    linked.query_params["queue"] = "uncertain"
    linked.run()
    assert linked.session_state.queue_kind == "uncertain"
    assert shown_image_id(linked) == ids[crops[1]]


def test_import_a_label_file_from_the_server(app_store, bueno_dir, monkeypatch):
    Session, _ = app_store
    monkeypatch.setenv("GLOM_DATA_ROOT", str(bueno_dir.parent))
    at = signed_in("alice", role="admin")
    at.switch_page("import_page.py").run()
    at.text_input(key="import_dataset").input("bueno-labeled")
    at.radio(key="import_format").set_value("csv")
    at.text_input(key="import_path").input(str(bueno_dir / "labels.csv"))
    at.button(key="import_folder_btn").click().run()
    assert not at.error, [e.value for e in at.error]
    assert any("789 images added" in m.value for m in at.success)
    with Session() as s:
        ds = store.get_dataset(s, "bueno-labeled")
        assert dataset_stats(s, ds)["labels_per_annotator"] == {"imported": 789}


def test_slide_thumbnail_shows_where_the_crop_lies(app_store, crops, wsi_dir):
    Session, _ = app_store
    with Session() as s, s.begin():
        ds = store.get_dataset(s, "bueno")
        slide = store.get_or_create_slide(s, "cmu-1-small-region", path=str(wsi_dir / "cmu-1-small-region.svs"))
        store.find_image(s, ds, crops[0]).slide_id = slide.id
    at = signed_in("alice")
    assert not at.exception, at.exception
    assert any("Slide** cmu-1-small-region" in m.value and "x 0, y 500" in m.value for m in at.markdown)
    assert len(at.image) == 2, "crop and slide thumbnail"
    assert not any("thumbnail unavailable" in c.value for c in at.caption)


def test_empty_store_offers_the_demo_dataset(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    monkeypatch.setenv("GLOM_DB", url)
    monkeypatch.setenv("GLOM_SINGLE_USER", "1")  # as `make app` starts it on a fresh machine
    monkeypatch.setenv("GLOM_LOCAL_USER", "alice")
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert any("Signed in as **alice** · admin" in m.value for m in at.sidebar.markdown)
    assert any("no datasets yet" in w.value for w in at.sidebar.warning)
    next(b for b in at.sidebar.button if b.label == "Create the demo dataset").click()
    at.run()
    assert at.session_state.dataset_name == "demo"
    assert (tmp_path / "demo").is_dir(), "demo images belong beside the store, not in the checkout"
    assert shown_image_id(at) >= 1


def test_demo_that_cannot_be_written_says_why_in_the_sidebar(tmp_path, monkeypatch):
    # A file where the demo folder should go: the button reports the problem instead of a traceback,
    # and the store stays empty.
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    (tmp_path / "demo").write_text("not a folder")
    monkeypatch.setenv("GLOM_DB", url)
    monkeypatch.setenv("GLOM_SINGLE_USER", "1")
    monkeypatch.setenv("GLOM_LOCAL_USER", "alice")
    at = AppTest.from_file(APP, default_timeout=60).run()
    next(b for b in at.sidebar.button if b.label == "Create the demo dataset").click()
    at.run()
    assert not at.exception, at.exception
    assert any("Demo dataset not created" in e.value and "demo" in e.value for e in at.sidebar.error)
    assert any("no datasets yet" in w.value for w in at.sidebar.warning)


def test_by_slide_queue_walks_one_slide(app_store, crops):
    Session, _ = app_store
    with Session() as s, s.begin():
        ds = store.get_dataset(s, "bueno")
        other = store.get_or_create_slide(s, "VUHSK_0001")
        store.find_image(s, ds, crops[0]).slide_id = other.id
        wanted = [store.find_image(s, ds, c).id for c in crops[1:]]
        other_id = other.id
    at = signed_in("alice")
    at.sidebar.radio(key="queue_kind").set_value("slide").run()
    assert any("Pick a slide" in i.value for i in at.info)
    at.sidebar.selectbox(key="slide_id").select(other_id).run()
    assert shown_image_id(at) not in wanted
    at.button(key="class_globally_sclerotic").click().run()
    assert any("Nothing left" in m.value for m in at.success), "the slide had one crop"


def test_grid_pages_the_model_uncertain_queue(app_store, crops):
    """The grid walks the uncertain queue too (keyset cursors are (margin, id) pairs there)."""
    Session, _ = app_store
    with Session() as s, s.begin():
        ds = store.get_dataset(s, "bueno")
        for name, p in zip(crops[:3], (0.9, 0.6, 0.7)):
            store.add_prediction(s, store.find_image(s, ds, name), "ckpt-1",
                                 {"globally_sclerotic": p, "non_globally_sclerotic": 1 - p})
    at = signed_in("alice")
    at.sidebar.radio(key="queue_kind").set_value("uncertain").run()
    at.switch_page("grid_page.py").run()
    assert not at.exception, at.exception
    at.selectbox(key="grid_apply_class").select("non_globally_sclerotic").run()
    next(b for b in at.button if b.label.startswith("Apply to")).click().run()
    assert not at.exception, at.exception
    assert labels_of(Session, "alice") == {c: ["non_globally_sclerotic"] for c in crops[:3]}


def _predict_all(Session, crops: list[str], p_gs: float = 0.8, ckpt: str = "jobs/job-1/best@abc") -> dict[str, int]:  # noqa: ANN001
    with Session() as s, s.begin():
        ds = store.get_dataset(s, "bueno")
        ids = {}
        for name in crops:
            img = store.find_image(s, ds, name)
            store.add_prediction(s, img, ckpt, {"globally_sclerotic": p_gs, "non_globally_sclerotic": 1 - p_gs})
            ids[name] = img.id
        return ids


def _suggestions(Session, mode: str, blind_share: float, seed: int = 0) -> None:  # noqa: ANN001
    from annotation_db.suggestions import set_suggestions

    with Session() as s, s.begin():
        set_suggestions(s, store.get_dataset(s, "bueno"), mode, blind_share=blind_share, blind_seed=seed)


def _suggestion_shown(at: AppTest) -> bool:
    return any("Model suggests" in m.value for m in at.markdown)


def test_suggestion_before_is_shown_accepted_and_recorded(app_store, crops):
    from annotation_db.suggestions import is_blind

    Session, _ = app_store
    ids = _predict_all(Session, crops)
    _suggestions(Session, "before", 0.5, seed=0)
    blind = {i for i in ids.values() if is_blind(i, 0, 0.5)}
    assert 0 < len(blind) < len(ids), "seed 0 must split these 6 crops"
    at = signed_in("alice")
    seen = set()
    for _ in crops:
        image_id = shown_image_id(at)
        seen.add(image_id)
        assert _suggestion_shown(at) == (image_id not in blind), image_id
        if image_id in blind:
            at.button(key="class_non_globally_sclerotic").click().run()
        else:
            assert any("80%" in m.value for m in at.markdown if "Model suggests" in m.value)
            at.button(key="accept_suggestion").click().run()
    assert seen == set(ids.values())
    with Session() as s:
        rows = s.execute(select(Label.image_id, Label.classes, Label.suggested, Label.suggested_by)).all()
    for image_id, classes, suggested, by in rows:
        if image_id in blind:
            assert (classes, suggested, by) == (["non_globally_sclerotic"], None, None)
        else:
            assert (classes, suggested, by) == (["globally_sclerotic"], "globally_sclerotic", "jobs/job-1/best@abc")


def test_suggestion_after_waits_for_my_own_label(app_store, crops):
    Session, _ = app_store
    ids = _predict_all(Session, crops)
    _suggestions(Session, "after", 0.0)
    at = signed_in("alice")
    first = shown_image_id(at)
    assert not _suggestion_shown(at)
    at.button(key="class_non_globally_sclerotic").click().run()
    assert shown_image_id(at) == first and _suggestion_shown(at)  # my label saved; now the model's
    with Session() as s:
        assert s.scalar(select(Label.suggested).where(Label.image_id == first)) is None
    at.button(key="accept_suggestion").click().run()
    assert shown_image_id(at) != first
    with Session() as s:
        label = s.scalar(select(Label).where(Label.image_id == first))
        assert (label.classes, label.suggested) == (["globally_sclerotic"], "globally_sclerotic")
        events = s.scalars(select(LabelEvent.suggested).where(LabelEvent.image_id == first)
                           .order_by(LabelEvent.id)).all()
        assert events == [None, "globally_sclerotic"]
    assert len(ids) == N_CROPS


def test_models_page_is_read_only_for_annotators_and_lists_jobs(app_store, tmp_path, monkeypatch):
    from annotation_db import jobs

    Session, _ = app_store
    monkeypatch.setenv("GLOM_RUNS", str(tmp_path / "runs"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\n")
    with Session() as s, s.begin():
        ds = store.get_dataset(s, "bueno")
        job = jobs.submit_job(s, ds, created_by="dr_admin", recipe=recipe, runs_dir=tmp_path / "runs")
        jobs.finish_job(s, job.id, "failed", error="error: dataset 'bueno' has no single-class labels")
    at = signed_in("alice")
    at.switch_page("models_page.py").run()
    assert not at.exception, at.exception
    assert not any(b.key == "start_training" for b in at.button)
    assert any("Only admins start training jobs" in c.value for c in at.caption)
    assert any("error: dataset 'bueno' has no single-class labels" in c.value for c in at.caption)
    assert not any("Traceback" in c.value for c in at.caption)

    admin = signed_in("dr_admin", role="admin")
    admin.switch_page("models_page.py").run()
    assert not admin.exception, admin.exception
    assert any(b.key == "start_training" for b in admin.button)
    admin.radio(key="sugg_mode").set_value("before").run()
    admin.button(key="save_suggestions").click().run()
    with Session() as s:
        assert store.get_dataset(s, "bueno").suggestions == "before"
