"""Queues of the labeling app (annotation_db.queues) on each backend: what comes next, in order."""

from __future__ import annotations

from pathlib import Path

import pytest

from annotation_db import queues, store
from annotation_db.models import Image


@pytest.fixture
def seeded(Session, bueno_dir: Path):  # noqa: N803 - the conftest's session factory
    """Eight real crops on two slides, labeled variously by alice and bob."""
    names = sorted(p.relative_to(bueno_dir).as_posix() for p in bueno_dir.glob("globally_sclerotic/*.png"))[:8]
    with Session() as s, s.begin():
        ds = store.create_dataset(s, "q", ["a", "b", "c"], root=bueno_dir)
        s1, s2 = store.get_or_create_slide(s, "s1"), store.get_or_create_slide(s, "s2")
        images = [store.add_image(s, ds, n, slide=s1 if i % 2 == 0 else s2) for i, n in enumerate(names)]
        alice, bob = store.get_or_create_annotator(s, "alice"), store.get_or_create_annotator(s, "bob")
        for img, (va, vb) in zip(images, [("a", "a"), ("b", "c"), (None, "a"), ("c", "c"), ("a", "b")]):
            if va:
                store.set_label(s, img, alice, [va])
            store.set_label(s, img, bob, [vb])
        ids = [i.id for i in images]
        out = dict(ds=ds.id, alice=alice.id, bob=bob.id, ids=ids, s1=s1.id)
    return Session, out


def _walk(Session, spec, limit=2):  # noqa: N803
    seen, cursor = [], 0
    with Session() as s:
        while batch := queues.next_image_ids(s, spec, cursor, limit=limit):
            seen += [i for _, i in batch]
            cursor = batch[-1][0]
    return seen


def test_mine_skips_only_my_labels(seeded):
    Session, d = seeded
    spec = queues.QueueSpec("mine", d["ds"], d["alice"])
    assert _walk(Session, spec) == [d["ids"][2], *d["ids"][5:]]


def test_all_and_slide_queues(seeded):
    Session, d = seeded
    assert _walk(Session, queues.QueueSpec("all", d["ds"], d["alice"])) == d["ids"]
    assert _walk(Session, queues.QueueSpec("slide", d["ds"], d["alice"], d["s1"])) == d["ids"][0::2]


def test_disagreements_leave_out_agreed_and_adjudicated(seeded):
    Session, d = seeded
    spec = queues.QueueSpec("disagreements", d["ds"], d["alice"])
    assert _walk(Session, spec) == [d["ids"][1], d["ids"][4]]
    with Session() as s, s.begin():
        img = s.get(Image, d["ids"][1])
        store.adjudicate(s, img, "carol", ["b"])
    assert _walk(Session, spec) == [d["ids"][4]]


def test_uncertain_ranks_by_margin_and_skips_mine(seeded):
    Session, d = seeded
    spec = queues.QueueSpec("uncertain", d["ds"], d["alice"])
    assert _walk(Session, spec) == []  # no predictions yet
    with Session() as s, s.begin():
        for image_id, p in zip(d["ids"][4:8], [0.9, 0.4, 0.6, 0.34]):
            store.add_prediction(s, s.get(Image, image_id), "m1", {"a": p, "b": (1 - p) * 0.8, "c": (1 - p) * 0.2})
        ranking = queues.uncertainty_ranking(s, d["ds"], queues.latest_checkpoint(s, d["ds"]))
    # margins between the top two: 0.82, 0.08, 0.28, 0.19
    assert ranking == [d["ids"][5], d["ids"][7], d["ids"][6], d["ids"][4]]
    for limit in (1, 2, 10):  # alice labeled ids[4]; keyset pages of any size give the same walk
        assert _walk(Session, spec, limit) == [d["ids"][5], d["ids"][7], d["ids"][6]]
    assert _walk(Session, queues.QueueSpec("uncertain", d["ds"], _carol(Session))) == ranking  # labeled nothing


def _carol(Session) -> int:  # noqa: N803
    with Session() as s, s.begin():
        return store.get_or_create_annotator(s, "carol").id


def test_uncertain_queue_sees_new_predictions_at_once_and_the_latest_per_image(seeded):
    Session, d = seeded
    spec = queues.QueueSpec("uncertain", d["ds"], _carol(Session))
    with Session() as s, s.begin():
        for image_id, p in zip(d["ids"][5:8], [0.9, 0.6, 0.8]):  # margins 0.8, 0.2, 0.6
            store.add_prediction(s, s.get(Image, image_id), "m1", {"a": p, "b": 1 - p, "c": 0.0})
    with Session() as s:
        [(cursor, first)] = queues.next_image_ids(s, spec, 0, limit=1)
    assert first == d["ids"][6]
    with Session() as s, s.begin():  # the viewer predicts again while the clinician works
        store.add_prediction(s, s.get(Image, d["ids"][7]), "m1", {"a": 0.55, "b": 0.45, "c": 0.0})  # now 0.1
        store.add_prediction(s, s.get(Image, d["ids"][5]), "m1", {"a": 0.7, "b": 0.3, "c": 0.0})  # now 0.4
        store.add_prediction(s, s.get(Image, d["ids"][3]), "m1", {"a": 0.6, "b": 0.3, "c": 0.1})  # new, 0.3
    with Session() as s:
        rest = [i for _, i in queues.next_image_ids(s, spec, cursor, limit=10)]
    # after the cursor (ids[6] at 0.2): the new one, then ids[5] at its latest margin; ids[7] moved
    # before the cursor (a fresh walk starts with it); every image once
    assert rest == [d["ids"][3], d["ids"][5]]
    assert _walk(Session, spec) == [d["ids"][7], d["ids"][6], d["ids"][3], d["ids"][5]]


def test_recent_labels_and_progress(seeded):
    Session, d = seeded
    with Session() as s:
        recent = queues.recent_labeled_ids(s, d["ds"], d["alice"], limit=3)
        p = queues.progress(s, d["ds"], d["alice"])
    assert recent == [d["ids"][4], d["ids"][3], d["ids"][1]]
    assert (p.done, p.total, p.per_class) == (4, 8, {"a": 2, "b": 1, "c": 1})


def test_a_queue_needs_a_known_kind_and_a_slide():
    with pytest.raises(queues.QueueError, match="unknown queue"):
        queues.QueueSpec("nope", 1, 1)
    with pytest.raises(queues.QueueError, match="needs a slide"):
        queues.QueueSpec("slide", 1, 1)
