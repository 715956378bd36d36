"""Glomeruli stored on slides as detector training data (``data.store``, issue 13).

Three pyramidal TIFFs are built here from real tiles (level 0 at 0.5 µm/px) with known glomerulus
masks, and registered in a real SQLite store: a drawn box (slide_a), an accepted and a rejected
proposal (slide_b: every finding decided), an accepted and a still-proposed one (slide_c).
The windows read back at 1 µm/px must sit where the glomeruli are.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from skimage import measure

from core.cli import main as glom
from core.config import ConfigError
from core.detection.config import load_detector_config
from core.detection.data import (
    StoredGlomerulus,
    StoredSlide,
    load_store_windows,
    read_slide_windows,
    read_stored_slides,
    split_detector_data,
)
from core.detection.model import DetectorError
from tests.detector_fixtures import TILES, TILES_MPP, real_tile, write_pyramid_tiff

MPP = 1.0  # working resolution of the checks
SLIDE_TILES = {"slide_a": ["10149"], "slide_b": ["10150", "10215"], "slide_c": ["10172"]}
REJECTED_B = (1024 + 600, 600, 120, 120)  # tissue of the glomerulus-free tile 10215
PROPOSED_C = (40, 880, 100, 100)  # far from 10172's glomerulus (y 52..387)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def _polygon(mask: np.ndarray) -> list[tuple[float, float]]:
    contour = max(measure.find_contours(np.pad(mask, 1).astype(np.uint8), 0.5), key=len)
    return [(float(c) - 1, float(r) - 1) for r, c in contour[::4]]  # (x, y), level 0


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The slides (tissue over a band of glass), their stored-glomerulus masks, and the store."""
    from annotation_db import store
    from annotation_db.boxes import add_box
    from annotation_db.db import open_store
    from annotation_db.proposals import (
        accept_proposal,
        list_proposals,
        reject_proposal,
        replace_proposals,
    )

    root = tmp_path_factory.mktemp("store_slides")
    slides_dir = root / "slides"
    slides_dir.mkdir()
    images, truths = {}, {}
    for name, tiles in SLIDE_TILES.items():
        rgb = np.full((1024 + 512, 1024 * len(tiles), 3), 243, np.uint8)
        mask = np.zeros(rgb.shape[:2], bool)
        for i, t in enumerate(tiles):
            r, m = real_tile(t)
            rgb[:1024, i * 1024:(i + 1) * 1024] = r
            if i == 0:  # the stored glomerulus is the first tile's; the others hold none worth storing
                mask[:1024, :1024] = m
        write_pyramid_tiff(slides_dir / f"{name}.tif", rgb, TILES_MPP)
        images[name], truths[name] = rgb, mask
    url = f"sqlite:///{root / 'store.db'}"
    Session = open_store(url)

    def finding(mask: np.ndarray | None, box: tuple[int, int, int, int]) -> SimpleNamespace:
        x, y, w, h = box
        poly = _polygon(mask) if mask is not None else [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
        return SimpleNamespace(polygon=poly, box=box, score=0.9, area_um2=w * h * TILES_MPP ** 2)

    with Session() as s, s.begin():
        store.get_or_create_dataset(s, "biopsies", ["globally_sclerotic", "non_globally_sclerotic"],
                                    root=root / "ds")
        a = store.get_or_create_slide(s, "slide_a", mpp=TILES_MPP)  # no path: found under slides_root
        add_box(s, a, _box(truths["slide_a"]), created_by="dr_a")
        for name, extra in (("slide_b", REJECTED_B), ("slide_c", PROPOSED_C)):
            replace_proposals(s, "biopsies", name, [finding(truths[name], _box(truths[name])), finding(None, extra)],
                              source="model:test", slide_path=str(slides_dir / f"{name}.tif"))
            props = {p.box: p for p in list_proposals(s, name, "biopsies")}
            accept_proposal(s, props[_box(truths[name])].id, reviewed_by="dr_b")
            if name == "slide_b":
                reject_proposal(s, props[REJECTED_B].id, reviewed_by="dr_b")
    return SimpleNamespace(url=url, root=root, slides_dir=slides_dir, images=images, truths=truths)


def _cfg(stored: SimpleNamespace, *extra: str):
    return load_detector_config("recipes/detector/cpu.yaml", [
        f"data.store.db={stored.url}", f"data.store.slides_root={stored.slides_dir}", f"mpp={MPP}", "tile_size=256",
        "data.store.negatives_per_slide=3", "data.store.slide_ratios=[0.34,0.33,0.33]", f"data.tiles={TILES}",
        "data.crops_csv=", *extra])


def _truth_window(full: np.ndarray, box: tuple[int, int, int, int], side: int) -> np.ndarray:
    """The level-0 ``box`` of a full-resolution array (outside: zeros) resized to ``side``² working px."""
    x, y, w, h = box
    pad = np.zeros((h, w) + full.shape[2:], full.dtype)
    ys, xs = slice(max(0, y), min(full.shape[0], y + h)), slice(max(0, x), min(full.shape[1], x + w))
    pad[ys.start - y:ys.stop - y, xs.start - x:xs.stop - x] = full[ys, xs]
    if full.dtype == bool:
        img = Image.fromarray(pad.astype(np.uint8) * 255).resize((side, side), Image.Resampling.BILINEAR)
        return np.asarray(img) > 127
    return np.asarray(Image.fromarray(pad).resize((side, side), Image.Resampling.BOX))


def test_store_windows_land_on_the_stored_glomeruli(stored: SimpleNamespace) -> None:
    cfg = _cfg(stored)
    slides = {sl.name: sl for sl in read_stored_slides(cfg.data.store)}
    assert set(slides) == set(SLIDE_TILES)
    assert [g.polygon is None for g in slides["slide_a"].glomeruli] == [True]  # a drawn box: no outline
    assert [g.polygon is None for g in slides["slide_b"].glomeruli] == [False]  # accepted: the proposal's polygon
    assert slides["slide_b"].fully_reviewed and not slides["slide_c"].fully_reviewed
    assert not slides["slide_a"].fully_reviewed  # never detected: nobody looked for the others

    split = split_detector_data(cfg)
    windows = load_store_windows(cfg, split)
    every = [w for part in windows.values() for w in part]
    side = round(256 * 1.5)
    kinds = {name: sorted(w.kind for w in every if w.slide == name) for name in SLIDE_TILES}
    assert kinds == {"slide_a": ["glomerulus"], "slide_b": ["glomerulus", "rejected", "tissue", "tissue", "tissue"],
                     "slide_c": ["glomerulus"]}
    for w in every:
        assert w.tile.rgb.shape == (side, side, 3) and w.tile.mask.shape == (side, side)
        assert w.box[2] == w.box[3] == round(side * MPP / TILES_MPP)  # level-0 px
        inside = _truth_window(np.ones(stored.truths[w.slide].shape, bool), w.box, side)

        def diff(dx: int, dy: int, w=w, inside=inside) -> float:
            true_rgb = _truth_window(stored.images[w.slide], (w.box[0] + dx, w.box[1] + dy, *w.box[2:]), side)
            return float(np.abs(w.tile.rgb.astype(int) - true_rgb.astype(int))[inside].mean())

        # the pixels of the slide at that place, at 1 µm/px (within a level-0 pixel: a level-1 read of
        # an odd level-0 origin is half a working pixel off), and not those 2 working px beside it
        here = diff(0, 0)
        assert here < 12 and here < min(diff(4, 0), diff(-4, 0), diff(0, 4), diff(0, -4)), (w.slide, w.kind, here)
        truth = _truth_window(stored.truths[w.slide], w.box, side)
        iou = _iou(w.tile.mask, truth)
        if w.kind == "rejected":
            assert not w.tile.mask.any()  # a rejected proposal is a hard negative
        elif w.kind == "glomerulus":
            assert truth.sum() > 0.5 * stored.truths[w.slide].sum() * (TILES_MPP / MPP) ** 2  # mostly inside
            # a drawn box becomes its inscribed ellipse (an approximation); an outline is the outline
            assert iou >= (0.75 if w.slide == "slide_a" else 0.9), (w.slide, iou)
        elif truth.any():
            assert iou >= 0.9, (w.slide, w.kind, iou)
    for w in (w for w in every if w.slide == "slide_c"):
        x, y, bw, bh = w.box
        px, py, pw, ph = PROPOSED_C
        assert x >= px + pw or px >= x + bw or y >= py + ph or py >= y + bh  # undecided: never in a window


def test_a_window_touching_an_undecided_finding_is_dropped(stored: SimpleNamespace) -> None:
    st = _cfg(stored, "data.store.negatives_per_slide=5").data.store
    box = _box(stored.truths["slide_a"])
    g = StoredGlomerulus(box, None, "box:1")
    path = stored.slides_dir / "slide_a.tif"
    undecided = StoredSlide("slide_a", str(path), None, [g], [], [box], detected=True)
    assert read_slide_windows(undecided, path, MPP, 256, st, np.random.default_rng(0)) == []
    decided = StoredSlide("slide_a", str(path), None, [g], [], [], detected=True)
    got = read_slide_windows(decided, path, MPP, 256, st, np.random.default_rng(0))
    assert sorted(w.kind for w in got) == ["glomerulus"] + ["tissue"] * 5
    tissue = [w for w in got if w.kind == "tissue"]
    c = 256 * 3 // 4  # the window's centre: on tissue, not on the band of glass (243) below it
    assert all(w.tile.rgb[c - 8:c + 8, c - 8:c + 8].mean() < 225 for w in tissue), \
        [w.tile.rgb[c - 8:c + 8, c - 8:c + 8].mean() for w in tissue]


def test_the_split_keeps_each_slide_on_one_side(stored: SimpleNamespace) -> None:
    seen = set()
    for seed in range(8):
        split = split_detector_data(_cfg(stored, f"data.seed={seed}"))
        parts = [split.store_train_slides, split.store_val_slides, split.store_test_slides]
        assert sorted(n for p in parts for n in p) == sorted(SLIDE_TILES) and all(len(p) == 1 for p in parts)
        seen.add(tuple(split.store_test_slides))
        windows = load_store_windows(_cfg(stored, f"data.seed={seed}", "data.store.negatives_per_slide=0"), split) \
            if seed < 2 else None
        if windows:
            for part, names in zip(("train", "val", "test"), parts):
                assert {w.slide for w in windows[part]} == set(names)
    assert len(seen) > 1  # the seed changes the split
    with pytest.raises(DetectorError, match="leave none"):
        split_detector_data(_cfg(stored, "data.store.slide_ratios=[0,0.5,0.5]"))


def test_store_errors_name_what_is_wrong(stored: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(DetectorError, match="no slide nope"):
        read_stored_slides(_cfg(stored, "data.store.slides=[nope]").data.store)
    with pytest.raises(DetectorError, match="no dataset other"):
        read_stored_slides(_cfg(stored, "data.store.datasets=[other]").data.store)
    with pytest.raises(DetectorError, match="no store file"):
        read_stored_slides(_cfg(stored, f"data.store.db=sqlite:///{tmp_path / 'typo.db'}").data.store)
    assert not (tmp_path / "typo.db").exists()
    with pytest.raises(ConfigError, match="data.store.slide_ratios"):
        _cfg(stored, "data.store.slide_ratios=[0.5,0.5]")
    cfg = _cfg(stored, f"data.store.slides_root={tmp_path}")
    with pytest.raises(DetectorError, match="slide slide_a: .*no path stored"):
        load_store_windows(cfg, split_detector_data(cfg))
    (tmp_path / "split.json").write_text(json.dumps({"train_tiles": ["10183"]}))
    with pytest.raises(DetectorError, match="store_train_slides"):
        split_detector_data(_cfg(stored, f"data.split_file={tmp_path / 'split.json'}"))


def test_train_detector_runs_on_stored_glomeruli(stored: SimpleNamespace, tmp_path: Path, capsys) -> None:
    split = {"train_tiles": ["10183"], "val_tiles": [], "test_tiles": [], "train_slides": [], "heldout_slides": [],
             "store_train_slides": ["slide_a", "slide_b"], "store_val_slides": ["slide_c"], "store_test_slides": []}
    (tmp_path / "split.json").write_text(json.dumps(split))
    args = ["train-detector", "--recipe", "recipes/detector/cpu.yaml", "--no-progress"]
    for o in (f"output_dir={tmp_path}", "name=stored", "mpp=2.0", "tile_size=64", f"data.tiles={TILES}",
              "data.crops_csv=", f"data.split_file={tmp_path / 'split.json'}", f"data.store.db={stored.url}",
              f"data.store.slides_root={stored.slides_dir}", "data.store.window_scale=3", "data.store.negatives_per_slide=3", "train.epochs=1",
              "train.samples_per_epoch=8", "train.batch_size=4", "train.max_minutes=0", "model.pretrained_file="):
        args += ["--set", o]
    assert glom(args) == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "stored" / "best.json").read_text())
    blob = json.dumps(meta)
    assert '"n_store_windows"' in blob
    assert meta["training_data"]["n_store_windows"] == {"train": 6, "val": 1, "test": 0}  # a: 1, b: 1+1+3; c: 1
    assert json.loads((tmp_path / "stored" / "split.json").read_text())["store_val_slides"] == ["slide_c"]
    assert "val" in json.loads((tmp_path / "stored" / "report.json").read_text())


def test_imported_and_drawn_outlines_are_the_mask_a_plain_box_its_ellipse(tmp_path: Path) -> None:
    """A box with an outline (imported, drawn as one, accepted) trains on that outline; a plain box
    on the ellipse inscribed in it."""
    from annotation_db import store
    from annotation_db.boxes import add_box
    from annotation_db.db import open_store
    from core.annotations import Annotation
    from core.detection.config import DetectorStoreConfig
    from core.detection.data import rasterise_glomeruli
    from core.slide_crops import store_outlines

    url = f"sqlite:///{tmp_path / 'store.db'}"
    triangle = ((100.0, 100.0), (300.0, 100.0), (100.0, 300.0))
    with open_store(url)() as s, s.begin():
        sl = store.get_or_create_slide(s, "biopsy", mpp=0.5)
        store_outlines(s, sl, [(Annotation("polygon", triangle, source="qupath.geojson#0"), None)], created_by="dr_q")
        add_box(s, sl, (400, 100, 200, 200), created_by="dr_a")
    (slide,) = read_stored_slides(DetectorStoreConfig(db=url))
    imported, plain = slide.glomeruli
    assert imported.polygon == list(triangle) and imported.box == (100, 100, 200, 200) and plain.polygon is None
    mask = rasterise_glomeruli(slide.glomeruli, (0, 0, 800, 400), 0.5, 400)
    assert mask[60, 60] and not mask[140, 140]  # inside the triangle, beyond its hypotenuse
    assert mask[100, 250] and not mask[55, 205]  # the plain box's ellipse: its centre, not its corner
