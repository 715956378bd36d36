"""Training samples reach loader workers per epoch, and hard negative mining (``train.hard_negative_p``)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from core.config import ConfigError
from core.detection.config import DetectorAugmentConfig, load_detector_config
from core.detection.data import DetectorTrainingSet, TileImage, TrainingSampler
from core.detection.model import DetectorMeta
from core.detection.train import mine_hard_negatives, train_detector
from tests.detector_fixtures import TILES

PLAIN = {"paste_p": 0.0, "rotate90": False, "flip": False, "hed_jitter": 0.0, "color_jitter": 0.0, "blur": 0.0,
         "scale_jitter": 0.0, "centre_on_glomerulus_p": 0.5}


def _tile() -> TileImage:
    yy, xx = np.mgrid[:96, :96]
    rgb = np.stack([(yy * 2) % 200, (xx * 2) % 200, (yy + xx) % 200], axis=2).astype(np.uint8)
    return TileImage("t", rgb, (yy - 20) ** 2 + (xx - 20) ** 2 < 100)


def test_persistent_workers_draw_new_samples_every_epoch():
    """The epoch travels in the sampler's keys: a persistent worker's copy of the dataset never saw the
    epoch set on the main process's one, and used to replay epoch 1's windows every epoch."""
    ds = DetectorTrainingSet([_tile()], [], 32, 1.0, DetectorAugmentConfig(**PLAIN), 8, (0, 0, 0), (1, 1, 1), seed=5)
    sampler = TrainingSampler(8, seed=5)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, num_workers=1, persistent_workers=True)
    epochs = []
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        epochs.append(torch.cat([x for x, _ in loader]))
    assert not torch.equal(epochs[0], epochs[1])
    for epoch, batch in zip((1, 2), epochs):  # and each is what the main process draws for that epoch
        expect = torch.stack([torch.from_numpy(ds.sample(i, epoch)[0].transpose(2, 0, 1) / 255.0).float()
                              for i in range(8)])
        assert torch.allclose(batch, expect, atol=1e-6)
    assert [k[2] for k in sampler] == [None] * 8  # nothing mined yet: no hard keys whatever the share


def test_hard_negative_keys_centre_windows_on_the_mined_point():
    tile = _tile()
    tile.rgb[70, 60] = (255, 0, 255)  # the one pixel of this colour: where the model was wrong
    ds = DetectorTrainingSet([tile], [], 32, 1.0, DetectorAugmentConfig(**PLAIN), 64, (0, 0, 0), (1, 1, 1), seed=2)
    sampler = TrainingSampler(64, seed=2, hard_negative_p=0.5)
    sampler.set_epoch(3)
    plain_keys = list(sampler)
    sampler.set_hard_negatives([(0, 70, 60)])
    keys = list(sampler)
    hard = [k for k in keys if k[2] is not None]
    assert 16 < len(hard) < 48 and all(k[2] == (0, 70, 60) for k in hard)
    for k in hard:
        rgb, _ = ds.sample(k[1], k[0], k[2])
        assert (rgb == (255, 0, 255)).all(axis=2).sum() == 1, f"key {k}: window misses the hard point"
    for k, k0 in zip(keys, plain_keys):  # the other keys are the ones drawn without mining
        if k[2] is None:
            assert k == k0


class _RedIsProbability:
    """A stand-in model: the probability of a pixel is its red channel / 255."""

    meta = DetectorMeta("Unet", "x", mpp=1.0, tile_size=64)

    def __call__(self, tiles):
        return np.stack(list(tiles))[..., 0].astype(np.float32) / 255


def test_mining_keeps_false_findings_away_from_glomeruli_and_specks():
    rgb = np.zeros((200, 200, 3), np.uint8)
    yy, xx = np.mgrid[:200, :200]
    mask = (yy - 50) ** 2 + (xx - 50) ** 2 < 30 ** 2  # the glomerulus
    rgb[mask] = 230  # found: not a false finding
    r2 = (yy - 50) ** 2 + (xx - 50) ** 2
    rgb[(r2 >= 30 ** 2) & (r2 < 40 ** 2)] = 200  # a rim of 10 µm around it (2,200 µm²): its outline's error
    rgb[(yy - 150) ** 2 + (xx - 150) ** 2 < 15 ** 2] = 100  # p 0.39 ≥ 0.3, 700 µm² ≥ 1500 / 4: a false finding
    rgb[150, 150] = 120  # its most probable pixel
    rgb[(yy - 150) ** 2 + (xx - 40) ** 2 < 5 ** 2] = 255  # a speck (78 µm²)
    rgb[(yy - 100) ** 2 + (xx - 150) ** 2 < 20 ** 2] = 60  # p 0.24: below the mining threshold
    found = mine_hard_negatives(_RedIsProbability(), [TileImage("a", rgb, mask)], [0], min_area_um2=1500)
    assert found == {0: [(0, 150, 150)]}


def test_training_mines_hard_negatives_and_checks_its_settings(tmp_path):
    cfg = load_detector_config("recipes/detector/cpu.yaml", [
        f"output_dir={tmp_path}", "name=hn", "mpp=2.0", "tile_size=64", f"data.tiles={TILES}", "data.val_tiles=1",
        "data.test_tiles=1", "data.crops_csv=", "train.epochs=2", "train.samples_per_epoch=8", "train.batch_size=4",
        "train.max_minutes=0", "train.hard_negative_p=0.5", "train.hard_negative_start=2",
        "train.hard_negative_tiles=3",
        "postprocess.tune=false", "model.decoder_channels=[16,16,16,8,8]", "model.pretrained_file="])
    run = train_detector(cfg, progress=False)
    with (run.run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["hard_negatives"]) > 0 for r in rows] == [False, True]  # an untrained model errs everywhere
    with pytest.raises(ConfigError, match="hard_negative_p must be in"):
        load_detector_config("recipes/detector/cpu.yaml", ["train.hard_negative_p=2"])
