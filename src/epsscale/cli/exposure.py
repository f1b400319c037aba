"""``epsscale measure`` and ``epsscale calibrate``: exposure bias and λ for any model ``sample`` reads."""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, Callable, Iterator

from ..adapters import forward_attrs
from ..exposure.search import TILT_STEP, TUNING_SEED0
from ..hashing import describe, digest_json
from . import common
from .common import UserError
from .fid import add_extractor_options, extractor_from_args

MEASURE_DESCRIPTION = """\
Exposure bias of a model and sampler, as Ning et al. (ICLR 2024) measure it: N real images are
diffused to the first step of the chain, the sampler runs from there with and without Epsilon
Scaling, and the variance error delta_t and the eps-norm curves (one network call on noised data
at each step vs the norm along sampling) are written as exposure.json, delta_t.png and
eps_norm.png. Real images: --data (a folder of images, an .npz with arr_0 uint8 NHWC, or a
zip), or the Fashion-MNIST train split for models trained on it.

example:
  epsscale measure --sampler ddpm --steps 20 --eps-scale 1.01 --num 256 --out exposure/
"""

CALIBRATE_DESCRIPTION = """\
Choose lambda for a model and sampler and write it as a schedule JSON that `sample
--eps-schedule` reads. --method fid (the default) searches uniform b by FID with the same
seeds at every point (--search parabola: usually 3 or 4 points of 100 samples; grid and golden
take more); every point is cached, so an interrupted search resumes. --method norm matches the
sampling eps-norm to the training one (the paper's argument), cheaply, but it does not always
point the way FID does: check it with --method fid. The JSON records what it was tuned on.

examples:
  epsscale calibrate --sampler ddim --steps 20 --out lam_ddim.json
  epsscale calibrate --sampler ddpm --steps 20 --method fid --search grid --lo 0.99 --hi 1.02 --points 7 --out lam_grid.json
"""


def _rank0_only(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Under torchrun, measure/calibrate run on rank 0 while the other ranks wait."""

    @wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from .. import distributed as dist

        dist.init()
        try:
            return fn(args) if dist.rank() == 0 else 0
        finally:
            dist.barrier()

    return run


def _add_data_options(p: argparse.ArgumentParser, num_default: int) -> None:
    g = p.add_argument_group("real data")
    g.add_argument("--data", default=None, metavar="PATH", help="the model's training images: a folder of images, an .npz (arr_0 uint8 NHWC) or a zip, at the model's size and channels (default: Fashion-MNIST's train split, for models trained on it)")
    g.add_argument("--num", type=common.positive_int, default=num_default, help="real images (and trajectories)")
    g.add_argument("--data-seed", type=int, default=0, help="which random subset of the images")


def add_parsers(sub: Any) -> None:
    m = sub.add_parser("measure", help="exposure bias: delta_t and eps-norm curves, baseline vs ES", description=MEASURE_DESCRIPTION)
    common.add_model_options(m)
    common.add_sampling_options(m)
    _add_data_options(m, 256)
    m.add_argument("--start", choices=("data", "prior"), default="data", help="where the eps-norm trajectories start: noised real images (the delta_t protocol), or the sampler's prior (the authors' eps-norm analyses); delta_t always starts from data")
    m.add_argument("--batch", type=common.positive_int, default=None, help=f"network batch (default: the fewest batches of at most {common.MAX_BATCH}, evened out)")
    m.add_argument("--out", required=True, help="output directory (exposure.json, delta_t.png, eps_norm.png)")
    common.add_run_options(m)
    m.set_defaults(func=measure)

    c = sub.add_parser("calibrate", help="choose lambda: an FID search (cached, resumable) or norm matching", description=CALIBRATE_DESCRIPTION)
    common.add_model_options(c)
    common.add_sampling_options(c)
    g = c.add_argument_group("method")
    g.add_argument("--method", choices=("fid", "norm"), default="fid", help="FID search over uniform b, or eps-norm matching")
    g.add_argument("--search", choices=("parabola", "grid", "golden"), default=_ONLY["--search"][1], help="FID search: parabola (3-4 coupled FID points, then the vertex), a grid, or golden-section")
    g.add_argument("--lo", type=common.positive_float, default=_ONLY["--lo"][1], help="lowest b (default: 0.9 for the parabola, else 1.0)")
    g.add_argument("--hi", type=common.positive_float, default=_ONLY["--hi"][1], help="highest b (default: 1.1 for the parabola, else 1.03)")
    g.add_argument("--points", type=common.positive_int, default=_ONLY["--points"][1], help="grid points (--search grid)")
    g.add_argument("--tol", type=common.positive_float, default=_ONLY["--tol"][1], help="golden-section: stop when the bracket is this narrow")
    g.add_argument("--center", type=common.positive_float, default=_ONLY["--center"][1], help="parabola: the middle of the first three points")
    g.add_argument("--spacing", type=common.positive_float, default=_ONLY["--spacing"][1], help="parabola: the distance between points")
    g.add_argument("--fid-num", type=common.positive_int, default=_ONLY["--fid-num"][1], help="samples per FID point (default: 100 for the parabola, else 1000)")
    g.add_argument("--cache", default=_ONLY["--cache"][1], help="the FID points' cache (default: OUT.points.json)")
    g.add_argument("--kind", choices=("uniform", "linear", "per_sigma"), default=_ONLY["--kind"][1], help="the schedule family: uniform b; the paper's linear lambda_i = b + k i (norm matching, or the parabola FID search over b and then the tilt k); per_sigma (norm matching)")
    g.add_argument("--tilt-spacing", type=common.positive_float, default=_ONLY["--tilt-spacing"][1], help="--kind linear with the FID search: spacing of the tilt (lambda of the first step minus lambda of the last)")
    g.add_argument("--start", choices=("data", "prior"), default=_ONLY["--start"][1], help="norm matching: trajectories start from noised real images or from the prior")
    add_extractor_options(c)
    _add_data_options(c, _ONLY["--num"][1])
    c.add_argument("--batch", type=common.positive_int, default=None, help=f"network batch (default: the fewest batches of at most {common.MAX_BATCH}, evened out)")
    c.add_argument("--out", required=True, help="the schedule JSON to write")
    common.add_run_options(c)
    c.set_defaults(func=calibrate)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def real_images(plan: Any, data: str | None, num: int, seed: int) -> tuple[Any, dict, str]:
    """``num`` real images in the model's space (a seeded random subset), the conditioning of a
    class-conditional or text model for them, and what the images are."""
    import numpy as np
    import torch

    if plan.data_space is None:
        raise UserError(f"{plan.name}: epsscale does not know how to put images into this model's space")
    labels = None
    if data is not None:
        from ..data.images import load_images, load_npz

        if str(data).endswith(".npz"):
            images, labels = load_npz(data, with_labels=True)
        else:
            images = load_images(data)
        what = str(data)
    elif plan.meta.get("source") == "epsscale" and plan.meta.get("data") == "fashion-mnist":
        from ..data.fashion_mnist import load_fashion_mnist

        images, what = load_fashion_mnist("train")[0][..., None], "fashion-mnist-train"
    else:
        raise UserError("measure and calibrate need the model's training images: give --data PATH (a folder of images, an .npz with arr_0 uint8 NHWC, or a zip)")
    if num > len(images):
        raise UserError(f"--num {num} exceeds the {len(images)} images of {what}")
    idx = np.sort(np.random.default_rng(seed).choice(len(images), num, replace=False))
    try:
        x0 = plan.data_space(images[idx]).to(plan.device)
    except ValueError as e:
        raise UserError(f"--data {what}: {e}") from None
    cond: dict = {}
    if plan.num_classes:
        if plan.cycle_labels:
            y = [k % plan.num_classes for k in range(num)]
        elif labels is not None:
            y = [int(v) for v in labels[idx]]
        else:
            common.warn(f"{what} holds no class labels (an .npz with arr_1 would): the class-conditional model gets random labels")
            y = np.random.default_rng(seed + 1).integers(0, plan.num_classes, num).tolist()
        cond = {"y": torch.tensor(y, device=plan.device)}
    return x0, cond, what


class _Counting:
    """The model, advancing a progress bar (stderr) by the images of every network call."""

    def __init__(self, inner: Any, bar: Any) -> None:
        self.inner, self.bar = inner, bar
        forward_attrs(self, inner)

    def __call__(self, x: Any, sigma: Any, **cond: Any) -> Any:
        out = self.inner(x, sigma, **cond)
        self.bar.update(x.shape[0])
        return out


@contextmanager
def _progress(plan: Any, show: bool, desc: str, total: int) -> Iterator[Any]:
    """The plan's model wrapped to count network evaluations on a tqdm bar (off with --quiet)."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="eval", disable=not show, unit_scale=True) as bar:
        yield _Counting(plan.denoiser, bar)


def _refuse_labels(args: argparse.Namespace) -> None:
    if args.labels is not None:
        raise UserError("--labels is for sample; measure and calibrate take class labels from --data (an .npz's arr_1), else each seed draws its own")


def _refuse_for_measurements(args: argparse.Namespace, plan: Any) -> None:
    """What measure and calibrate cannot take, in one line each."""
    if "time_shift" in plan.sampler_opts:
        raise UserError("--time-shift moves each sample to its own sigma, which delta_t and the eps-norm curves (one sigma per step) cannot report; measure it by FID with benchmarks/compare.py")
    if getattr(args, "start", "data") == "prior" and plan.prior == "pfgmpp":
        raise UserError("--start prior draws a Gaussian prior; PFGM++'s (--aug-dim) is not one: use --start data")


def _warn_deterministic_top(plan: Any) -> None:
    """A deterministic sigma-space sampler from the top of a 1000-step cosine chain blows up."""
    top = float(plan.sigmas[0])
    if plan.sampler in common.SIGMA_SAMPLERS and top > 1e3:
        common.warn(f"{plan.sampler} starts at sigma = {top:.3g} here (the top of the respaced grid), where an eps-prediction model's x0 = x - sigma eps is too inaccurate for a deterministic step; use --disc karras")


# ---------------------------------------------------------------------------------------------
# measure
# ---------------------------------------------------------------------------------------------


@_rank0_only
def measure(args: argparse.Namespace) -> int:
    import dataclasses

    from .._atomic import atomic_write_text
    from ..exposure import (
        eps_norms,
        exposure_json,
        measure_exposure,
        plot_delta,
        plot_eps_norms,
    )

    common.set_threads(args)
    out = common.out_dir(args.out)
    common.writable(out / "exposure.json") if out.exists() else common.writable_later(out / "exposure.json")
    if args.num < 2:
        raise UserError(f"--num must be at least 2 (delta_t is a variance over images), got {args.num}")
    _refuse_labels(args)
    plan = common.build_plan(args)
    _refuse_for_measurements(args, plan)
    _warn_deterministic_top(plan)
    x0, cond, data_name = real_images(plan, args.data, args.num, args.data_seed)
    lam = None if isinstance(plan.lam, (int, float)) and plan.lam == 1.0 else plan.lam  # ES off: the baseline alone
    t0 = time.time()
    seeds = range(TUNING_SEED0, TUNING_SEED0 + args.num)
    batch = args.batch or common.auto_batch(args.num)
    opts = dict(plan.sampler_opts)
    passes = (2 if lam is not None else 1) * (2 if args.start == "prior" else 1)
    with _progress(plan, not args.quiet, "measure", args.num * (passes * plan.nfe + plan.steps)) as model:
        rep = measure_exposure(model, x0, plan.sigmas, plan.sampler, lam, seeds=seeds, sampler_opts=opts, cond=cond or None, batch_size=batch)
        if args.start == "prior":  # the eps-norm curves from the prior; delta_t keeps the data start of its protocol
            eps = eps_norms(model, x0, plan.sigmas, plan.sampler, lam, seeds=seeds, sampler_opts=opts, cond=cond or None, batch_size=batch, start="prior")
            rep = dataclasses.replace(rep, eps=eps, nfe=rep.nfe + eps.nfe)
    meta = {"model": plan.name, "fingerprint": plan.fingerprint, "sampler": plan.sampler, "steps": plan.steps, "grid": plan.meta.get("disc"), "lam": common.format_lam(lam), "num": args.num, "data": data_name, "start": args.start, "seconds": round(time.time() - t0, 1)}
    doc = exposure_json(rep, schedule=plan.schedule if plan.sampler in common.VP_SAMPLERS else None, meta=meta)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "exposure.json", json.dumps(doc, indent=1) + "\n")
    plot_delta(rep.delta_baseline, rep.delta_es, out / "delta_t.png")
    plot_eps_norms(rep.eps, out / "eps_norm.png")
    if args.quiet:
        return 0
    d_b, d_e = doc["delta_t"]["baseline"], doc["delta_t"]["es"]
    e = doc["eps_norm"]
    es_note = f"ES {common.format_lam(lam)}" if d_e and lam is not None else "no ES run (give --eps-scale B or --eps-schedule FILE to compare)"
    print(f"{plan.sampler}, {plan.steps} steps, {args.num} images of {data_name}, {es_note}")
    print("| t | delta_t baseline | delta_t ES | eps-norm training | sampling | sampling after ES |")
    print("|---|---|---|---|---|---|")
    for i, t in enumerate(doc["t"]):
        es_d = f"{d_e[i]:.3g}" if d_e else "-"
        es_n = f"{e['sampling_es'][i]:.2f}" if e.get("sampling_es") else "-"
        tt = f"{t:.0f}" if doc["t_kind"] == "timestep" else f"{t:.4g}"
        print(f"| {tt} | {d_b[i]:.3g} | {es_d} | {e['training'][i]:.2f} | {e['sampling'][i]:.2f} | {es_n} |")
    print(f"\nwrote {out / 'exposure.json'}, {out / 'delta_t.png'}, {out / 'eps_norm.png'} ({meta['seconds']}s)")
    return 0


# ---------------------------------------------------------------------------------------------
# calibrate
# ---------------------------------------------------------------------------------------------

# calibrate's options and the methods (or searches) they belong to: option -> (dest, default, applies).
_ONLY = {
    "--kind": ("kind", "uniform", lambda a: a.method == "norm" or a.search == "parabola"),
    "--start": ("start", "data", lambda a: a.method == "norm"),
    "--num": ("num", 256, lambda a: a.method == "norm"),
    "--data-seed": ("data_seed", 0, lambda a: a.method == "norm"),
    "--search": ("search", "parabola", lambda a: a.method == "fid"),
    "--lo": ("lo", None, lambda a: a.method == "fid"),
    "--hi": ("hi", None, lambda a: a.method == "fid"),
    "--fid-num": ("fid_num", None, lambda a: a.method == "fid"),
    "--cache": ("cache", None, lambda a: a.method == "fid"),
    "--extractor": ("extractor", None, lambda a: a.method == "fid"),
    "--inception": ("inception", None, lambda a: a.method == "fid"),
    "--points": ("points", 7, lambda a: a.method == "fid" and a.search == "grid"),
    "--tol": ("tol", 1e-3, lambda a: a.method == "fid" and a.search == "golden"),
    "--center": ("center", 1.0, lambda a: a.method == "fid" and a.search == "parabola"),
    "--spacing": ("spacing", 0.01, lambda a: a.method == "fid" and a.search == "parabola"),
    "--tilt-spacing": ("tilt_spacing", TILT_STEP, lambda a: a.method == "fid" and a.kind == "linear"),
}


def _check_calibrate_options(args: argparse.Namespace) -> None:
    """One line naming options that the chosen method would ignore."""
    if args.eps_scale is not None or args.eps_schedule:
        raise UserError("calibrate chooses lambda: --eps-scale and --eps-schedule do not apply")
    idle = [opt for opt, (dest, default, applies) in _ONLY.items() if getattr(args, dest) != default and not applies(args)]
    if idle:
        what = f"--method {args.method}" + (f" --search {args.search}" if args.method == "fid" else "")
        raise UserError(f"{', '.join(idle)} do{'es' if len(idle) == 1 else ''} not apply to {what}")
    if args.method == "fid" and args.kind == "per_sigma":
        raise UserError("--kind per_sigma is for --method norm; the FID search takes uniform or linear")
    if args.method == "fid" and args.search == "parabola" and not 0 < args.spacing < 0.5:
        raise UserError(f"--spacing {args.spacing:g}: the parabola's points are b apart by this much; expected a small number such as 0.01 (did you mean --steps?)")


def _calibrate_linear(args: argparse.Namespace, plan: Any, evaluate: Callable[[Any], float], num: int, lo: float, hi: float, cache: Path, key: dict, meta: dict, ref: str, ext: Any, t0: float, out: Path, png: Path) -> int:
    """--method fid --kind linear: the parabola over uniform b, then over the tilt (exposure.linear_search)."""
    from ..exposure import linear_search, plot_fid_vs_b, write_calibrated_schedule

    res = linear_search(evaluate, plan.steps, center=args.center, step=args.spacing, tilt_step=args.tilt_spacing, lo=lo, hi=hi, cache_path=cache, key=key)
    sched = res.schedule
    new_nfe = res.new_evaluations * num * plan.nfe
    meta.update(search="parabola", kind="linear", num=num, seed0=TUNING_SEED0, points={str(k): v for k, v in res.uniform.points}, tilt_points={str(k): v for k, v in res.tilt.points},
                mean=res.uniform.best_b, tilt=res.tilt.best_b, nfe=res.points * num * plan.nfe, new_nfe=new_nfe, seconds=round(time.time() - t0, 1))
    meta["tuned_on"] = _tuned_on(plan, args, ref, {"seeds": f"{TUNING_SEED0}-{TUNING_SEED0 + num - 1}", "extractor": ext.name, "search": "parabola", "kind": "linear"})
    write_calibrated_schedule(out, sched, meta)
    plot_fid_vs_b(res.uniform.points, png)
    if not args.quiet:
        done = f"{res.new_evaluations} of {res.points} points new: {new_nfe} network evaluations" if res.new_evaluations else f"all {res.points} points from the cache: no network evaluations"
        print(f"FID search (linear, {num} samples per point): mean lambda {res.uniform.best_b:.5g}, tilt {res.tilt.best_b:.4g} -> lambda {common.format_lam(sched)}  [{done}, {meta['seconds']}s]")
        print(f"wrote {out}" + (f" and {png}" if png.exists() else ""))
    return 0


def _tuned_on(plan: Any, args: argparse.Namespace, data: str, extra: dict) -> dict:
    """What a schedule JSON records about the run it was tuned on (``sample`` checks it)."""
    return {
        "model": plan.name, "fingerprint": plan.fingerprint, "sampler": plan.sampler, "steps": plan.steps, "disc": plan.meta.get("disc"),
        "sigmas": [round(float(v), 12) for v in plan.sigmas], "sampler_options": describe(dict(plan.sampler_opts)), "settings": digest_json(describe(dict(plan.meta))),
        "data": data, "method": args.method, **extra,
    }


@_rank0_only
def calibrate(args: argparse.Namespace) -> int:
    from ..exposure import (
        calibrate_norm_matching,
        fid_objective,
        fid_search,
        plot_fid_vs_b,
        write_calibrated_schedule,
    )
    from ..metrics import reference_stats
    from ..plots import plot_calibration
    from ..scaling import Uniform

    _check_calibrate_options(args)
    common.set_threads(args)
    out = common.writable(args.out, "--out")
    if out.suffix != ".json":
        raise UserError(f"--out must end in .json, got {out}")
    _refuse_labels(args)
    plan = common.build_plan(args)
    if args.method == "norm":
        _refuse_for_measurements(args, plan)
    _warn_deterministic_top(plan)
    meta: dict[str, Any] = {"model": plan.name, "sampler": plan.sampler, "steps": plan.steps, "grid": plan.meta.get("disc"), "method": args.method, "sampler_options": describe(dict(plan.sampler_opts))}
    t0 = time.time()
    png = out.with_suffix(".png")
    if args.method == "norm":
        common.warn("norm matching follows the paper's eps-norm argument and does not always agree with FID; check its lambda with --method fid")
        x0, cond, data_name = real_images(plan, args.data, args.num, args.data_seed)
        seeds = range(TUNING_SEED0, TUNING_SEED0 + args.num)
        with _progress(plan, not args.quiet, f"norm matching ({args.kind})", args.num * (plan.nfe + plan.steps) * 4) as model:
            sched, info = calibrate_norm_matching(model, x0, plan.sigmas, plan.sampler, args.kind, seeds=seeds, sampler_opts=dict(plan.sampler_opts), cond=cond or None, batch_size=args.batch or common.auto_batch(args.num), start=args.start)
        meta.update(kind=args.kind, num=args.num, nfe=info.nfe, passes=info.passes, converged=info.converged, seconds=round(time.time() - t0, 1), calibration=info.to_dict())
        meta["tuned_on"] = _tuned_on(plan, args, data_name, {"seeds": f"{seeds[0]}-{seeds[-1]}", "kind": args.kind, "start": args.start})
        write_calibrated_schedule(out, sched, meta)
        plot_calibration(info, png)
        if not args.quiet:
            print(f"norm matching ({args.kind}): lambda {common.format_lam(sched)}  [{info.nfe} network evaluations in {info.passes} passes, {meta['seconds']}s]")
    else:
        parabola = args.search == "parabola"
        lo = args.lo if args.lo is not None else (0.9 if parabola else 1.0)
        hi = args.hi if args.hi is not None else (1.1 if parabola else 1.03)
        num = args.fid_num if args.fid_num is not None else (100 if parabola else 1000)
        dev = common.device()
        ref = args.data if args.data is not None else "fashion-mnist-train"
        if args.data is None and not (plan.meta.get("source") == "epsscale" and plan.meta.get("data") == "fashion-mnist"):
            raise UserError("the FID search needs the model's training images as the reference: give --data PATH (a folder of images, an .npz with arr_0 uint8 NHWC, or a zip)")
        from ..data.images import load_images

        ext = extractor_from_args(args, dev, (28, 28, 1) if args.data is None else load_images(args.data).shape[1:])
        ref_stats = reference_stats(ext, ref, progress=not args.quiet)
        objective = fid_objective(plan, num, TUNING_SEED0, args.batch or common.auto_batch(num), ext, ref_stats, progress=not args.quiet)

        def evaluate(b: float) -> float:
            fid = objective(b)
            if not args.quiet:  # one line per measured point, on stderr beside the progress bars
                print(f"  lambda {common.format_lam(b)}: FID {fid:.4f} ({num} samples)", file=sys.stderr, flush=True)
            return fid

        cache = common.writable(args.cache, "--cache") if args.cache else out.with_suffix(".points.json")
        # Everything that changes a score: the weights, the grid, the sampler's options, the samples, the reference and the features.
        search_key = {
            "model": plan.fingerprint, "sampler": plan.sampler, "sigmas": [round(float(v), 12) for v in plan.sigmas],
            "sampler_options": meta["sampler_options"], "settings": digest_json(describe(dict(plan.meta))), "num": num, "seed0": TUNING_SEED0, "ref": ref, "extractor": f"{ext.name}:{getattr(ext, 'weights_id', '')}",
        }
        if args.kind == "linear":
            return _calibrate_linear(args, plan, evaluate, num, lo, hi, cache, search_key, meta, ref, ext, t0, out, png)
        res = fid_search(evaluate, lo, hi, method=args.search, cache_path=cache, points=args.points, tol=args.tol, start=args.center, step=args.spacing, key=search_key)
        pts = dict(res.points)
        b = round(float(res.best_b), 6)
        new_nfe = res.new_evaluations * num * plan.nfe
        meta.update(search=args.search, num=num, seed0=TUNING_SEED0, points={str(k): v for k, v in pts.items()}, best_fid=res.best_score, bracketed=res.bracketed, nfe=len(pts) * num * plan.nfe, new_nfe=new_nfe, seconds=round(time.time() - t0, 1))
        meta["tuned_on"] = _tuned_on(plan, args, ref, {"seeds": f"{TUNING_SEED0}-{TUNING_SEED0 + num - 1}", "extractor": ext.name, "search": args.search})
        write_calibrated_schedule(out, Uniform(b), meta)
        plot_fid_vs_b(res.points, png)
        if not args.quiet:
            best_b, best_fid = min(pts.items(), key=lambda kv: kv[1])
            if parabola and res.bracketed:
                head = f"vertex b = {b:.5g} (the parabola's predicted FID {res.best_score:.4g}); lowest measured: FID {best_fid:.4g} at b = {best_b:.5g}"
            else:
                head = f"best b = {b:.5g}, measured FID {res.best_score:.4g}" + ("" if res.bracketed else " (minimum not bracketed inside [lo, hi])")
            done = f"{res.new_evaluations} of {len(pts)} points new: {new_nfe} network evaluations" if res.new_evaluations else f"all {len(pts)} points from the cache: no network evaluations"
            print(f"FID search ({args.search}, {num} samples per point): {head}  [{done}, {meta['seconds']}s]")
    if not args.quiet:
        print(f"wrote {out}" + (f" and {png}" if png.exists() else ""))
    return 0
