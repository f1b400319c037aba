"""Every training-free fix for exposure bias side by side, on one model and one yardstick.

    python benchmarks/compare.py --steps 20 --samplers ddim,ddpm --threads 2
    python benchmarks/compare.py --report --write-results      # tables + plot from the cache

Methods, each on the shipped model's plan for the sampler (its grid and x0 clipping):

* ``baseline``: λ = 1;
* ``ES``: uniform λ = b (Ning et al. 2024);
* ``Time-Shift``: the network's timestep from the state's variance (Li et al. 2024), knob: the
  window w (the cutoff stays the paper's);
* ``TSR``: ε·r(σ) (arXiv 2510.01184), knob: k (σ_p = 1), both sides of 1;
* ``DCW``: the low-frequency Haar band corrected after each step (arXiv 2604.16044), knob: c
  (log-spaced: see :func:`knob_grid`);
* ``ES + Time-Shift``, ``ES + DCW``: each method at its own tuned knob, stacked as they are;
* ``IP``, ``IP + ES``: the DDPM-IP model (input perturbation in training; ``--ip-model``) at
  λ = 1 and at its own tuned b;
* ``control``, ``control + ES``: where the IP model is a fine-tune of the main one, the same
  fine-tune with γ = 0 (``--control-model``): the extra training steps alone, so that IP's rows
  can be read against it rather than against a model that trained less.

Every knob is tuned with the same budget: a grid of ``--tune-points`` values on ``--tune-num``
tuning seeds (1,000,000...) against the train split; the best value is then evaluated on
``--num`` held-out seeds (0...) against the test split. All FIDs use the project's classifier
features. Every FID is cached in ``--cache`` (a rerun resumes; ``--report`` samples nothing), with
its wall time. None of these methods adds a network evaluation; what else they cost is timed
apart, interleaved, by ``benchmarks/speed.py`` (wall times taken here, point after point while
another process shares the machine, are too noisy to compare).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchmarks/_common.py, also when loaded by path
from _common import add_to_json_cache, write_between_markers  # noqa: E402

METHODS = ("baseline", "ES", "Time-Shift", "TSR", "DCW", "ES + Time-Shift", "ES + DCW", "IP", "IP + ES", "control", "control + ES")
# Methods with a knob of their own, tuned on the tuning seeds; "IP + ES" and "control + ES" tune b
# on their own model.
TUNED = ("ES", "Time-Shift", "TSR", "DCW", "IP + ES", "control + ES")
MODEL_OF = {"IP": "ip", "control": "control"}


def model_of(method: str) -> str:
    """Which model a method samples: ``ip``, ``control`` or ``main``."""
    return MODEL_OF.get(method.split(" + ")[0], "main")


def knob_of(method: str) -> str:
    """The knob a tuned method tunes: "IP + ES" and "control + ES" tune ES's b on their own model."""
    return "ES" if method.endswith(" + ES") else method


def knobs_of(method: str, tuned: dict[str, float | None]) -> dict[str, float | None]:
    """The knob values a method runs at, from the tuned ones (by method name)."""
    if model_of(method) != "main":
        return {"ES": tuned.get(method)} if method.endswith(" + ES") else {}
    return {k: tuned.get(k) for k in ("ES", "Time-Shift", "TSR", "DCW") if k in method.split(" + ")}
# The value at which each knob leaves the sampler as it is. A knob at its neutral value is dropped
# from the plan and from the cache key, so every grid's neutral point and every method that tunes
# to it share the baseline's sample (and its FID) instead of sampling the same thing again.
NEUTRAL = {"ES": 1.0, "Time-Shift": 0, "TSR": 1.0, "DCW": 0.0}


def active(knobs: dict[str, float]) -> dict[str, float]:
    """``knobs`` without those at their neutral value."""
    return {k: v for k, v in knobs.items() if v != NEUTRAL[k]}


def cache_key(model: str, sampler: str, steps: int, knobs: dict[str, float]) -> str:
    """The cache key of one (model, sampler, steps, knobs) plan, neutral knobs dropped."""
    return f"{model}|{sampler}|{steps}|" + ",".join(f"{k}={v}" for k, v in sorted(active(knobs).items()))


BEGIN, END = "<!-- compare.py --report: begin -->", "<!-- compare.py --report: end -->"


def knob_grid(method: str, steps: int, points: int) -> list[float]:
    """The values a method's knob is tuned over: the first ``points`` of a list that starts at the
    neutral value (b = 1, w = 0, k = 1, c = 0) and moves outwards.

    ES's b and TSR's k go both ways, since a model may want eps shrunk or enlarged (the shipped model
    wants b < 1 for DDPM). DCW's c is >= 0 by definition and log-spaced: on the respaced cosine
    chain sigma_max is about 2e4, so its weight c sigma_i / sigma_max is c at the first step and at
    most c / 3,500 (10 steps) to c / 630 (50 steps) after it, and the paper's c = 0.005 barely
    moves a sample.
    """
    from epsscale.timeshift import paper_defaults

    if method == "ES" or method.endswith(" + ES") and model_of(method) != "main":
        return [1.0, 0.99, 1.01, 0.98, 1.02, 0.97, 1.03][:points]
    if method == "Time-Shift":
        w = paper_defaults(steps)[0]
        return [0] + [max(1, round(w * f)) for f in (0.5, 1, 2, 3, 4, 6)][: points - 1]
    if method == "TSR":
        return [1.0, 0.97, 1.03, 0.95, 1.05, 0.9, 1.1][:points]
    if method == "DCW":
        return [0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0][:points]
    raise ValueError(method)


def plan_for(base, knobs: dict[str, float]):
    """The plan of one method: ``knobs`` holds b, w, k or c by method name."""
    from epsscale.dcw import DCW
    from epsscale.scaling import TSR
    from epsscale.timeshift import TimeShift

    opts = dict(base.sampler_opts)
    lam = 1.0
    if "ES" in knobs:
        lam = knobs["ES"]
    if "TSR" in knobs:
        lam = TSR(k=knobs["TSR"], sigma=1.0)
    if knobs.get("Time-Shift"):
        opts["time_shift"] = TimeShift.for_steps(base.schedule, base.steps, window=int(knobs["Time-Shift"]))
    if knobs.get("DCW"):
        opts["dcw"] = DCW(knobs["DCW"])
    return base.replace(lam=lam, sampler_opts=opts)


class Evaluator:
    """FID of a plan's samples, cached by key in a JSON file that several processes may share (say one
    per sampler, each with one thread): every write merges into what is on disk under a lock."""

    def __init__(self, cache_path: Path, batch: int) -> None:
        from epsscale.metrics import get_extractor, reference_stats

        self.path = cache_path
        self.cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
        self.batch = batch
        self.ext = get_extractor("fmnist")
        self.refs = {r: reference_stats(self.ext, r) for r in ("fashion-mnist-train", "fashion-mnist-test")}

    def __call__(self, key: str, plan, num: int, seed0: int, ref: str) -> dict:
        from epsscale.metrics import compute_fid, feature_stats
        from epsscale.sampling import sample_seeds

        key = f"{key}|{num}|{seed0}|{ref}"
        if key not in self.cache:
            t0 = time.perf_counter()
            images, _ = sample_seeds(plan, range(seed0, seed0 + num), batch_size=self.batch)
            seconds = time.perf_counter() - t0
            self.cache[key] = {"fid": compute_fid(feature_stats(images, self.ext), self.refs[ref]), "seconds": round(seconds, 2), "per_image": seconds / num}
            self.cache = add_to_json_cache(self.path, key, self.cache[key])
            print(f"{key}: FID {self.cache[key]['fid']:.3f} ({seconds:.0f}s)", flush=True)
        return self.cache[key]


def model_ids(args: argparse.Namespace) -> dict[str, str]:
    """Cache names of the models: main/ip/control plus a digest of their weights (a new model, new keys)."""
    from epsscale.hashing import digest_file
    from epsscale.models.pretrained import SHIPPED

    ids = {}
    for name, path in (("main", SHIPPED.get(args.model, Path(args.model))), ("ip", Path(args.ip_model)), ("control", Path(args.control_model))):
        weights = Path(path).with_suffix(".safetensors") if Path(path).suffix != ".safetensors" else Path(path)
        if Path(path).is_dir():
            weights = Path(path) / "model.safetensors"
        if weights.exists():
            ids[name] = f"{name}-{digest_file(weights, 8)}"
    return ids


def run_cell(ev: Evaluator, models: dict, sampler: str, steps: int, args: argparse.Namespace) -> None:
    from epsscale.exposure.search import TUNING_SEED0
    from epsscale.models.pretrained import shipped_plan

    ids = model_ids(args)
    bases = {ids[name]: shipped_plan(sampler, steps, model=m) for name, m in models.items()}
    tuned: dict[str, float] = {}
    for method in TUNED:
        model = ids.get(model_of(method))
        if model not in bases:
            continue
        knob = knob_of(method)
        scores = {}
        for v in knob_grid(method, steps, args.tune_points):
            res = ev(cache_key(model, sampler, steps, {knob: v}), plan_for(bases[model], active({knob: v})), args.tune_num, TUNING_SEED0, "fashion-mnist-train")
            scores[v] = res["fid"]
        tuned[method] = min(scores, key=scores.get)
    for method in METHODS:
        model = ids.get(model_of(method))
        if model not in bases:
            continue
        knobs = knobs_of(method, tuned)
        ev(cache_key(model, sampler, steps, knobs), plan_for(bases[model], active(knobs)), args.num, 0, "fashion-mnist-test")


def tuning_grid(cache: dict, ids: dict, sampler: str, steps: int, method: str, args: argparse.Namespace) -> dict[float, float] | None:
    """A tuned method's knob values -> FID on the tuning seeds, from the cache (None until complete)."""
    model, knob = ids.get(model_of(method), "-"), knob_of(method)
    grid = {}
    for v in knob_grid(method, steps, args.tune_points):
        hit = cache.get(cache_key(model, sampler, steps, {knob: v}) + f"|{args.tune_num}|1000000|fashion-mnist-train")
        if hit is None:
            return None
        grid[v] = hit["fid"]
    return grid


NAMES = {"ES": "b", "Time-Shift": "w", "TSR": "k", "DCW": "c"}


def rows(cache: dict, sampler: str, steps: int, args: argparse.Namespace) -> list[tuple]:
    """(method, knob text, FID, change vs baseline) from the cache. A tuned value
    at an end of its grid (other than the neutral one) is marked with a dagger: the knob might gain
    more beyond it."""
    ids = model_ids(args)
    grids = {m: tuning_grid(cache, ids, sampler, steps, m, args) for m in TUNED}
    best = {m: (min(g, key=g.get) if g else None) for m, g in grids.items()}

    def at_end(method: str, knob: str) -> bool:
        tuner = method if method in TUNED else knob  # "ES + DCW" takes DCW's value from the DCW row
        g, v = grids.get(tuner), best.get(tuner)
        return bool(g) and v != NEUTRAL[knob] and v in (min(g), max(g))

    out = []
    base = None
    for method in METHODS:
        model = ids.get(model_of(method), "-")
        knobs = knobs_of(method, best)
        if any(v is None for v in knobs.values()):
            continue
        hit = cache.get(cache_key(model, sampler, steps, knobs) + f"|{args.num}|0|fashion-mnist-test")
        if hit is None:
            continue
        if method == "baseline":
            base = hit
        text = ", ".join(f"{NAMES[k]} = {v:g}" + ("†" if at_end(method, k) else "") for k, v in knobs.items()) or "-"
        change = f"{100 * (hit['fid'] / base['fid'] - 1):+.1f}%" if base else ""
        out.append((method, text, hit["fid"], change))
    return out


def report(cache: dict, args: argparse.Namespace) -> str:
    from epsscale.samplers import nfe

    blocks = []
    ids = model_ids(args)
    for sampler in args.samplers.split(","):
        for steps in (int(s) for s in args.steps.split(",")):
            rs = rows(cache, sampler, steps, args)
            if not rs:
                continue
            lines = [f"**{sampler}, {steps} steps** ({nfe(sampler, steps)} network evaluations per sample for every method; FID of {args.num} held-out samples vs the test split)\n",
                     "| method | tuned knob | FID | vs baseline |", "|---|---|---|---|"]
            lines += [f"| {m} | {k} | {f:.2f} | {c} |" for m, k, f, c in rs]
            if any("†" in r[1] for r in rs):
                lines.append("\n† the best value is at an end of its grid (every knob had the same budget of values).")
            lines += [f"\nTuning, FID of {args.tune_num} tuning samples vs the train split (best in bold):\n", "| method | knob: FID |", "|---|---|"]
            for m in TUNED:
                g = tuning_grid(cache, ids, sampler, steps, m, args)
                if g:
                    knob = NAMES[knob_of(m)]
                    cells = [(f"**{knob} = {v:g}: {f:.1f}**" if f == min(g.values()) else f"{knob} = {v:g}: {f:.1f}") for v, f in sorted(g.items())]
                    lines.append(f"| {m} | " + ", ".join(cells) + " |")
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def plot(cache: dict, args: argparse.Namespace, path: Path) -> None:
    """One panel per (sampler, steps): each method's FID change against the baseline."""
    from epsscale.plots import new_figure, save_figure

    cells = [(s, int(n)) for s in args.samplers.split(",") for n in args.steps.split(",")]
    cells = [(s, n, rows(cache, s, n, args)) for s, n in cells]
    cells = [c for c in cells if len(c[2]) > 1]
    if not cells:
        return
    fig = new_figure(3.2 * len(cells), 3.4)
    axes = fig.subplots(1, len(cells), squeeze=False)[0]
    for ax, (sampler, steps, rs) in zip(axes, cells):
        base = rs[0][2]
        names = [r[0] for r in rs[1:]]
        ax.barh(names, [100 * (r[2] / base - 1) for r in rs[1:]], color=["C0" if r[2] < base else "C3" for r in rs[1:]])
        ax.axvline(0, color="grey", lw=0.5)
        ax.invert_yaxis()
        ax.set_title(f"{sampler}, {steps} steps", fontsize=9)
        ax.set_xlabel("FID vs baseline (%)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samplers", default="ddim,ddpm")
    ap.add_argument("--steps", default="20,10,50")
    ap.add_argument("--num", type=int, default=500, help="held-out seeds per evaluation")
    ap.add_argument("--tune-num", type=int, default=200, help="tuning seeds per knob value")
    ap.add_argument("--tune-points", type=int, default=5, help="knob values per method (the same budget for every method)")
    ap.add_argument("--batch", type=int, default=125)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="fmnist")
    ap.add_argument("--ip-model", default=str(HERE / "ip_model" / "model"), help="the DDPM-IP model (IP rows are skipped while it is missing)")
    ap.add_argument("--control-model", default=str(HERE / "ip_model" / "control"), help="the IP fine-tune's control: the same fine-tune with gamma = 0 (its rows are skipped while it is missing)")
    ap.add_argument("--cache", default=str(HERE / "compare_cache.json"))
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache_path = Path(args.cache)
    if not args.report:
        from epsscale.models.pretrained import load_model

        models = {"main": load_model(args.model)}
        for name, path in (("ip", args.ip_model), ("control", args.control_model)):
            if Path(path).with_suffix(".json").exists():
                models[name] = load_model(path)
        ev = Evaluator(cache_path, args.batch)
        for steps in (int(s) for s in args.steps.split(",")):
            for sampler in args.samplers.split(","):
                run_cell(ev, models, sampler, steps, args)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    text = report(cache, args)
    print(text)
    if text:
        plot(cache, args, HERE / "compare.png")
    if args.write_results and text:
        write_between_markers(HERE / "RESULTS.md", BEGIN, END, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
