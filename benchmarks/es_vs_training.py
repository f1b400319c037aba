"""How ES's gain changes as a model trains: the tuned-b gain at 20 steps, checkpoint by checkpoint.

    python benchmarks/es_vs_training.py --run-dir runs/fmnist28 --steps-of 1200,3000,6000,12000 --threads 1
    python benchmarks/es_vs_training.py --report --write-results     # table + plot from the caches

For each checkpoint (the EMA weights of a training snapshot, exported once into
``benchmarks/es_vs_training/models/stepNNNNNN/``, where a fresh clone finds them) and each
sampler (DDPM ancestral and DDIM, each on the grid the shipped model's config gives it, the start
that benchmarks/start_sweep.py chose for the finished model; x0 clipped to [-1, 1] as ADM does), an FID grid over uniform b (0.98 ... 1.03 by 0.01,
extended past an end that holds the minimum) on the same 500 tuning seeds at every b, against
Fashion-MNIST's train split with the project's classifier features. The gain is FID at the best
b over FID at b = 1, on those seeds. Every point is cached (``--cache-dir``), so a run resumes and
``--report`` costs nothing. The paper argues that exposure bias follows from prediction error;
this shows how the error that ES corrects changes with training.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- es_vs_training.py --report: begin -->", "<!-- es_vs_training.py --report: end -->"


def model_dir(models: Path, step: int) -> Path:
    return models / f"step{step:06d}"


def export(run_dir: Path, models: Path, step: int) -> Path:
    """The snapshot's EMA weights as a model directory (model.json + model.safetensors)."""
    from epsscale.models.train import export_model

    d = model_dir(models, step)
    if not (d / "model.safetensors").exists():
        d.mkdir(parents=True, exist_ok=True)
        export_model(run_dir, d / "model", step=step)
    return d


def setting(sampler: str) -> tuple[str, float | None, dict, str]:
    """(grid kind, Karras top, sampler options, label) of ``sampler`` as the shipped model runs it
    (its config's ``sampling`` block): every checkpoint is measured on the finished model's grid."""
    from epsscale.models.pretrained import shipped_discretisation, shipped_sampler_options

    disc, sigma_max = shipped_discretisation(sampler)
    return disc, sigma_max, shipped_sampler_options(sampler), disc if sigma_max is None else f"{disc}{sigma_max:g}"


def grid_search(model: Path, sampler: str, steps: int, num: int, batch: int, cache: Path, lo: float = 0.98, hi: float = 1.03, points: int = 6, max_extend: int = 6, device: str = "cpu"):
    """The cached FID grid over b for one checkpoint and sampler (extended past an end minimum)."""
    from _common import grid_to_interior_minimum
    from epsscale.exposure import fid_objective
    from epsscale.exposure.search import TUNING_SEED0
    from epsscale.metrics import get_extractor, reference_stats
    from epsscale.models.pretrained import build_plan

    disc, sigma_max, opts, label = setting(sampler)
    plan = build_plan(model, sampler=sampler, steps=steps, disc=disc, sigma_max=sigma_max, sampler_opts=opts, device=device)
    ext = get_extractor("fmnist", device=device)
    evaluate = fid_objective(plan, num, TUNING_SEED0, batch, ext, reference_stats(ext, "fashion-mnist-train"))
    key = {"model": model.name, "sampler": sampler, "disc": label, "steps": steps, "num": num}
    return grid_to_interior_minimum(evaluate, lo, hi, points, cache, key, max_extend)[0]


def rows(cache_dir: Path, total: int) -> list[dict]:
    out = []
    for f in sorted(cache_dir.glob("*.json")):
        d = json.loads(f.read_text())
        pts = sorted((float(b), float(v)) for b, v in d["points"])
        base = dict(pts).get(1.0)
        best_b, best = min(pts, key=lambda p: (p[1], p[0]))
        step = int(d["key"]["model"].removeprefix("step"))
        out.append({"step": step, "share": step / total, "sampler": d["key"]["sampler"], "disc": d["key"]["disc"], "num": d["key"]["num"],
                    "fid_1": base, "best_b": best_b, "fid_best": best, "gain": None if base is None else best / base - 1,
                    "bracketed": pts[0][0] < best_b < pts[-1][0], "points": pts})
    return sorted(out, key=lambda r: (r["sampler"], r["step"]))


def table(rs: list[dict]) -> str:
    lines = ["| checkpoint | of training | sampler | FID at λ = 1 | best b | FID at best b | gain | grid (b: FID) |", "|---|---|---|---|---|---|---|---|"]
    for r in rs:
        grid = ", ".join(f"{b:g}: {v:.1f}" for b, v in r["points"])
        best = f"{r['best_b']:g}" + ("" if r["bracketed"] else " (edge)")
        gain = "" if r["gain"] is None else f"{100 * r['gain']:+.1f}%"
        fid_1 = "not yet" if r["fid_1"] is None else f"{r['fid_1']:.2f}"  # a grid still running may lack b = 1
        lines.append(f"| step {r['step']} | {100 * r['share']:.0f}% | {r['sampler']} ({r['disc']}) | {fid_1} | {best} | {r['fid_best']:.2f} | {gain} | {grid} |")
    return "\n".join(lines)


def plot(rs: list[dict], path: Path) -> None:
    from epsscale.plots import new_figure, save_figure

    fig = new_figure(9, 3.4)
    a, b = fig.subplots(1, 2)
    for sampler in sorted({r["sampler"] for r in rs}):
        mine = [r for r in rs if r["sampler"] == sampler and r["gain"] is not None]
        x = [100 * r["share"] for r in mine]
        a.plot(x, [100 * r["gain"] for r in mine], marker="o", label=sampler)
        b.plot(x, [r["best_b"] for r in mine], marker="o", label=sampler)
    a.set_xlabel("% of training")
    a.set_ylabel("FID change at the best b (%)")
    a.axhline(0, color="grey", lw=0.5)
    b.set_xlabel("% of training")
    b.set_ylabel("best uniform b")
    b.axhline(1, color="grey", lw=0.5)
    a.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default="runs/fmnist28", help="the training run whose snapshots to export (not needed once exported)")
    ap.add_argument("--steps-of", default="1200,3000,6000,12000", help="checkpoint steps (10, 25, 50, 100%% of 12,000)")
    ap.add_argument("--total", type=int, default=12000, help="the run's total steps")
    ap.add_argument("--samplers", default="ddpm,ddim")
    ap.add_argument("--sampling-steps", type=int, default=20)
    ap.add_argument("--num", type=int, default=500, help="tuning seeds per point")
    ap.add_argument("--batch", type=int, default=125)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default=str(HERE / "es_vs_training" / "models"))
    ap.add_argument("--cache-dir", default=None, help="default benchmarks/es_vs_training/grids (with --device cuda: grids_cuda)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda; a seed's noise differs between them, so each keeps its own caches")
    ap.add_argument("--report", action="store_true", help="print the table and write the plot from the caches; sample nothing")
    ap.add_argument("--write-results", action="store_true", help="with --report: put the table into benchmarks/RESULTS.md between its markers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    suffix = "" if args.device == "cpu" else "_" + args.device.split(":")[0]
    models, cache_dir = Path(args.models), Path(args.cache_dir or HERE / "es_vs_training" / f"grids{suffix}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for step in (int(s) for s in args.steps_of.split(",")):
            d = model_dir(models, step) if model_dir(models, step).exists() else export(Path(args.run_dir), models, step)
            for sampler in args.samplers.split(","):
                t0 = time.time()
                res = grid_search(d, sampler, args.sampling_steps, args.num, args.batch, cache_dir / f"step{step:06d}_{sampler}_{setting(sampler)[3]}_{args.sampling_steps}_{args.num}.json", device=args.device)
                print(f"step {step} {sampler}: {sorted(res.points)} -> b = {res.best_b:g} ({res.new_evaluations} new points, {time.time() - t0:.0f}s)", flush=True)
    rs = rows(cache_dir, args.total)
    text = table(rs)
    print(text)
    if rs:
        plot(rs, HERE / f"es_vs_training{suffix}.png")
    if args.write_results:
        from _common import write_between_markers

        write_between_markers(HERE / "RESULTS.md", BEGIN, END, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
