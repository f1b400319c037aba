"""Calibration: norm matching vs an FID grid over uniform b, on the shipped model (docs/design.md, "Performance targets").

Both methods choose lambda on *tuning* seeds (1,000,000..); each chosen schedule is then scored
on *held-out* seeds (0..) against the Fashion-MNIST *test* split, with the project's classifier
features. Network evaluations are counted in images (one image through the net = 1).

Target: the norm-matched schedule within 2% of the grid's FID at <= 10% of its evaluations.

    python benchmarks/calibration.py --sampler ddpm --steps 20 --lo 1.0 --hi 1.03 --points 7 \
        --grid-num 1000 --norm-num 256 --eval-num 2000 --out benchmarks/calibration_ddpm.json

The chosen uniform b per sampler is what ``assets/fmnist_adm_es.json`` ships for the demo.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from epsscale.exposure.search import TILT_STEP


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sampler", default="ddpm")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lo", type=float, default=1.0)
    ap.add_argument("--hi", type=float, default=1.03)
    ap.add_argument("--points", type=int, default=7, help="grid points from lo to hi")
    ap.add_argument("--grid-num", type=int, default=1000)
    ap.add_argument("--norm-num", type=int, default=256)
    ap.add_argument("--norm-kinds", default="uniform,linear,per_sigma", help="empty: grid only")
    ap.add_argument("--eval-num", type=int, default=2000, help="0: no held-out evaluation")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cache", default=None, help="FID grid points cache (a rerun replays it)")
    ap.add_argument("--norm-cache-dir", default="benchmarks/calibration_norm", help="norm-matching results, one schedule JSON each")
    ap.add_argument("--parabola-num", type=int, default=100, help="samples per point of the parabola search (0: skip)")
    ap.add_argument("--parabola-step", type=float, default=0.01)
    ap.add_argument("--tilt-step", type=float, default=TILT_STEP, help="the linear search's tilt spacing (lambda of the first step minus the last)")
    ap.add_argument("--parabola-cache", default=None, help="default OUT.parabola.json")
    ap.add_argument("--eval-cache", default="benchmarks/calibration_heldout.json", help="held-out FID per schedule")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import numpy as np

    from epsscale._atomic import atomic_write_text
    from epsscale.data.fashion_mnist import load_fashion_mnist
    from epsscale.exposure import calibrate_norm_matching, fid_objective, fid_search
    from epsscale.exposure.search import TUNING_SEED0
    from epsscale.metrics import get_extractor, reference_stats
    from epsscale.models.pretrained import load_model, shipped_discretisation, shipped_plan, shipped_sampler_options
    from epsscale.samplers import nfe
    from epsscale.scaling import Uniform, describe_schedule, load_schedule, save_schedule

    disc, sigma_max = shipped_discretisation(args.sampler)
    model = load_model("fmnist")
    plan = shipped_plan(args.sampler, args.steps, model=model)
    sigmas = plan.sigmas
    opts = shipped_sampler_options(args.sampler)
    ext = get_extractor("fmnist")

    def fid_evaluator(num: int, seed0: int, ref: str = "fashion-mnist-train"):
        return fid_objective(plan, num, seed0, args.batch, ext, reference_stats(ext, ref))

    def _data(num: int, seed: int):
        images = load_fashion_mnist("train")[0]
        return plan.data_space(images[np.sort(np.random.default_rng(seed).choice(len(images), num, replace=False))])
    per_image = nfe(args.sampler, args.steps)
    report: dict = {"sampler": args.sampler, "steps": args.steps, "disc": disc, "sigma_max": sigma_max, "grid_num": args.grid_num, "norm_num": args.norm_num, "eval_num": args.eval_num}

    # FID grid on tuning seeds.
    t0 = time.time()
    tune = fid_evaluator(args.grid_num, TUNING_SEED0)
    res = fid_search(tune, args.lo, args.hi, method="grid", points=args.points, cache_path=args.cache, key={"sampler": args.sampler, "steps": args.steps, "num": args.grid_num} if args.cache else None)
    report["grid"] = {"points": res.points, "best_b": res.best_b, "nfe": len(res.points) * args.grid_num * per_image, "seconds": round(time.time() - t0, 1)}
    print(f"grid: {res.points} -> b = {res.best_b}", flush=True)

    # Norm matching on tuning seeds.
    x0 = _data(args.norm_num, 0)
    schedules = {"grid best uniform": (Uniform(res.best_b), report["grid"]["nfe"]), "lambda = 1": (Uniform(1.0), 0)}
    report["norm"] = {}
    for kind in [k for k in args.norm_kinds.split(",") if k]:
        # Each norm-matching result is kept (as a schedule JSON) so a rerun does not redo it.
        saved = Path(args.norm_cache_dir) / f"{args.sampler}_{args.steps}_{kind}_{args.norm_num}.json"
        if saved.exists():
            loaded = load_schedule(saved)
            sched, m = loaded.schedule, loaded.meta
            schedules[f"norm matching, {kind}"] = (sched, m["nfe"])
            report["norm"][kind] = {k: m[k] for k in ("nfe", "passes", "lam", "seconds")} | {"schedule": repr(sched), "from": str(saved)}
            print(f"norm {kind}: {sched} ({m['nfe']} evaluations, from {saved})", flush=True)
            continue
        t0 = time.time()
        sched, info = calibrate_norm_matching(model.denoiser, x0, sigmas, args.sampler, kind, seeds=range(TUNING_SEED0, TUNING_SEED0 + args.norm_num), sampler_opts=opts, batch_size=args.batch)
        schedules[f"norm matching, {kind}"] = (sched, info.nfe)
        report["norm"][kind] = {"schedule": repr(sched), "nfe": info.nfe, "passes": info.passes, "lam": info.lam.tolist(), "seconds": round(time.time() - t0, 1)}
        saved.parent.mkdir(parents=True, exist_ok=True)
        save_schedule(saved, sched, {"model": "fmnist", "sampler": args.sampler, "steps": args.steps, **{k: report["norm"][kind][k] for k in ("nfe", "passes", "lam", "seconds")}})
        print(f"norm {kind}: {sched} ({info.nfe} evaluations)", flush=True)

    # The cheap FID search: a parabola through 3-4 small coupled FID points (same tuning seeds).
    if args.parabola_num:
        t0 = time.time()
        pcache = args.parabola_cache or (str(Path(args.out).with_suffix(".parabola.json")) if args.out else None)
        tune_small = fid_evaluator(args.parabola_num, TUNING_SEED0)
        pres = fid_search(tune_small, 0.9, 1.1, method="parabola", start=1.0, step=args.parabola_step, cache_path=pcache, key={"sampler": args.sampler, "steps": args.steps, "num": args.parabola_num})
        cost = len(pres.points) * args.parabola_num * per_image
        b = round(pres.best_b, 4)
        schedules[f"FID parabola, {args.parabola_num} samples x {len(pres.points)} points"] = (Uniform(b), cost)
        report["parabola"] = {"points": pres.points, "vertex": pres.best_b, "bracketed": pres.bracketed, "nfe": cost, "seconds": round(time.time() - t0, 1)}
        print(f"parabola: {pres.points} -> b = {b} ({cost} evaluations)", flush=True)

        # The paper's linear schedule by FID: the same parabola, then one over the tilt (same seeds).
        t0 = time.time()
        from epsscale.exposure import linear_search

        lres = linear_search(tune_small, args.steps, step=args.parabola_step, tilt_step=args.tilt_step, cache_path=pcache, key={"sampler": args.sampler, "steps": args.steps, "num": args.parabola_num})
        lcost = lres.points * args.parabola_num * per_image
        schedules[f"FID linear (b, then tilt), {args.parabola_num} samples x {lres.points} points"] = (lres.schedule, lcost)
        report["linear"] = {"uniform_points": lres.uniform.points, "tilt_points": lres.tilt.points, "mean": lres.uniform.best_b, "tilt": lres.tilt.best_b, "schedule": repr(lres.schedule), "nfe": lcost, "seconds": round(time.time() - t0, 1)}
        print(f"linear: mean {lres.uniform.best_b:.5g}, tilt {lres.tilt.best_b:.4g} -> {lres.schedule} ({lcost} evaluations)", flush=True)

    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    if not args.eval_num:
        return

    # Score everything on held-out seeds against the test split.
    evaluate = fid_evaluator(args.eval_num, 0, ref="fashion-mnist-test")
    # Held-out scores are cached by schedule (a rerun, or two methods choosing the same b, costs nothing).
    ecache_path = Path(args.eval_cache) if args.eval_cache else None
    ecache = json.loads(ecache_path.read_text()) if ecache_path and ecache_path.exists() else {}
    rows = []
    for name, (sched, cost) in schedules.items():
        key = f"{args.sampler}|{args.steps}|{args.eval_num}|{sched!r}"
        if key not in ecache:
            ecache[key] = evaluate(sched)
            if ecache_path:
                atomic_write_text(ecache_path, json.dumps(ecache, indent=1, sort_keys=True) + "\n")
        fid = ecache[key]
        rows.append({"method": name, "schedule": repr(sched), "fid": fid, "nfe": cost, "label": describe_schedule(sched)})
        print(f"{name}: FID {fid:.4f}", flush=True)
    report["rows"] = rows
    grid_row = rows[0]
    print(f"\n{args.sampler}, {args.steps} steps; lambda tuned on {args.grid_num} (grid) / {args.norm_num} (norm) / {args.parabola_num} (parabola) tuning seeds; FID on {args.eval_num} held-out seeds vs the test split\n")
    print("| method | schedule | FID (held out) | vs grid | network evaluations | vs grid |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['label']} | {r['fid']:.4f} | {100 * (r['fid'] / grid_row['fid'] - 1):+.1f}% | {r['nfe']:,} | {r['nfe'] / grid_row['nfe']:.1%} |")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
