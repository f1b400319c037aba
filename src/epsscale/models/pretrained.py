"""Loading epsscale models: safetensors weights plus a JSON config, shipped or from a directory.

A model is ``<prefix>.safetensors`` + ``<prefix>.json`` (written by
:func:`epsscale.models.train.export_model`). ``load_model("fmnist")`` loads the shipped
Fashion-MNIST model; ``load_model("path/to/dir")`` loads ``model.safetensors`` + ``model.json``
from a directory, and ``load_model("path/prefix")`` a named pair.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..adapters import VPDenoiser
from ..samplers import VP_SAMPLERS
from ..schedules import VPSchedule, vp_grid

if TYPE_CHECKING:
    from ..plan import SamplingPlan

__all__ = ["LoadedModel", "load_model", "build_plan", "default_disc", "shipped_plan", "shipped_discretisation", "shipped_sampler_options", "shipped_lambdas", "DEMO_SETTINGS", "ES_FILE", "ASSETS", "SHIPPED"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED = {"fmnist": ASSETS / "fmnist_adm"}
MODEL_FORMAT = "epsscale.model/1"
# The shipped model's tuned Epsilon Scaling, per sampler (with how it was chosen).
ES_FILE = ASSETS / "fmnist_adm_es.json"

# How the demo and the benchmarks run the shipped model: (label, sampler, discretisation, steps,
# sigma_max of a karras grid). The model config's ``sampling`` block overrides the grid of each
# sampler it names (shipped_discretisation): it holds the starts measured on this model by
# benchmarks/start_sweep.py. The grids below are only the fallback for a config without that block
# (guided-diffusion's "ddimN" stride for DDIM and a Karras grid from sigma 13 for Euler, the
# previous shipped model's compromise).
DEMO_SETTINGS = (("DDPM", "ddpm", "respaced", 20, None), ("DDIM", "ddim", "ddim", 20, None), ("Euler", "euler", "karras", 20, 13.0))


@dataclass
class LoadedModel:
    name: str
    path: Path  # the weights file
    net: nn.Module
    denoiser: VPDenoiser
    schedule: VPSchedule
    config: dict

    @property
    def shape(self) -> tuple[int, int, int]:
        f = self.config["flags"]
        return (int(f.get("in_channels", 3)), int(f["image_size"]), int(f["image_size"]))

    @property
    def num_classes(self) -> int | None:
        return 1000 if self.config["flags"].get("class_cond") else None

    @property
    def karras_sigma_max(self) -> float:
        """Where a Karras grid starts by default: the config's ``sampling.karras_sigma_max``, else EDM's 80."""
        return float(self.config.get("sampling", {}).get("karras_sigma_max", 80.0))

    def start_sigma(self, sampler: str) -> float:
        """Where ``sampler``'s Karras grid starts by default: the config's ``sampling.sigma_max``
        entry for it (where the model was measured to want it), else :attr:`karras_sigma_max`."""
        table = self.config.get("sampling", {}).get("sigma_max", {})
        return float(table[sampler]) if isinstance(table, dict) and sampler in table else self.karras_sigma_max

    @property
    def crop(self) -> int:
        """The image size that is saved: the config's ``crop`` (a padded training set), else the full size."""
        return int(self.config.get("crop") or self.shape[-1])


def _resolve(name_or_path: str | os.PathLike) -> Path:
    s = str(name_or_path)
    if s in SHIPPED:
        return SHIPPED[s]
    p = Path(s)
    if p.is_dir():
        return p / "model"
    if p.suffix in (".json", ".safetensors"):
        return p.with_suffix("")
    if p.with_suffix(".json").exists():
        return p
    raise ValueError(f"unknown model {s!r}: expected one of {', '.join(SHIPPED)} or a directory holding model.json + model.safetensors")


def load_config(prefix: Path) -> dict:
    path = prefix.with_suffix(".json")
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: model config not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path}: model config is not valid JSON") from None
    if not isinstance(cfg, dict) or cfg.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not an epsscale model config (expected 'format': {MODEL_FORMAT!r})")
    for key, typ in (("flags", dict), ("schedule", str), ("num_timesteps", int), ("prediction", str)):
        if not isinstance(cfg.get(key), typ):
            raise ValueError(f"{path}: field {key!r} must be a {typ.__name__}")
    if cfg.get("arch") != "adm":
        raise ValueError(f"{path}: unsupported arch {cfg.get('arch')!r} (expected 'adm')")
    crop = cfg.get("crop")
    if crop is not None and (isinstance(crop, bool) or not isinstance(crop, int) or crop < 1):
        raise ValueError(f"{path}: field 'crop' must be a positive integer, got {crop!r}")
    if crop is not None and crop > int(cfg["flags"].get("image_size", 0) or 0):
        raise ValueError(f"{path}: field 'crop' ({crop}) is larger than flags.image_size")
    if "learn_sigma" in cfg and "learn_sigma" in cfg["flags"] and bool(cfg["learn_sigma"]) != (str(cfg["flags"]["learn_sigma"]).lower() in ("true", "1")):
        raise ValueError(f"{path}: 'learn_sigma' ({cfg['learn_sigma']}) disagrees with flags.learn_sigma ({cfg['flags']['learn_sigma']})")
    return cfg


def load_model(name_or_path: str | os.PathLike = "fmnist", *, device: str | torch.device = "cpu") -> LoadedModel:
    """Build the network, load its weights, and wrap it as a VE denoiser."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .adm import create_adm_model, load_adm_state_dict

    prefix = _resolve(name_or_path)
    cfg = load_config(prefix)
    weights = prefix.with_suffix(".safetensors")
    if not weights.exists():
        raise ValueError(f"{weights}: model weights not found")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights}: cannot read safetensors ({str(e).splitlines()[0]})") from None
    net = create_adm_model(cfg["flags"])
    load_adm_state_dict(net, state)
    net = net.eval().requires_grad_(False).to(device).to(memory_format=torch.channels_last)
    schedule = VPSchedule(cfg["schedule"], cfg["num_timesteps"])
    den = VPDenoiser(net, schedule, prediction=cfg["prediction"], learn_sigma=bool(cfg.get("learn_sigma")))
    return LoadedModel(str(name_or_path), weights, net, den, schedule, cfg)


def shipped_discretisation(sampler: str) -> tuple[str, float | None]:
    """(grid kind, Karras sigma_max) for ``sampler`` on the shipped model, as the demo and the
    benchmarks run it: the model config's ``sampling`` block (``disc`` and ``sigma_max`` per sampler,
    else ``karras_sigma_max``, where the model was measured to want them), else DEMO_SETTINGS'
    choice and a Karras grid from sigma 13 for the other sigma-space samplers."""
    sampling = load_config(SHIPPED["fmnist"]).get("sampling", {})
    table = sampling.get("disc")
    if isinstance(table, dict) and sampler in table:
        disc = str(table[sampler])
        tops = sampling.get("sigma_max", {})
        top = tops.get(sampler) if isinstance(tops, dict) else None
        return disc, (float(top if top is not None else sampling.get("karras_sigma_max", 80.0)) if disc == "karras" else None)
    for _, s, kind, _, sigma_max in DEMO_SETTINGS:
        if s == sampler:
            return kind, sigma_max
    return "karras", 13.0


def shipped_sampler_options(sampler: str) -> dict:
    """ADM's x0 clipping to [-1, 1] for the VP samplers (ddpm, ddim); nothing for the others."""
    return {"clip": 1.0} if sampler in VP_SAMPLERS else {}


def shipped_lambdas() -> dict[str, float]:
    """The uniform ES lambda per sampler chosen for the shipped model (see the file's provenance)."""
    if not ES_FILE.exists():
        raise FileNotFoundError(f"{ES_FILE} is missing: the demo needs the shipped ES settings")
    d = json.loads(ES_FILE.read_text())
    return {k: float(v["b"]) for k, v in d["samplers"].items()}


def shipped_plan(sampler: str, steps: int, lam: Any = 1.0, *, model: "str | os.PathLike | LoadedModel" = "fmnist", device: str | torch.device = "cpu") -> "SamplingPlan":
    """The shipped model's plan for ``sampler`` as the demo and the benchmarks run it."""
    disc, sigma_max = shipped_discretisation(sampler)
    return build_plan(model, sampler=sampler, steps=steps, disc=disc, sigma_max=sigma_max, sampler_opts=shipped_sampler_options(sampler), lam=lam, device=device)


def default_disc(model: LoadedModel, sampler: str) -> str:
    """The grid a sampler runs on for this model unless told: the config's ``sampling.disc``
    entry for the sampler (where the model was measured to want it), else ``"respaced"``."""
    table = model.config.get("sampling", {}).get("disc", {})
    return str(table.get(sampler, "respaced")) if isinstance(table, dict) else "respaced"


def build_plan(
    model: str | os.PathLike | LoadedModel = "fmnist",
    *,
    sampler: str = "ddpm",
    steps: int = 20,
    disc: str = "respaced",
    sigma_max: float | None = None,
    sampler_opts: dict | None = None,
    lam: Any = 1.0,
    device: str | torch.device = "cpu",
) -> "SamplingPlan":
    """The sampling plan of an epsscale model (shipped name, directory or prefix, or a loaded model).

    ``disc`` and ``sigma_max`` choose the grid (:func:`epsscale.schedules.vp_grid`; a Karras grid
    starts at ``sigma_max``, else where the model's ``sampling`` block says ``sampler`` should
    start: :meth:`LoadedModel.start_sigma`). ``ddpm`` and
    ``ddim`` clip x0 to [-1, 1] unless ``sampler_opts`` has a ``clip`` (None: off), as ADM's
    ``clip_denoised`` does. Samples are quantised as guided-diffusion does, centre-cropped to the
    model's ``crop``.
    """
    from functools import partial

    from ..data.fashion_mnist import to_model_space
    from ..data.images import quantize_adm
    from ..plan import SamplingPlan, fingerprint_file

    m = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    sampler_opts = dict(sampler_opts or {})
    if sampler in VP_SAMPLERS:
        sampler_opts.setdefault("clip", 1.0)
    sigmas = vp_grid(m.schedule, steps, disc, m.start_sigma(sampler) if sigma_max is None else sigma_max)
    return SamplingPlan(
        denoiser=m.denoiser, sigmas=sigmas, sampler=sampler, shape=m.shape, quantize=partial(quantize_adm, crop=m.crop),
        lam=lam, sampler_opts=sampler_opts or {}, prior="vp", num_classes=m.num_classes, fingerprint=fingerprint_file(m.path),
        name=m.name, device=device, schedule=m.schedule, data_space=partial(to_model_space, size=m.shape[-1]),
        meta={"source": "epsscale", "disc": disc, "data": m.config.get("data")},
    )
