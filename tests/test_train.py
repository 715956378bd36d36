"""End to end: config, a tiny model learning the demo classes, run artefacts, CLI, pretrained errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

from core.cli import main as glom
from core.config import ConfigError, load_config
from core.demo import generate_demo_images
from core.model_factory import PretrainedUnavailableError, create_classifier


def test_recipes_load_and_overrides_apply():
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
    """A tiny timm model trained on 4×20 synthetic demo images (40 px), with the full run pipeline."""
    from core.train import run_training

    root = tmp_path_factory.mktemp("demo")
    generate_demo_images(root / "images", n_per_class=20, size_px=40, seed=0)
    cfg = load_config(None, [
        "name=demo", f"output_dir={root / 'runs'}", "data.kind=folder", f"data.path={root / 'images'}",
        "data.split.group_by=none", "model.name=test_resnet", "preprocess.input_size=40",
        "train.epochs=10", "train.batch_size=16", "train.lr=0.01", "train.threads=2",
        "augment.hflip=0.5", "augment.rotate90=true", "evaluate.tsne=true",
        "preprocess.stain.method=macenko",
    ])
    # CPU seconds of this process: what the run costs, whatever else shares the two cores.
    start = time.process_time()
    result = run_training(cfg, progress=False)
    return result, time.process_time() - start


def test_tiny_model_learns_demo_classes_quickly(demo_run):
    result, _ = demo_run
    test = result.report["splits"]["test"]
    # Speed lives in bench/bench_train_step.py: a CPU-seconds bound here failed whenever another
    # job shared the two cores, which says nothing about the code.
    assert test["n"] >= 12
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
    assert lines[0].startswith("epoch,lr,train_loss") and len(lines) == 11


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
    capsys.readouterr()
    assert glom(["train", "--set", "train.optimizer=lion"]) == 2  # named errors: one line, status 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "lion" in err[0]


def test_compare_trains_each_model_on_the_same_split(demo_run, tmp_path):
    from core.compare import compare_architectures

    result, _ = demo_run
    images = result.run_dir.parents[1] / "images"
    cfg = load_config(None, [
        "name=cmp", f"output_dir={tmp_path}", "data.kind=folder", f"data.path={images}",
        "data.split.group_by=none", "preprocess.input_size=32", "train.epochs=1", "train.batch_size=16",
        "evaluate.tsne=false", "evaluate.calibrate=false",
    ])
    out_dir, rows = compare_architectures(cfg, ["test_resnet", "test_efficientnet"], progress=False)
    assert [r["model"] for r in rows] == ["test_resnet", "test_efficientnet"]
    splits = [json.loads((tmp_path / "cmp-compare" / f"cmp-{m}" / "split.json").read_text())
              for m in ("test_resnet", "test_efficientnet")]
    assert splits[0]["test"] == splits[1]["test"] and splits[0]["train"] == splits[1]["train"]
    table = (out_dir / "comparison.md").read_text()
    assert "| test_resnet |" in table and "macro f1" in table


@pytest.mark.parametrize("name,expected", [
    ("multistep", [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]),
    ("step", [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]),
    ("none", [1.0] * 6),
])
def test_schedulers_follow_their_rule(name, expected):
    from core.optim import build_scheduler

    cfg = load_config(None, [f"train.scheduler.name={name}", "train.scheduler.milestones=[2, 4]",
                             "train.scheduler.step_size=2", "train.scheduler.gamma=0.1"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg, 6)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx(expected)


def test_warmup_then_cosine():
    from core.optim import build_scheduler

    cfg = load_config(None, ["train.scheduler.name=cosine", "train.scheduler.warmup_epochs=2"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg, 10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] < seen[1] < seen[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(seen[2:], seen[3:])) and seen[-1] < 0.1



@pytest.mark.parametrize("monitor,values,lr_drops", [
    ("val_macro_f1", [0.5, 0.6, 0.7, 0.8, 0.9], False),  # a score that keeps rising: lr stays
    ("val_macro_f1", [0.5, 0.5, 0.5, 0.5, 0.5], True),  # a score that stalls: lr drops
    ("val_loss", [0.9, 0.8, 0.7, 0.6, 0.5], False),  # a loss that keeps falling: lr stays
    ("val_loss", [0.5, 0.6, 0.7, 0.8, 0.9], True),  # a loss that rises: lr drops
])
def test_plateau_follows_the_monitored_value_in_its_direction(monitor, values, lr_drops):
    from core.optim import build_scheduler, step_scheduler

    cfg = load_config(None, ["train.scheduler.name=plateau", "train.scheduler.patience=2",
                             "train.scheduler.factor=0.5", f"train.monitor={monitor}"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg, len(values))
    for v in values:
        opt.step()
        step_scheduler(sched, v)
    assert (opt.param_groups[0]["lr"] < 1.0) == lr_drops


def test_an_unknown_monitor_is_refused_before_any_work(tmp_path):
    from core.config import TrainingConfigError, validate_config

    cfg = load_config(None, ["train.monitor=val_auc", f"output_dir={tmp_path}"])
    with pytest.raises(TrainingConfigError, match="train.monitor: 'val_auc' is not one of val_macro_f1"):
        validate_config(cfg)
    from core.train import run_training

    with pytest.raises(TrainingConfigError, match="train.monitor"):
        run_training(cfg, progress=False)
    assert not any(tmp_path.iterdir())  # no run folder was made


def test_early_stopping_and_two_phase(demo_run, tmp_path):
    from core.train import run_training

    result, _ = demo_run
    images = result.run_dir.parents[1] / "images"
    base = ["data.kind=folder", f"data.path={images}", "data.split.group_by=none", "model.name=test_resnet",
            "preprocess.input_size=32", "train.batch_size=16", "evaluate.tsne=false", f"output_dir={tmp_path}",
            "train.scheduler.name=none"]
    # Nothing can change (lr 0, backbone and its BN statistics frozen): no epoch after the first improves.
    stopped = run_training(load_config(None, [*base, "name=es", "train.epochs=8", "train.lr=0",
                                              "model.freeze.fraction=1.0", "train.early_stopping_patience=2"]),
                           progress=False)
    assert len(stopped.history) == 3 and "early stopping" in stopped.report["stop_reason"]
    two = run_training(load_config(None, [*base, "name=tp", "train.epochs=3", "train.lr=0.01",
                                          "train.two_phase.frozen_epochs=1", "train.two_phase.lr_scale=0.1"]),
                       progress=False)
    assert [h["lr"] for h in two.history] == pytest.approx([0.01, 0.001, 0.001])


def test_per_stain_references_travel_to_the_predictor(demo_run, tmp_path):
    from core.predict import Predictor
    from core.stain import PerStainNormalizer
    from core.train import run_training

    result, _ = demo_run
    images = result.run_dir.parents[1] / "images"
    refs = sorted(images.rglob("*.png"))[:2]
    run = run_training(load_config(None, [
        "name=ps", f"output_dir={tmp_path}", "data.kind=folder", f"data.path={images}", "data.split.group_by=none",
        "model.name=test_resnet", "preprocess.input_size=32", "train.epochs=1", "evaluate.tsne=false",
        "preprocess.stain.method=macenko", f"preprocess.stain.references={{PAS: {refs[0]}, HE: {refs[1]}}}",
    ]), progress=False)
    side = json.loads((run.run_dir / "best.json").read_text())
    assert side["stain"]["method"] == "per_stain" and set(side["stain"]["stains"]) == {"PAS", "HE"}
    pred = Predictor.from_checkpoint(run.checkpoint)
    assert isinstance(pred.stain, PerStainNormalizer)
    from core.torch_data import read_rgb

    rgb = read_rgb(refs[0])
    assert not torch.equal(pred.preprocess(rgb, "PAS"), pred.preprocess(rgb, "HE"))


def test_a_diverging_run_ends_glom_train_with_one_error_line(tmp_path, bueno_dir):
    # The real command in its own process, on 16 real crops: an absurd learning rate makes the
    # outputs infinite at once. The user gets one ``error:`` line and status 2, not a traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "core.cli", "train", "--no-progress",
         "--set", f"output_dir={tmp_path / 'runs'}", "--set", "data.kind=csv",
         "--set", f"data.path={bueno_dir / 'labels.csv'}", "--set", "data.max_images=16",
         "--set", "data.split.group_by=none", "--set", "model.name=test_resnet",
         "--set", "preprocess.input_size=32", "--set", "train.epochs=2", "--set", "train.optimizer=sgd",
         "--set", "train.lr=1e30", "--set", "train.log_every=1", "--set", "train.loss.class_weights=null"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "lower the learning rate" in errors[0], proc.stderr[-2000:]
    assert not list((tmp_path / "runs").rglob("best.safetensors"))  # no checkpoint of a diverged run


def test_the_torchrun_entry_point_reports_named_errors_like_glom_train(tmp_path):
    # ``torchrun -m core.train`` runs this same main() on every rank.
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quick.yaml"
    proc = subprocess.run([sys.executable, "-m", "core.train", "--recipe", str(recipe), "--set", "train.lrr=1e-3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "lrr" in errors[0]
