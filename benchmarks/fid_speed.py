"""Frechet distance at 2048-d: ours vs the scipy.linalg.sqrtm formula (pytorch-fid), side by side.

docs/design.md, "Performance targets": at least 5x faster than the sqrtm formula and within 1e-6 relative of it.

    python benchmarks/fid_speed.py --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import os

    import torch

    torch.set_num_threads(args.threads)
    from epsscale.metrics.fid import frechet_distance, frechet_distance_scipy

    # Two correlated, Inception-like (non-negative, decaying spectrum) feature clouds.
    rng = np.random.default_rng(0)
    d, n = args.dim, args.samples
    w = rng.standard_normal((d, d)) * np.exp(-np.arange(d) / 300)[None]
    x = np.maximum(rng.standard_normal((n, d)) @ w, 0)
    y = np.maximum(rng.standard_normal((n, d)) @ w * 1.05 + 0.01, 0)
    m1, s1, m2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    ours, ref, t_ours, t_ref = [], [], [], []
    if os.environ.get("OMP_NUM_THREADS") != str(args.threads):
        print(f"(set OMP_NUM_THREADS={args.threads} too, so that numpy/scipy's BLAS uses the same thread count)")
    for _ in range(args.repeats):
        t = time.perf_counter()
        ours.append(frechet_distance(m1, s1, m2, s2))
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref.append(frechet_distance_scipy(m1, s1, m2, s2))
        t_ref.append(time.perf_counter() - t)
    a, b = statistics.median(t_ours), statistics.median(t_ref)
    print(f"d = {d}, covariances from {n} samples, {args.threads} thread(s), medians of {args.repeats}\n")
    print("| method | seconds | FID | speed-up |")
    print("|---|---|---|---|")
    print(f"| scipy sqrtm (pytorch-fid formula) | {b:.2f} | {ref[0]:.10f} | 1.0x |")
    print(f"| epsscale frechet_distance | {a:.2f} | {ours[0]:.10f} | {b / a:.1f}x |")
    print(f"\nrelative difference: {abs(ours[0] - ref[0]) / abs(ref[0]):.2e}")


if __name__ == "__main__":
    main()
