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
from typing import Any

import torch
from torch import nn

from ..adapters import VPDenoiser
from ..schedules import VPSchedule

__all__ = ["LoadedModel", "load_model", "ASSETS", "SHIPPED"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED = {"fmnist": ASSETS / "fmnist_adm"}
MODEL_FORMAT = "epsscale.model/1"


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


def describe(model: LoadedModel) -> dict[str, Any]:
    n = sum(p.numel() for p in model.net.parameters())
    return {"name": model.name, "parameters": n, "schedule": model.config["schedule"], "shape": model.shape}
