"""guided-diffusion (ADM) checkpoints with the flags of its ``image_sample.py``.

``parse_flags`` reads the flag string a user would paste after ``python image_sample.py``
(``--image_size 32 --num_channels 128 ... --timestep_respacing 100 --use_ddim False``), and
``load_checkpoint`` builds our :class:`~epsscale.models.adm.ADMUNet` from it, loads the state
dict (a plain ``torch.save``), and wraps it as a VP denoiser. ``run_settings`` turns the
diffusion flags into our sampler, grid and options:

* ``timestep_respacing`` -> the respaced sigma grid (``""`` keeps all ``diffusion_steps``);
* ``use_ddim`` -> ``ddim`` (eta 0) else ``ddpm`` ancestral: learned-range variance with
  ``learn_sigma``, else ``fixed_large`` (guided-diffusion's default) or ``fixed_small`` with
  ``sigma_small``;
* ``clip_denoised`` -> x0 clipped to [-1, 1] (after ES, as ADM-ES does);
* ``eps_scaler`` (ADM-ES's flag) -> uniform ES lambda: absent means 1.0, and a value <= 0 is
  rejected (ADM-ES's default of 0.0 would divide by zero);
* ``batch_size``, ``num_samples``, ``class_cond``; ``classifier_path`` and ``classifier_scale``
  (``classifier_sample.py``'s) for classifier guidance.

Images are written the way ``image_sample.py`` does: ``((x + 1) * 127.5).clamp(0, 255)``
truncated to uint8, NHWC, in ``arr_0`` (labels in ``arr_1`` when class-conditional).
"""

from __future__ import annotations

import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapters import VPDenoiser
from ..data.images import quantize_adm as to_uint8  # image_sample.py's quantisation
from ..schedules import VPSchedule

__all__ = ["parse_flags", "DIFFUSION_DEFAULTS", "RunSettings", "run_settings", "load_checkpoint", "build_plan"]

# guided-diffusion's diffusion/sampling defaults (script_util.diffusion_defaults + image_sample.py).
DIFFUSION_DEFAULTS: dict[str, Any] = {
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "learn_sigma": False,
    "sigma_small": False,
    "predict_xstart": False,
    "use_kl": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
    "clip_denoised": True,
    "num_samples": 10000,
    "batch_size": 16,
    "use_ddim": False,
    "model_path": "",
    "class_cond": False,
    "eps_scaler": None,
    "classifier_path": "",
    "classifier_scale": None,
}
# guided-diffusion's str2bool spellings.
_BOOL = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False, "t": True, "f": False, "y": True, "n": False}


def parse_flags(text: str) -> dict[str, Any]:
    """Parse ``--name value`` pairs (as pasted from an ``image_sample.py`` command line)."""
    try:
        tokens = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"cannot parse --flags: {e}") from None
    flags: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) < 3:
            raise ValueError(f"--flags: expected '--name value', got {tok!r}")
        name, eq, val = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ValueError(f"--flags: flag --{name} has no value")
            val = tokens[i + 1]
            i += 1
        flags[name.replace("-", "_")] = val
        i += 1
    return flags


def _as_bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    b = _BOOL.get(str(v).strip().lower())
    if b is None:
        raise ValueError(f"flag --{name}: expected True or False, got {v!r}")
    return b


def _as_int(name: str, v: Any, lo: int = 1) -> int:
    try:
        i = int(str(v))
    except ValueError:
        raise ValueError(f"flag --{name}: expected an integer, got {v!r}") from None
    if i < lo:
        raise ValueError(f"flag --{name}: must be >= {lo}, got {i}")
    return i


def _as_float(name: str, v: Any) -> float:
    try:
        x = float(str(v))
    except ValueError:
        raise ValueError(f"flag --{name}: expected a number, got {v!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"flag --{name} must be finite, got {v!r}")
    return x


@dataclass(frozen=True)
class RunSettings:
    sampler: str
    respacing: str
    clip: float | None
    lam: float
    batch_size: int
    num_samples: int
    class_cond: bool
    schedule: VPSchedule
    prediction: str
    learn_sigma: bool
    variance: str
    classifier_path: str
    classifier_scale: float | None


def run_settings(flags: dict[str, Any]) -> RunSettings:
    f = {**DIFFUSION_DEFAULTS, **flags}
    if _as_bool("rescale_timesteps", f["rescale_timesteps"]):
        raise ValueError("flag --rescale_timesteps True is not supported (guided-diffusion checkpoints use False)")
    if f["noise_schedule"] not in ("linear", "cosine"):
        raise ValueError(f"flag --noise_schedule: expected linear or cosine, got {f['noise_schedule']!r}")
    steps = _as_int("diffusion_steps", f["diffusion_steps"])
    lam = 1.0 if f["eps_scaler"] is None else _as_float("eps_scaler", f["eps_scaler"])
    if not lam > 0:
        raise ValueError(f"flag --eps_scaler must be finite and > 0 (it divides eps), got {f['eps_scaler']!r}")
    respacing = str(f["timestep_respacing"]) or str(steps)
    use_ddim = _as_bool("use_ddim", f["use_ddim"])
    learn_sigma = _as_bool("learn_sigma", f["learn_sigma"])
    scale = None if f["classifier_scale"] is None else _as_float("classifier_scale", f["classifier_scale"])
    if scale is not None and scale < 0:
        raise ValueError(f"flag --classifier_scale must be finite and >= 0, got {f['classifier_scale']!r}")
    return RunSettings(
        sampler="ddim" if use_ddim else "ddpm",
        respacing=respacing,
        clip=1.0 if _as_bool("clip_denoised", f["clip_denoised"]) else None,
        lam=lam,
        batch_size=_as_int("batch_size", f["batch_size"]),
        num_samples=_as_int("num_samples", f["num_samples"]),
        class_cond=_as_bool("class_cond", f["class_cond"]),
        schedule=VPSchedule(f["noise_schedule"], steps),
        prediction="x0" if _as_bool("predict_xstart", f["predict_xstart"]) else "eps",
        learn_sigma=learn_sigma,
        variance="learned_range" if learn_sigma else ("fixed_small" if _as_bool("sigma_small", f["sigma_small"]) else "fixed_large"),
        classifier_path=str(f["classifier_path"]),
        classifier_scale=scale,
    )


def load_checkpoint(path: str | os.PathLike, flags: dict[str, Any]) -> tuple[torch.nn.Module, VPDenoiser, RunSettings]:
    """Build the ADM network from the flags, load the checkpoint, wrap it as a denoiser."""
    from ..models.adm import create_adm_model, load_adm_state_dict

    settings = run_settings(flags)
    model_flags = {k: v for k, v in flags.items() if k not in DIFFUSION_DEFAULTS or k in ("learn_sigma", "class_cond")}
    net = create_adm_model(model_flags)
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: checkpoint not found")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, pickled code...
        raise ValueError(f"{p}: cannot read checkpoint ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{p}: expected a state dict, got {type(state).__name__}")
    load_adm_state_dict(net, state)
    net = net.eval().requires_grad_(False)
    den = VPDenoiser(net, settings.schedule, prediction=settings.prediction, learn_sigma=settings.learn_sigma)
    return net, den, settings




class _WithoutLabels:
    """An unconditional denoiser that ignores the class labels meant for a guidance classifier."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, x: Any, sigma: Any, y: Any = None, **cond: Any) -> Any:
        return self.inner(x, sigma, **cond)


def _preset_flags(preset: str, preset_es: str, steps: int | None, flags: dict[str, Any]) -> tuple[dict, dict[str, Any]]:
    """The paper's preset for the chain the flags ask for, and the flags it completes."""
    from ..presets import get_preset

    respacing = str(flags.get("timestep_respacing", ""))
    if respacing:
        # The preset's lambda is the one for the chain the flags ask for.
        n = respacing[4:] if respacing.startswith("ddim") else respacing
        if not n.isdigit():
            raise ValueError(f"--preset needs a plain step count in --timestep_respacing (100, 50 or 20), got {respacing!r}")
        if steps is not None and steps != int(n):
            raise ValueError(f"--steps {steps} and --timestep_respacing {respacing} disagree")
        steps = int(n)
    if _as_bool("use_ddim", flags.get("use_ddim", False)):
        raise ValueError("the paper's ADM presets are for the ancestral sampler; drop --use_ddim True or --preset")
    p = get_preset(preset, steps=steps if steps is not None else 20, es=preset_es)  # type: ignore[arg-type]
    if p["framework"] != "adm":
        raise ValueError(f"preset {preset} is an EDM preset; use it with --edm PKL")
    return p, {**{k: str(v) for k, v in {**p["model_flags"], **p["diffusion_flags"]}.items()}, "class_cond": str(p["conditional"]), **flags}


def _classifier(path: str, flags: dict[str, Any], schedule: VPSchedule, scale: float, device: Any) -> Any:
    """ADM-G's classifier gradient (times ``scale``) from a classifier checkpoint."""
    from ..models.adm import load_adm_state_dict
    from ..models.adm_classifier import classifier_guidance, create_adm_classifier

    clf = create_adm_classifier(flags)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read classifier checkpoint ({str(e).splitlines()[0][:200]})") from None
    load_adm_state_dict(clf, state)
    return classifier_guidance(clf.to(device).eval(), schedule, scale)


def build_plan(
    path: str | os.PathLike,
    flags_text: str = "",
    *,
    preset: str | None = None,
    preset_es: str = "uniform",
    steps: int | None = None,
    classifier: str | None = None,
    classifier_scale: float | None = None,
    eps_scale: float | None = None,
    eps_schedule: str | os.PathLike | None = None,
    sampler_overrides: tuple[str, ...] | list[str] = (),
    device: torch.device | str = "cpu",
) -> Any:
    """The sampling plan of a guided-diffusion checkpoint, run as ``image_sample.py`` /
    ``classifier_sample.py`` would run it with ``flags_text``.

    The flags decide the sampler (``use_ddim``), the chain (``timestep_respacing``), clipping
    and the variance (see :func:`run_settings`). A ``preset`` (the paper's ADM settings at
    ``steps`` T') fills in the flags and λ; ``preset_es="linear"`` takes its 20-step linear
    schedule. A classifier (``classifier``, or ``--classifier_path`` inside the flags) adds
    ADM-G guidance to the ancestral sampler; ES never scales its gradient. λ follows
    :func:`epsscale.plan.choose_lam`; ADM-ES's ``--eps_scaler`` in the flags counts as the
    user's own. ``sampler_overrides`` names sampler options given elsewhere (command-line
    options): they are refused, since the flags decide. ``meta`` carries ``num_samples`` and
    ``batch_size`` of the flags.
    """
    from ..plan import SamplingPlan, choose_lam, fingerprint_file

    flags = parse_flags(flags_text or "")
    own = None
    if "eps_scaler" in flags:
        own = _as_float("eps_scaler", flags["eps_scaler"])
        if not own > 0:
            raise ValueError(f"flag --eps_scaler must be finite and > 0 (it divides eps), got {flags['eps_scaler']!r}")
    choose_lam(eps_scale=eps_scale, eps_schedule=eps_schedule, checkpoint=own)  # lambda given twice: refused first
    if sampler_overrides:
        raise ValueError(f"{', '.join(sampler_overrides)} cannot apply to --guided-diffusion: its sampler, grid and clipping come from --flags (--timestep_respacing, --use_ddim, --clip_denoised)")
    if flags.get("model_path") and Path(flags["model_path"]).resolve() != Path(path).resolve():
        raise ValueError(f"--model_path {flags['model_path']} in --flags is not --guided-diffusion {path}")
    p = None
    if preset:
        p, flags = _preset_flags(preset, preset_es, steps, flags)
    net, den, st = load_checkpoint(path, flags)
    net.to(device)
    lam, _ = choose_lam(eps_scale=eps_scale, eps_schedule=eps_schedule, checkpoint=own, preset=p["lam"] if p else None)
    opts: dict[str, Any] = {"clip": st.clip}
    if st.sampler == "ddpm":
        opts["variance"] = st.variance

    # classifier_sample.py's --classifier_path / --classifier_scale may come inside the flags too.
    clf_path = classifier or st.classifier_path or None
    if classifier and st.classifier_path and Path(classifier).resolve() != Path(st.classifier_path).resolve():
        raise ValueError(f"--classifier {classifier} and --classifier_path {st.classifier_path} in --flags disagree")
    if classifier_scale is not None and st.classifier_scale is not None and classifier_scale != st.classifier_scale:
        raise ValueError(f"--classifier-scale {classifier_scale:g} and --classifier_scale {st.classifier_scale:g} in --flags disagree")
    if st.classifier_scale is not None and not clf_path:
        raise ValueError("--classifier_scale in --flags needs a classifier: --classifier_path in --flags, or --classifier CKPT")
    guided = p["guidance"] if p else None
    if clf_path or guided:
        if st.sampler != "ddpm":
            raise ValueError("classifier guidance is implemented for the ancestral sampler (use_ddim False): ADM-ES divides the model's eps twice on its DDIM + guidance path, so epsscale does not reproduce that path")
        if not clf_path:
            raise ValueError(f"preset {preset} uses classifier guidance: pass --classifier CKPT.pt ({guided['classifier_checkpoint']})")
        if not st.class_cond:
            den = _WithoutLabels(den)  # classifier_sample.py with an unconditional model: the labels steer the classifier only
        scale = next((v for v in (classifier_scale, st.classifier_scale) if v is not None), guided["scale"] if guided else 1.0)
        opts["classifier_grad"] = _classifier(clf_path, {**(guided["classifier_flags"] if guided else {}), **flags}, st.schedule, scale, device)
    from functools import partial

    from ..data.images import to_unit_range

    image_size = int(flags.get("image_size", 64))
    in_ch = int(flags.get("in_channels", 3))
    return SamplingPlan(
        denoiser=den, sigmas=st.schedule.grid(st.respacing), sampler=st.sampler, shape=(in_ch, image_size, image_size), quantize=to_uint8,
        lam=lam, sampler_opts=opts, prior="vp", num_classes=1000 if st.class_cond or "classifier_grad" in opts else None,
        fingerprint=fingerprint_file(path), name=os.fspath(path), device=device, schedule=st.schedule, data_space=partial(to_unit_range, channels=in_ch, size=image_size),
        meta={"source": "guided-diffusion", "flags": flags_text, "preset": preset, "preset_es": preset_es, "num_samples": st.num_samples, "batch_size": st.batch_size, "respacing": st.respacing,
              "classifier": fingerprint_file(clf_path) if clf_path else None},
    )
