"""``epsscale``: thin command-line wrappers over the library.

    epsscale demo        baseline vs Epsilon Scaling on the shipped model (or --toy)
    epsscale sample      sample seeds to an ADM-style .npz (and a PNG grid)
    epsscale measure     exposure bias: delta_t and eps-norm curves, baseline vs ES
    epsscale calibrate   choose lambda: norm matching or an FID search
    epsscale fid         FID of samples against reference statistics
    epsscale train       train (or resume) the Fashion-MNIST model

User errors end with one line on stderr and exit status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ._atomic import atomic_write

log = logging.getLogger("epsscale")

SAMPLER_NAMES = ("ddpm", "ddim", "euler", "heun", "dpmpp_2m")


class UserError(Exception):
    """A problem with the user's input: reported in one line, no traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise UserError(f"{self.prog}: {message}")


# ---------------------------------------------------------------------------------------------
# Option types
# ---------------------------------------------------------------------------------------------


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def finite_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def nonneg_float(s: str) -> float:
    v = finite_float(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}")
    return v


def positive_float(s: str) -> float:
    v = finite_float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}")
    return v


def lam_float(s: str) -> float:
    v = finite_float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"lambda must be finite and > 0, got {s!r}")
    return v


def seeds_type(s: str) -> list[int]:
    from .distributed import parse_seeds

    try:
        return parse_seeds(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _writable(path: str | os.PathLike) -> Path:
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write {p}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {p}: directory {parent} is not writable")
    if p.is_dir():
        raise UserError(f"cannot write {p}: it is a directory")
    return p


def _out_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """An output directory: may not exist yet, but must not be a file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{option} {p}: exists and is not a directory")
    return p


# ---------------------------------------------------------------------------------------------
# Shared helpers: model, grid, ES
# ---------------------------------------------------------------------------------------------


def _threads(args: argparse.Namespace) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def _lam_from_args(args: argparse.Namespace) -> Any:
    from .scaling import load_schedule

    if getattr(args, "eps_schedule", None):
        return load_schedule(args.eps_schedule)
    return args.eps_scale if args.eps_scale is not None else 1.0


def make_grid(model: Any, sampler: str, steps: int, kind: str = "respaced", sigma_max: float | None = None) -> Any:
    """The sigma grid a sampler runs on for a discrete VP model (see README: grids).

    ``karras`` spans [max(0.002, sigma_min of the model), min(top, its sigma_max)], where top is
    ``sigma_max``, else the model config's ``sampling.karras_sigma_max``, else EDM's 80.
    """
    from .schedules import sigmas_karras

    if kind == "respaced":
        return model.schedule.grid(str(steps))
    if kind == "ddim":
        return model.schedule.grid(f"ddim{steps}")
    if kind == "karras":
        if sigma_max is None:
            sigma_max = float(getattr(model, "config", {}).get("sampling", {}).get("karras_sigma_max", 80.0))
        top = min(sigma_max, model.schedule.sigma_max)
        return sigmas_karras(steps, sigma_min=max(0.002, model.schedule.sigma_min), sigma_max=top)
    raise UserError(f"unknown grid {kind!r}: expected respaced, ddim or karras")


def sampler_options(args: argparse.Namespace) -> dict:
    s = args.sampler
    opts: dict[str, Any] = {}
    if s in ("ddpm", "ddim") and args.clip is not None:
        opts["clip"] = args.clip
    if s == "ddim":
        opts["eta"] = args.eta
    if s in ("euler", "heun"):
        opts.update(s_churn=args.s_churn, s_tmin=args.s_tmin, s_tmax=args.s_tmax, s_noise=args.s_noise)
    return opts


# The sampler's own options of `epsscale sample` (option, args attribute), which --guided-diffusion
# takes from --flags instead and an EDM preset (the s_* ones) sets itself.
_SAMPLER_OPTION_FLAGS = (("--sampler", "sampler"), ("--disc", "grid_kind"), ("--sigma-max", "sigma_max"), ("--eta", "eta"), ("--clip/--no-clip", "clip"), ("--s-churn", "s_churn"), ("--s-tmin", "s_tmin"), ("--s-tmax", "s_tmax"), ("--s-noise", "s_noise"))
_SAMPLE_STEPS = 20  # epsscale sample's default --steps
_SAMPLE_DEFAULTS = {"sampler": "ddpm", "grid_kind": "respaced", "sigma_max": None, "eta": 0.0, "clip": 1.0, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}


def _add_sampling_options(p: argparse.ArgumentParser, *, default_steps: int = _SAMPLE_STEPS) -> None:
    p.add_argument("--model", default="fmnist", help="shipped model name (fmnist, toy) or a directory with model.json + model.safetensors")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=_SAMPLE_DEFAULTS["sampler"])
    p.add_argument("--steps", type=positive_int, default=default_steps, help="sampling steps (respaced chain length T')")
    p.add_argument("--disc", dest="grid_kind", default=_SAMPLE_DEFAULTS["grid_kind"], choices=("respaced", "ddim", "karras"), help="time discretisation: guided-diffusion respacing of the 1000 steps (default), integer-stride 'ddimN', or EDM's Karras sigmas")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--eps-scale", type=lam_float, default=None, metavar="B", help="uniform Epsilon Scaling lambda (1 = off)")
    g.add_argument("--eps-schedule", default=None, metavar="FILE", help="schedule JSON (from epsscale calibrate)")
    p.add_argument("--sigma-max", type=nonneg_float, default=_SAMPLE_DEFAULTS["sigma_max"], help="top of the karras grid (default: the model config's sampling.karras_sigma_max, 25 for fmnist; else 80), capped at the model's")
    p.add_argument("--eta", type=nonneg_float, default=_SAMPLE_DEFAULTS["eta"], help="DDIM stochasticity")
    p.add_argument("--clip", type=nonneg_float, default=_SAMPLE_DEFAULTS["clip"], help="clip x0 to [-c, c] for ddpm/ddim (ADM: 1)")
    p.add_argument("--no-clip", dest="clip", action="store_const", const=None)
    p.add_argument("--s-churn", type=nonneg_float, default=_SAMPLE_DEFAULTS["s_churn"])
    p.add_argument("--s-tmin", type=nonneg_float, default=_SAMPLE_DEFAULTS["s_tmin"])
    p.add_argument("--s-tmax", type=nonneg_float, default=_SAMPLE_DEFAULTS["s_tmax"])
    p.add_argument("--s-noise", type=nonneg_float, default=_SAMPLE_DEFAULTS["s_noise"])
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------


def cmd_sample(args: argparse.Namespace) -> int:
    from . import distributed as dist
    from .scaling import eps_scaling

    _threads(args)
    dist.init()
    out = _writable(args.out)
    if out.suffix != ".npz":
        raise UserError(f"--out must end in .npz, got {out}")
    grid_png = _writable(args.grid) if args.grid else None
    work = _work_dir(args, out)
    if grid_png is not None and grid_png.resolve() in (out.resolve(), work.resolve()):
        raise UserError(f"--grid {grid_png} would overwrite {'--out' if grid_png.resolve() == out.resolve() else 'the work directory'}; give the PNG another name")
    lam = _lam_from_args(args)

    if args.guided_diffusion and args.edm:
        raise UserError("give one of --guided-diffusion and --edm")
    # Options that would otherwise be ignored without a word.
    if args.classifier_scale is not None and not args.classifier:
        raise UserError("--classifier-scale needs --classifier CKPT")
    if args.preset_es != "uniform" and not args.preset:
        raise UserError("--preset-es needs --preset")
    if args.allow_pickle and not args.edm:
        raise UserError("--allow-pickle is for --edm PKL only")
    if args.aug_dim is not None and not args.edm:
        raise UserError("--aug-dim is for PFGM++ networks, given as --edm PKL")
    if args.guided_diffusion:
        return _sample_guided_diffusion(args, out, grid_png)
    if args.edm:
        return _sample_edm(args, out, grid_png)
    for opt in ("preset", "classifier", "labels"):
        if getattr(args, opt) is not None:
            raise UserError(f"--{opt} needs --guided-diffusion CKPT or --edm PKL")
    if args.flags is not None:
        raise UserError("--flags needs --guided-diffusion CKPT")
    if args.seeds is None:
        args.seeds = list(range(64))
    args.batch = args.batch or 64
    if args.model == "toy":
        if args.grid_kind == "ddim" or args.sigma_max is not None:
            raise UserError("--model toy runs on --disc respaced or karras (from sigma 80); it takes no --disc ddim or --sigma-max")
        return _sample_toy(args, lam, out, grid_png)

    from .data.fashion_mnist import from_model_space
    from .models.pretrained import load_model

    device = _device()
    model = load_model(args.model, device=device)
    sigmas = make_grid(model, args.sampler, args.steps, args.grid_kind, args.sigma_max)
    den = eps_scaling(model.denoiser, lam, sigmas=sigmas)
    crop = model.config.get("crop")
    size = crop or model.shape[-1]
    t0 = time.time()
    res = dist.sample_seeds(
        den, args.seeds, model.shape, sampler=args.sampler, sigmas=sigmas,
        to_uint8=lambda x: from_model_space(x, size=size), batch_size=args.batch,
        prior_kind="vp", sampler_opts=sampler_options(args), num_classes=model.num_classes,
        work_dir=work, job_meta={"model": _fingerprint(model.path), "lam": repr(lam)}, outputs=(out, grid_png), progress=not args.quiet, device=device,
    )
    return _write_samples(res, out, grid_png, work, None if args.quiet else f"in {time.time() - t0:.1f}s")


def _write_samples(res: Any, out: Path, grid_png: Path | None, work: Path, message: str | None) -> int:
    """Rank 0: write the .npz (and PNG grid) atomically, then drop the work directory."""
    from . import distributed as dist
    from .data.images import save_npz

    if res is None:  # not rank 0
        return 0
    images, labels = res
    save_npz(out, images, labels)
    if grid_png:
        save_image_grid(images[:64], grid_png)
    dist.finish(work)
    if message is not None:
        print(f"wrote {len(images)} samples to {out} {message}")
    return 0


def _work_dir(args: argparse.Namespace, out: Path) -> Path:
    """Where finished batches wait until the .npz is written: --work-dir, else OUT.npz.parts."""
    return Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".parts")


def _fingerprint(path: Any) -> str:
    """Identify weights by path, size and modification time, so a resume never mixes models."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return str(p)
    return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _device() -> Any:
    """CUDA (this process's LOCAL_RANK under torchrun) when available, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _parse_labels(spec: str | None, n: int) -> list[int] | None:
    import numpy as np

    if spec is None:
        return None
    if spec.endswith(".npy"):
        try:
            arr = np.load(spec, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"--labels: cannot read {spec} ({str(e).splitlines()[0]})") from None
        values = arr.reshape(-1).tolist()
    else:
        try:
            values = [int(v) for v in spec.split(",")]
        except ValueError:
            raise UserError(f"--labels: expected integers like 3,1,4 or a .npy file, got {spec!r}") from None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise UserError(f"--labels: {spec} holds non-numbers; need integer class labels")
    if len(values) != n or any(not float(v).is_integer() or not 0 <= int(v) < 1000 for v in values):
        raise UserError(f"--labels: need {n} integer labels in [0, 1000), got {len(values)}")
    return [int(v) for v in values]


def _sample_guided_diffusion(args: argparse.Namespace, out: Path, grid_png: Path | None) -> int:
    from . import distributed as dist
    from .integrations.guided_diffusion import _as_bool, load_checkpoint, parse_flags, to_uint8
    from .scaling import eps_scaling

    flags = parse_flags(args.flags or "")
    if (args.eps_scale is not None or args.eps_schedule) and "eps_scaler" in flags:
        raise UserError("give lambda once: either --eps_scaler inside --flags or --eps-scale/--eps-schedule")
    # The sampler, its grid and options come from the flags (image_sample.py's); ours would be ignored.
    ignored = [opt for opt, dest in _SAMPLER_OPTION_FLAGS if getattr(args, dest) != _SAMPLE_DEFAULTS[dest]]
    if args.steps != _SAMPLE_STEPS and not args.preset:
        ignored.insert(0, "--steps")
    if ignored:
        raise UserError(f"{', '.join(ignored)} cannot apply to --guided-diffusion: its sampler, grid and clipping come from --flags (--timestep_respacing, --use_ddim, --clip_denoised)")
    if flags.get("model_path") and Path(flags["model_path"]).resolve() != Path(args.guided_diffusion).resolve():
        raise UserError(f"--model_path {flags['model_path']} in --flags is not --guided-diffusion {args.guided_diffusion}")
    preset = None
    if args.preset:
        from .presets import get_preset

        steps = args.steps
        respacing = str(flags.get("timestep_respacing", ""))
        if respacing:
            # The preset's lambda is the one for the chain the flags ask for.
            n = respacing[4:] if respacing.startswith("ddim") else respacing
            if not n.isdigit():
                raise UserError(f"--preset needs a plain step count in --timestep_respacing (100, 50 or 20), got {respacing!r}")
            if args.steps != _SAMPLE_STEPS and args.steps != int(n):
                raise UserError(f"--steps {args.steps} and --timestep_respacing {respacing} disagree")
            steps = int(n)
        if _as_bool("use_ddim", flags.get("use_ddim", False)):
            raise UserError("the paper's ADM presets are for the ancestral sampler; drop --use_ddim True or --preset")
        preset = get_preset(args.preset, steps=steps, es=args.preset_es)
        if preset["framework"] != "adm":
            raise UserError(f"preset {args.preset} is an EDM preset; use it with --edm PKL")
        flags = {**{k: str(v) for k, v in {**preset["model_flags"], **preset["diffusion_flags"]}.items()}, "class_cond": str(preset["conditional"]), **flags}
    device = _device()
    net, den, st = load_checkpoint(args.guided_diffusion, flags)
    net.to(device)
    if args.eps_scale is not None or args.eps_schedule:
        lam = _lam_from_args(args)
    elif preset is not None and "eps_scaler" not in flags:
        lam = preset["lam"]
    else:
        lam = st.lam
    seeds = args.seeds if args.seeds is not None else list(range(st.num_samples))
    labels = _parse_labels(args.labels, len(seeds))
    sigmas = st.schedule.grid(st.respacing)
    image_size = int(flags.get("image_size", 64))
    in_ch = int(flags.get("in_channels", 3))
    opts: dict[str, Any] = {"clip": st.clip}
    if st.sampler == "ddpm":
        opts["variance"] = st.variance
    # classifier_sample.py's --classifier_path / --classifier_scale may come inside --flags.
    clf_path = args.classifier or st.classifier_path or None
    if args.classifier and st.classifier_path and Path(args.classifier).resolve() != Path(st.classifier_path).resolve():
        raise UserError(f"--classifier {args.classifier} and --classifier_path {st.classifier_path} in --flags disagree")
    if args.classifier_scale is not None and st.classifier_scale is not None and args.classifier_scale != st.classifier_scale:
        raise UserError(f"--classifier-scale {args.classifier_scale:g} and --classifier_scale {st.classifier_scale:g} in --flags disagree")
    if st.classifier_scale is not None and not clf_path:
        raise UserError("--classifier_scale in --flags needs a classifier: --classifier_path in --flags, or --classifier CKPT")
    if clf_path or (preset and preset["guidance"]):
        if st.sampler != "ddpm":
            raise UserError("classifier guidance is implemented for the ancestral sampler (use_ddim False)")
        if not clf_path:
            raise UserError(f"preset {args.preset} uses classifier guidance: pass --classifier CKPT.pt ({preset['guidance']['classifier_checkpoint']})")
        if not st.class_cond:
            # classifier_sample.py with an unconditional model: the labels steer the classifier only.
            den = _WithoutLabels(den)
        from .models.adm_classifier import classifier_guidance, create_adm_classifier
        from .models.adm import load_adm_state_dict
        import torch

        cflags = {**(preset["guidance"]["classifier_flags"] if preset and preset["guidance"] else {}), **flags}
        clf = create_adm_classifier(cflags)
        try:
            cstate = torch.load(clf_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{clf_path}: cannot read classifier checkpoint ({str(e).splitlines()[0][:200]})") from None
        load_adm_state_dict(clf, cstate)
        clf.to(device)
        scale = next((v for v in (args.classifier_scale, st.classifier_scale) if v is not None), preset["guidance"]["scale"] if preset and preset["guidance"] else 1.0)
        opts["classifier_grad"] = classifier_guidance(clf.eval(), st.schedule, scale)
    work = _work_dir(args, out)
    res = dist.sample_seeds(
        eps_scaling(den, lam, sigmas=sigmas), seeds, (in_ch, image_size, image_size), sampler=st.sampler,
        sigmas=sigmas, to_uint8=to_uint8, batch_size=args.batch or st.batch_size, prior_kind="vp",
        sampler_opts=opts, num_classes=1000 if st.class_cond or "classifier_grad" in opts else None, labels=labels, work_dir=work,
        job_meta={"model": _fingerprint(args.guided_diffusion), "lam": repr(lam), "flags": args.flags, "preset": args.preset},
        outputs=(out, grid_png), progress=not args.quiet, device=device,
    )
    return _write_samples(res, out, grid_png, work, None if args.quiet else f"({st.sampler}, respacing {st.respacing}, lambda {lam})")


class _WithoutLabels:
    """An unconditional denoiser that ignores the class labels meant for a guidance classifier."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, x: Any, sigma: Any, y: Any = None, **cond: Any) -> Any:
        return self.inner(x, sigma, **cond)


def _sample_edm(args: argparse.Namespace, out: Path, grid_png: Path | None) -> int:
    import numpy as np
    import torch

    from . import distributed as dist
    from .adapters import EDMDenoiser
    from .models.edm import load_edm_pickle
    from .scaling import eps_scaling
    from .schedules import sigmas_karras

    if args.grid_kind == "ddim":
        raise UserError("EDM nets run on EDM's Karras grid (--sigma-max sets its top); --disc ddim is for discrete VP models")
    device = _device()
    net = load_edm_pickle(args.edm, allow_pickle=args.allow_pickle, device=device if device.type != "cpu" else None)
    lam: Any = _lam_from_args(args)
    sampler, steps, opts = args.sampler, args.steps, sampler_options(args)
    sigma_min, sigma_max, rho = 0.002, 80.0, 7.0
    if args.preset:
        from .presets import get_preset

        if args.sampler not in (_SAMPLE_DEFAULTS["sampler"], "heun", "euler"):
            raise UserError(f"EDM presets are for heun or euler, not --sampler {args.sampler}")
        preset = get_preset(args.preset, steps=args.steps, sampler=args.sampler if args.sampler in ("heun", "euler") else None)
        if preset["framework"] != "edm":
            raise UserError(f"preset {args.preset} is an ADM preset; use it with --guided-diffusion CKPT")
        if args.aug_dim is not None:
            raise UserError(f"--preset {args.preset} holds EDM's lambdas, not PFGM++'s; give --eps-scale with --aug-dim")
        mine = [opt for opt, dest in _SAMPLER_OPTION_FLAGS if dest.startswith("s_") and getattr(args, dest) != _SAMPLE_DEFAULTS[dest]]
        if mine:
            raise UserError(f"{', '.join(mine)} cannot apply with --preset {args.preset}: the preset sets EDM's sampler options")
        sampler, steps, opts = preset["sampler"], preset["steps"], dict(preset["sampler_kwargs"])
        sigma_min, sigma_max, rho = preset["grid"]["sigma_min"], preset["grid"]["sigma_max"], preset["grid"]["rho"]
        if args.eps_scale is None and not args.eps_schedule:
            lam = preset["lam"]
    if sampler in ("ddpm", "ddim"):
        raise UserError("EDM nets are sampled with euler, heun or dpmpp_2m")
    if args.sigma_max is not None:
        sigma_max = args.sigma_max
    sigma_min, sigma_max = max(sigma_min, float(net.sigma_min)), min(sigma_max, float(net.sigma_max))
    sigmas = sigmas_karras(steps, sigma_min, sigma_max, rho)
    rounded = torch.as_tensor(net.round_sigma(sigmas[:-1]), dtype=torch.float64)  # EDM rounds its grid
    sigmas = torch.cat([rounded, rounded.new_zeros(1)])
    seeds = args.seeds if args.seeds is not None else list(range(64))
    if args.labels is not None and not net.label_dim:
        raise UserError(f"--labels: {args.edm} is an unconditional network")
    labels = _parse_labels(args.labels, len(seeds)) if net.label_dim else None
    work = _work_dir(args, out)
    shape = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))

    def to_u8(x: Any) -> np.ndarray:  # EDM's generate.py quantisation
        return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()

    res = dist.sample_seeds(
        eps_scaling(EDMDenoiser(net), lam, sigmas=sigmas), seeds, shape, sampler=sampler, sigmas=sigmas, to_uint8=to_u8,
        batch_size=args.batch or 64, prior_kind="ve" if args.aug_dim is None else f"pfgmpp:{args.aug_dim}", sampler_opts=opts, num_classes=int(net.label_dim) or None, labels=labels,
        work_dir=work, job_meta={"model": _fingerprint(args.edm), "lam": repr(lam)}, outputs=(out, grid_png), progress=not args.quiet, device=device,
    )
    prior_note = "" if args.aug_dim is None else f", PFGM++ prior D = {args.aug_dim}"
    return _write_samples(res, out, grid_png, work, None if args.quiet else f"({sampler}, {steps} steps, lambda {lam}{prior_note})")


def _sample_toy(args: argparse.Namespace, lam: Any, out: Path, grid_png: Path | None) -> int:
    import numpy as np
    import torch

    from . import distributed as dist
    from .data.toy import ImperfectDenoiser, default_mixture
    from .samplers import SAMPLERS, StackedGenerator, prior
    from .scaling import eps_scaling
    from .schedules import VPSchedule

    if dist.rank() != 0:  # 2-D points take no time: under torchrun, rank 0 does it alone
        return 0
    sch = VPSchedule("cosine")
    sigmas = sch.grid(str(args.steps)) if args.grid_kind != "karras" else _karras_toy(args.steps)
    den = eps_scaling(ImperfectDenoiser(default_mixture()), lam, sigmas=sigmas)
    gen = StackedGenerator(args.seeds)
    x = prior(gen.randn((len(args.seeds), 2), dtype=torch.float64), sigmas[0], kind="vp")
    pts = SAMPLERS[args.sampler](den, x, sigmas, noise=gen, **sampler_options(args)).double().numpy()
    atomic_write(out, lambda f: np.savez(f, arr_0=pts))
    if grid_png:
        _scatter([("samples", pts)], grid_png)
    if not args.quiet:
        print(f"wrote {len(pts)} 2-D samples to {out}")
    return 0


def _karras_toy(steps: int) -> Any:
    from .schedules import sigmas_karras

    return sigmas_karras(steps, sigma_min=0.002, sigma_max=80.0)


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def save_image_grid(images: Any, path: Path, *, ncol: int | None = None, title: str | None = None) -> None:
    """uint8 NHWC -> one PNG grid (atomic)."""
    import numpy as np
    from PIL import Image

    n = len(images)
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    h, w, c = images.shape[1:]
    canvas = np.full((nrow * (h + 2) + 2, ncol * (w + 2) + 2, c), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, ncol)
        canvas[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + q * (w + 2) : 2 + q * (w + 2) + w] = im
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    img = img.resize((img.width * 2, img.height * 2), Image.NEAREST)
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def _scatter(panels: Sequence[tuple[str, Any]], path: Path, reference: Any = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels):
        if reference is not None:
            ax.scatter(reference[:, 0], reference[:, 1], s=2, c="lightgray", label="data")
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c="C0")
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-3.2, 3.2)
        ax.set_ylim(-3.2, 3.2)
        ax.set_aspect("equal")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# fid
# ---------------------------------------------------------------------------------------------


def cmd_fid(args: argparse.Namespace) -> int:
    """FID of a sample set. Under ``torchrun`` rank r featurises images r, r + W, ..., and the
    float64 sums (n, sum x, sum x x^T) are added over ranks with all_reduce; rank 0 prints."""
    from . import distributed as dist
    from .data.images import load_images
    from .metrics import FeatureStats, compute_fid, feature_stats, get_extractor, reference_stats

    _threads(args)
    dist.init()
    ref = args.ref
    if ref not in ("fashion-mnist-train", "fashion-mnist-test") and not Path(ref).exists():
        raise UserError(f"--ref {ref}: no such file or folder (expected fashion-mnist-train, fashion-mnist-test, a stats .npz or images)")
    images = load_images(args.samples)
    if len(images) < 2:
        raise UserError(f"{args.samples}: FID needs at least 2 images, found {len(images)}")
    ext = get_extractor(args.extractor, args.inception if args.extractor == "inception" else None, device=_device())
    r, w = dist.rank(), dist.world_size()
    stats = FeatureStats(ext.dim)
    if len(images[r::w]):
        feature_stats(images[r::w], ext, batch_size=args.batch, progress=not args.quiet and r == 0, stats=stats)
    for t in stats.tensors():
        dist.all_reduce_sum(t)
    if r != 0:
        return 0
    if ref.endswith(".npz") and Path(ref).exists() and _is_stats_npz(ref):
        ref_stats: Any = ref
    else:
        ref_stats = reference_stats(ext, ref, progress=not args.quiet)
    fid = compute_fid(stats, ref_stats)
    print(json.dumps({"fid": fid, "samples": len(images), "extractor": ext.name, "ref": ref}) if args.json else f"FID {fid:.4f}  ({len(images)} samples, {ext.name} features, ref {ref})")
    return 0


def _is_stats_npz(path: str) -> bool:
    import numpy as np

    try:
        with np.load(path) as z:
            return "mu" in z.files and "sigma" in z.files
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from .models.train import TrainConfig, export_model, train

    if args.karras_sigma_max and not args.export:
        raise UserError("--karras-sigma-max is recorded by --export; give --export PREFIX too")
    _out_dir(args.run_dir, "--run-dir")
    if args.export:
        _writable(Path(args.export).with_suffix(".safetensors"))
    _threads(args)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, lr_schedule=args.lr_schedule, warmup=args.warmup, ema_decay=args.ema, input_perturbation=args.input_perturbation, seed=args.seed, data=args.data)
    run = train(cfg, args.run_dir, progress=not args.quiet, max_seconds=args.max_minutes * 60 if args.max_minutes else None, snapshot_every=args.snapshot_every, init_from=args.init_from, device=args.device)
    if args.export:
        extra = {"sampling": {"karras_sigma_max": args.karras_sigma_max}} if args.karras_sigma_max else None
        st, js = export_model(run, args.export, extra=extra)
        print(f"exported {st} and {js}")
    return 0


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    from .models.pretrained import SHIPPED

    out = _out_dir(args.out)
    if args.num is not None and args.num < 2:
        raise UserError(f"--num must be at least 2 (FID needs 2 samples per setting), got {args.num}")
    _threads(args)
    if args.toy or not SHIPPED["fmnist"].with_suffix(".json").exists() or not demo.ES_FILE.exists():
        if not args.toy:
            print("(the shipped Fashion-MNIST model is not in this checkout: running the 2-D mixture demo)")
        return demo.toy_demo(out, num=args.num)
    return demo.fmnist_demo(out, num=args.num, batch=args.batch)


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="epsscale", description="Measure and correct exposure bias in diffusion models with Epsilon Scaling (Ning et al., ICLR 2024).")
    p.add_argument("--version", action="version", version=f"epsscale {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    d = sub.add_parser("demo", help="baseline vs ES on the shipped Fashion-MNIST model (or --toy: a 2-D mixture)")
    d.add_argument("--toy", action="store_true", help="2-D Gaussian mixture with an exact and an imperfect denoiser")
    d.add_argument("--num", type=positive_int, default=None, help="samples per setting")
    d.add_argument("--batch", type=positive_int, default=250)
    d.add_argument("--out", default="demo_out", help="output directory")
    d.add_argument("--threads", type=positive_int, default=None)
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("sample", help="sample seeds to an ADM-style .npz")
    _add_sampling_options(s)
    s.add_argument("--seeds", type=seeds_type, default=None, help="e.g. 0-49999 or 1,2,5-10 (default 0-63, or --num_samples of --flags)")
    s.add_argument("--batch", type=positive_int, default=None, help="batch size (default 64, or --batch_size of --flags)")
    s.add_argument("--guided-diffusion", default=None, metavar="CKPT.pt", help="a guided-diffusion / ADM-ES checkpoint (state dict)")
    s.add_argument("--flags", default=None, help="guided-diffusion image_sample.py flags, pasted verbatim (with --guided-diffusion)")
    s.add_argument("--labels", default=None, help="class labels, one per seed: 3,1,4,... or a .npy file")
    s.add_argument("--edm", default=None, metavar="NET.pkl", help="an NVlabs EDM network pickle (needs --allow-pickle and EDM's repo on PYTHONPATH)")
    s.add_argument("--allow-pickle", action="store_true", help="allow loading --edm pickles, which run code")
    s.add_argument("--aug-dim", type=positive_int, default=None, metavar="D", help="with --edm: a PFGM++ network (Newbeeer/pfgmpp --aug_dim D); x_T follows its prior, r = sigma sqrt(D)")
    s.add_argument("--preset", default=None, help="the paper's settings, e.g. adm-cifar10 (with --steps 100/50/20 and --guided-diffusion CKPT)")
    s.add_argument("--preset-es", default="uniform", choices=("uniform", "linear"), help="the preset's uniform b, or its 20-step linear (k, b)")
    s.add_argument("--classifier", default=None, metavar="CKPT.pt", help="ADM-G classifier checkpoint (classifier guidance; ES never scales its gradient)")
    s.add_argument("--classifier-scale", type=nonneg_float, default=None)
    s.add_argument("--out", required=True, help="output .npz (arr_0: uint8 NHWC)")
    s.add_argument("--grid", "--png", dest="grid", default=None, metavar="FILE.png", help="also write a PNG grid of the first 64 samples")
    s.add_argument("--work-dir", default=None, help="where finished batches are kept for resuming (default: OUT.parts)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_sample)

    f = sub.add_parser("fid", help="FID of samples (npz, folder or zip) against reference statistics")
    f.add_argument("samples")
    f.add_argument("--ref", default="fashion-mnist-train", help="fashion-mnist-train, fashion-mnist-test, a stats .npz (mu, sigma) or images")
    f.add_argument("--extractor", choices=("fmnist", "inception"), default="fmnist")
    f.add_argument("--inception", default=None, metavar="PATH", help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid's weights)")
    f.add_argument("--batch", type=positive_int, default=250)
    f.add_argument("--json", action="store_true")
    f.add_argument("--quiet", action="store_true")
    f.add_argument("--threads", type=positive_int, default=None)
    f.set_defaults(func=cmd_fid)

    t = sub.add_parser("train", help="train or resume the Fashion-MNIST model")
    t.add_argument("--run-dir", required=True)
    t.add_argument("--steps", type=positive_int, default=16000)
    t.add_argument("--batch", type=positive_int, default=64)
    t.add_argument("--lr", type=positive_float, default=5e-4)
    t.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine")
    t.add_argument("--warmup", type=int, default=500)
    t.add_argument("--ema", type=nonneg_float, default=0.9995)
    t.add_argument("--snapshot-every", type=positive_int, default=None)
    t.add_argument("--init-from", default=None)
    t.add_argument("--device", default="cpu")
    t.add_argument("--input-perturbation", type=nonneg_float, default=0.0, help="DDPM-IP gamma")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--data", default=None, help="directory with the Fashion-MNIST IDX .gz files")
    t.add_argument("--max-minutes", type=nonneg_float, default=None, help="stop after a checkpoint once this much time has passed")
    t.add_argument("--export", default=None, metavar="PREFIX", help="write PREFIX.safetensors + PREFIX.json from the EMA weights")
    t.add_argument("--karras-sigma-max", type=positive_float, default=None, help="with --export: record this as the model's default top of a Karras grid (sampling.karras_sigma_max; without it, 80)")
    t.add_argument("--threads", type=positive_int, default=None)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    _add_more_commands(sub)
    return p


def _add_more_commands(sub: Any) -> None:
    """measure and calibrate (epsscale.exposure)."""
    try:
        from . import cli_exposure
    except ImportError:
        return
    cli_exposure.add_commands(sub, _add_sampling_options)


def _version() -> str:
    from . import __version__

    return __version__


def _one_line_warning(message: Any, category: Any, filename: str, lineno: int, line: str | None = None) -> str:
    return f"epsscale: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """The ``epsscale`` command; returns the exit status (0, 2 for bad input, 3 for non-finite output)."""
    import warnings

    shown = warnings.formatwarning
    warnings.formatwarning = _one_line_warning  # a warning is one line too, without file and source
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = shown


def _main(argv: Sequence[str] | None) -> int:
    logging.basicConfig(level=logging.WARNING, format="epsscale: %(message)s")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, ImportError) as e:
        msg = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        print(f"epsscale: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("epsscale: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # NonFiniteError and other run failures: one line, non-zero
        from .distributed import NonFiniteError

        if isinstance(e, NonFiniteError):
            print(f"epsscale: error: {e}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
