"""The training data loader's own throughput: decoded real crops → augmented batches, no model.

Measures images/s of ``core.torch_data.ImageDataset`` + the training transform through a DataLoader,
for several worker counts, from PNG files (cold, decoding every image) and from the in-memory
cache of decoded crops (``data.cache: true``). Compare with the GPU's training images/s from
``bench_train_step.py``: the loader must deliver more than the GPU consumes.

    python bench/bench_loader.py --workers 0 1 2 --size 224
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import AugmentConfig  # noqa: E402
from core.labeled_sets import load_labeled_set, shared_data_dir  # noqa: E402
from core.stain import create_stain_normalizer  # noqa: E402
from core.torch_data import ImageDataset  # noqa: E402
from core.transforms import IMAGENET_MEAN, IMAGENET_STD, build_train_transform  # noqa: E402

SEED_AUG = AugmentConfig(rotate90=True, hflip=0.5, vflip=0.5, crop_scale=0.8, color_jitter=0.1,
                         hed_jitter=0.03, gaussian_noise=0.02)


def measure(samples, size: int, workers: int, batch: int, cached: bool, pin: bool, max_batches: int,
            stain: str = "none") -> dict:
    pre = {"input_size": [3, size, size], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
           "scaling": "imagenet", "interpolation": "bilinear"}
    norm = None
    if stain != "none":
        from core.torch_data import read_rgb

        norm = create_stain_normalizer(stain).fit(read_rgb(samples[0].path))
    ds = ImageDataset(samples, build_train_transform(pre, SEED_AUG), norm, cache=cached)
    if cached:  # fill the cache first: the timed pass then measures augmentation only
        for i in range(len(ds)):
            ds.load_rgb(i)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=pin,
                        persistent_workers=workers > 0, drop_last=True)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    n, t = 0, time.perf_counter()
    for i, (x, _) in enumerate(it):
        n += x.shape[0]
        if i + 1 >= max_batches:
            break
    sec = time.perf_counter() - t
    return {"workers": workers, "cached": cached, "stain": stain, "size": size, "batch": batch,
            "images": n, "seconds": sec, "images_per_s": n / sec}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", default=str(shared_data_dir() / "glomeruli-bueno" / "labels.csv"))
    p.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--stain", default="none", choices=["none", "macenko", "vahadane"])
    p.add_argument("--pin-memory", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the loader's work, not intra-op threads
    samples = load_labeled_set("csv", args.csv).samples
    rows = []
    for cached in (False, True):
        for w in args.workers:
            rows.append(measure(samples, args.size, w, args.batch_size, cached, args.pin_memory, args.batches,
                                args.stain))
    print("| source | stain | workers | px | images/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {'decoded cache' if r['cached'] else 'PNG files'} | {r['stain']} | {r['workers']} | {r['size']} "
              f"| {r['images_per_s']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
