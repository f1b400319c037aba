"""The FID a perfect model would score: real training images against the test split.

    python scripts/fid_floor.py --sizes 500,2000,5000 --repeats 3

With the project's Fashion-MNIST classifier features (the extractor of every FID in this project):
the whole train split (60,000) against the test split, and random subsets of the train split of
the sizes the benchmarks sample (their small-sample bias), each drawn ``--repeats`` times.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="500,2000,5000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from epsscale.data.fashion_mnist import load_fashion_mnist
    from epsscale.metrics import compute_fid, feature_stats, get_extractor, reference_stats

    ext = get_extractor("fmnist")
    test = reference_stats(ext, "fashion-mnist-test")
    train = reference_stats(ext, "fashion-mnist-train")
    print("| real images (train split) | FID vs test split |")
    print("|---|---|")
    print(f"| all 60,000 | {compute_fid(train, test):.3f} |")
    images = load_fashion_mnist("train")[0][..., None]
    for n in (int(s) for s in args.sizes.split(",")):
        fids = [compute_fid(feature_stats(images[np.random.default_rng(r).choice(len(images), n, replace=False)], ext), test) for r in range(args.repeats)]
        print(f"| {n:,} random (seeds 0..{args.repeats - 1}) | {np.mean(fids):.3f} (min {min(fids):.3f}, max {max(fids):.3f}) |")


if __name__ == "__main__":
    main()
