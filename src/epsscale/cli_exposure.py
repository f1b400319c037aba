"""``epsscale measure`` and ``epsscale calibrate``: thin wrappers over :mod:`epsscale.exposure`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

from ._atomic import atomic_write, atomic_write_text

# Seeds used for tuning lambda: far from the seeds users and the demo sample from (0..).
TUNING_SEED0 = 1_000_000


def _data(model: Any, num: int, seed: int, split: str = "train") -> Any:
    """``num`` real images in model space, a seeded random subset of a Fashion-MNIST split."""
    import numpy as np

    from .data.fashion_mnist import load_fashion_mnist, to_model_space

    if model.config.get("data") != "fashion-mnist":
        raise ValueError("measure/calibrate need the model's training data; only Fashion-MNIST models are supported here (use the epsscale.exposure API otherwise)")
    images, _ = load_fashion_mnist(split)
    if num > len(images):
        raise ValueError(f"--num {num} exceeds the {len(images)} images of the {split} split")
    idx = np.random.default_rng(seed).choice(len(images), num, replace=False)
    return to_model_space(images[np.sort(idx)], model.shape[-1])


def _default_lam(args: argparse.Namespace, sampler: str) -> Any:
    from .cli import _lam_from_args
    from .demo import ES_FILE, shipped_lambdas

    if args.eps_scale is not None or args.eps_schedule:
        return _lam_from_args(args)
    if args.model == "fmnist" and ES_FILE.exists():
        return shipped_lambdas()[sampler]
    raise ValueError("give the ES setting to compare with: --eps-scale B or --eps-schedule FILE")


def _rank0_only(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Under torchrun, measure/calibrate run on rank 0 while the other ranks wait."""
    from functools import wraps

    @wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from . import distributed as dist

        dist.init()
        try:
            return fn(args) if dist.rank() == 0 else 0
        finally:
            dist.barrier()

    return run


@_rank0_only
def cmd_measure(args: argparse.Namespace) -> int:
    from .cli import UserError, _out_dir, _threads, _writable, make_grid, sampler_options
    from .exposure import exposure_json, measure_exposure, plot_delta, plot_eps_norms
    from .models.pretrained import load_model

    _threads(args)
    out = _out_dir(args.out)
    _writable(out / "exposure.json") if out.exists() else _writable(out)
    if args.num < 2:
        raise UserError(f"--num must be at least 2 (delta_t is a variance over images), got {args.num}")
    model = load_model(args.model)
    sigmas = make_grid(model, args.sampler, args.steps, args.grid_kind, args.sigma_max)
    lam = _default_lam(args, args.sampler)
    x0 = _data(model, args.num, args.data_seed)
    t0 = time.time()
    rep = measure_exposure(model.denoiser, x0, sigmas, args.sampler, lam, seeds=range(TUNING_SEED0, TUNING_SEED0 + args.num), sampler_opts=sampler_options(args), batch_size=args.batch)
    meta = {"model": args.model, "sampler": args.sampler, "steps": args.steps, "grid": args.grid_kind, "lam": repr(lam), "num": args.num, "seconds": round(time.time() - t0, 1)}
    doc = exposure_json(rep, schedule=model.schedule if args.sampler in ("ddpm", "ddim") else None, meta=meta)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "exposure.json", json.dumps(doc, indent=1) + "\n")
    plot_delta(rep.delta_baseline, rep.delta_es, out / "delta_t.png")
    plot_eps_norms(rep.eps, out / "eps_norm.png")
    d_b, d_e = doc["delta_t"]["baseline"], doc["delta_t"]["es"]
    e = doc["eps_norm"]
    print(f"{args.sampler}, {args.steps} steps, {args.num} images, ES {lam!r}")
    print("| t | delta_t baseline | delta_t ES | eps-norm training | sampling | sampling after ES |")
    print("|---|---|---|---|---|---|")
    for i, t in enumerate(doc["t"]):
        es_d = f"{d_e[i]:.3g}" if d_e else "-"
        es_n = f"{e['sampling_es'][i]:.2f}" if e.get("sampling_es") else "-"
        tt = f"{t:.0f}" if doc["t_kind"] == "timestep" else f"{t:.4g}"
        print(f"| {tt} | {d_b[i]:.3g} | {es_d} | {e['training'][i]:.2f} | {e['sampling'][i]:.2f} | {es_n} |")
    print(f"\nwrote {out / 'exposure.json'}, {out / 'delta_t.png'}, {out / 'eps_norm.png'} ({meta['seconds']}s)")
    return 0


def fid_evaluator(model: Any, sampler: str, sigmas: Any, opts: dict, num: int, seed0: int, batch: int, ref: str = "fashion-mnist-train", *, work_root: Path | None = None, progress: bool = False, device: Any = "cpu") -> Callable[[float], float]:
    """b -> FID of ``num`` uniform-ES samples (seeds from ``seed0``), classifier features.

    With ``work_root``, each b samples into its own work directory below it (finished batches
    survive a kill and are reused by a rerun) that is removed once the FID is computed.
    ``device`` is where the noise is drawn and the features run; ``model`` must already be there.
    A seed's noise depends on the device's generator, so CUDA and CPU samples differ.
    """
    import shutil

    from .demo import sample_images
    from .metrics import compute_fid, feature_stats, get_extractor, reference_stats

    ext = get_extractor("fmnist", device=device)
    ref_stats = reference_stats(ext, ref)

    def evaluate(b: float) -> float:
        work = None if work_root is None else work_root / f"{sampler}-{len(sigmas) - 1}-{b!r}-{num}-{seed0}"
        images = sample_images(model, sampler, sigmas, b, range(seed0, seed0 + num), batch=batch, opts=opts, work_dir=work, job_meta={"model": "fmnist", "lam": b} if work else None, progress=progress, device=device)
        fid = compute_fid(feature_stats(images, ext), ref_stats)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        return fid

    return evaluate


# calibrate's options and the methods (or searches) they belong to: option -> (dest, default, applies).
_CALIBRATE_ONLY = {
    "--kind": ("kind", "uniform", lambda a: a.method == "norm"),
    "--num": ("num", 256, lambda a: a.method == "norm"),
    "--data-seed": ("data_seed", 0, lambda a: a.method == "norm"),
    "--search": ("search", "grid", lambda a: a.method == "fid"),
    "--lo": ("lo", None, lambda a: a.method == "fid"),
    "--hi": ("hi", None, lambda a: a.method == "fid"),
    "--fid-num": ("fid_num", None, lambda a: a.method == "fid"),
    "--cache": ("cache", None, lambda a: a.method == "fid"),
    "--points": ("points", 7, lambda a: a.method == "fid" and a.search == "grid"),
    "--tol": ("tol", 1e-3, lambda a: a.method == "fid" and a.search == "golden"),
    "--start": ("start", 1.0, lambda a: a.method == "fid" and a.search == "parabola"),
    "--step": ("step", 0.01, lambda a: a.method == "fid" and a.search == "parabola"),
}


def _check_calibrate_options(args: argparse.Namespace) -> None:
    """One line naming options that the chosen method would ignore."""
    from .cli import UserError

    if args.eps_scale is not None or args.eps_schedule:
        raise UserError("calibrate chooses lambda: --eps-scale and --eps-schedule do not apply")
    idle = [opt for opt, (dest, default, applies) in _CALIBRATE_ONLY.items() if getattr(args, dest) != default and not applies(args)]
    if idle:
        what = f"--method {args.method}" + (f" --search {args.search}" if args.method == "fid" else "")
        raise UserError(f"{', '.join(idle)} do{'es' if len(idle) == 1 else ''} not apply to {what}")


@_rank0_only
def cmd_calibrate(args: argparse.Namespace) -> int:
    from .cli import _fingerprint, _threads, _writable, make_grid, sampler_options
    from .exposure import calibrate_norm_matching, fid_search, plot_fid_vs_b, write_calibrated_schedule
    from .models.pretrained import load_model
    from .samplers import nfe
    from .scaling import Uniform

    _check_calibrate_options(args)
    _threads(args)
    out = _writable(args.out)
    if out.suffix != ".json":
        raise ValueError(f"--out must end in .json, got {out}")
    model = load_model(args.model)
    sigmas = make_grid(model, args.sampler, args.steps, args.grid_kind, args.sigma_max)
    opts = sampler_options(args)
    meta: dict[str, Any] = {"model": args.model, "sampler": args.sampler, "steps": args.steps, "grid": args.grid_kind, "method": args.method, "sampler_options": {k: v for k, v in opts.items() if k != "classifier_grad"}}
    t0 = time.time()
    if args.method == "norm":
        x0 = _data(model, args.num, args.data_seed)
        sched, info = calibrate_norm_matching(model.denoiser, x0, sigmas, args.sampler, args.kind, seeds=range(TUNING_SEED0, TUNING_SEED0 + args.num), sampler_opts=opts, batch_size=args.batch)
        meta.update(kind=args.kind, num=args.num, nfe=info.nfe, passes=info.passes, converged=info.converged, seconds=round(time.time() - t0, 1), calibration=info.to_dict())
        write_calibrated_schedule(out, sched, meta)
        png = out.with_suffix(".png")
        _plot_calibration(info, png)
        print(f"norm matching ({args.kind}): {sched}  [{info.nfe} network evaluations in {info.passes} passes, {meta['seconds']}s]")
    else:
        parabola = args.search == "parabola"
        lo = args.lo if args.lo is not None else (0.9 if parabola else 1.0)
        hi = args.hi if args.hi is not None else (1.1 if parabola else 1.03)
        num = args.fid_num if args.fid_num is not None else (100 if parabola else 1000)
        evaluate = fid_evaluator(model, args.sampler, sigmas, opts, num, TUNING_SEED0, args.batch)
        cache = _writable(args.cache) if args.cache else out.with_suffix(".points.json")
        # Everything that changes a score: the weights, the grid itself (kind, steps, sigma_max),
        # the sampler's options, the samples and the reference.
        search_key = {
            "model": _fingerprint(model.path), "sampler": args.sampler, "sigmas": [round(float(v), 12) for v in sigmas],
            "sampler_options": meta["sampler_options"], "num": num, "seed0": TUNING_SEED0, "ref": "fashion-mnist-train",
        }
        res = fid_search(evaluate, lo, hi, method=args.search, cache_path=cache, points=args.points, tol=args.tol, start=args.start, step=args.step, key=search_key)
        pts = dict(res.points)
        b = round(float(res.best_b), 6)
        meta.update(search=args.search, num=num, seed0=TUNING_SEED0, points={str(k): v for k, v in pts.items()}, best_fid=res.best_score, bracketed=res.bracketed, nfe=len(pts) * num * nfe(args.sampler, args.steps), seconds=round(time.time() - t0, 1))
        write_calibrated_schedule(out, Uniform(b), meta)
        png = out.with_suffix(".png")
        plot_fid_vs_b(res.points, png)
        what = "vertex" if parabola and res.bracketed else "best"
        print(f"FID search ({args.search}, {num} samples per point): {what} b = {b:.5g}, FID {res.best_score:.4f}{'' if res.bracketed else ' (minimum not bracketed inside [lo, hi])'}, {len(pts)} points ({res.new_evaluations} new)  [{meta['nfe']} network evaluations, {meta['seconds']}s]")
    print(f"wrote {out}" + (f" and {png}" if png.exists() else ""))
    return 0


def _plot_calibration(info: Any, path: Path) -> None:
    """Training vs sampling eps-norm (baseline and chosen schedule) and the chosen lambda."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    a, b = fig.subplots(1, 2)
    s = info.sigma.numpy()
    a.plot(s, info.training.numpy(), label="training")
    a.plot(s, info.baseline.numpy(), label="sampling, lambda = 1")
    a.plot(s, (info.sampling_raw / info.lam).numpy(), label="sampling, calibrated ES")
    a.set_xscale("log")
    a.set_xlabel("sigma")
    a.set_ylabel("||eps||")
    a.legend(fontsize=7)
    b.plot(s, info.lam.numpy(), marker=".")
    b.set_xscale("log")
    b.set_xlabel("sigma")
    b.set_ylabel("lambda")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def add_commands(sub: Any, add_sampling_options: Callable[..., None]) -> None:
    from .cli import nonneg_float, positive_int

    m = sub.add_parser("measure", help="exposure bias: delta_t and eps-norm curves, baseline vs ES")
    add_sampling_options(m)
    m.add_argument("--num", type=positive_int, default=256, help="real training images (and trajectories)")
    m.add_argument("--batch", type=positive_int, default=256)
    m.add_argument("--data-seed", type=int, default=0, help="which random subset of the training images")
    m.add_argument("--out", required=True, help="output directory (exposure.json, delta_t.png, eps_norm.png)")
    m.set_defaults(func=cmd_measure)

    c = sub.add_parser("calibrate", help="choose lambda: norm matching (cheap) or an FID search (cached, resumable)")
    add_sampling_options(c)
    c.add_argument("--method", choices=("norm", "fid"), default="norm")
    c.add_argument("--kind", choices=("uniform", "linear", "per_sigma"), default=_CALIBRATE_ONLY["--kind"][1], help="norm matching: schedule family")
    c.add_argument("--num", type=positive_int, default=_CALIBRATE_ONLY["--num"][1], help="norm matching: real images / trajectories")
    c.add_argument("--data-seed", type=int, default=_CALIBRATE_ONLY["--data-seed"][1])
    c.add_argument("--search", choices=("golden", "grid", "parabola"), default=_CALIBRATE_ONLY["--search"][1], help="FID search method; parabola: usually 3-4 small coupled FID points and the vertex (cheapest)")
    c.add_argument("--lo", type=nonneg_float, default=_CALIBRATE_ONLY["--lo"][1], help="lowest b (default 1.0; parabola 0.9)")
    c.add_argument("--hi", type=nonneg_float, default=_CALIBRATE_ONLY["--hi"][1], help="highest b (default 1.03; parabola 1.1)")
    c.add_argument("--points", type=positive_int, default=_CALIBRATE_ONLY["--points"][1], help="grid points")
    c.add_argument("--tol", type=nonneg_float, default=_CALIBRATE_ONLY["--tol"][1])
    c.add_argument("--start", type=nonneg_float, default=_CALIBRATE_ONLY["--start"][1], help="parabola: middle of the first three points")
    c.add_argument("--step", type=nonneg_float, default=_CALIBRATE_ONLY["--step"][1], help="parabola: spacing of the points")
    c.add_argument("--fid-num", type=positive_int, default=_CALIBRATE_ONLY["--fid-num"][1], help="samples per FID point (default 1000; parabola 100)")
    c.add_argument("--cache", default=_CALIBRATE_ONLY["--cache"][1], help="FID points cache (default OUT.points.json)")
    c.add_argument("--batch", type=positive_int, default=250)
    c.add_argument("--out", required=True, help="schedule JSON")
    c.set_defaults(func=cmd_calibrate)
