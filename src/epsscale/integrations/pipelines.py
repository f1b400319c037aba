"""diffusers pipelines saved on disk, sampled by epsscale's own samplers: ``--diffusers DIR``.

:func:`build_plan` loads a pipeline offline (``DiffusionPipeline.from_pretrained(DIR,
local_files_only=True)``) and turns it into a :class:`~epsscale.plan.SamplingPlan`: its network
(``unet`` or ``transformer``) becomes a VP denoiser on the scheduler's own ᾱ table, and the
plan's grid, sampler and Epsilon Scaling are epsscale's, so ``sample``, ``measure`` and
``calibrate`` work on it like on any other model. (To put ES into the pipeline's *own* loop
instead, use :func:`epsscale.integrations.diffusers.apply_epsilon_scaling`.)

What is read from the pipeline:

* the scheduler's ``betas`` (any DDPM-type schedule: linear, scaled_linear, cosine), its
  ``prediction_type`` (``epsilon``, ``v_prediction``, ``sample``) and, for ``ddpm``/``ddim``
  without ``--clip``, its ``clip_sample`` / ``clip_sample_range``;
* learned variance: the network returns twice the channels (DiT; ``variance_type`` learned);
* the network: ``UNet2DModel`` (unconditional, or class-conditional with ``num_class_embeds``),
  a DiT transformer (class-conditional; the null class is ``num_classes``, as DiT trains it),
  or ``UNet2DConditionModel`` with the pipeline's ``encode_prompt`` (text: prompts from
  ``--prompt-file``, cycled over the seeds; the negative prompt is empty);
* latent pipelines: ``vae`` (``AutoencoderKL``: latents are ``mode() · scaling_factor``) or
  ``vqvae`` (``VQModel``, as ``LDMPipeline``: unscaled); samples are decoded before they are
  quantised, and real images are encoded for ``measure``/``calibrate``.

Classifier-free guidance (``--guidance-scale``, default the pipeline's own: DiT 4, text 7.5)
mixes the conditional and unconditional predictions before ES (:mod:`epsscale.guidance`).
Images are quantised as diffusers' ``numpy_to_pil`` does: ``round(clamp(x / 2 + 0.5, 0, 1) · 255)``.
Flow-matching schedulers (SD3, Flux) start at pure noise (σ = ∞ in VE units) and are refused
here; use the hook integration for them.
"""

from __future__ import annotations

import inspect
import os
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data.images import quantize_diffusers
from ..samplers import VP_SAMPLERS

__all__ = ["load_pipeline", "build_plan"]

_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def load_pipeline(path: str | os.PathLike, device: torch.device | str = "cpu") -> Any:
    """``DiffusionPipeline.from_pretrained(path, local_files_only=True)`` with one-line errors."""
    p = Path(path)
    if not (p / "model_index.json").is_file():
        raise ValueError(f"--diffusers {p}: not a saved diffusers pipeline (no model_index.json; save one with pipe.save_pretrained(DIR))")
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        raise ImportError("--diffusers needs the diffusers package: pip install 'epsscale[diffusers]'") from None
    from diffusers.utils import logging as diffusers_logging

    shown = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # its loading bar is noise on epsscale's stderr
    try:
        pipe = DiffusionPipeline.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # missing weights, unknown classes, a broken config...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--diffusers {p}: cannot load the pipeline ({first[:200]})") from None
    finally:
        if shown:
            diffusers_logging.enable_progress_bar()
    return pipe.to(device)


class _Network:
    """The pipeline's network as ``net(x_vp, t, y=None) -> output``, for :class:`~epsscale.adapters.VPDenoiser`.

    ``y`` is a class label per sample (``None``: the null class, for guidance) or, for text
    pipelines, the index of each sample's prompt in ``embeddings`` (``None``: the empty prompt).
    """

    def __init__(self, module: torch.nn.Module, kind: str, *, null_class: int | None = None, embeddings: torch.Tensor | None = None, negative: torch.Tensor | None = None) -> None:
        self.module, self.kind = module, kind
        self.null_class, self.embeddings, self.negative = null_class, embeddings, negative

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "text":
            emb = self.negative.expand(x.shape[0], *self.negative.shape[1:]) if y is None else self.embeddings[y.long()]  # type: ignore[union-attr, index]
            return self.module(x, t, encoder_hidden_states=emb).sample
        labels = None if y is None else y.long()
        if labels is None and self.null_class is not None:  # the unconditional branch of guidance
            labels = torch.full((x.shape[0],), self.null_class, device=x.device, dtype=torch.long)
        if self.kind == "transformer":
            return self.module(x, timestep=t, class_labels=labels).sample
        return self.module(x, t, class_labels=labels).sample if labels is not None else self.module(x, t).sample


def _latent_codec(pipe: Any) -> tuple[Any, float] | None:
    """The pipeline's autoencoder and the factor its latents are scaled by, or None (pixel space)."""
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        return vae, float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    vq = getattr(pipe, "vqvae", None)
    if vq is not None:
        return vq, 1.0  # LDMPipeline decodes its latents as they are
    return None


def _decode(codec: tuple[Any, float] | None, x: torch.Tensor) -> np.ndarray:
    if codec is None:
        return quantize_diffusers(x)
    ae, scale = codec
    with torch.no_grad():
        z = (x / scale).to(next(ae.parameters()).dtype)
        return quantize_diffusers(ae.decode(z).sample)


def _encode(codec: tuple[Any, float] | None, channels: int, size: int, images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> the model's x0: [-1, 1] pixels, or the autoencoder's latents."""
    from ..data.images import to_unit_range

    if codec is None:
        return to_unit_range(images, channels, size)
    ae, scale = codec
    imgs = np.asarray(images)
    x = to_unit_range(imgs, int(ae.config.in_channels), imgs.shape[1] if imgs.ndim == 4 else -1)
    with torch.no_grad():
        dev = next(ae.parameters()).device
        enc = ae.encode(x.to(dev))
        z = enc.latent_dist.mode() if hasattr(enc, "latent_dist") else enc.latents
    if z.shape[-1] != size:
        raise ValueError(f"these images encode to {z.shape[-1]}x{z.shape[-1]} latents; the model takes {size}x{size}")
    return (z * scale).float().cpu()


def build_plan(
    path: str | os.PathLike | Any,
    *,
    sampler: str = "ddpm",
    steps: int = 20,
    disc: str = "respaced",
    sigma_max: float | None = None,
    sampler_opts: dict | None = None,
    lam: Any = 1.0,
    prompts: Sequence[str] | None = None,
    guidance_scale: float | None = None,
    device: torch.device | str = "cpu",
) -> Any:
    """The sampling plan of a diffusers pipeline (a saved folder, or a loaded pipeline).

    ``disc``/``sigma_max`` choose the grid on the scheduler's ᾱ table
    (:func:`epsscale.schedules.vp_grid`). ``prompts`` are for text-to-image pipelines (each
    seed, in order, takes the next prompt); ``guidance_scale`` is the classifier-free guidance
    scale (default: the pipeline's own for conditional models; 1 is off).
    """
    from ..adapters import VPDenoiser
    from ..guidance import classifier_free
    from ..plan import SamplingPlan, fingerprint_file
    from ..schedules import VPSchedule, vp_grid

    pipe = load_pipeline(path, device) if isinstance(path, (str, os.PathLike)) else path
    name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else type(pipe).__name__
    sched = getattr(pipe, "scheduler", None)
    if sched is None or getattr(sched, "betas", None) is None:
        kind = type(sched).__name__ if sched is not None else "no scheduler"
        raise ValueError(f"--diffusers {name}: {kind} is not a DDPM-type (beta) scheduler; flow-matching pipelines are not sampled by epsscale's samplers (use epsscale.integrations.diffusers.apply_epsilon_scaling on the pipeline)")
    prediction = _PREDICTIONS.get(str(sched.config.get("prediction_type", "epsilon")))
    if prediction is None:
        raise ValueError(f"--diffusers {name}: prediction_type {sched.config.get('prediction_type')!r} is not one of {', '.join(_PREDICTIONS)}")
    schedule = VPSchedule.from_betas(torch.as_tensor(sched.betas, dtype=torch.float64))

    # The network and its conditioning.
    module = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if module is None:
        raise ValueError(f"--diffusers {name}: the pipeline has neither a unet nor a transformer")
    module.eval().requires_grad_(False)
    cfg = module.config
    codec = _latent_codec(pipe)
    channels = int(cfg.in_channels)
    size = int(cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0])
    num_classes: int | None = None
    default_scale = 1.0
    if getattr(pipe, "transformer", None) is not None:
        if "encoder_hidden_states" in inspect.signature(module.forward).parameters and not getattr(cfg, "num_embeds_ada_norm", None):
            raise ValueError(f"--diffusers {name}: a text-conditioned transformer (PixArt-style) is not sampled by epsscale's samplers; use apply_epsilon_scaling on the pipeline")
        num_classes = int(getattr(cfg, "num_embeds_ada_norm", 0) or 0) or None
        net = _Network(module, "transformer", null_class=num_classes)
        default_scale = 4.0 if num_classes else 1.0  # DiTPipeline's default
    elif "encoder_hidden_states" in inspect.signature(module.forward).parameters:
        if getattr(cfg, "addition_embed_type", None):
            raise ValueError(f"--diffusers {name}: this UNet needs added conditioning ({cfg.addition_embed_type}, as SDXL's); epsscale samples SD-1/2-style text pipelines only (use apply_epsilon_scaling on the pipeline)")
        if not prompts:
            raise ValueError(f"--diffusers {name}: a text-to-image pipeline needs --prompt-file FILE (prompts, one a line)")
        if not hasattr(pipe, "encode_prompt"):
            raise ValueError(f"--diffusers {name}: the pipeline has no encode_prompt, so epsscale cannot turn prompts into its text embeddings")
        with torch.no_grad():
            emb, neg = pipe.encode_prompt(prompt=list(prompts), device=torch.device(device), num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=[""] * len(prompts))[:2]
        net = _Network(module, "text", embeddings=emb, negative=neg[:1])
        num_classes = len(prompts)
        default_scale = 7.5  # StableDiffusionPipeline's default
    else:
        n = int(getattr(cfg, "num_class_embeds", 0) or 0)
        num_classes = n or None
        net = _Network(module, "unet", null_class=None)
    if prompts and net.kind != "text":
        raise ValueError("--prompt-file is for text-to-image pipelines; this one takes no prompts")
    out_channels = int(getattr(cfg, "out_channels", channels) or channels)
    den: Any = VPDenoiser(net, schedule, prediction=prediction, learn_sigma=out_channels == 2 * channels, dtype=next(module.parameters()).dtype)
    scale = default_scale if guidance_scale is None else float(guidance_scale)
    if scale != 1.0:
        if net.kind == "unet":
            raise ValueError("--guidance-scale needs a pipeline that was trained with an unconditional branch (DiT's null class, or prompts); this one has none")
        den = classifier_free(den, scale, {"y": None})

    opts = dict(sampler_opts or {})
    if sampler in VP_SAMPLERS and "clip" not in opts and sched.config.get("clip_sample", False):
        opts["clip"] = float(sched.config.get("clip_sample_range", 1.0))
    sigmas = vp_grid(schedule, steps, disc, 80.0 if sigma_max is None else sigma_max)
    return SamplingPlan(
        denoiser=den, sigmas=sigmas, sampler=sampler, shape=(channels, size, size), quantize=partial(_decode, codec),
        lam=lam, sampler_opts=opts, prior="vp", num_classes=num_classes, fingerprint=fingerprint_file(path) if isinstance(path, (str, os.PathLike)) else name,
        cycle_labels=net.kind == "text", name=name, device=device, schedule=schedule, data_space=partial(_encode, codec, channels, size),
        meta={"source": "diffusers", "disc": disc, "prompts": list(prompts) if prompts else None, "guidance_scale": scale},
    )
