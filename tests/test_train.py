"""End to end: config, a tiny model learning the demo classes, run artefacts, CLI, pretrained errors."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import timm
import torch

from core.config import ConfigError, load_config
from core.demo import generate_demo_images
from core.model_factory import PretrainedUnavailableError, create_classifier


def test_recipes_load_and_overrides_apply():
    from pathlib import Path

    recipes = sorted(Path(__file__).resolve().parents[1].glob("recipes/*.yaml"))
    assert {r.stem for r in recipes} >= {"quick", "glomerulus_se_resnet50", "skin_chip_resnest50",
                                         "isic_ds_resnet50", "sipakmed_resnetv2_attn"}
    for r in recipes:
        cfg = load_config(r)
        assert timm.is_model(cfg.model.name)
    cfg = load_config(Path("recipes/glomerulus_se_resnet50.yaml").resolve() if Path("recipes").is_dir()
                      else recipes[0], ["train.lr=3e-4", "data.split.ratios=[0.7, 0.3]", "model.freeze.fraction=0.25"])
    assert cfg.train.lr == 3e-4 and cfg.data.split.ratios == [0.7, 0.3] and cfg.model.freeze.fraction == 0.25
    with pytest.raises(ConfigError, match="lrr"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=many"])


def test_pretrained_offline_names_both_ways_out(monkeypatch):
    from core.config import ModelConfig

    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(PretrainedUnavailableError) as e:
        create_classifier(ModelConfig(name="resnet18", pretrained=True), 2)
    assert "pretrained_file" in str(e.value) and "pretrained: false" in str(e.value)


def test_pretrained_file_loads_local_weights(tmp_path):
    from safetensors.torch import save_file

    from core.config import ModelConfig

    src = timm.create_model("resnet18", num_classes=1000)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    model = create_classifier(ModelConfig(name="resnet18", pretrained=True,
                                          pretrained_file=str(tmp_path / "r18.safetensors")), 3)
    assert torch.equal(model.conv1.weight, src.conv1.weight)
    assert model.fc.out_features == 3
    with pytest.raises(PretrainedUnavailableError):
        create_classifier(ModelConfig(name="resnet18", pretrained_file=str(tmp_path / "none.pth")), 3)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A tiny timm model trained on 4×24 synthetic demo images (48 px), with the full run pipeline."""
    from core.train import run_training

    root = tmp_path_factory.mktemp("demo")
    generate_demo_images(root / "images", n_per_class=24, size_px=48, seed=0)
    cfg = load_config(None, [
        "name=demo", f"output_dir={root / 'runs'}", "data.kind=folder", f"data.path={root / 'images'}",
        "data.split.group_by=none", "model.name=test_resnet", "preprocess.input_size=48",
        "train.epochs=6", "train.batch_size=16", "train.lr=0.003", "train.threads=2",
        "augment.hflip=0.5", "augment.rotate90=true", "evaluate.tsne=true",
        "preprocess.stain.method=macenko",
    ])
    start = time.perf_counter()
    result = run_training(cfg, progress=False)
    return result, time.perf_counter() - start


def test_tiny_model_learns_demo_classes_quickly(demo_run):
    result, seconds = demo_run
    test = result.report["splits"]["test"]
    assert seconds < 60, f"training took {seconds:.0f} s"
    assert test["n"] >= 16
    assert test["accuracy"] >= 0.6, test  # chance is 0.25 with 4 balanced classes


def test_run_writes_every_artefact(demo_run):
    result, _ = demo_run
    d = result.run_dir
    for name in ("config.yaml", "split.json", "metrics.csv", "best.safetensors", "best.json", "last.safetensors",
                 "report.json", "report.md", "confusion_matrix.png", "roc.png", "reliability.png", "tsne.png",
                 "history.png"):
        assert (d / name).is_file(), name
    assert any((d / "tensorboard").iterdir())
    side = json.loads((d / "best.json").read_text())
    assert side["stain"]["method"] == "macenko" and side["split"]["file"] == "split.json"
    assert side["temperature"] is not None and "test_macro_f1" in side["metrics"]
    report = json.loads((d / "report.json").read_text())
    assert {"accuracy", "balanced_accuracy", "macro_f1", "confusion_matrix", "calibration"} <= set(report["splits"]["test"])
    lines = (d / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,lr,train_loss") and len(lines) == 7


def test_cli_evaluate_and_predict_reproduce_the_run(demo_run, capsys):
    from core.cli_train import register

    result, _ = demo_run
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = result.run_dir / "evaluation"
    args = parser.parse_args(["evaluate", str(result.checkpoint), "--out", str(out), "--no-tsne"])
    assert args.func(args) == 0
    again = json.loads((out / "report.json").read_text())["splits"]["test"]
    assert again["accuracy"] == pytest.approx(result.report["splits"]["test"]["accuracy"])
    split = json.loads((result.run_dir / "split.json").read_text())
    capsys.readouterr()
    args = parser.parse_args(["predict", str(result.checkpoint), *split["test"][:3]])
    assert args.func(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and all(abs(sum(r["probs"].values()) - 1) < 1e-5 for r in rows)
    args = parser.parse_args(["train", "--set", "train.optimizer=lion"])
    assert args.func(args) == 2  # named errors become one line, exit status 2
