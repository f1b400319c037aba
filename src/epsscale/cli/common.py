"""What every ``epsscale`` subcommand shares: the parser, option types, the model and sampling
options, and how a run is turned into a :class:`~epsscale.plan.SamplingPlan`.

Errors are one line, ``epsscale <command>: error: <message>``, exit status 2; warnings are one
line, ``epsscale <command>: warning: <message>``, on stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from ..samplers import TIME_SHIFT_SAMPLERS, VP_SAMPLERS
from ..scaling import describe_schedule

SAMPLER_NAMES = ("ddpm", "ddim", "euler", "heun", "dpmpp_2m")
SIGMA_SAMPLERS = ("euler", "heun", "dpmpp_2m")

# The biggest batch a run uses by default. Measured on this project's 2-core CPU with the
# shipped model: throughput is flat from 64 to 256 rows ("Batch size" in benchmarks/RESULTS.md).
MAX_BATCH = 128


class UserError(Exception):
    """A problem with the user's input: reported in one line, no traceback, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching (``--seed`` is not ``--seeds``), one-line errors, defaults in help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to an option's help unless it says its default itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or action.option_strings == [] or isinstance(action, argparse._StoreConstAction):
            return text
        return f"{text} (default: {action.default})"


_CURRENT = ["epsscale"]


def warn(message: str) -> None:
    """One line on stderr: ``epsscale <command>: warning: <message>``."""
    print(f"{_CURRENT[0]}: warning: {message}", file=sys.stderr)


def set_current_command(name: str) -> None:
    _CURRENT[0] = name


# ---------------------------------------------------------------------------------------------
# Option types
# ---------------------------------------------------------------------------------------------


def _integer_at_least(low: int, what: str) -> Any:
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v

    return parse


positive_int = _integer_at_least(1, "a positive integer")
nonneg_int = _integer_at_least(0, "an integer >= 0")


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


def tmax_float(s: str) -> float:
    """A number >= 0, or inf (EDM's S_tmax default)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or inf, got {s!r}") from None
    if math.isnan(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or inf, got {s!r}")
    return v


def seeds_type(s: str) -> list[int]:
    from ..sampling import parse_seeds

    try:
        return parse_seeds(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Paths, threads, devices
# ---------------------------------------------------------------------------------------------


def writable(path: str | os.PathLike, option: str = "") -> Path:
    """A file we are about to write: its folder exists and is writable, and it is not a folder."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    where = f"{option} " if option else ""
    if not parent.is_dir():
        raise UserError(f"cannot write {where}{p}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {where}{p}: directory {parent} is not writable")
    if p.is_dir():
        raise UserError(f"cannot write {where}{p}: it is a directory")
    return p


def writable_later(path: str | os.PathLike, option: str = "") -> Path:
    """A file whose folder may be created first: the nearest existing folder above it is writable."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"cannot write {option} {p}: it is a directory".replace("  ", " "))
    parent = p.parent if str(p.parent) else Path(".")
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {option} {p}: {parent} is not a writable directory".replace("  ", " "))
    return p


def out_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """An output directory: may not exist yet, but must not be a file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{option} {p}: exists and is not a directory")
    return p


def set_threads(args: argparse.Namespace) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def device() -> Any:
    """CUDA (this process's LOCAL_RANK under torchrun) when available, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def auto_batch(n: int, largest: int = MAX_BATCH) -> int:
    """The default batch for ``n`` samples: as few batches of at most ``largest`` rows as
    possible, evened out, so that padding never adds more than one row per batch."""
    batches = max(1, math.ceil(n / largest))
    return max(1, math.ceil(n / batches))


# λ for a summary line: the library's own description of a schedule.
format_lam = describe_schedule


# ---------------------------------------------------------------------------------------------
# Model options: one set for sample, measure and calibrate
# ---------------------------------------------------------------------------------------------

# Sampler options: (option, dest, default, the samplers it applies to).
SAMPLER_OPTIONS = (
    ("--eta", "eta", 0.0, ("ddim",)),
    ("--clip", "clip", None, VP_SAMPLERS),
    ("--s-churn", "s_churn", 0.0, ("euler", "heun")),
    ("--s-tmin", "s_tmin", 0.0, ("euler", "heun")),
    ("--s-tmax", "s_tmax", float("inf"), ("euler", "heun")),
    ("--s-noise", "s_noise", 1.0, ("euler", "heun")),
)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Where the model comes from (one of these) and the options of each source."""
    g = p.add_argument_group("model (give one; the default is the shipped Fashion-MNIST model)")
    g.add_argument("--model", default=None, metavar="NAME|DIR", help="an epsscale model: fmnist (shipped), toy (2-D mixture), or a directory with model.json + model.safetensors (default: fmnist)")
    g.add_argument("--guided-diffusion", default=None, metavar="CKPT.pt", help="a guided-diffusion / ADM-ES checkpoint (state dict); its sampler comes from --flags")
    g.add_argument("--flags", default=None, help="with --guided-diffusion: image_sample.py's flags, pasted verbatim")
    g.add_argument("--edm", default=None, metavar="NET.pkl", help="an NVlabs EDM network pickle (needs --allow-pickle and EDM's repository on PYTHONPATH)")
    g.add_argument("--allow-pickle", action="store_true", help="allow loading --edm pickles, which run code")
    g.add_argument("--aug-dim", type=positive_int, default=None, metavar="D", help="with --edm: a PFGM++ network (--aug_dim D); x_T follows its prior, r = sigma sqrt(D)")
    g.add_argument("--diffusers", default=None, metavar="DIR", help="a diffusers pipeline saved with save_pretrained (loaded offline)")
    g.add_argument("--prompt-file", default=None, metavar="FILE", help="with --diffusers text-to-image pipelines: prompts, one a line, cycled over the seeds")
    g.add_argument("--guidance-scale", type=nonneg_float, default=None, help="with --diffusers: classifier-free guidance scale (default: the pipeline's, 1 = off)")
    g.add_argument("--preset", default=None, help="the paper's settings and lambda: adm-* with --guided-diffusion (and --steps 100/50/20), edm-* with --edm")
    g.add_argument("--preset-es", default="uniform", choices=("uniform", "linear"), help="the preset's uniform b, or its 20-step linear (k, b)")
    g.add_argument("--classifier", default=None, metavar="CKPT.pt", help="with --guided-diffusion: an ADM-G classifier (guidance; ES never scales its gradient)")
    g.add_argument("--classifier-scale", type=nonneg_float, default=None, help="classifier guidance scale (default: the preset's, else 1)")
    g.add_argument("--labels", default=None, help="class labels, one per seed: 3,1,4,... or a .npy file (default: each seed draws its own)")


def add_sampling_options(p: argparse.ArgumentParser, *, default_steps: int = 20) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", choices=SAMPLER_NAMES, default=None, help="the sampler (default: ddpm; EDM nets: give euler, heun or dpmpp_2m, or --preset)")
    g.add_argument("--steps", type=positive_int, default=None, help=f"sampling steps T' (default: {default_steps})")
    g.add_argument("--disc", dest="grid_kind", default=None, choices=("respaced", "ddim", "karras"), help="time discretisation: guided-diffusion's respacing of all timesteps, its integer 'ddimN' stride, or EDM's Karras sigmas (default: the model's own for the sampler; respaced)")
    g.add_argument("--sigma-max", type=positive_float, default=None, help="top of a karras grid (default: where the model config's sampling block starts this sampler, else 80; capped at the model's)")
    es = g.add_mutually_exclusive_group()
    es.add_argument("--eps-scale", type=lam_float, default=None, metavar="B", help="uniform Epsilon Scaling lambda: eps / B (default: 1, off; a preset's with --preset)")
    es.add_argument("--eps-schedule", default=None, metavar="FILE|SPEC", help="a schedule JSON (from epsscale calibrate), or Temporal Score Rescaling as tsr or tsr:k=0.95,sigma=1 (lambda = 1/r(sigma))")
    g.add_argument("--eta", type=nonneg_float, default=0.0, help="DDIM's stochasticity eta (ddim only)")
    g.add_argument("--clip", type=positive_float, default=None, help="clip x0 to [-c, c] (ddpm and ddim; default: the model's convention: 1 for epsscale and ADM models, a diffusers scheduler's clip_sample, none for the toy)")
    g.add_argument("--no-clip", dest="clip", action="store_const", const=math.inf, help="do not clip x0 (ddpm and ddim)")
    g.add_argument("--s-churn", type=nonneg_float, default=0.0, help="EDM's S_churn (euler, heun)")
    g.add_argument("--s-tmin", type=nonneg_float, default=0.0, help="EDM's S_tmin (euler, heun)")
    g.add_argument("--s-tmax", type=tmax_float, default=float("inf"), help="EDM's S_tmax (euler, heun)")
    g.add_argument("--s-noise", type=nonneg_float, default=1.0, help="EDM's S_noise (euler, heun)")
    peers = p.add_argument_group("peer methods (compose with Epsilon Scaling)")
    peers.add_argument("--time-shift", action="store_true", help="Time-Shift sampling (Li et al., ICLR 2024): call the network at the timestep whose 1 - abar is nearest the state's variance (ddpm, ddim, euler, heun; discrete VP models)")
    peers.add_argument("--ts-window", type=nonneg_int, default=None, metavar="W", help="with --time-shift: search window in original timesteps (default: the paper's for the step count: 40/30/8/2 at 10/20/50/100 steps, the nearest count otherwise; 0 = off)")
    peers.add_argument("--ts-cutoff", type=nonneg_int, default=None, metavar="C", help="with --time-shift: no shift once the planned timestep is <= C (default: the paper's for the nearest of 10/20/50/100 steps: 200 at 10, else 300)")
    peers.add_argument("--dcw", type=nonneg_float, default=None, metavar="C", help="DCW (arXiv 2604.16044): after each step move the state's Haar LL band away from x0 by C sigma_i / sigma_max (images with even height and width; 0 = off; the official script uses 0.005)")
    p.set_defaults(_default_steps=default_steps)


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summaries")


def given_sampler_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler options the user changed from their defaults, by dest."""
    return {dest: getattr(args, dest) for _, dest, default, _ in SAMPLER_OPTIONS if getattr(args, dest) != default}


def sampler_options(args: argparse.Namespace, sampler: str) -> dict[str, Any]:
    """The keyword options of ``sampler`` from the command line; a changed option that the
    sampler does not take is a one-line warning. (The peer methods' options, which need the
    model's schedule and sample shape, are added to every plan by :func:`peer_options`.)"""
    opts: dict[str, Any] = {}
    if sampler in VP_SAMPLERS and args.clip is not None:  # given: a number, or off (--no-clip)
        opts["clip"] = None if math.isinf(args.clip) else args.clip
    if sampler == "ddim":
        opts["eta"] = args.eta
    if sampler in ("euler", "heun"):
        opts.update(s_churn=args.s_churn, s_tmin=args.s_tmin, s_tmax=args.s_tmax, s_noise=args.s_noise)
    idle = [opt for opt, dest, default, applies in SAMPLER_OPTIONS if getattr(args, dest) != default and sampler not in applies]
    if idle:
        warn(f"{', '.join(idle)} do{'es' if len(idle) == 1 else ''} not apply to --sampler {sampler}: ignored")
    return opts


def parse_labels(spec: str | None, n: int, num_classes: int = 1000) -> list[int] | None:
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
    if len(values) != n:
        raise UserError(f"--labels: need one label per seed ({n}), got {len(values)}")
    bad = next((v for v in values if not float(v).is_integer() or not 0 <= int(v) < num_classes), None)
    if bad is not None:
        raise UserError(f"--labels: labels must be integers in [0, {num_classes}) for this model, got {bad}")
    return [int(v) for v in values]


def source_of(args: argparse.Namespace) -> str:
    """Which model source the options name: epsscale, toy, guided-diffusion, edm or diffusers."""
    given = [name for name, opt in (("guided-diffusion", "guided_diffusion"), ("edm", "edm"), ("diffusers", "diffusers")) if getattr(args, opt, None)]
    if getattr(args, "model", None) is not None:
        given.insert(0, "toy" if args.model == "toy" else "epsscale")
    if len(given) > 1:
        raise UserError(f"give one model: --{' and --'.join('model' if g in ('epsscale', 'toy') else g for g in given)} were given")
    return given[0] if given else "epsscale"


def _refuse_foreign(args: argparse.Namespace, source: str) -> None:
    """Options that belong to another model source than the one given."""
    belongs = {
        "flags": ("guided-diffusion",), "classifier": ("guided-diffusion",), "classifier_scale": ("guided-diffusion",),
        "allow_pickle": ("edm",), "aug_dim": ("edm",), "prompt_file": ("diffusers",), "guidance_scale": ("diffusers",),
        "preset": ("guided-diffusion", "edm"), "labels": ("guided-diffusion", "edm", "diffusers"),
    }
    need = {"guided-diffusion": "--guided-diffusion CKPT", "edm": "--edm PKL", "diffusers": "--diffusers DIR"}
    for dest, sources in belongs.items():
        value = getattr(args, dest, None)
        if value is not None and value is not False and source not in sources:
            opt = "--" + dest.replace("_", "-")
            if dest == "aug_dim":
                raise UserError("--aug-dim is for PFGM++ networks, given as --edm PKL")
            if dest == "allow_pickle":
                raise UserError("--allow-pickle is for --edm PKL only")
            raise UserError(f"{opt} needs {' or '.join(need[s] for s in sources)}")
    if getattr(args, "preset_es", "uniform") != "uniform" and not getattr(args, "preset", None):
        raise UserError("--preset-es needs --preset")
    if getattr(args, "classifier_scale", None) is not None and not getattr(args, "classifier", None) and source == "guided-diffusion" and "classifier_scale" not in (args.flags or ""):
        raise UserError("--classifier-scale needs --classifier CKPT")


PEER_SAMPLERS = TIME_SHIFT_SAMPLERS


def _check_peer_args(args: argparse.Namespace, source: str) -> None:
    """The peer options that are wrong whatever the model (before any model is loaded)."""
    if not getattr(args, "time_shift", False):
        given = [opt for opt, dest in (("--ts-window", "ts_window"), ("--ts-cutoff", "ts_cutoff")) if getattr(args, dest, None) is not None]
        if given:
            raise UserError(f"{' and '.join(given)} need{'s' if len(given) == 1 else ''} --time-shift")
    elif source in ("edm", "toy"):
        raise UserError(f"--time-shift needs a discrete VP model (an epsscale model, --guided-diffusion or --diffusers), not {'--model toy' if source == 'toy' else '--' + source}")


def peer_options(args: argparse.Namespace, plan: Any) -> Any:
    """``plan`` with the peer methods of the command line in its ``sampler_opts`` (so that a
    resumable run's manifest records them): ``time_shift`` (a :class:`~epsscale.timeshift.TimeShift`
    on the plan's VP schedule, the paper's window and cutoff for the step count unless given)
    and ``dcw`` (:class:`~epsscale.dcw.DCW`; ``--dcw 0`` adds nothing). Refusals are one line."""
    extra: dict[str, Any] = {}
    if getattr(args, "time_shift", False):
        from ..timeshift import TimeShift

        if plan.schedule is None:
            raise UserError("--time-shift needs a discrete VP model")
        if plan.sampler not in PEER_SAMPLERS:
            raise UserError(f"--time-shift works with --sampler {', '.join(PEER_SAMPLERS)}, not {plan.sampler}")
        T = plan.schedule.num_timesteps
        if args.ts_cutoff is not None and args.ts_cutoff > T - 1:
            raise UserError(f"--ts-cutoff must be in [0, {T - 1}] (a timestep of the model's schedule), got {args.ts_cutoff}")
        from ..timeshift import paper_defaults

        cutoff = args.ts_cutoff if args.ts_cutoff is not None else min(paper_defaults(plan.steps)[1], T - 1)  # the paper's, within a short schedule
        extra["time_shift"] = TimeShift.for_steps(plan.schedule, plan.steps, window=args.ts_window, cutoff=cutoff)
    if getattr(args, "dcw", None):
        from ..dcw import DCW

        shape = tuple(plan.shape)
        if len(shape) < 3 or shape[-1] % 2 or shape[-2] % 2:
            raise UserError(f"--dcw needs images with an even height and width; {plan.name or 'this model'} makes samples of shape {shape}")
        extra["dcw"] = DCW(args.dcw)
    return plan.replace(sampler_opts={**plan.sampler_opts, **extra}) if extra else plan


def build_plan(args: argparse.Namespace) -> Any:
    """The run the options describe, from whichever model source they name.

    Builders raise ``ValueError`` for settings that cannot apply; they reach the user as one line.
    The peer methods' options are added last (:func:`peer_options`).
    """
    source = source_of(args)
    _refuse_foreign(args, source)
    _check_peer_args(args, source)
    return peer_options(args, _build_plan(args, source))


def _build_plan(args: argparse.Namespace, source: str) -> Any:
    dev = device()
    steps = args.steps if args.steps is not None else args._default_steps
    if source == "guided-diffusion":
        from ..integrations import guided_diffusion

        overrides = [opt for opt, dest in (("--sampler", "sampler"), ("--disc", "grid_kind"), ("--sigma-max", "sigma_max")) if getattr(args, dest) is not None]
        overrides += [opt for opt, dest, default, _ in SAMPLER_OPTIONS if getattr(args, dest) != default and dest != "clip"]
        if args.clip is not None:
            overrides.append("--clip/--no-clip")
        if args.steps is not None and not args.preset:
            overrides.insert(0, "--steps")
        return guided_diffusion.build_plan(
            args.guided_diffusion, args.flags or "", preset=args.preset, preset_es=args.preset_es, steps=args.steps,
            classifier=args.classifier, classifier_scale=args.classifier_scale, eps_scale=args.eps_scale, eps_schedule=args.eps_schedule,
            sampler_overrides=overrides, device=dev,
        )
    if source == "edm":
        from ..models import edm

        churn = {k: v for k, v in given_sampler_options(args).items() if k.startswith("s_")}
        idle = [opt for opt, dest, default, _ in SAMPLER_OPTIONS if not dest.startswith("s_") and getattr(args, dest) != default]
        if idle:
            warn(f"{', '.join(idle)} do{'es' if len(idle) == 1 else ''} not apply to EDM nets: ignored")
        return edm.build_plan(
            args.edm, allow_pickle=args.allow_pickle, sampler=args.sampler, steps=steps, disc=args.grid_kind, sigma_max=args.sigma_max,
            churn=churn, preset=args.preset, aug_dim=args.aug_dim, eps_scale=args.eps_scale, eps_schedule=args.eps_schedule, device=dev,
        )
    from ..plan import choose_lam

    lam, _ = choose_lam(eps_scale=args.eps_scale, eps_schedule=args.eps_schedule)
    sampler = args.sampler or "ddpm"
    if source == "diffusers":
        from ..integrations import pipelines

        opts = sampler_options(args, sampler)  # without --clip/--no-clip the scheduler's clip_sample decides
        return pipelines.build_plan(
            args.diffusers, sampler=sampler, steps=steps, disc=args.grid_kind or "respaced", sigma_max=args.sigma_max,
            sampler_opts=opts, lam=lam, prompts=read_prompts(args.prompt_file), guidance_scale=args.guidance_scale, device=dev,
        )
    if source == "toy":
        from ..data import toy

        if args.sigma_max is not None:
            raise UserError("--model toy runs on --disc respaced or karras (from sigma 80); it takes no --disc ddim or --sigma-max")
        return toy.build_plan(sampler=sampler, steps=steps, disc=args.grid_kind or "respaced", sampler_opts=sampler_options(args, sampler), lam=lam)
    from ..models import pretrained

    model = pretrained.load_model(args.model or "fmnist", device=dev)
    disc = args.grid_kind or pretrained.default_disc(model, sampler)
    return pretrained.build_plan(model, sampler=sampler, steps=steps, disc=disc, sigma_max=args.sigma_max, sampler_opts=sampler_options(args, sampler), lam=lam, device=dev)


def read_prompts(path: str | None) -> list[str] | None:
    if path is None:
        return None
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompt-file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise UserError(f"--prompt-file {path}: holds no prompts (one a line)")
    return prompts
