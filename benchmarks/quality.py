"""Quality: FID against steps and lambda for the shipped Fashion-MNIST model, resumable.

Every evaluated point (sampler, discretisation, steps, lambda, seeds) is cached in a JSON file,
so an interrupted run (or a run split across sessions) continues where it stopped; within a
point, finished batches are kept by the sampling runner's work directory.

FID uses the project's Fashion-MNIST classifier features against the *test* split (the train
split is what the model learned; the test split is a yardstick nothing here was tuned on).

    # tune lambda on seeds 100000.. at 20 steps, then evaluate on seeds 0.. (held out)
    python benchmarks/quality.py --samplers ddpm,ddim,euler,heun --steps 10,20,50,100 \
        --lams 1.0,1.005,1.01,1.015,1.02 --num 5000 --seed0 0 --cache benchmarks/quality_cache.json

    python benchmarks/quality.py --report --cache benchmarks/quality_cache.json   # tables + plot
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

# The demo's discretisations (see epsscale.demo.DEMO_SETTINGS): sampler -> (disc, karras sigma_max).
DISC = {"ddpm": ("respaced", None), "ddim": ("ddim", None), "euler": ("karras", 13.0), "heun": ("karras", 13.0), "dpmpp_2m": ("karras", 13.0)}


def point_key(sampler: str, steps: int, lam: float, num: int, seed0: int, ref: str) -> str:
    return f"{sampler}|{DISC[sampler][0]}|{steps}|{lam:.6g}|{num}|{seed0}|{ref}"


def load_cache(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save_cache(path: Path, cache: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def evaluate(model, ext, ref_stats, sampler: str, steps: int, lam: float, num: int, seed0: int, batch: int, work_root: Path) -> dict:
    from epsscale.cli import make_grid
    from epsscale.data.fashion_mnist import from_model_space
    from epsscale.distributed import sample_seeds
    from epsscale.metrics import compute_fid, feature_stats
    from epsscale.samplers import nfe
    from epsscale.scaling import eps_scaling

    sigmas = make_grid(model, sampler, steps, *DISC[sampler])
    opts = {"clip": 1.0} if sampler in ("ddpm", "ddim") else {}
    work = work_root / f"{sampler}-{steps}-{lam:.6g}-{num}-{seed0}"
    t0 = time.time()
    images, _ = sample_seeds(eps_scaling(model.denoiser, lam, sigmas=sigmas), range(seed0, seed0 + num), model.shape, sampler=sampler, sigmas=sigmas, to_uint8=lambda x: from_model_space(x, 28), batch_size=batch, prior_kind="vp", sampler_opts=opts, work_dir=work, job_meta={"model": "fmnist", "lam": lam}, progress=True)
    fid = compute_fid(feature_stats(images, ext), ref_stats)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return {"fid": fid, "nfe_per_sample": nfe(sampler, steps), "seconds": round(time.time() - t0, 1)}


def report(cache: dict, out_png: Path | None) -> None:
    rows: dict[tuple, dict] = {}
    for k, v in cache.items():
        sampler, disc, steps, lam, num, seed0, ref = k.split("|")
        rows.setdefault((sampler, int(steps), int(num), int(seed0), ref), {})[float(lam)] = v["fid"]
    print("| sampler | steps | samples | seeds from | FID lambda=1 | best lambda | FID at best | change |")
    print("|---|---|---|---|---|---|---|---|")
    for (sampler, steps, num, seed0, ref), d in sorted(rows.items()):
        base = d.get(1.0)
        best = min(d, key=d.get)
        change = f"{100 * (d[best] / base - 1):+.1f}%" if base else "n/a"
        print(f"| {sampler} | {steps} | {num} | {seed0} | {base:.3f} | {best:g} | {d[best]:.3f} | {change} |" if base else f"| {sampler} | {steps} | {num} | {seed0} | n/a | {best:g} | {d[best]:.3f} | n/a |")
    if out_png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for (sampler, steps, num, seed0, ref), d in sorted(rows.items()):
            lams = sorted(d)
            axes[1].plot(lams, [d[l] for l in lams], marker="o", label=f"{sampler} {steps} steps")
        by_sampler: dict[str, list] = {}
        for (sampler, steps, num, seed0, ref), d in sorted(rows.items()):
            if 1.0 in d:
                by_sampler.setdefault(sampler, []).append((steps, d[1.0], min(d.values())))
        for sampler, pts in by_sampler.items():
            pts.sort()
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{sampler} baseline")
            axes[0].plot([p[0] for p in pts], [p[2] for p in pts], marker="x", ls="--", label=f"{sampler} best lambda")
        axes[0].set_xscale("log")
        axes[0].set_xlabel("steps")
        axes[0].set_ylabel("FID (FMNIST classifier features, test split)")
        axes[1].set_xlabel("lambda")
        axes[1].set_ylabel("FID")
        for ax in axes:
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out_png, dpi=110)
        print(f"\nplot: {out_png}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samplers", default="ddpm,ddim,euler,heun")
    ap.add_argument("--steps", default="10,20,50,100")
    ap.add_argument("--lams", default="1.0,1.005,1.01,1.015,1.02")
    ap.add_argument("--num", type=int, default=5000)
    ap.add_argument("--seed0", type=int, default=0)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ref", default="fashion-mnist-test")
    ap.add_argument("--cache", default="benchmarks/quality_cache.json")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--plot", default="benchmarks/quality.png")
    args = ap.parse_args()
    cache_path = Path(args.cache)
    if args.report:
        report(load_cache(cache_path), Path(args.plot) if args.plot else None)
        return
    torch.set_num_threads(args.threads)
    from epsscale.metrics import get_extractor, reference_stats
    from epsscale.models.pretrained import load_model

    model = load_model("fmnist")
    ext = get_extractor("fmnist")
    ref_stats = reference_stats(ext, args.ref)
    work_root = cache_path.with_name(cache_path.stem + "_work")
    for sampler in args.samplers.split(","):
        for steps in [int(s) for s in args.steps.split(",")]:
            for lam in [float(l) for l in args.lams.split(",")]:
                key = point_key(sampler, steps, lam, args.num, args.seed0, args.ref)
                cache = load_cache(cache_path)
                if key in cache:
                    continue
                res = evaluate(model, ext, ref_stats, sampler, steps, lam, args.num, args.seed0, args.batch, work_root)
                cache = load_cache(cache_path)
                cache[key] = res
                save_cache(cache_path, cache)
                print(f"{key}: FID {res['fid']:.4f} ({res['seconds']}s)", flush=True)


if __name__ == "__main__":
    main()
