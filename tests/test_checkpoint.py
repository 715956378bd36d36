"""Checkpoints reload to identical logits from safetensors + JSON, without unpickling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

import models  # noqa: F401
from core.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint, read_meta, save_checkpoint
from core.predict import Predictor

PRE = {"input_size": [3, 48, 48], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
       "scaling": "imagenet", "interpolation": "bilinear"}


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint loading must not call torch.load")

    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("name,kwargs", [("resnet18", {"drop_rate": 0.3}), ("se_resnet50_factorized", {}),
                                         ("resnetv2_50_attn", {"attn_dim": 16})])
def test_reload_gives_identical_logits(tmp_path, no_unpickling, name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, **kwargs)
    # Move BN statistics away from their initial values so they must be saved too.
    model.train()
    model(torch.randn(4, 3, 48, 48))
    model.eval()
    meta = CheckpointMeta(name, 3, ["a", "b", "c"], PRE, model_kwargs=kwargs, metrics={"val_macro_f1": 0.5})
    save_checkpoint(model, tmp_path / "best", meta)
    assert (tmp_path / "best.safetensors").is_file()
    side = json.loads((tmp_path / "best.json").read_text())
    for key in ("architecture", "classes", "preprocess", "metrics", "code_revision", "split", "stain"):
        assert key in side
    loaded, meta2 = load_checkpoint(tmp_path / "best.safetensors")
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta2.classes == ["a", "b", "c"] and meta2.model_kwargs == kwargs


def test_channels_last_model_saves(tmp_path):
    model = timm.create_model("resnet18", num_classes=2).eval().to(memory_format=torch.channels_last)
    save_checkpoint(model, tmp_path / "m", CheckpointMeta("resnet18", 2, ["a", "b"], PRE))
    loaded, _ = load_checkpoint(tmp_path / "m")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-6)


def test_broken_checkpoints_fail_with_named_errors(tmp_path):
    model = timm.create_model("resnet18", num_classes=2)
    save_checkpoint(model, tmp_path / "m", CheckpointMeta("resnet18", 2, ["a", "b"], PRE))
    side = json.loads((tmp_path / "m.json").read_text())
    (tmp_path / "wrong.json").write_text(json.dumps({**side, "architecture": "resnet34"}))
    (tmp_path / "m.safetensors").rename(tmp_path / "wrong.safetensors")
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path / "wrong")
    with pytest.raises(CheckpointError, match="sidecar"):
        read_meta(tmp_path / "nothing.safetensors")
    (tmp_path / "lonely.json").write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "lonely")


def test_predictor_rebuilds_preprocessing_and_applies_temperature(tmp_path, no_unpickling):
    from core.stain import create_stain_normalizer

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=2).eval()
    rng = np.random.default_rng(0)
    ref = rng.integers(60, 200, (48, 48, 3), dtype=np.uint8)
    stain = create_stain_normalizer("macenko").fit(ref).to_dict()
    meta = CheckpointMeta("resnet18", 2, ["no", "yes"], PRE, stain=stain, temperature=2.0)
    save_checkpoint(model, tmp_path / "best", meta)
    pred = Predictor.from_checkpoint(tmp_path / "best.safetensors")
    rgb = rng.integers(60, 200, (64, 64, 3), dtype=np.uint8)
    cal = pred.predict_rgb(rgb)
    raw = pred.predict_rgb(rgb, calibrated=False)
    assert set(cal) == {"no", "yes"} and abs(sum(cal.values()) - 1) < 1e-6
    # Temperature 2 pulls probabilities towards 1/2.
    assert abs(cal["yes"] - 0.5) <= abs(raw["yes"] - 0.5)
    x = pred.preprocess(rgb)
    assert x.shape == (3, 48, 48)
    assert pred.cam_target_layers()[0] is model.layer4 or pred.cam_target_layers()[0] is pred.model.layer4
