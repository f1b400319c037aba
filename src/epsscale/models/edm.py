"""Opt-in loading of NVlabs EDM network pickles.

EDM (Karras et al. 2022) and the forks that share its code (EDM-ES, PFGM++) publish networks as
pickles: ``pickle.load(f)["ema"]`` is the EMA network, an ``EDMPrecond`` / ``VPPrecond`` /
``VEPrecond`` module. Those pickles carry Python source (``torch_utils.persistence``), so
unpickling one runs code from the file, and needs EDM's ``dnnlib`` and ``torch_utils`` packages
importable. epsscale's own checkpoints are safetensors plus JSON; this loader is an explicit
opt-in (``allow_pickle=True``) and warns every time it runs.

The network it returns is what :class:`epsscale.adapters.EDMDenoiser` wraps: called as
``net(x, sigma, class_labels)``, with ``sigma_min``, ``sigma_max``, ``round_sigma``,
``img_channels``, ``img_resolution`` and ``label_dim``.
"""

from __future__ import annotations

import os
import pickle
import warnings
from typing import Any

import torch

__all__ = ["EDM_NET_ATTRIBUTES", "load_edm_pickle"]

#: What EDM's ``generate.py`` (and :class:`~epsscale.adapters.EDMDenoiser`) use of a network.
EDM_NET_ATTRIBUTES = ("sigma_min", "sigma_max", "round_sigma", "img_channels", "img_resolution", "label_dim")


def load_edm_pickle(
    path: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    key: str = "ema",
    device: torch.device | str | None = None,
) -> Any:
    """Load the network of an NVlabs EDM pickle (``pickle.load(f)[key]``, key ``"ema"``).

    Args:
        path: the ``.pkl`` file (download it first; URLs are not fetched).
        allow_pickle: must be True. Unpickling runs code stored in the file: only load files
            you trust. A ``UserWarning`` says so on every load.
        key: the entry of the pickled dict that holds the network.
        device: move the network there (``net.to(device)``) when given.

    Returns:
        The network, as pickled (EDM stores the EMA network in eval mode without gradients). Wrap
        it with :class:`epsscale.adapters.EDMDenoiser`.

    Raises:
        ValueError: ``allow_pickle`` is not True, the file is missing, or the pickle holds no
            EDM-like network under ``key``.
        ImportError: the pickle needs a module that is not importable, usually EDM's
            ``dnnlib``/``torch_utils``: EDM's repository must be on PYTHONPATH.
    """
    if allow_pickle is not True:
        raise ValueError(
            f"{os.fspath(path)}: refusing to unpickle an EDM network (pickles run code); "
            "pass allow_pickle=True only for files you trust"
        )
    if not os.path.isfile(path):
        raise ValueError(f"{os.fspath(path)}: no such file")
    warnings.warn(
        f"{os.fspath(path)}: unpickling runs code stored in the file; only load pickles you trust",
        UserWarning,
        stacklevel=2,
    )

    # Unpickle; a missing module is almost always EDM's own packages.
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except ModuleNotFoundError as err:
        missing = (err.name or "?").split(".")[0]
        raise ImportError(
            f"{os.fspath(path)}: the pickle needs module {missing!r}, which is not importable; "
            "EDM's repository (github.com/NVlabs/edm, which provides dnnlib and torch_utils) must be on PYTHONPATH",
            name=missing,
        ) from None
    except (pickle.UnpicklingError, EOFError, AttributeError, IndexError, TypeError, ValueError) as err:
        raise ValueError(f"{os.fspath(path)}: not a readable pickle ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None

    # Find the network and check that it looks like an EDM *Precond module.
    if not isinstance(data, dict) or key not in data:
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{os.fspath(path)}: expected a dict with key {key!r} (an EDM network pickle), found {found}")
    net = data[key]
    missing_attrs = [a for a in EDM_NET_ATTRIBUTES if not hasattr(net, a)]
    if missing_attrs or not callable(net):
        what = f"lacks {', '.join(missing_attrs)}" if missing_attrs else "is not callable"
        raise ValueError(f"{os.fspath(path)}: {key!r} holds a {type(net).__name__} that {what}; not an EDM network")
    if device is not None and hasattr(net, "to"):  # a duck-typed net without .to stays as it is
        net = net.to(device)
    return net


# What EDM's sampler options are called on the command line (refusals name them).
CHURN_OPTIONS = {"s_churn": "--s-churn", "s_tmin": "--s-tmin", "s_tmax": "--s-tmax", "s_noise": "--s-noise"}


def build_plan(
    path: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    sampler: str | None = None,
    steps: int = 18,
    disc: str | None = None,
    sigma_max: float | None = None,
    churn: dict[str, float] | None = None,
    preset: str | None = None,
    aug_dim: int | None = None,
    eps_scale: float | None = None,
    eps_schedule: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
) -> Any:
    """The sampling plan of an NVlabs EDM (or PFGM++) network pickle, as EDM's ``generate.py`` runs it.

    EDM nets run on EDM's Karras grid (σ from 0.002 to 80, ρ = 7, rounded by the net;
    ``sigma_max`` moves its top, within the net's range) with ``euler``, ``heun`` or
    ``dpmpp_2m``. ``churn`` holds the EDM sampler options the user set (``s_churn``, ``s_tmin``,
    ``s_tmax``, ``s_noise``). A ``preset`` (:mod:`epsscale.presets`) sets the sampler, steps,
    grid, options and λ; options beside it are refused. ``aug_dim`` D starts a PFGM++ network
    from its prior (radius r = σ√D). λ follows :func:`epsscale.plan.choose_lam`. Samples are
    quantised as EDM's ``generate.py`` does.
    """
    from functools import partial

    from ..adapters import EDMDenoiser
    from ..data.images import quantize_edm, to_unit_range
    from ..plan import SamplingPlan, choose_lam, fingerprint_file
    from ..samplers import VP_SAMPLERS
    from ..schedules import sigmas_karras

    churn = dict(churn or {})
    if disc not in (None, "karras"):
        raise ValueError(f"EDM nets run on EDM's Karras grid (--sigma-max sets its top); --disc {disc} is for discrete VP models")
    net = load_edm_pickle(path, allow_pickle=allow_pickle, device=device if torch.device(device).type != "cpu" else None)
    opts: dict[str, Any] = dict(churn)
    sigma_min, top, rho = 0.002, 80.0, 7.0
    preset_lam = None
    if preset:
        from ..presets import get_preset

        if sampler not in (None, "heun", "euler"):
            raise ValueError(f"EDM presets are for heun or euler, not --sampler {sampler}")
        p = get_preset(preset, steps=steps, sampler=sampler)
        if p["framework"] != "edm":
            raise ValueError(f"preset {preset} is an ADM preset; use it with --guided-diffusion CKPT")
        if aug_dim is not None:
            raise ValueError(f"--preset {preset} holds EDM's lambdas, not PFGM++'s; give --eps-scale with --aug-dim")
        if churn:
            raise ValueError(f"{', '.join(CHURN_OPTIONS[k] for k in churn)} cannot apply with --preset {preset}: the preset sets EDM's sampler options")
        sampler, steps, opts = p["sampler"], p["steps"], dict(p["sampler_kwargs"])
        sigma_min, top, rho = p["grid"]["sigma_min"], p["grid"]["sigma_max"], p["grid"]["rho"]
        preset_lam = p["lam"]
    if sampler is None or sampler in VP_SAMPLERS:
        raise ValueError("EDM nets are sampled with euler, heun or dpmpp_2m (give --sampler, or --preset)")
    if sampler == "dpmpp_2m" and churn:
        raise ValueError(f"{', '.join(CHURN_OPTIONS[k] for k in churn)} cannot apply to dpmpp_2m (EDM's churn is for euler and heun)")
    lam, _ = choose_lam(eps_scale=eps_scale, eps_schedule=eps_schedule, preset=preset_lam)
    if sigma_max is not None:
        top = sigma_max
    sigma_min, top = max(sigma_min, float(net.sigma_min)), min(top, float(net.sigma_max))
    sigmas = sigmas_karras(steps, sigma_min, top, rho)
    rounded = torch.as_tensor(net.round_sigma(sigmas[:-1]), dtype=torch.float64)  # EDM rounds its grid
    sigmas = torch.cat([rounded, rounded.new_zeros(1)])
    shape = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
    return SamplingPlan(
        denoiser=EDMDenoiser(net), sigmas=sigmas, sampler=sampler, shape=shape, quantize=quantize_edm, lam=lam, sampler_opts=opts,
        prior="ve" if aug_dim is None else "pfgmpp", aug_dim=aug_dim, num_classes=int(net.label_dim) or None,
        fingerprint=fingerprint_file(path), name=os.fspath(path),
        device=device, data_space=partial(to_unit_range, channels=shape[0], size=shape[1]), meta={"source": "edm", "preset": preset, "disc": "karras"},
    )
