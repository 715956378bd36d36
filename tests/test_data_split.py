"""Splits never put one slide in two parts; they are stratified, seeded and saved; readers work."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from core.labeled_sets import DataError, LabeledSet, Sample, load_labeled_set, shared_data_dir
from core.splits import Split, kfold_grouped, split_grouped

BUENO = shared_data_dir() / "glomeruli-bueno"
needs_bueno = pytest.mark.skipif(not (BUENO / "labels.csv").is_file(), reason="shared real crops not present")


@pytest.fixture(scope="module")
def bueno() -> LabeledSet:
    return load_labeled_set("csv", str(BUENO / "labels.csv"))


def _slides(ls: LabeledSet, paths: list[str]) -> set[str]:
    slide = {s.path: s.slide for s in ls.samples}
    return {slide[p] for p in paths}


@needs_bueno
@pytest.mark.parametrize("ratios", [(0.6, 0.2, 0.2), (0.7, 0.3)])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_no_slide_in_two_splits(bueno, ratios, seed):
    split = split_grouped(bueno, ratios, seed=seed)
    parts = [split.train, split.val, split.test]
    assert sum(map(len, parts)) == len(bueno.samples)
    assert len(set().union(*map(set, parts))) == len(bueno.samples)
    slides = [_slides(bueno, p) for p in parts]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not slides[i] & slides[j]
    total = len(bueno.samples)
    for part, r in zip((split.train, split.test), (ratios[0], ratios[-1])):
        assert abs(len(part) / total - r) < 0.08
        labels = Counter(s.label for s in bueno.samples if s.path in set(part))
        assert set(labels) == {0, 1}  # both classes in every split


@needs_bueno
def test_split_is_seeded_and_round_trips(bueno, tmp_path):
    a, b = split_grouped(bueno, seed=3), split_grouped(bueno, seed=3)
    assert a.to_dict() == b.to_dict()
    assert split_grouped(bueno, seed=4).to_dict() != a.to_dict()
    a.save(tmp_path / "split.json")
    again = Split.load(tmp_path / "split.json")
    assert again == a
    assert [len(v) for v in again.subsets(bueno).values()] == [len(a.train), len(a.val), len(a.test)]


@needs_bueno
def test_kfold_test_parts_partition_the_slides(bueno):
    folds = kfold_grouped(bueno, n_folds=4, seed=0)
    seen: list[str] = []
    for f in folds:
        assert not _slides(bueno, f.test) & _slides(bueno, f.train + f.val)
        assert not _slides(bueno, f.train) & _slides(bueno, f.val)
        seen += f.test
    assert sorted(seen) == sorted(s.path for s in bueno.samples)


def test_ungrouped_split_is_stratified():
    samples = [Sample(f"/x/{i}.png", int(i % 10 == 0)) for i in range(200)]
    split = split_grouped(LabeledSet(["a", "b"], samples), (0.6, 0.2, 0.2), group_by="none")
    label = {s.path: s.label for s in samples}
    for part, n in ((split.train, 120), (split.val, 40), (split.test, 40)):
        assert len(part) == n
        assert sum(label[p] for p in part) == n // 10


def test_too_few_slides_is_an_error():
    samples = [Sample(f"/x/{i}.png", i % 2, slide="only") for i in range(10)]
    with pytest.raises(DataError, match="slide"):
        split_grouped(LabeledSet(["a", "b"], samples))


def test_seed_jsonl_and_csv_readers(tmp_path):
    names = ["正常肾小球", "节段性硬化", "系膜细胞增生", "新月体形成"]
    lines = []
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / f"0496052bb_{i}.png")
        lines.append(json.dumps({"image_name": f"0496052bb_{i}.png", **{n: int(j == i) for j, n in enumerate(names)}},
                                ensure_ascii=False))
    (tmp_path / "labels.jsonl").write_text("\n".join(lines) + "\n")
    keys = ["normal", "segmental_sclerosis", "mesangial_proliferation", "crescent"]
    ls = load_labeled_set("jsonl", str(tmp_path / "labels.jsonl"), classes=keys)
    assert ls.classes == keys and ls.display_names == names
    assert [s.label for s in ls.samples] == [0, 1, 2, 3]
    assert ls.samples[0].slide == "0496052bb"
    (tmp_path / "labels.csv").write_text(
        "image,label,slide\n0496052bb_0.png,normal,s1\n0496052bb_1.png,crescent,s2\n")
    ls = load_labeled_set("csv", str(tmp_path / "labels.csv"), classes=keys)
    assert [(s.label, s.slide) for s in ls.samples] == [(0, "s1"), (3, "s2")]
    (tmp_path / "bad.csv").write_text("image,label\nmissing.png,normal\n")
    with pytest.raises(DataError, match="missing"):
        load_labeled_set("csv", str(tmp_path / "bad.csv"), classes=keys)


@needs_bueno
def test_folder_reader_skips_mask_folder():
    ls = load_labeled_set("folder", str(BUENO))
    assert ls.classes == ["globally_sclerotic", "non_globally_sclerotic"]
    assert ls.counts() == [142, 647]
    assert all(s.slide for s in ls.samples)
