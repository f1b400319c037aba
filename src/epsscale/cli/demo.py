"""``epsscale demo``: baseline vs Epsilon Scaling, end to end, on this CPU.

* The shipped Fashion-MNIST model: each of the demo's settings (sampler, grid, steps) at λ = 1
  and with the shipped ES λ, FID (the project's Fashion-MNIST classifier features) against the
  train and the test split. The λs were chosen on other seeds (``assets/fmnist_adm_es.json``),
  so these seeds are a held-out yardstick.
* ``--toy``: a 2-D mixture of 8 Gaussians with its exact denoiser and a deliberately imperfect
  one; λ is chosen on one set of seeds and reported on another.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import common
from .common import UserError

DESCRIPTION = """\
Baseline vs Epsilon Scaling on the shipped Fashion-MNIST model: each demo setting at lambda = 1
and at the model's tuned lambda, FID against the train and test splits, a picture of the
samples (OUT/samples.png) and a report (OUT/report.md, OUT/report.json). --toy runs the
2-D Gaussian-mixture demo instead (seconds).
"""


def add_parser(sub: Any) -> None:
    d = sub.add_parser("demo", help="baseline vs ES on the shipped Fashion-MNIST model (or --toy: a 2-D mixture)", description=DESCRIPTION)
    d.add_argument("--toy", action="store_true", help="2-D Gaussian mixture with an exact and an imperfect denoiser")
    d.add_argument("--num", type=common.positive_int, default=None, help="samples per setting (default: 300; --toy: 4000)")
    d.add_argument("--batch", type=common.positive_int, default=None, help=f"network batch (default: the fewest batches of at most {common.MAX_BATCH}, evened out)")
    d.add_argument("--out", default="demo_out", help="output directory")
    common.add_run_options(d)
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models.pretrained import ES_FILE, SHIPPED

    out = common.out_dir(args.out)
    if args.num is not None and args.num < 2:
        raise UserError(f"--num must be at least 2 (FID needs 2 samples per setting), got {args.num}")
    common.set_threads(args)
    if args.toy or not SHIPPED["fmnist"].with_suffix(".json").exists() or not ES_FILE.exists():
        if not args.toy:
            print("(the shipped Fashion-MNIST model is not in this checkout: running the 2-D mixture demo)")
        return toy_demo(out, num=args.num, quiet=args.quiet)
    return fmnist_demo(out, num=args.num, batch=args.batch, quiet=args.quiet)


def fmnist_demo(out: Path, *, num: int | None = None, batch: int | None = None, seed0: int = 0, quiet: bool = False) -> int:
    from .._atomic import atomic_write_text
    from ..metrics import compute_fid, feature_stats, get_extractor, reference_stats
    from ..models.pretrained import (
        DEMO_SETTINGS,
        ES_FILE,
        load_model,
        shipped_discretisation,
        shipped_lambdas,
        shipped_plan,
    )
    from ..plots import panel_grid
    from ..sampling import sample_seeds

    num = num or 300
    batch = batch or common.auto_batch(num)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model("fmnist")
    lams = shipped_lambdas()
    ext = get_extractor("fmnist")
    refs = {"train": reference_stats(ext, "fashion-mnist-train"), "test": reference_stats(ext, "fashion-mnist-test")}
    seeds = list(range(seed0, seed0 + num))
    rows, panels = [], []
    t_all = time.time()
    for label, sampler, _, steps, _ in DEMO_SETTINGS:
        plan = shipped_plan(sampler, steps, model=model)
        kind, top = shipped_discretisation(sampler)  # the grid the model's config chose (its measured start)
        grid_kind = kind if top is None else f"{kind} from sigma {top:g}"
        for lam in dict.fromkeys((1.0, lams[sampler])):  # one row when the tuned lambda is 1
            t0 = time.time()
            images, _ = sample_seeds(plan.replace(lam=lam), seeds, batch_size=batch, progress=not quiet)
            stats = feature_stats(images, ext)
            row = {"sampler": label, "steps": steps, "grid": grid_kind, "lambda": lam, "fid_train": compute_fid(stats, refs["train"]), "fid_test": compute_fid(stats, refs["test"]), "seconds": round(time.time() - t0, 1)}
            rows.append(row)
            panels.append((f"{label} {'baseline' if lam == 1.0 else f'ES {lam:g}'}", images[:36]))
    panel_grid(panels, out / "samples.png")
    report = {"model": "fmnist", "num_samples": num, "seeds": f"{seeds[0]}-{seeds[-1]}", "extractor": ext.name, "rows": rows, "seconds": round(time.time() - t_all, 1), "lambdas_from": str(ES_FILE.name)}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    table = _markdown_table(rows)
    atomic_write_text(out / "report.md", f"# epsscale demo: Fashion-MNIST, {num} samples per setting\n\n{table}\n\nFID uses the project's Fashion-MNIST classifier features; lambda chosen on other seeds ({ES_FILE.name}).\n")
    if not quiet:
        print(table)
        print(f"\nwrote {out / 'samples.png'}, {out / 'report.md'}, {out / 'report.json'} in {report['seconds']}s")
    return 0


def _markdown_table(rows: list[dict]) -> str:
    lines = ["| sampler | steps | lambda | FID vs train | FID vs test | change (test) |", "|---|---|---|---|---|---|"]
    base: dict[str, float] = {}
    for r in rows:
        if r["lambda"] == 1.0:
            base[r["sampler"]] = r["fid_test"]
            change = "baseline"
        else:
            change = f"{100 * (r['fid_test'] / base[r['sampler']] - 1):+.1f}%"
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['lambda']:g} | {r['fid_train']:.3f} | {r['fid_test']:.3f} | {change} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 2-D toy
# ---------------------------------------------------------------------------------------------


def _toy_distance(pts: np.ndarray, ref: np.ndarray, mix: Any) -> dict[str, float]:
    """Frechet distance of the 2-D point clouds, and the RMS distance to the nearest mode."""
    from ..metrics import frechet_distance

    fd = frechet_distance(pts.mean(0), np.cov(pts, rowvar=False), ref.mean(0), np.cov(ref, rowvar=False))
    d = np.linalg.norm(pts[:, None, :] - mix.means.numpy()[None], axis=-1).min(1)
    return {"frechet": float(fd), "mode_rms": float(np.sqrt((d**2).mean()))}


def toy_demo(out: Path, *, num: int | None = None, steps: int = 20, quiet: bool = False) -> int:
    import torch

    from .._atomic import atomic_write_text
    from ..data import toy
    from ..plots import scatter_points
    from ..samplers import StackedGenerator

    num = num or 4000
    out.mkdir(parents=True, exist_ok=True)
    mix = toy.default_mixture()
    ref = mix.sample(20000, torch.Generator().manual_seed(12345)).numpy()
    base = toy.build_plan(sampler="ddpm", steps=steps, sampler_opts={"dtype": torch.float64})

    def run(plan: Any, seeds: list[int]) -> np.ndarray:
        gen = StackedGenerator(seeds)
        x, cond = plan.start(gen)
        return plan.run(plan.scaled_denoiser(), x, gen, cond).numpy()

    # Choose lambda on calibration seeds, report on held-out seeds.
    cal = list(range(10**6, 10**6 + num))
    grid = [1.0 + 0.01 * k for k in range(0, 16)]
    scores = {b: _toy_distance(run(base.replace(lam=b), cal), ref, mix)["frechet"] for b in grid}
    best = min(scores, key=scores.get)
    held = list(range(num))
    results = {
        "exact denoiser": run(base.replace(denoiser=mix), held),
        "imperfect, baseline": run(base, held),
        f"imperfect, ES {best:.2f}": run(base.replace(lam=best), held),
    }
    rows = {k: _toy_distance(v, ref, mix) for k, v in results.items()}
    lines = ["| denoiser | Frechet distance to data | RMS distance to nearest mode |", "|---|---|---|"]
    lines += [f"| {k} | {v['frechet']:.4f} | {v['mode_rms']:.4f} |" for k, v in rows.items()]
    true_rms = _toy_distance(ref, ref, mix)["mode_rms"]
    table = "\n".join(lines) + f"\n\n(data itself: RMS distance to nearest mode {true_rms:.4f}; DDPM, {steps} steps, {num} held-out seeds; lambda chosen on other seeds from {grid[0]:.2f}..{grid[-1]:.2f})"
    scatter_points([(f"{k}\nFD {rows[k]['frechet']:.4f}", v) for k, v in results.items()], out / "toy.png", reference=ref[:4000])
    atomic_write_text(out / "toy_report.json", json.dumps({"steps": steps, "num": num, "lambda": best, "lambda_scores": {str(k): v for k, v in scores.items()}, "rows": rows}, indent=2) + "\n")
    atomic_write_text(out / "toy_report.md", "# epsscale demo: 2-D mixture\n\n" + table + "\n")
    if not quiet:
        print(table)
        print(f"\nwrote {out / 'toy.png'} and {out / 'toy_report.md'}")
    return 0
