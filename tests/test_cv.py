"""Validation that tells the truth: grouped folds, leave-one-centre-out, slide-bootstrap intervals,
out-of-fold predictions, ensembles, operating-point re-fitting — on the real crops."""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter

import numpy as np
import pytest
import torch

from core.cli import main as glom
from core.config import load_config
from core.cv import plan_folds, run_cv
from core.labeled_sets import DataError, assign_centres, load_from_csv
from core.intervals import bootstrap_metrics, format_ci, point_metrics

PATTERN = "^([^_]+)_"


def _glom_train_cli() -> argparse.ArgumentParser:
    """The ``glom`` training verbs (train, cv, evaluate, adapt, compare, predict) as a parser."""
    from core.cli_train import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser


def _write_csv(path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="module")
def bueno(bueno_dir):
    return assign_centres(load_from_csv(bueno_dir / "labels.csv"), PATTERN)


def test_centres_come_from_the_slide_id_pattern_or_a_column(bueno, bueno_dir, tmp_path):
    assert Counter(s.centre for s in bueno.samples) == {"VUHSK": 409, "SESCAM": 306, "SAS": 74}
    with pytest.raises(DataError, match=r"does not match the slide id 'SAS_21883_001'"):
        assign_centres(load_from_csv(bueno_dir / "labels.csv"), "^VUHSK")
    with pytest.raises(DataError, match="no centre"):
        load_from_csv(bueno_dir / "labels.csv").groups("centre")
    # A `centre` column wins over the pattern.
    rows = list(csv.DictReader((bueno_dir / "labels.csv").open()))[:30]
    out = tmp_path / "with_centre.csv"
    _write_csv(out, [{**r, "centre": "H1" if i % 2 else "H2"} for i, r in enumerate(rows)])
    ls = assign_centres(load_from_csv(out, bueno_dir), PATTERN)
    assert {s.centre for s in ls.samples} == {"H1", "H2"}


def test_leave_one_centre_out_holds_out_exactly_one_centre(bueno):
    folds = plan_folds(bueno, "loco", seed=0)
    assert [f.name for f in folds] == ["centre-SAS", "centre-SESCAM", "centre-VUHSK"]
    centre_of = {s.path: s.centre for s in bueno.samples}
    slide_of = {s.path: s.slide for s in bueno.samples}
    for f in folds:
        (c,) = f.held_out
        assert {centre_of[p] for p in f.split.test} == {c}
        assert len(f.split.test) == sum(s.centre == c for s in bueno.samples)
        assert c not in {centre_of[p] for p in f.split.train + f.split.val}
        assert not {slide_of[p] for p in f.split.train} & {slide_of[p] for p in f.split.val}
        assert f.split.val  # early stopping and temperature need a validation part


def test_kfold_by_slide_tests_every_crop_once_and_never_splits_a_slide(bueno):
    folds = plan_folds(bueno, "kfold", folds=5, group_by="slide", seed=0)
    tested = [p for f in folds for p in f.split.test]
    assert sorted(tested) == sorted(s.path for s in bueno.samples)
    slide_of = {s.path: s.slide for s in bueno.samples}
    for f in folds:
        test_slides = {slide_of[p] for p in f.split.test}
        assert not test_slides & {slide_of[p] for p in f.split.train + f.split.val}
        # stratified: every fold's test part holds both classes
        assert {s.label for s in bueno.samples if s.path in set(f.split.test)} == {0, 1}
    by_centre = plan_folds(bueno, "kfold", folds=3, group_by="centre", seed=0)
    centre_of = {s.path: s.centre for s in bueno.samples}
    assert sorted(len({centre_of[p] for p in f.split.test}) for f in by_centre) == [1, 1, 1]


def test_point_metrics_agree_with_sklearn():
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    probs = rng.dirichlet([1, 1, 1], 200)
    probs[np.arange(200), labels] += 0.3
    probs /= probs.sum(1, keepdims=True)
    m = point_metrics(probs, labels, ["a", "b", "c"])
    assert m["macro_f1"] == pytest.approx(f1_score(labels, probs.argmax(1), average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, probs.argmax(1)))
    assert m["macro_auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))


def test_bootstrap_over_slides_is_wider_than_over_crops_when_errors_cluster():
    # 20 slides of 20 crops; all errors sit on 3 slides. Crops are not independent: the slide
    # bootstrap must see that, the crop bootstrap cannot.
    labels, probs, slides = [], [], []
    rng = np.random.default_rng(1)
    for s in range(20):
        for i in range(20):
            y = int(rng.integers(0, 2))
            wrong = s < 3 and i < 14
            p = 0.2 if wrong else 0.9
            probs.append([p, 1 - p] if y == 0 else [1 - p, p])
            labels.append(y)
            slides.append(f"s{s}")
    probs, labels = np.array(probs), np.array(labels)
    by_slide = bootstrap_metrics(probs, labels, slides, ["a", "b"], n=400, seed=0)
    by_crop = bootstrap_metrics(probs, labels, None, ["a", "b"], n=400, seed=0)
    width = lambda f: f["macro_f1"]["hi"] - f["macro_f1"]["lo"]  # noqa: E731
    assert by_slide["_resampled"] == {"unit": "slide", "groups": 20, "n": 400, "redrawn": 0}
    assert by_crop["_resampled"]["unit"] == "crop"
    assert width(by_slide) > 1.5 * width(by_crop)
    assert by_slide["macro_f1"]["lo"] < by_slide["macro_f1"]["value"] < by_slide["macro_f1"]["hi"]
    assert format_ci(by_slide["macro_f1"]).count("[") == 1


def test_resamples_that_lose_a_class_are_redrawn():
    # One slide holds every positive: most resamples lose the class and must not count as F1 1.0.
    labels = np.array([1] * 5 + [0] * 45)
    probs = np.where(labels[:, None] == np.array([[0, 1]]), 0.8, 0.2)
    probs[:3] = [0.9, 0.1]  # 3 of the 5 positives missed
    slides = ["pos"] * 5 + [f"n{i}" for i in range(45)]
    ci = bootstrap_metrics(probs, labels, slides, ["neg", "pos"], n=200, seed=0)
    assert ci["_resampled"]["redrawn"] > 0
    assert ci["recall/pos"]["hi"] == pytest.approx(0.4)  # never a resample without the positive slide


@pytest.fixture(scope="module")
def tiny_cv(tmp_path_factory, bueno_dir):
    """A 3-fold CV of a tiny model on 90 real crops, with the ensemble bundled."""
    out = tmp_path_factory.mktemp("cv")
    cfg = load_config(None, [
        "name=tiny", f"output_dir={out}", "data.kind=csv", f"data.path={bueno_dir / 'labels.csv'}",
        "data.max_images=90", f"data.centre_pattern={PATTERN}", "model.name=test_resnet",
        "preprocess.input_size=32", "train.epochs=2", "train.batch_size=16", "train.threads=2",
        "evaluate.bootstrap=100", "evaluate.tta=true",
    ])
    return cfg, run_cv(cfg, "kfold", folds=3, progress=False, ensemble=True)


def test_cv_writes_out_of_fold_predictions_intervals_and_slide_table(tiny_cv):
    cfg, res = tiny_cv
    rows = list(csv.DictReader((res.out_dir / "oof_predictions.csv").open()))
    assert len(rows) == 90 and len({r["path"] for r in rows}) == 90
    assert {r["fold"] for r in rows} == {"fold0", "fold1", "fold2"}
    assert all(abs(sum(float(r[k]) for k in r if k.startswith("p/")) - 1) < 1e-4 for r in rows)
    rep = json.loads((res.out_dir / "cv_report.json").read_text())
    pooled = rep["pooled"]
    assert pooled["n"] == 90 and rep["tta"] is True
    for k in ("macro_f1", "balanced_accuracy", "macro_auc", "ece", "recall/globally_sclerotic"):
        f = pooled[k]
        assert f["lo"] is not None and f["lo"] <= f["value"] <= f["hi"], (k, f)
    slides = list(csv.DictReader((res.out_dir / "slide_errors.csv").open()))
    assert sum(int(s["crops"]) for s in slides) == 90
    rates = [float(s["error_rate"]) for s in slides]
    assert rates == sorted(rates, reverse=True)
    md = (res.out_dir / "cv_report.md").read_text()
    assert "**pooled**" in md and "bootstrap" in md
    for png in ("confusion_matrix.png", "roc.png", "reliability.png", "forest.png"):
        assert (res.out_dir / png).stat().st_size > 1000


def test_ensemble_checkpoint_is_the_mean_of_its_fold_models(tiny_cv):
    from core.checkpoint import load_checkpoint
    from core.predict import Predictor
    from core.transforms import tta_logits

    _, res = tiny_cv
    pred = Predictor.from_checkpoint(res.ensemble)
    assert pred.meta.ensemble == 3 and pred.tta and pred.temperature > 0
    x = torch.rand(4, 3, 32, 32)
    members = [load_checkpoint(r / "best")[0] for r in res.fold_runs]
    with torch.no_grad():
        expected = torch.stack([tta_logits(m, x) for m in members]).mean(0)
    assert torch.allclose(pred.logits(x), expected, atol=1e-5)
    # Explainable like any checkpoint: one Grad-CAM target per member.
    from core.explain import find_target_layers, open_cam

    target = find_target_layers(pred.model, pred.meta.architecture)
    assert len(target.layers) == 3
    with open_cam(pred.model, pred.meta.architecture, "gradcam", target) as cam:
        heat = cam(x[:2], target_class=0)
    assert heat.shape == (2, 32, 32) and np.isfinite(heat).all()


def test_tta_is_invariant_to_rotating_the_crop():
    from core.transforms import tta_logits

    torch.manual_seed(0)
    import timm

    model = timm.create_model("test_resnet", num_classes=3).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = tta_logits(model, x), tta_logits(model, torch.rot90(x, 1, dims=(-2, -1)).flip(-1))
        plain = model(torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(model(x), plain, atol=1e-3)  # the model alone is not invariant


def test_cli_cv_loco_prints_each_centre_with_intervals(bueno_dir, tmp_path, capsys):

    parser = _glom_train_cli()
    args = parser.parse_args([
        "cv", "--scheme", "loco", "--bootstrap", "50", "--no-progress", "--adapt-slides", "1",
        "--set", "name=loco", "--set", f"output_dir={tmp_path}", "--set", "data.kind=csv",
        "--set", f"data.path={bueno_dir / 'labels.csv'}", "--set", "data.max_images=60",
        "--set", f"data.centre_pattern={PATTERN}", "--set", "model.name=test_resnet",
        "--set", "preprocess.input_size=32", "--set", "train.epochs=1", "--set", "train.threads=2"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for c in ("SAS", "SESCAM", "VUHSK"):
        assert f"centre centre-{c}: n " in out
    assert "pooled: n 60" in out and "macro f1 " in out and "[" in out
    assert out.count("re-fitted on 1 labelled slides") == 3  # one per centre, reported apart
    md = next(tmp_path.glob("loco-loco*/cv_report.md")).read_text()
    assert "## Operating point re-fitted on 1 labelled slides of the held-out centre" in md
    # leave-one-centre-out without centres: one error line, status 2
    assert glom(["cv", "--scheme", "loco", "--set", "data.kind=csv",
                 "--set", f"data.path={bueno_dir / 'labels.csv'}", "--set", "model.name=test_resnet"]) == 2
    assert "centre_pattern" in capsys.readouterr().err


def test_class_bias_recovers_a_shifted_operating_point():
    from core.adapt import fit_class_bias

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (3000, 3))
    true_bias = np.array([1.0, -0.5, -0.5])
    p = torch.softmax(torch.tensor(z + true_bias), 1).numpy()
    y = np.array([rng.choice(3, p=row) for row in p])
    b = fit_class_bias(z, y, 1.0, ridge=0.0)
    assert np.allclose(b, true_bias, atol=0.15)


def test_adapt_and_evaluate_report_the_refitted_operating_point_separately(tiny_cv, bueno_dir, tmp_path, capsys):
    from core.checkpoint import read_meta
    from core.predict import Predictor

    _, res = tiny_cv
    ckpt = res.fold_runs[0] / "best.safetensors"
    rows = list(csv.DictReader((bueno_dir / "labels.csv").open()))
    sample, rest = tmp_path / "sample.csv", tmp_path / "rest.csv"
    _write_csv(sample, rows[::20])
    _write_csv(rest, rows[1::20])
    parser = _glom_train_cli()
    args = parser.parse_args(["adapt", str(ckpt), "--data", str(sample), "--kind", "csv", "--root", str(bueno_dir),
                              "--out", str(tmp_path / "site_b")])
    assert args.func(args) == 0
    meta = read_meta(tmp_path / "site_b")
    assert meta.class_bias is not None and meta.adapted["n"] == len(rows[::20])
    assert read_meta(ckpt).class_bias is None  # the original stays as trained
    a, b = Predictor.from_checkpoint(ckpt), Predictor.from_checkpoint(tmp_path / "site_b")
    x = torch.rand(2, 3, 32, 32)
    shift = np.log(b.predict_batch(x)) - np.log(a.predict_batch(x))
    assert np.allclose(shift - shift.mean(1, keepdims=True),
                       np.array(meta.class_bias) - np.mean(meta.class_bias), atol=1e-4)
    capsys.readouterr()
    args = parser.parse_args(["evaluate", str(ckpt), "--data", str(rest), "--kind", "csv", "--no-tsne",
                              "--root", str(bueno_dir),
                              "--adapt-on", str(sample), "--out", str(tmp_path / "eval")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "as trained:" in out and "operating point re-fitted on" in out
    assert out.count("macro f1 ") == 2 and "slides)" in out
    assert (tmp_path / "eval" / "adapted" / "report.md").is_file()
    assert glom(["adapt", str(ckpt), "--data", str(sample), "--kind", "csv", "--root", str(bueno_dir),
                 "--out", str(ckpt)]) == 2  # never overwrites the trained checkpoint


def test_auto_class_weights_balance_only_skewed_classes():
    from core.train import _class_weights

    assert _class_weights("auto", [100, 90]) is None
    w = _class_weights("auto", [647, 142])
    assert w[1] > 4 * w[0]
    assert _class_weights("balanced", [100, 90]) is not None
    assert _class_weights(None, [647, 142]) is None


def test_compare_runs_every_architecture_through_the_same_folds(bueno_dir, tmp_path):
    from core.compare import compare_cv

    cfg = load_config(None, [
        "name=cmp", f"output_dir={tmp_path}", "data.kind=csv", f"data.path={bueno_dir / 'labels.csv'}",
        "data.max_images=60", "preprocess.input_size=32", "train.epochs=1", "train.threads=2",
        "evaluate.bootstrap=50"])
    out_dir, rows = compare_cv(cfg, ["test_resnet", "test_efficientnet"], folds=3, progress=False)
    assert [r["model"] for r in rows] == ["test_resnet", "test_efficientnet"]
    assert all(r["cpu_ms"] > 0 and r["params"] > 0 and r["pooled"]["macro_f1"]["lo"] is not None for r in rows)
    folders = [tmp_path / "cmp-compare" / f"cmp-{m}-kfold" for m in ("test_resnet", "test_efficientnet")]
    tests = [[json.loads(p.read_text())["test"] for p in sorted(d.glob("*.split.json"))] for d in folders]
    assert tests[0] == tests[1]
    md = (out_dir / "comparison.md").read_text()
    assert "CPU ms/crop" in md and md.count("[") >= 8


def test_the_viewer_loads_and_explains_the_ensemble_like_any_checkpoint(tiny_cv, bueno_dir):
    from PIL import Image

    from core.diagnosis import diagnose, find_checkpoints, load_viewer_checkpoint

    _, res = tiny_cv
    assert res.ensemble in find_checkpoints(res.out_dir)
    ckpt = load_viewer_checkpoint(res.ensemble, res.out_dir)
    rgbs = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((bueno_dir / "globally_sclerotic").glob("*.png"))[:3]]
    with_cam = diagnose(ckpt, rgbs, method="gradcam")
    plain = diagnose(ckpt, rgbs, method=None)
    assert [r.heat.shape for r in with_cam] == [(32, 32)] * 3
    # TTA checkpoint: the probabilities shown with a heatmap are the 8-view ones, as without.
    for a, b in zip(with_cam, plain):
        assert a.probs == pytest.approx(b.probs, abs=1e-5)


def test_temperature_fit_does_not_sharpen_on_a_small_confident_validation_part():
    from core.metrics import fit_temperature

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 25)
    z = np.where(np.eye(2)[y] > 0, 2.0, -2.0)  # 25 crops, all right, moderately confident
    assert fit_temperature(z, y, prior=0) < 0.3  # the plain fit sharpens hard on 25 crops
    assert fit_temperature(z, y) > 0.5
    # With many crops, including mistakes, the data decide, prior or not.
    y = rng.integers(0, 2, 2000)
    z = rng.normal(0, 1, (2000, 2)) + 3 * np.eye(2)[y]
    assert fit_temperature(z, y) == pytest.approx(fit_temperature(z, y, prior=0), rel=0.25)


def test_glom_evaluate_takes_the_ensemble_on_other_crops_and_refuses_its_own(tiny_cv, bueno_dir, tmp_path, capsys):

    _, res = tiny_cv
    rows = list(csv.DictReader((bueno_dir / "labels.csv").open()))[5::40]
    other = tmp_path / "other.csv"
    _write_csv(other, rows)
    parser = _glom_train_cli()
    args = parser.parse_args(["evaluate", str(res.ensemble), "--data", str(other), "--kind", "csv",
                              "--root", str(bueno_dir), "--out", str(tmp_path / "ev")])
    assert args.func(args) == 0  # t-SNE is skipped for an ensemble rather than crashing
    assert f"all: n {len(rows)}" in capsys.readouterr().out
    assert glom(["evaluate", str(res.ensemble)]) == 2
    assert "out-of-fold" in capsys.readouterr().err
