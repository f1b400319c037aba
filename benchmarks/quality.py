"""Quality: FID against steps for the shipped Fashion-MNIST model, baseline vs the best uniform b.

Protocol, per (sampler, steps):

1. *Tune*: a small FID grid over uniform b (``--tune-lo``..``--tune-hi``, ``--tune-points``) with ``--tune-num`` samples on tuning seeds
   1,000,000.. against the Fashion-MNIST *train* split (the protocol of
   ``benchmarks/calibration.py``; each grid is cached in ``--tune-dir`` and resumes).
2. *Evaluate*: λ = 1 and the tuned b on ``--num`` held-out seeds (0..) against the *test* split,
   a yardstick the tuning never saw. Each point is cached in ``--cache``; within a point the
   sampling runner's work directory keeps finished batches, so a kill loses at most one batch.

    python benchmarks/quality.py --samplers ddpm,ddim,euler,heun --steps 10,20,50,100 --num 5000
    python benchmarks/quality.py --report          # tables + benchmarks/quality.png
    python benchmarks/quality.py --report --write-results   # ... and the tables into RESULTS.md
    python benchmarks/quality.py --report --write-readme    # ... and the steps x sampler summary into README.md
    python benchmarks/quality.py --samplers euler,heun --karras-sigma-max 25   # another Karras start, cached apart

FID uses the project's Fashion-MNIST classifier features. Processes with different ``--samplers``
may run side by side (one thread each uses two cores better than one process with two): the cache
is shared under a lock, and each (sampler, steps) has its own tuning file and work directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, also when loaded by path
from _common import add_to_json_cache, grid_to_interior_minimum, write_between_markers  # noqa: E402

from epsscale.models.pretrained import shipped_discretisation as demo_discretisation, shipped_sampler_options as demo_sampler_options
from epsscale.samplers import SAMPLERS

# The tuning grid every (sampler, steps) starts from: b = lo..hi in this many points.
TUNE_START = (0.99, 1.02, 7)


def discretisation(sampler: str, karras_sigma_max: float | None = None) -> tuple[str, float | None]:
    """The demo's (grid kind, sigma_max) for ``sampler``; ``karras_sigma_max`` moves the top of a
    Karras grid (euler, heun), and changes nothing for the VP samplers."""
    kind, sigma_max = demo_discretisation(sampler)
    return (kind, karras_sigma_max) if kind == "karras" and karras_sigma_max is not None else (kind, sigma_max)


def grid_label(sampler: str, karras_sigma_max: float | None = None) -> str:
    """Cache label of the grid: the demo's kind name, plus sigma_max where it moved from the demo's."""
    kind, sigma_max = discretisation(sampler, karras_sigma_max)
    return kind if sigma_max == demo_discretisation(sampler)[1] else f"{kind}{sigma_max:g}"


def is_demo_grid(sampler: str, grid: str) -> bool:
    """Whether ``grid`` (a :func:`grid_label`) is the demo's own; other grids are cached apart."""
    return grid == demo_discretisation(sampler)[0]


def point_key(sampler: str, grid: str, steps: int, lam: float, num: int, seed0: int, ref: str) -> str:
    """Cache key of one held-out evaluation; ``grid`` is :func:`grid_label`'s."""
    return f"{sampler}|{grid}|{steps}|{lam:.6g}|{num}|{seed0}|{ref}"


def load_cache(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def evaluator(model, sampler: str, steps: int, num: int, seed0: int, batch: int, ref: str, work_root: Path | None = None, device: str = "cpu", karras_sigma_max: float | None = None):
    """b -> FID of ``num`` samples from seed ``seed0`` on the demo's discretisation (see fid_evaluator)."""
    from epsscale.exposure import fid_objective
    from epsscale.metrics import get_extractor, reference_stats
    from epsscale.models.pretrained import build_plan

    kind, sigma_max = discretisation(sampler, karras_sigma_max)
    plan = build_plan(model, sampler=sampler, steps=steps, disc=kind, sigma_max=sigma_max, sampler_opts=demo_sampler_options(sampler), device=device)
    grid = grid_label(sampler, karras_sigma_max)
    if work_root is not None and not is_demo_grid(sampler, grid):
        work_root = work_root / grid
    ext = get_extractor("fmnist", device=device)
    return fid_objective(plan, num, seed0, batch, ext, reference_stats(ext, ref), work_root=work_root, progress=work_root is not None)


def evaluate(model, sampler: str, steps: int, lam: float, num: int, seed0: int, batch: int, ref: str, work_root: Path, device: str = "cpu", karras_sigma_max: float | None = None) -> dict:
    from epsscale.samplers import nfe

    t0 = time.time()
    fid = evaluator(model, sampler, steps, num, seed0, batch, ref, work_root, device, karras_sigma_max)(lam)
    return {"fid": fid, "nfe_per_sample": nfe(sampler, steps), "seconds": round(time.time() - t0, 1)}


def tune(model, sampler: str, steps: int, lo: float, hi: float, points: int, num: int, batch: int, tune_dir: Path, max_extend: int = 8, device: str = "cpu", karras_sigma_max: float | None = None):
    """FID grid over uniform b on tuning seeds (train split), cached per (sampler, steps, num).

    When the best b is an end of the grid the grid grows past that end, one spacing at a time
    (at most ``max_extend`` points), until the minimum is inside it. Returns the last search's
    result and how many grid points were newly evaluated in all.
    """
    from epsscale.exposure.search import TUNING_SEED0

    evaluate = evaluator(model, sampler, steps, num, TUNING_SEED0, batch, "fashion-mnist-train", device=device, karras_sigma_max=karras_sigma_max)
    tune_dir.mkdir(parents=True, exist_ok=True)
    label = grid_label(sampler, karras_sigma_max)
    moved = not is_demo_grid(sampler, label)
    cache = tune_dir / (f"{sampler}_{label}_{steps}_{num}.json" if moved else f"{sampler}_{steps}_{num}.json")
    key = {"sampler": sampler, "steps": steps, "num": num, **({"grid": label} if moved else {})}
    # A minimum on the edge of the grid is not a minimum: the grid grows past it.
    return grid_to_interior_minimum(evaluate, lo, hi, points, cache, key, max_extend)


def tuned(tune_dir: Path, initial: tuple[float, float, int] | None = None) -> dict[tuple[str, str, int], tuple[float | None, list]]:
    """(sampler, grid label, steps) -> (best b, [(b, FID), ...]) from the tuning caches on disk.

    best b is None while the tuning is unfinished: its minimum is still at an end of the grid
    (the rule :func:`tune` extends by), or, with ``initial`` = (lo, hi, points), a point of the
    grid it starts from is still missing (a search killed halfway, whose partial minimum means
    nothing yet).
    """
    from epsscale.exposure.search import grid_points

    start = set() if initial is None else {round(b, 6) for b in grid_points(*initial)}
    out = {}
    for f in sorted(tune_dir.glob("*.json")):
        d = json.loads(f.read_text())
        sampler = d["key"]["sampler"]
        pts = sorted((float(b), float(v)) for b, v in d["points"])
        best = min(pts, key=lambda p: (p[1], p[0]))[0]
        grid = d["key"].get("grid") or demo_discretisation(sampler)[0]
        done = pts[0][0] < best < pts[-1][0] and start <= {round(b, 6) for b, _ in pts}
        out[(sampler, grid, int(d["key"]["steps"]))] = (best if done else None, pts)
    return out


def _row_order(item) -> tuple:
    (sampler, grid, steps), _ = item
    return (list(SAMPLERS).index(sampler), not is_demo_grid(sampler, grid), grid, steps)


def _row_name(sampler: str, grid: str) -> str:
    return sampler if is_demo_grid(sampler, grid) else f"{sampler} ({grid})"


TABLES_BEGIN = "<!-- quality.py --report: begin -->"
TABLES_END = "<!-- quality.py --report: end -->"
SUMMARY_BEGIN = "<!-- quality.py --report summary: begin -->"
SUMMARY_END = "<!-- quality.py --report summary: end -->"


def write_tables(path: Path, tables: str, begin: str = TABLES_BEGIN, end: str = TABLES_END) -> None:
    """Replace the text between the markers ``begin`` and ``end`` in ``path`` with ``tables``."""
    write_between_markers(path, begin, end, tables)


def _rows(cache: dict, grids: dict, num: int, seed0: int, ref: str) -> list[tuple]:
    """(row name, sampler, grid, steps, best b, result at λ = 1, result at b) per tuning grid, in report order."""
    rows = []
    for (sampler, grid, steps), (best, _) in sorted(grids.items(), key=_row_order):
        base = cache.get(point_key(sampler, grid, steps, 1.0, num, seed0, ref))
        es = base if best == 1.0 else cache.get(point_key(sampler, grid, steps, best, num, seed0, ref)) if best is not None else None
        rows.append((_row_name(sampler, grid), sampler, grid, steps, best, base, es))
    return rows


def _change(base: dict | None, es: dict | None) -> str:
    return f"{100 * (es['fid'] / base['fid'] - 1):+.1f}%" if base and es else ""


NOTHING_YET = "No cell of the grid has been measured on the shipped model yet; the commands are in the Quality section of benchmarks/RESULTS.md."


def summary(cache: dict, tune_dir: Path, num: int, seed0: int, ref: str, initial: tuple[float, float, int] | None = None) -> str:
    """A steps x sampler table of the held-out change at the tuned b, demo grids only (for the README)."""
    from epsscale.samplers import nfe

    rows = [r for r in _rows(cache, tuned(tune_dir, initial), num, seed0, ref) if is_demo_grid(r[1], r[2])]
    cells = {(sampler, steps): (best, base, es) for _, sampler, _, steps, best, base, es in rows}
    if not cells:
        return NOTHING_YET
    samplers = [s for s in SAMPLERS if any(k[0] == s for k in cells)]
    lines = [
        f"Change in held-out FID ({num} samples against {ref}) at the tuned b (in brackets); λ = 1 is 0%:\n",
        "| steps | " + " | ".join(samplers) + " |",
        "|---|" + "---|" * len(samplers),
    ]
    for steps in sorted({k[1] for k in cells}):
        out = []
        for sampler in samplers:
            best, base, es = cells.get((sampler, steps), (None, None, None))
            if (sampler, steps) not in cells:
                out.append("not run")
            elif best is None:
                out.append("tuning unfinished")
            elif not (base and es):
                out.append(f"not evaluated (b = {best:g})")
            else:
                out.append(f"{_change(base, es)} ({best:g})")
        lines.append(f"| {steps} | " + " | ".join(out) + " |")
    all_steps = sorted({k[1] for k in cells})
    for sampler in samplers:
        if any(nfe(sampler, n) != n for n in all_steps):
            counts = ", ".join(str(nfe(sampler, n)) for n in all_steps)
            lines.append(f"\n{sampler} takes {counts} network evaluations at {', '.join(map(str, all_steps))} steps.")
    return "\n".join(lines)


def report(cache: dict, tune_dir: Path, num: int, seed0: int, ref: str, out_png: Path | None, initial: tuple[float, float, int] | None = None) -> str:
    """The Markdown tables (held-out FIDs, tuning grids); also draws ``out_png`` when given."""
    from epsscale.samplers import nfe

    lines = []
    emit = lines.append
    grids = tuned(tune_dir, initial)
    rows = _rows(cache, grids, num, seed0, ref)
    if not rows and not grids:
        return NOTHING_YET
    emit(f"Held-out FID, {num} samples (seeds {seed0}..{seed0 + num - 1}) against {ref}; b tuned on other seeds.\n")
    emit("| sampler | steps | NFE | tuned b | FID λ = 1 | FID at b | change |")
    emit("|---|---|---|---|---|---|---|")
    for name, sampler, _, steps, best, base, es in rows:
        f = lambda r: f"{r['fid']:.2f}" if r else "not run"
        b = "tuning unfinished" if best is None else f"{best:g}"
        emit(f"| {name} | {steps} | {nfe(sampler, steps)} | {b} | {f(base)} | {f(es)} | {_change(base, es)} |")
    emit("\nTuning grids (FID at b, tuning seeds, train split):\n")
    bs = sorted({round(b, 6) for _, pts in grids.values() for b, _ in pts})
    emit("| sampler | steps | " + " | ".join(f"{b:g}" for b in bs) + " |")
    emit("|---|---|" + "---|" * len(bs))
    for (sampler, grid, steps), (best, pts) in sorted(grids.items(), key=_row_order):
        d = {round(b, 6): v for b, v in pts}
        cells = [("**%.2f**" if best is not None and abs(b - best) < 1e-9 else "%.2f") % d[b] if b in d else "" for b in bs]
        emit(f"| {_row_name(sampler, grid)} | {steps} | " + " | ".join(cells) + " |")
    if out_png:
        emit(f"\n![quality]({out_png.name})")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name in dict.fromkeys(r[0] for r in rows):
            pts = [(st, base["fid"], es["fid"]) for n, _, _, st, _, base, es in rows if n == name and base and es]
            if not pts:
                continue
            line = axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name}, λ = 1")[0]
            axes[0].plot([p[0] for p in pts], [p[2] for p in pts], marker="x", ls="--", color=line.get_color(), label=f"{name}, tuned b")
        for (sampler, grid, steps), (best, pts) in sorted(grids.items(), key=_row_order):
            axes[1].plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"{_row_name(sampler, grid)} {steps}")
        axes[0].set_xscale("log")
        axes[0].set_xlabel("steps")
        axes[0].set_ylabel(f"FID, {num} held-out samples vs test split")
        axes[1].set_xlabel("uniform b")
        axes[1].set_ylabel("FID, tuning grid (train split)")
        axes[1].set_yscale("log")
        for ax in axes:
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out_png, dpi=110)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samplers", default="ddpm,ddim,euler,heun")
    ap.add_argument("--steps", default="10,20,50,100")
    ap.add_argument("--tune-lo", type=float, default=TUNE_START[0])
    ap.add_argument("--tune-hi", type=float, default=TUNE_START[1])
    ap.add_argument("--tune-points", type=int, default=TUNE_START[2])
    ap.add_argument("--tune-num", type=int, default=500)
    ap.add_argument("--tune-dir", default=None, help="default benchmarks/quality_tune (with --device cuda: quality_tune_cuda)")
    ap.add_argument("--num", type=int, default=5000)
    ap.add_argument("--seed0", type=int, default=0)
    ap.add_argument("--batch", type=int, default=125)
    ap.add_argument("--karras-sigma-max", type=float, default=None, help="top of the Karras grid for euler and heun (default: the shipped config's start); cached apart from it")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ref", default="fashion-mnist-test")
    ap.add_argument("--cache", default=None, help="default benchmarks/quality_cache.json (with --device cuda: quality_cache_cuda.json)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda; a seed's noise differs between them, so each keeps its own caches")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--write-results", nargs="?", const="benchmarks/RESULTS.md", default=None, help="with --report: also put the tables into this file, between its report markers")
    ap.add_argument("--write-readme", nargs="?", const="README.md", default=None, help="with --report: also put the steps x sampler summary into this file, between its summary markers")
    ap.add_argument("--plot", default=None, help="default benchmarks/quality.png (with --device cuda: quality_cuda.png)")
    args = ap.parse_args()
    if args.karras_sigma_max is not None and not 0 < args.karras_sigma_max < float("inf"):
        ap.error(f"--karras-sigma-max must be a positive number, got {args.karras_sigma_max}")
    suffix = "" if args.device == "cpu" else "_" + args.device.split(":")[0]
    cache_path = Path(args.cache or f"benchmarks/quality_cache{suffix}.json")
    tune_dir = Path(args.tune_dir or f"benchmarks/quality_tune{suffix}")
    args.plot = f"benchmarks/quality{suffix}.png" if args.plot is None else args.plot
    if args.report:
        initial = (args.tune_lo, args.tune_hi, args.tune_points)
        tables = report(load_cache(cache_path), tune_dir, args.num, args.seed0, args.ref, Path(args.plot) if args.plot else None, initial)
        print(tables)
        # Another device's tables go between markers of their own, never over the CPU's.
        mark = (lambda m: m) if args.device == "cpu" else (lambda m: m.replace("--report", f"--report --device {args.device}"))
        if args.write_results:
            write_tables(Path(args.write_results), tables, mark(TABLES_BEGIN), mark(TABLES_END))
            print(f"\ntables written into {args.write_results}")
        if args.write_readme:
            text = summary(load_cache(cache_path), tune_dir, args.num, args.seed0, args.ref, initial)
            write_tables(Path(args.write_readme), text, mark(SUMMARY_BEGIN), mark(SUMMARY_END))
            print(f"\n{text}\n\nsummary written into {args.write_readme}")
        return
    torch.set_num_threads(args.threads)
    # Full float32 on a GPU too (no TF32), so its numbers differ from the CPU's only by the noise.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    from epsscale.models.pretrained import load_model

    model = load_model("fmnist", device=args.device)
    work_root = cache_path.with_name(cache_path.stem + "_work")
    # Steps outer, so the short (cheap) settings of every sampler finish first.
    for steps in [int(s) for s in args.steps.split(",")]:
        for sampler in args.samplers.split(","):
            sm = args.karras_sigma_max
            grid = grid_label(sampler, sm)
            res, new = tune(model, sampler, steps, args.tune_lo, args.tune_hi, args.tune_points, args.tune_num, args.batch, tune_dir, device=args.device, karras_sigma_max=sm)
            print(f"tuned {sampler} {steps} ({grid}): b = {res.best_b:g} ({new} new grid points)", flush=True)
            for lam in dict.fromkeys([1.0, res.best_b]):
                key = point_key(sampler, grid, steps, lam, args.num, args.seed0, args.ref)
                if key in load_cache(cache_path):
                    continue
                out = evaluate(model, sampler, steps, lam, args.num, args.seed0, args.batch, args.ref, work_root, args.device, sm)
                add_to_json_cache(cache_path, key, out)
                print(f"{key}: FID {out['fid']:.4f} ({out['seconds']}s)", flush=True)


if __name__ == "__main__":
    main()
