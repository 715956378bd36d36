"""Store writes: attribution, history that is never overwritten, adjudication, label sources."""

import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select

from annotation_db import store
from annotation_db.classes import GLOMERULUS_CLASSES, InvalidLabelError
from annotation_db.images import ImageFileError
from annotation_db.label_resolution import dataset_stats, labeled_items, labels_per_annotator, resolve_labels
from annotation_db.models import LabelEvent


@pytest.fixture
def crops(tmp_path):
    root = tmp_path / "crops"
    root.mkdir()
    for i in range(4):
        PILImage.new("RGB", (20 + i, 10), (i * 40, 0, 0)).save(root / f"c{i}.png")
    return root


def _dataset(s, root, multi=False):
    return store.create_dataset(s, "glom", GLOMERULUS_CLASSES, multi_label=multi, root=root)


def test_relabel_keeps_one_current_label_and_the_whole_history(Session, crops):
    with Session() as s, s.begin():
        ds = _dataset(s, crops)
        img = store.add_image(s, ds, "c0.png")
        store.set_label(s, img, "dr_li", ["normal"])
        store.set_label(s, img, "dr_li", ["crescent"], note="on second look")
        store.set_label(s, img, "dr_wang", ["normal"], uncertain=True)
    with Session() as s, s.begin():
        ds = store.get_dataset(s, "glom")
        img = store.find_image(s, ds, "c0.png")
        assert labels_per_annotator(s, ds)[img.id] == {"dr_li": ["crescent"], "dr_wang": ["normal"]}
        history = store.label_history(s, img)
        assert [(e.action, e.classes) for e in history] == [
            ("set", ["normal"]),
            ("set", ["crescent"]),
            ("set", ["normal"]),
        ]
        assert history[1].note == "on second look"
        store.clear_label(s, img, "dr_li")
    with Session() as s, s.begin():
        img = store.find_image(s, store.get_dataset(s, "glom"), "c0.png")
        assert [e.action for e in store.label_history(s, img)] == ["set", "set", "set", "clear"]
        assert s.scalar(select(func.count()).select_from(LabelEvent)) == 4


def test_image_metadata_and_idempotent_registration(Session, crops):
    with Session() as s, s.begin():
        ds = _dataset(s, crops)
        a = store.add_image(s, ds, "c2.png")
        b = store.add_image(s, ds, crops / "c2.png")  # absolute inside the root: same image
        assert a.id == b.id and (a.width, a.height) == (22, 10) and len(a.sha256) == 64


def test_bad_labels_are_refused_with_the_reason(Session, crops):
    with Session() as s, s.begin():
        ds = _dataset(s, crops)
        img = store.add_image(s, ds, "c0.png")
        with pytest.raises(InvalidLabelError, match="unknown class 'sclerosis'"):
            store.set_label(s, img, "a", ["sclerosis"])
        with pytest.raises(InvalidLabelError, match="single-label"):
            store.set_label(s, img, "a", ["normal", "crescent"])
        with pytest.raises(InvalidLabelError, match="needs a class"):
            store.set_label(s, img, "a", [])


def test_multi_label_dataset_stores_classes_in_schema_order(Session, crops):
    with Session() as s, s.begin():
        ds = _dataset(s, crops, multi=True)
        img = store.add_image(s, ds, "c1.png")
        label = store.set_label(s, img, "a", ["crescent", "segmental_sclerosis"])
        assert label.classes == ["segmental_sclerosis", "crescent"]


def test_images_outside_the_root_or_not_images_are_refused(Session, crops, tmp_path):
    (tmp_path / "outside.png").write_bytes((crops / "c0.png").read_bytes())
    (crops / "notes.png").write_text("not a picture")
    with Session() as s, s.begin():
        ds = _dataset(s, crops)
        with pytest.raises(ImageFileError, match="outside the data root"):
            store.add_image(s, ds, "../outside.png")
        with pytest.raises(ImageFileError, match="not an image"):
            store.add_image(s, ds, "notes.png")
        with pytest.raises(ImageFileError, match="not found"):
            store.add_image(s, ds, "gone.png")


def test_label_sources_majority_adjudicated_final(Session, crops):
    with Session() as s, s.begin():
        ds = _dataset(s, crops)
        imgs = [store.add_image(s, ds, f"c{i}.png") for i in range(3)]
        # c0: 2 vs 1 -> majority normal; c1: 1 vs 1 tie -> undecided; c2: unanimous crescent
        for who, cls in [("a", "normal"), ("b", "normal"), ("c", "crescent")]:
            store.set_label(s, imgs[0], who, [cls])
        store.set_label(s, imgs[1], "a", ["normal"])
        store.set_label(s, imgs[1], "b", ["crescent"])
        store.set_label(s, imgs[2], "a", ["crescent"])
        store.adjudicate(s, imgs[1], "chief", ["crescent"], note="capsule breached")
        ids = [i.id for i in imgs]
    with Session() as s, s.begin():
        ds = store.get_dataset(s, "glom")
        maj = resolve_labels(s, ds, "majority")
        assert maj.by_image == {ids[0]: ["normal"], ids[2]: ["crescent"]} and maj.undecided == [ids[1]]
        assert resolve_labels(s, ds, "adjudicated").by_image == {ids[1]: ["crescent"]}
        final = resolve_labels(s, ds, "final").by_image
        assert final == {ids[0]: ["normal"], ids[1]: ["crescent"], ids[2]: ["crescent"]}
        assert resolve_labels(s, ds, "annotator:b").by_image == {ids[0]: ["normal"], ids[1]: ["crescent"]}
        with pytest.raises(store.StoreError, match="No annotator named 'zed'"):
            resolve_labels(s, ds, "annotator:zed")
        items = labeled_items(s, "glom", "final")
        assert [(i.rel_path, i.classes) for i in items] == [
            ("c0.png", ["normal"]), ("c1.png", ["crescent"]), ("c2.png", ["crescent"])
        ]
        assert items[0].path == str(crops.resolve() / "c0.png")
        stats = dataset_stats(s, ds)
        assert stats["images"] == 3 and stats["adjudicated"] == 1
        assert stats["final_per_class"]["crescent"] == 2


def test_predictions_are_stored_with_the_argmax(Session, crops):
    with Session() as s, s.begin():
        ds = _dataset(s, crops)
        img = store.add_image(s, ds, "c0.png")
        p = store.add_prediction(s, img, "run1/best", {"normal": 0.2, "crescent": 0.7, "segmental_sclerosis": 0.1})
        assert p.predicted == "crescent"
        with pytest.raises(InvalidLabelError):
            store.add_prediction(s, img, "run1/best", {"bogus": 1.0})


def test_unknown_dataset_lists_known_ones(Session, crops):
    with Session() as s, s.begin():
        _dataset(s, crops)
        with pytest.raises(store.DatasetNotFoundError, match="known: glom"):
            store.get_dataset(s, "nope")
        with pytest.raises(store.DatasetExistsError):
            _dataset(s, crops)


def test_a_models_call_is_not_a_vote(Session, crops):
    with Session() as s, s.begin():
        ds = _dataset(s, crops)
        img = store.add_image(s, ds, "c0.png")
        store.set_label(s, img, "dr_li", ["crescent"])
        store.set_label(s, img, "model:run1/best@abc", ["normal"])
        store.set_label(s, img, "model:run2/best@def", ["normal"])
    with Session() as s:
        ds = store.get_dataset(s, "glom")
        assert list(resolve_labels(s, ds, "majority").by_image.values()) == [["crescent"]]
        assert len(labels_per_annotator(s, ds)[img.id]) == 3  # still visible to queues
        from annotation_db.agreement import agreement_report

        assert agreement_report(s, ds).items == 0  # one person: nothing to agree on
        assert agreement_report(s, ds, ["dr_li", "model:run1/best@abc"]).items == 1
