"""Agreement statistics against published values and sklearn; the report from the store."""

import math

import numpy as np
import pytest
from PIL import Image as PILImage
from sklearn.metrics import cohen_kappa_score

from annotation_db import agreement, store
from annotation_db.classes import GLOMERULUS_CLASSES


def test_cohen_kappa_matches_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 4, 50)
        b = np.where(rng.random(50) < 0.6, a, rng.integers(0, 4, 50))
        assert agreement.cohen_kappa(list(a), list(b)) == pytest.approx(cohen_kappa_score(a, b))
    assert math.isnan(agreement.cohen_kappa([1, 1], [1, 1]))  # undefined, not a fake 1.0


def test_fleiss_kappa_matches_the_published_example():
    # Fleiss (1971) worked example as given on Wikipedia: 10 items, 14 raters, 5 categories -> 0.210
    counts = np.array([
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ])
    assert agreement.fleiss_kappa(counts) == pytest.approx(0.20993, abs=1e-4)


def test_fleiss_kappa_is_one_for_perfect_agreement():
    perfect = np.array([[3, 0], [0, 3], [3, 0]])
    assert agreement.fleiss_kappa(perfect) == pytest.approx(1.0)


@pytest.fixture
def labeled(SqliteSession, tmp_path):
    for i in range(6):
        PILImage.new("RGB", (4, 4), (i, 0, 0)).save(tmp_path / f"{i}.png")
    a = ["normal", "normal", "crescent", "crescent", "segmental_sclerosis", "normal"]
    b = ["normal", "crescent", "crescent", "crescent", "normal", "normal"]
    c = ["normal", "crescent", "crescent", "normal", "mesangial_proliferation", "normal"]
    with SqliteSession() as s, s.begin():
        ds = store.create_dataset(s, "g", GLOMERULUS_CLASSES, root=tmp_path)
        for i in range(6):
            img = store.add_image(s, ds, f"{i}.png")
            for who, labels in (("a", a), ("b", b), ("c", c)):
                store.set_label(s, img, who, [labels[i]])
    return SqliteSession, a, b, c


def test_two_annotator_report(labeled):
    Session, a, b, _ = labeled
    with Session() as s:
        r = agreement.agreement_report(s, store.get_dataset(s, "g"), ["a", "b"])
    assert r.method == "cohen" and r.items == 6
    assert r.kappa == pytest.approx(cohen_kappa_score(a, b))
    assert r.per_class_kappa["crescent"] == pytest.approx(
        cohen_kappa_score([x == "crescent" for x in a], [x == "crescent" for x in b])
    )
    keys = GLOMERULUS_CLASSES
    idx = {c.key: i for i, c in enumerate(keys)}
    expected = np.zeros((4, 4), int)
    for x, y in zip(a, b):
        expected[idx[x], idx[y]] += 1
    assert np.array_equal(np.array(r.confusion), expected)
    assert [d.path for d in r.disagreements] == ["1.png", "4.png"]


def test_three_annotators_use_fleiss_and_rank_worst_first(labeled):
    Session, *_ = labeled
    with Session() as s:
        r = agreement.agreement_report(s, store.get_dataset(s, "g"))
    assert r.method == "fleiss" and r.annotators == ["a", "b", "c"]
    # 4.png: three different answers (1/3 agree) comes before the 2-of-3 disagreements.
    assert r.disagreements[0].path == "4.png" and r.disagreements[0].agreement == pytest.approx(1 / 3, abs=1e-3)
    assert {d.path for d in r.disagreements[1:]} == {"1.png", "3.png"}
    assert -1 <= r.kappa <= 1 and sum(map(sum, r.confusion)) == 6 * 3
    as_dict = r.to_dict()
    assert as_dict["disagreements"][0]["votes"] == {"a": ["segmental_sclerosis"], "b": ["normal"], "c": ["mesangial_proliferation"]}
