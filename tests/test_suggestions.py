"""Suggestions while labeling: the blind slice, what is shown when, what a label records, and the
automation-bias figures on a constructed case whose answers are known."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import select

from annotation_db import agreement, store, suggestions
from annotation_db.models import Label, LabelEvent

CLASSES = ["globally_sclerotic", "non_globally_sclerotic"]
GS, NGS = CLASSES
CKPT = "jobs/job-1/best@abc"


def test_blind_slice_is_deterministic_sized_and_nested():
    ids = range(1, 20001)
    at_10 = {i for i in ids if suggestions.is_blind(i, seed=7, share=0.10)}
    assert at_10 == {i for i in ids if suggestions.is_blind(i, seed=7, share=0.10)}  # same answer every time
    assert 0.09 < len(at_10) / len(ids) < 0.11
    at_5 = {i for i in ids if suggestions.is_blind(i, seed=7, share=0.05)}
    assert at_5 < at_10  # a smaller share keeps its images inside the larger slice
    other_seed = {i for i in ids if suggestions.is_blind(i, seed=8, share=0.10)}
    assert len(other_seed & at_10) < 0.2 * len(at_10)  # another seed draws another slice
    assert not any(suggestions.is_blind(i, 7, 0.0) for i in ids)
    assert all(suggestions.is_blind(i, 7, 1.0) for i in range(1, 100))
    # pinned: a change of the hash would silently move images between the slices of a live study
    assert [i for i in range(1, 40) if suggestions.is_blind(i, 0, 0.1)] == \
        [i for i in range(1, 40) if suggestions.blind_fraction(i, 0) < 0.1]


@pytest.fixture
def store_with_images(Session, bueno_dir):
    """12 real crops, unlabeled, in dataset "d"."""
    crops = sorted(bueno_dir.glob("non_globally_sclerotic/*.png"))[:12]
    with Session() as s, s.begin():
        ds = store.create_dataset(s, "d", CLASSES, root=bueno_dir)
        ids = [store.add_image(s, ds, p.relative_to(bueno_dir).as_posix()).id for p in crops]
        return Session, ds.id, ids


def test_what_is_shown_follows_the_setting_and_the_blind_slice(store_with_images):
    Session, _, ids = store_with_images
    with Session() as s, s.begin():
        ds = store.get_dataset(s, "d")
        for i in ids:
            store.add_prediction(s, s.get(store.Image, i), CKPT, {GS: 0.8, NGS: 0.2})
        image = ids[0]
        assert suggestions.suggestion_to_show(s, ds, image, labeled_by_me=False) is None  # off by default
        suggestions.set_suggestions(s, ds, "before", blind_share=0.0)
        shown = suggestions.suggestion_to_show(s, ds, image, labeled_by_me=False)
        assert shown == suggestions.Suggestion(GS, 0.8, CKPT)
        suggestions.set_suggestions(s, ds, "after")
        assert suggestions.suggestion_to_show(s, ds, image, labeled_by_me=False) is None
        assert suggestions.suggestion_to_show(s, ds, image, labeled_by_me=True) == shown
        suggestions.set_suggestions(s, ds, "before", blind_share=0.5, blind_seed=3)
        blind = [i for i in ids if suggestions.is_blind(i, 3, 0.5)]
        assert blind and len(blind) < len(ids)
        for i in ids:
            got = suggestions.suggestion_to_show(s, ds, i, labeled_by_me=True)
            assert (got is None) == (i in blind)
        # the active model, once set, is where suggestions come from
        suggestions.set_active_checkpoint(s, ds, "/runs/other/best.safetensors", "other@1")
        assert suggestions.active_checkpoint(s, ds) == "/runs/other/best.safetensors"
        assert suggestions.suggestion_to_show(s, ds, next(i for i in ids if i not in blind), labeled_by_me=True) is None
        with pytest.raises(suggestions.SuggestionError, match="sometimes"):
            suggestions.set_suggestions(s, ds, "sometimes")
        with pytest.raises(suggestions.SuggestionError, match="blind share"):
            suggestions.set_suggestions(s, ds, "off", blind_share=1.5)


def test_a_label_records_the_suggestion_it_was_given_with(store_with_images):
    Session, _, ids = store_with_images
    with Session() as s, s.begin():
        image = s.get(store.Image, ids[0])
        store.set_label(s, image, "alice", [NGS])  # unprompted
        store.set_label(s, image, "alice", [GS], suggested=GS, suggested_by=CKPT)  # took the suggestion
        label = s.scalar(select(Label).where(Label.image_id == ids[0]))
        assert (label.classes, label.suggested, label.suggested_by) == ([GS], GS, CKPT)
        events = s.scalars(select(LabelEvent).where(LabelEvent.image_id == ids[0]).order_by(LabelEvent.id)).all()
        assert [(e.classes, e.suggested) for e in events] == [([NGS], None), ([GS], GS)]
        store.set_label(s, image, "alice", [NGS])  # relabelled without one: the current label says so
        s.expire_all()
        assert s.scalar(select(Label.suggested).where(Label.image_id == ids[0])) is None


def test_bias_report_on_a_constructed_case(store_with_images):
    """Known answers: the model says GS everywhere; the truth (adjudicated) is NGS everywhere.

    Blind slice = share 0.5 with seed 1. On non-blind images alice is shown the (wrong) GS
    suggestion and follows it on all of them; bob is shown it and follows it on none. On blind
    images alice chooses GS on exactly one, bob on none.
    """
    Session, _, ids = store_with_images
    with Session() as s, s.begin():
        ds = store.get_dataset(s, "d")
        suggestions.set_suggestions(s, ds, "before", blind_share=0.5, blind_seed=1)
        blind = [i for i in ids if suggestions.is_blind(i, 1, 0.5)]
        rest = [i for i in ids if i not in blind]
        assert len(blind) >= 2 and len(rest) >= 2
        for i in ids:
            image = s.get(store.Image, i)
            store.add_prediction(s, image, CKPT, {GS: 0.9, NGS: 0.1})
            store.adjudicate(s, image, "judge", [NGS])
        for i in rest:
            image = s.get(store.Image, i)
            store.set_label(s, image, "alice", [GS], suggested=GS, suggested_by=CKPT)
            store.set_label(s, image, "bob", [NGS], suggested=GS, suggested_by=CKPT)
        for k, i in enumerate(blind):
            image = s.get(store.Image, i)
            store.set_label(s, image, "alice", [GS] if k == 0 else [NGS])
            store.set_label(s, image, "bob", [NGS])
        store.set_label(s, s.get(store.Image, ids[0]), "model:x", [GS])  # a model's label is not a clinician's
        report = agreement.suggestion_report(s, ds)

    assert report.checkpoint_id == CKPT
    nb, nr = len(blind), len(rest)
    a, b, everyone = report.bias["alice"], report.bias["bob"], report.bias["all"]
    assert (a.shown_wrong, a.followed_wrong, a.blind_wrong, a.chose_unprompted) == (nr, nr, nb, 1)
    assert (b.shown_wrong, b.followed_wrong, b.blind_wrong, b.chose_unprompted) == (nr, 0, nb, 0)
    assert (everyone.shown_wrong, everyone.followed_wrong) == (2 * nr, nr)
    assert a.followed_rate == 1.0 and a.unprompted_rate == pytest.approx(1 / nb)
    assert b.followed_rate == 0.0 and b.unprompted_rate == 0.0
    # agreement with the model (GS): rest = alice's nr of 2·nr labels; blind = 1 of 2·nb
    assert report.slices["rest"].model_agreement == pytest.approx(0.5)
    assert report.slices["blind"].model_agreement == pytest.approx(1 / (2 * nb))
    # between clinicians: alice and bob never agree on the rest; on the blind slice all but one pair
    assert (report.slices["rest"].pairs, report.slices["rest"].agree_pairs) == (nr, 0)
    assert (report.slices["blind"].pairs, report.slices["blind"].agree_pairs) == (nb, nb - 1)
    assert report.per_annotator["alice"]["rest"].model_agreement == 1.0
    assert "model:x" not in report.per_annotator
    d = report.to_dict()
    assert d["bias"]["alice"]["followed_rate"] == 1.0 and d["slices"]["rest"]["pairs"] == nr
    text = "\n".join(agreement.suggestion_report_lines(report))
    assert f"alice: followed {nr}/{nr} (100.0 %) vs unprompted 1/{nb}" in text


def test_no_model_no_adjudication_gives_empty_figures(store_with_images):
    Session, _, ids = store_with_images
    with Session() as s, s.begin():
        store.set_label(s, s.get(store.Image, ids[0]), "alice", [GS])
        report = agreement.suggestion_report(s, store.get_dataset(s, "d"))
    assert report.checkpoint_id is None
    assert report.bias["all"].shown_wrong == 0 and math.isnan(report.bias["all"].followed_rate)
    assert sum(f.labels for f in report.slices.values()) == 1


def test_glom_agreement_prints_the_blind_slice_and_bias(sqlite_url, bueno_dir, capsys):
    import json

    from annotation_db.db import create_store_engine, make_sessionmaker, upgrade
    from core.cli import main as glom

    engine = create_store_engine(sqlite_url)
    upgrade(engine)
    crops = sorted(bueno_dir.glob("non_globally_sclerotic/*.png"))[:4]
    with make_sessionmaker(engine)() as s, s.begin():
        ds = store.create_dataset(s, "d", CLASSES, root=bueno_dir)
        for p in crops:
            image = store.add_image(s, ds, p.relative_to(bueno_dir).as_posix())
            store.add_prediction(s, image, CKPT, {GS: 0.7, NGS: 0.3})
            store.adjudicate(s, image, "judge", [NGS])
            store.set_label(s, image, "alice", [GS], suggested=GS, suggested_by=CKPT)
            store.set_label(s, image, "bob", [NGS])
    engine.dispose()
    assert glom(["--db", sqlite_url, "agreement", "--dataset", "d"]) == 0
    out = capsys.readouterr().out
    assert f"suggestions: model {CKPT}; blind slice 10.0 %" in out
    assert "alice: followed 4/4 (100.0 %)" in out and "bob: followed 0/0 (n/a)" in out
    assert glom(["--db", sqlite_url, "agreement", "--dataset", "d", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["suggestions"]["bias"]["alice"]["followed_wrong"] == 4


def test_the_active_model_orders_the_uncertain_queue(store_with_images):
    from annotation_db import queues

    Session, ds_id, ids = store_with_images
    with Session() as s, s.begin():
        ds = store.get_dataset(s, "d")
        me = store.get_or_create_annotator(s, "alice")
        for k, i in enumerate(ids):  # "old" is least sure of the first image, "new" of the last
            image = s.get(store.Image, i)
            p_old, p_new = 0.5 + 0.04 * k, 0.95 - 0.04 * k
            store.add_prediction(s, image, "old", {GS: p_old, NGS: 1 - p_old})
            store.add_prediction(s, image, "new", {GS: p_new, NGS: 1 - p_new})
        spec = queues.QueueSpec("uncertain", ds_id, me.id)
        assert queues.next_image_ids(s, spec, limit=1)[0][1] == ids[-1]  # the latest predictions rank
        suggestions.set_active_checkpoint(s, ds, "/runs/old/best.safetensors", "old")
        assert queues.next_image_ids(s, spec, limit=1)[0][1] == ids[0]  # the active model ranks
        assert suggestions.suggestion_checkpoint(s, ds) == "old"
