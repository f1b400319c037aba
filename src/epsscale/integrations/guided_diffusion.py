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

import numpy as np
import torch

from ..adapters import VPDenoiser
from ..schedules import VPSchedule

__all__ = ["parse_flags", "DIFFUSION_DEFAULTS", "RunSettings", "run_settings", "load_checkpoint", "to_uint8"]

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


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``image_sample.py``'s quantisation: ((x + 1) * 127.5).clamp(0, 255) -> uint8 NHWC."""
    from ..data.fashion_mnist import from_model_space

    return from_model_space(x, size=x.shape[-1])  # the same quantisation, without a crop
