"""``glom cv-detector`` (k-fold over the real tiles) and the post-processing chosen on validation tiles."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from core.cli import main as glom
from core.config import ConfigError
from core.detection.config import load_detector_config
from core.detection.cv import (
    choose_on_fold_validation,
    plan_tile_folds,
    rescore_detector_cv,
    run_detector_cv,
)
from core.detection.data import load_tiles
from core.detection.instances import filter_by_score, label_instances
from core.detection.model import DetectorError
from core.detection.scoring import gt_instances
from core.detection.train import MIN_SCORES, THRESHOLDS, choose_postprocess
from tests.detector_fixtures import TILES, TILES_MPP

NAMES = sorted(p.stem for p in (TILES / "images").glob("*.png"))


def test_plan_tile_folds_tests_each_tile_once_and_keeps_parts_apart():
    plan = plan_tile_folds(NAMES, 4, val_tiles=3, seed=0)
    assert len(NAMES) == 24 and len(plan) == 4
    tested = [n for p in plan for n in p["test_tiles"]]
    assert sorted(tested) == NAMES  # every tile tested exactly once
    for p in plan:
        parts = [set(p["train_tiles"]), set(p["val_tiles"]), set(p["test_tiles"])]
        assert sum(map(len, parts)) == len(NAMES) and set.union(*parts) == set(NAMES)
        assert len(p["val_tiles"]) == 3 and len(p["test_tiles"]) == 6
    assert plan == plan_tile_folds(NAMES, 4, val_tiles=3, seed=0)  # deterministic
    assert plan != plan_tile_folds(NAMES, 4, val_tiles=3, seed=1)
    with pytest.raises(DetectorError, match="cannot give 20 validation"):
        plan_tile_folds(NAMES, 4, val_tiles=20)
    with pytest.raises(DetectorError, match="at least 2"):
        plan_tile_folds(NAMES, 1, val_tiles=3)


def test_choose_postprocess_drops_a_faint_finding_on_a_real_tile():
    tile = load_tiles(TILES, TILES_MPP, 2.0, ["10003"])[0]
    prob = np.where(tile.mask, 0.95, 0.02).astype(np.float32)
    from scipy import ndimage as ndi

    far = ndi.distance_transform_edt(~tile.mask)
    far[:30], far[-30:], far[:, :30], far[:, -30:] = 0, 0, 0, 0
    cy, cx = np.unravel_index(int(far.argmax()), far.shape)  # tissue far from the glomerulus
    assert far[cy, cx] > 40
    yy, xx = np.mgrid[:prob.shape[0], :prob.shape[1]]
    prob[(yy - cy) ** 2 + (xx - cx) ** 2 < 25 ** 2] = 0.62  # a faint "tubule with a cast"
    post = {"threshold": 0.5, "min_area_um2": 1500.0, "split_min_distance_um": 60.0, "min_score": 0.0}
    labels, n = label_instances(prob, 0.5, 2.0, 1500.0, 60.0)
    assert n == 2
    kept, scores = filter_by_score(labels, prob, 0.8)
    assert kept.max() == 1 and len(scores) == 1 and scores[0] > 0.9
    chosen, figs = choose_postprocess([prob], [tile.mask], post, 2.0)
    assert figs["f1"] == 1.0 and figs["n_pred"] == 1
    assert chosen["threshold"] > 0.62 or chosen["min_score"] > 0.62


def test_cv_detector_two_folds_on_the_real_tiles(tmp_path, capsys):
    cfg = load_detector_config("recipes/detector/cpu.yaml", [
        f"output_dir={tmp_path}", "name=tiny", "mpp=2.0", "tile_size=128", f"data.tiles={TILES}",
        "data.val_tiles=2", "data.crops_csv=", "train.epochs=1", "train.samples_per_epoch=8", "train.batch_size=4",
        "train.max_minutes=0", "augment.paste_p=0", "postprocess.tune=true", "postprocess.tta=false",
        "model.decoder_channels=[16,16,16,8,8]"])
    res = run_detector_cv(cfg, 2, bootstrap=50, progress=False)
    out = res.out_dir
    assert out == tmp_path / "tiny-cv"
    with (out / "per_tile.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["tile"] for r in rows) == NAMES  # each tile tested exactly once
    folds = [json.loads((out / f"fold-{k}" / "split.json").read_text()) for k in range(2)]
    assert set(folds[0]["test_tiles"]).isdisjoint(folds[1]["test_tiles"])
    for k, sp in enumerate(folds):
        assert set(sp["test_tiles"]).isdisjoint(set(sp["train_tiles"]) | set(sp["val_tiles"]))
        assert set(sp["train_tiles"]).isdisjoint(sp["val_tiles"])
        assert {r["tile"] for r in rows if r["fold"] == str(k)} == set(sp["test_tiles"])
        assert (out / f"fold-{k}" / "best.safetensors").is_file()
    assert len(list((out / "overlays").glob("*.png"))) == 24
    # the pooled truth is every glomerulus of the 24 tiles at or above the minimum area, counted here anew
    min_px = int(1500 / 4)
    n_true = sum(int(gt_instances(t.mask, min_px).max()) for t in load_tiles(TILES, TILES_MPP, 2.0))
    report = json.loads((out / "cv_report.json").read_text())
    for which in ("fixed", "chosen"):
        pooled = report["pooled"][which]
        assert pooled["_pooled"]["n_true"] == n_true == 27
        assert pooled["_pooled"]["images"] == 24
        for k in ("f1", "dice", "precision", "recall"):
            fig = pooled[k]
            assert 0 <= fig["value"] <= 1
            if fig["lo"] is not None:
                assert fig["lo"] <= fig["hi"]
    assert sum(int(r["true"]) for r in rows) == n_true
    assert [f["fold"] for f in report["per_fold"]] == [0, 1]
    assert all(f["postprocess"]["min_score"] is not None for f in report["per_fold"])
    assert "| chosen on each fold's validation |" in (out / "cv_report.md").read_text()
    # re-scoring the same fold checkpoints unchanged gives the same figures; with flip TTA, other maps
    again = rescore_detector_cv(out, {}, bootstrap=0)
    for which in ("fixed", "chosen"):
        for k in ("f1", "dice", "ap"):
            assert again["pooled"][which][k]["value"] == pytest.approx(report["pooled"][which][k]["value"])
    tta = rescore_detector_cv(out, {"tta": True}, bootstrap=0)
    assert (out / "rescore-tta=True.json").is_file()
    assert tta["pooled"]["fixed"]["_pooled"]["n_true"] == n_true
    assert json.loads((out / "rescore-tta=True.json").read_text())["post_overrides"] == {"tta": True}
    # with another setting (image edges mirrored), each fold's threshold / min_score chosen again on its
    # validation tiles: the file says so, and the choices come from the grid training chooses from
    assert glom(["cv-detector", "--rescore", str(out), "--set", "postprocess.edge_mirror_um=64", "--retune",
                 "--bootstrap", "0"]) == 0
    assert "| F1@0.5 |" in capsys.readouterr().out
    mirrored = json.loads((out / "rescore-edge_mirror_um=64.0-retuned.json").read_text())
    assert mirrored["retune"] is True and mirrored["post_overrides"] == {"edge_mirror_um": 64.0}
    assert glom(["cv-detector", "--rescore", str(out), "--set", "train.epochs=3"]) == 2
    assert "postprocess.<key>" in capsys.readouterr().err
    assert len(mirrored["chosen_per_fold"]) == 2
    assert all(c["threshold"] in THRESHOLDS and c["min_score"] in MIN_SCORES for c in mirrored["chosen_per_fold"])
    assert mirrored["pooled"]["chosen"]["_pooled"]["n_true"] == n_true
    # one post-processing chosen on the folds' validation tiles pooled (2 folds × 2 validation tiles)
    chosen, figs = choose_on_fold_validation(out)
    val_tiles = [t for sp in folds for t in sp["val_tiles"]]
    assert figs["images"] == len(val_tiles) == 4
    assert figs["n_true"] == sum(int(gt_instances(t.mask, min_px).max()) for name in val_tiles
                                 for t in load_tiles(TILES, TILES_MPP, 2.0, [name]))
    assert chosen["threshold"] in (0.3, 0.4, 0.5, 0.6, 0.7) and chosen["min_area_um2"] == 1500


def test_flip_tta_averages_the_four_flips(tiny_detector):
    from core.detection.inference import Predictor
    from core.detection.model import load_detector

    model, meta = load_detector(tiny_detector, "cpu")
    rgb = load_tiles(TILES, TILES_MPP, 2.0, ["10003"])[0].rgb[:256, :256]
    plain = Predictor(model, meta)(rgb[None])[0]
    meta.postprocess = dict(meta.postprocess, tta=True)
    tta = Predictor(model, meta)
    p = tta(rgb[None])[0]
    assert np.abs(p - plain).max() > 1e-3  # not the plain forward
    flipped = tta(np.ascontiguousarray(rgb[::-1, ::-1])[None])[0][::-1, ::-1]
    assert np.abs(p - flipped).max() < 1e-4  # invariant to the flips it averages over
    off = Predictor(model, meta, tta=False)(rgb[None])[0]  # the caller's choice over the checkpoint's
    assert np.array_equal(off, plain)


def test_predict_image_mirrors_the_image_edges(tiny_detector):
    from core.detection.inference import Predictor, mirror_edges, predict_image
    from core.detection.model import load_detector

    rgb = load_tiles(TILES, TILES_MPP, 2.0, ["10025"])[0].rgb[:200, :150]  # not square, smaller than a tile
    m = mirror_edges(rgb, (3, 4, 5, 6))
    assert m.shape == (207, 161, 3)
    assert np.array_equal(m[3:-4, 5:-6], rgb) and np.array_equal(m[3:-4, :5], rgb[:, :5][:, ::-1])
    assert np.array_equal(m[-4:, 5:-6], rgb[-4:][::-1])
    model, meta = load_detector(tiny_detector, "cpu")
    plain = predict_image(Predictor(model, meta), rgb)
    meta.postprocess = dict(meta.postprocess, edge_mirror_um=64.0)  # 32 px at 2 µm/px
    mirrored = predict_image(Predictor(model, meta), rgb)
    assert mirrored.shape == plain.shape == (200, 150)
    assert np.abs(mirrored[:, :8] - plain[:, :8]).max() > 1e-3  # the edge now sees its mirror, not glass


def test_train_select_and_edge_mirror_are_checked():
    with pytest.raises(ConfigError, match="train.select must be best or last"):
        load_detector_config("recipes/detector/cpu.yaml", ["train.select=first"])
    with pytest.raises(ConfigError, match="edge_mirror_um"):
        load_detector_config("recipes/detector/cpu.yaml", ["postprocess.edge_mirror_um=-1"])
    with pytest.raises(ConfigError, match=r"augment.edge_mirror_p must be in \[0, 1\], got 1.5"):
        load_detector_config("recipes/detector/cpu.yaml", ["augment.edge_mirror_p=1.5"])
    with pytest.raises(ConfigError, match="edge_mirror_p needs postprocess.edge_mirror_um > 0"):
        load_detector_config("recipes/detector/cpu.yaml", ["augment.edge_mirror_p=0.5", "postprocess.edge_mirror_um=0"])


def test_training_windows_reach_into_the_mirrored_tile_edge():
    """With ``augment.edge_mirror_p`` a training window may cross the tile's edge into its mirror image
    (image and mask mirrored together), as prediction sees an image's edge; without it, never."""
    from core.detection.config import DetectorAugmentConfig
    from core.detection.data import DetectorTrainingSet, TileImage
    from core.detection.inference import mirror_edges

    yy, xx = np.mgrid[:96, :80]
    rgb = np.stack([(yy * 2) % 256, (xx * 3) % 256, (yy + xx) % 256], axis=2).astype(np.uint8)
    tile = TileImage("t", rgb, (xx < 20) | (yy > 70))  # the glomerulus touches two edges
    plain = {"paste_p": 0.0, "rotate90": False, "flip": False, "hed_jitter": 0.0, "color_jitter": 0.0,
             "blur": 0.0, "scale_jitter": 0.0, "centre_on_glomerulus_p": 0.5}
    padded_rgb, padded_mask = mirror_edges(rgb, (16,) * 4), mirror_edges(tile.mask[..., None], (16,) * 4)[..., 0]

    def origins(edge_mirror_p):
        ds = DetectorTrainingSet([tile], [], 32, 1.0, DetectorAugmentConfig(**plain, edge_mirror_p=edge_mirror_p),
                                 64, (0, 0, 0), (1, 1, 1), seed=3, edge_mirror_px=16)
        found = []
        for i in range(64):
            win, m = ds.sample(i)
            hits = [(y, x) for y in range(padded_rgb.shape[0] - 31) for x in range(padded_rgb.shape[1] - 31)
                    if np.array_equal(padded_rgb[y:y + 32, x:x + 32], win)]
            assert len(hits) == 1, f"sample {i} is no window of the mirrored tile"
            y, x = hits[0]
            assert np.array_equal(padded_mask[y:y + 32, x:x + 32], m), f"sample {i}: mask not mirrored with image"
            found.append((y, x))
        return found

    def inside(y, x):  # the window lies within the tile (margin 16, tile 96 x 80, window 32)
        return 16 <= y <= 16 + 96 - 32 and 16 <= x <= 16 + 80 - 32

    assert all(inside(*o) for o in origins(0.0))
    crossing = [o for o in origins(1.0) if not inside(*o)]
    assert len(crossing) > 16  # most windows of the mirrored mode cross an edge


def test_cv_detector_refuses_a_fixed_split(tmp_path):
    cfg = load_detector_config("recipes/detector/cpu.yaml", [f"output_dir={tmp_path}", "data.split_file=x.json"])
    with pytest.raises(DetectorError, match="draws its own splits"):
        run_detector_cv(cfg, 2, progress=False)
