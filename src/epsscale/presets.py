"""Presets: the paper's settings as small keyword sets, each with its provenance.

Ning et al., "Elucidating the Exposure Bias in Diffusion Models" (ICLR 2024), as published in the
READMEs of forever208/ADM-ES and forever208/EDM-ES (see docs/paper.md, "Results tables" and "Model settings (presets)"):

* ADM (guided-diffusion, DDPM ancestral sampling with learned variance and x0 clipping, 1000
  training steps respaced to T' in {100, 50, 20}): ``adm-cifar10``, ``adm-lsun-tower64``,
  ``adm-ffhq128``, ``adm-imagenet64`` and ``adm-imagenet128`` (classifier guidance, scale 0.5).
  ES is uniform ``lambda = b`` at every T'; at T' = 20 the linear ES* schedule
  ``lambda_i = b + k i`` is available with ``es="linear"``.
* EDM (NVlabs EDM's CIFAR-10 VP checkpoints, deterministic, Karras grid with sigma_min 0.002,
  sigma_max 80, rho 7): ``edm-cifar10-uncond`` and ``edm-cifar10-cond``, Heun with
  ``steps`` 18/11/7 (NFE 35/21/13) or Euler with ``steps`` 35/21/13.

``PRESETS`` holds the raw table; :func:`get_preset` picks a sampler, a step count and an ES
schedule, and returns everything a run needs::

    p = get_preset("adm-cifar10", steps=20)
    net = create_adm_model(p["model_flags"])                      # then load the checkpoint
    den = eps_scaling(VPDenoiser(net, p["schedule"], learn_sigma=True), p["lam"], sigmas=p["sigmas"])
    x = ddpm(den, prior(z, p["sigmas"][0], kind="vp"), p["sigmas"], **p["sampler_kwargs"])
"""

from __future__ import annotations

import copy
from types import MappingProxyType
from typing import Any, Literal, Mapping

from .samplers import nfe
from .scaling import Linear, Uniform
from .schedules import VPSchedule, sigmas_karras

__all__ = ["PRESETS", "get_preset", "preset_names"]

_PAPER = "Ning et al., ICLR 2024 (arXiv 2308.15321)"
_ADM_ES = "forever208/ADM-ES README"
_EDM_ES = "forever208/EDM-ES README"
_OPENAI = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021"
_NVLABS = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained"


# ---------------------------------------------------------------------------------------------
# ADM (guided-diffusion) settings.
# ---------------------------------------------------------------------------------------------

# Every ADM setting: 1000 steps, learned sigma (learned range), resblock up/down, AdaGN.
_ADM_COMMON_MODEL = dict(resblock_updown=True, learn_sigma=True, use_scale_shift_norm=True)
_ADM_SAMPLER = dict(variance="learned_range", clip=1.0)  # image_sample.py: clip_denoised=True


def _diffusion(noise_schedule: str, rescale_learned_sigmas: bool) -> dict:
    return dict(
        diffusion_steps=1000,
        noise_schedule=noise_schedule,
        learn_sigma=True,
        rescale_learned_sigmas=rescale_learned_sigmas,  # a training loss flag; no effect on sampling
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
    )


def _adm(
    title: str,
    model_flags: dict,
    diffusion_flags: dict,
    lam: dict[int, float],
    linear20: tuple[float, float],
    fid: dict[str, float],
    checkpoint: str,
    guidance: dict | None = None,
) -> dict:
    """One ADM preset. ``fid`` keys: "<T'>" (baseline), "<T'>-es" (uniform), "20-es*" (linear)."""
    return dict(
        framework="adm",
        title=title,
        model_flags={**model_flags, **_ADM_COMMON_MODEL},
        diffusion_flags=diffusion_flags,
        samplers={"ddpm": tuple(sorted(lam, reverse=True))},
        sampler_kwargs={"ddpm": dict(_ADM_SAMPLER)},
        lam={"ddpm": dict(lam)},
        lam_linear={("ddpm", 20): dict(k=linear20[0], b=linear20[1])},
        fid=fid,
        guidance=guidance,
        conditional=bool(model_flags.get("class_cond", False)),
        checkpoint=checkpoint,
        source=f"{_PAPER}, ADM table; flags from {_ADM_ES}",
    )


_ADM_PRESETS = {
    "adm-cifar10": _adm(
        "CIFAR-10 32x32, unconditional",
        dict(image_size=32, num_channels=128, num_res_blocks=3, num_head_channels=32,
             attention_resolutions="16,8", use_new_attention_order=True, dropout=0.3),
        _diffusion("cosine", rescale_learned_sigmas=False),
        lam={100: 1.017, 50: 1.017, 20: 1.017},
        linear20=(0.0025, 1.0),
        fid={"100": 3.37, "100-es": 2.17, "50": 4.43, "50-es": 2.49, "20": 10.36, "20-es": 5.15, "20-es*": 4.31},
        checkpoint="ADM-ES release (Google Drive link in the ADM-ES README)",
    ),
    "adm-lsun-tower64": _adm(
        "LSUN tower 64x64, unconditional",
        dict(image_size=64, num_channels=192, num_res_blocks=3, num_head_channels=64,
             attention_resolutions="32,16,8", use_new_attention_order=True, dropout=0.1, use_fp16=True),
        _diffusion("cosine", rescale_learned_sigmas=True),
        lam={100: 1.006, 50: 1.007, 20: 1.011},
        linear20=(0.0008, 1.0034),
        fid={"100": 3.59, "100-es": 2.91, "50": 7.28, "50-es": 3.68, "20": 23.92, "20-es": 8.22, "20-es*": 7.60},
        checkpoint="ADM-ES release (Google Drive link in the ADM-ES README)",
    ),
    "adm-ffhq128": _adm(
        "FFHQ 128x128, unconditional",
        dict(image_size=128, num_channels=256, num_res_blocks=3, num_head_channels=64,
             attention_resolutions="32,16,8", use_new_attention_order=True, dropout=0.1, use_fp16=True),
        _diffusion("cosine", rescale_learned_sigmas=True),
        lam={100: 1.005, 50: 1.007, 20: 1.008},
        linear20=(0.0004, 1.0042),
        fid={"100": 14.52, "100-es": 6.77, "50": 26.15, "50-es": 9.50, "20": 59.35, "20-es": 26.14, "20-es*": 24.83},
        checkpoint="ADM-ES release (Google Drive link in the ADM-ES README)",
    ),
    "adm-imagenet64": _adm(
        "ImageNet 64x64, class-conditional",
        dict(image_size=64, num_channels=192, num_res_blocks=3, num_head_channels=64,
             attention_resolutions="32,16,8", use_new_attention_order=True, dropout=0.1, use_fp16=True,
             class_cond=True),
        _diffusion("cosine", rescale_learned_sigmas=True),
        lam={100: 1.006, 50: 1.006, 20: 1.006},
        linear20=(0.0002, 1.0041),
        fid={"100": 2.71, "100-es": 2.39, "50": 3.75, "50-es": 3.07, "20": 10.96, "20-es": 7.52, "20-es*": 7.37},
        checkpoint=f"{_OPENAI}/64x64_diffusion.pt",
    ),
    "adm-imagenet128": _adm(
        "ImageNet 128x128, class-conditional, classifier guidance (scale 0.5)",
        dict(image_size=128, num_channels=256, num_res_blocks=2, num_heads=4,
             attention_resolutions="32,16,8", dropout=0.0, use_fp16=True, class_cond=True),
        _diffusion("linear", rescale_learned_sigmas=False),
        lam={100: 1.004, 50: 1.004, 20: 1.005},
        linear20=(0.00022, 1.00291),
        fid={"100": 3.55, "100-es": 3.37, "50": 5.15, "50-es": 4.33, "20": 12.48, "20-es": 9.95, "20-es*": 9.86},
        checkpoint=f"{_OPENAI}/128x128_diffusion.pt",
        guidance=dict(
            kind="classifier",
            scale=0.5,
            classifier_flags=dict(
                image_size=128, classifier_width=128, classifier_depth=2,
                classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
                classifier_resblock_updown=True, classifier_pool="attention", classifier_use_fp16=False,
            ),
            classifier_checkpoint=f"{_OPENAI}/128x128_classifier.pt",
        ),
    ),
}


# ---------------------------------------------------------------------------------------------
# EDM settings (CIFAR-10 VP checkpoints, deterministic samplers).
# ---------------------------------------------------------------------------------------------

_EDM_GRID = dict(sigma_min=0.002, sigma_max=80.0, rho=7.0)
_EDM_DETERMINISTIC = dict(s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0)


def _edm(title: str, lam: dict[str, dict[int, float]], fid: dict[str, float], checkpoint: str, conditional: bool) -> dict:
    """One EDM preset. ``lam[sampler][steps]``; ``fid`` keys "<sampler>-<NFE>" and "...-es"."""
    return dict(
        framework="edm",
        title=title,
        grid=dict(_EDM_GRID),
        samplers={s: tuple(lam[s]) for s in lam},
        sampler_kwargs={s: dict(_EDM_DETERMINISTIC) for s in lam},
        lam={s: dict(v) for s, v in lam.items()},
        lam_linear={},
        fid=fid,
        guidance=None,
        conditional=conditional,
        checkpoint=checkpoint,
        source=f"{_PAPER}, EDM table; sampler settings from {_EDM_ES}",
    )


_EDM_PRESETS = {
    "edm-cifar10-uncond": _edm(
        "CIFAR-10 32x32, unconditional, EDM VP checkpoint",
        lam={"heun": {18: 1.0005, 11: 0.9985, 7: 1.0060}, "euler": {35: 1.0034, 21: 1.0043, 13: 1.0048}},
        fid={"heun-35": 1.97, "heun-35-es": 1.95, "heun-21": 2.33, "heun-21-es": 2.24, "heun-13": 7.16, "heun-13-es": 6.54,
             "euler-35": 3.81, "euler-35-es": 2.80, "euler-21": 6.29, "euler-21-es": 4.32, "euler-13": 12.28, "euler-13-es": 8.39},
        checkpoint=f"{_NVLABS}/edm-cifar10-32x32-uncond-vp.pkl",
        conditional=False,
    ),
    "edm-cifar10-cond": _edm(
        "CIFAR-10 32x32, class-conditional, EDM VP checkpoint",
        lam={"heun": {18: 1.0006, 11: 0.9983, 7: 1.0070}, "euler": {35: 1.0035, 21: 1.0045, 13: 1.0051}},
        fid={"heun-35": 1.82, "heun-35-es": 1.80, "heun-21": 2.17, "heun-21-es": 2.08, "heun-13": 6.69, "heun-13-es": 6.16,
             "euler-35": 3.74, "euler-35-es": 2.59, "euler-21": 5.91, "euler-21-es": 3.74, "euler-13": 10.66, "euler-13-es": 6.59},
        checkpoint=f"{_NVLABS}/edm-cifar10-32x32-cond-vp.pkl",
        conditional=True,
    ),
}  # fmt: skip


def _freeze(d: Any) -> Any:
    if isinstance(d, dict):
        return MappingProxyType({k: _freeze(v) for k, v in d.items()})
    return d


#: name -> raw preset (read-only). Use :func:`get_preset` to pick sampler, steps and ES schedule.
PRESETS: Mapping[str, Mapping[str, Any]] = _freeze({**_ADM_PRESETS, **_EDM_PRESETS})


def preset_names() -> list[str]:
    """The preset names, in table order."""
    return list(PRESETS)


def _thaw(d: Any) -> Any:
    if isinstance(d, Mapping):
        return {k: _thaw(v) for k, v in d.items()}
    return copy.copy(d)


# ---------------------------------------------------------------------------------------------
# Lookup.
# ---------------------------------------------------------------------------------------------


def get_preset(
    name: str,
    *,
    steps: int | None = None,
    sampler: str | None = None,
    es: Literal["uniform", "linear"] = "uniform",
) -> dict[str, Any]:
    """The paper's setting ``name`` for one sampler and step count, with its lambda.

    Args:
        name: a key of :data:`PRESETS` (``"adm-cifar10"``, ``"edm-cifar10-cond"``, ...).
        steps: sampling steps: T' for ADM (100, 50, 20), EDM's ``--steps`` for EDM (Heun 18/11/7,
            Euler 35/21/13). ``None`` takes the first (largest) one.
        sampler: ``"ddpm"`` for ADM; ``"heun"`` or ``"euler"`` for EDM. ``None`` takes the
            preset's first (ADM: ddpm, EDM: heun).
        es: ``"uniform"`` (lambda = b, the paper's ES) or ``"linear"`` (ES*, lambda_i = b + k i;
            ADM at 20 steps only).

    Returns:
        A new dict (safe to modify) with ``name``, ``framework``, ``sampler``, ``steps``, ``nfe``,
        ``sigmas`` (the float64 grid with a trailing 0), ``sampler_kwargs`` (keyword arguments of
        the ``epsscale.samplers`` function), ``lam`` (a :class:`~epsscale.scaling.Uniform` or
        :class:`~epsscale.scaling.Linear`; bind ``Linear`` with ``sigmas``), ``fid``
        (``{"baseline": ..., "es": ...}``, 50k-sample FIDs from the paper), ``conditional``,
        ``guidance``, ``checkpoint`` and ``provenance``. ADM presets add ``model_flags`` (for
        :func:`epsscale.models.adm.create_adm_model`), ``diffusion_flags`` (with
        ``timestep_respacing``) and ``schedule`` (the :class:`~epsscale.schedules.VPSchedule`);
        EDM presets add ``grid`` (the :func:`~epsscale.schedules.sigmas_karras` arguments).

    Raises:
        ValueError: unknown name, sampler, steps or es, listing the valid ones.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)}")
    raw = PRESETS[name]
    samplers = list(raw["samplers"])
    sampler = samplers[0] if sampler is None else sampler
    if sampler not in raw["samplers"]:
        raise ValueError(f"preset {name!r} has no sampler {sampler!r}: expected one of {', '.join(samplers)}")
    valid_steps = list(raw["samplers"][sampler])
    steps = valid_steps[0] if steps is None else steps
    if isinstance(steps, bool) or steps not in valid_steps:
        listed = ", ".join(f"{s} (NFE {nfe(sampler, s)})" if sampler == "heun" else str(s) for s in valid_steps)
        raise ValueError(f"preset {name!r} with sampler {sampler!r} has no setting for steps={steps!r}: expected one of {listed}")
    steps = int(steps)

    # Lambda: uniform b, or the linear ES* pair.
    if es == "uniform":
        b = raw["lam"][sampler][steps]
        lam: Uniform | Linear = Uniform(b)
        what = f"uniform b={b}"
        fid_key = "es"
    elif es == "linear":
        pair = raw["lam_linear"].get((sampler, steps))
        if pair is None:
            have = [f"{s} at steps={n}" for s, n in raw["lam_linear"]] or ["none"]
            raise ValueError(f"preset {name!r} has no linear ES schedule for {sampler} at steps={steps} (published: {', '.join(have)})")
        lam = Linear(pair["k"], pair["b"])
        what = f"linear k={pair['k']}, b={pair['b']}"
        fid_key = "es*"
    else:
        raise ValueError(f"unknown es {es!r}: expected 'uniform' or 'linear'")

    out: dict[str, Any] = dict(
        name=name,
        framework=raw["framework"],
        title=raw["title"],
        sampler=sampler,
        steps=steps,
        nfe=nfe(sampler, steps),
        sampler_kwargs=_thaw(raw["sampler_kwargs"][sampler]),
        lam=lam,
        conditional=raw["conditional"],
        guidance=_thaw(raw["guidance"]),
        checkpoint=raw["checkpoint"],
    )
    fid = raw["fid"]
    if raw["framework"] == "adm":
        schedule = VPSchedule(raw["diffusion_flags"]["noise_schedule"], raw["diffusion_flags"]["diffusion_steps"])
        out["model_flags"] = _thaw(raw["model_flags"])
        out["diffusion_flags"] = {**_thaw(raw["diffusion_flags"]), "timestep_respacing": str(steps)}
        out["schedule"] = schedule
        out["sigmas"] = schedule.grid(str(steps))
        out["fid"] = {"baseline": fid[str(steps)], "es": fid[f"{steps}-{fid_key}"]}
        where = f"T'={steps}"
    else:
        out["grid"] = _thaw(raw["grid"])
        out["sigmas"] = sigmas_karras(steps, **raw["grid"])
        key = f"{sampler}-{out['nfe']}"
        out["fid"] = {"baseline": fid[key], "es": fid[f"{key}-es"]}
        where = f"{sampler} steps={steps} (NFE {out['nfe']})"
    out["provenance"] = (
        f"{raw['source']}: {raw['title']}, {where}, ES {what} "
        f"(FID {out['fid']['baseline']} -> {out['fid']['es']})"
    )
    return out
