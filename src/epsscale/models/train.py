"""The trainer behind ``epsscale train``: an ADM-style eps-prediction model with learned variance.

Loss: the hybrid objective of Nichol & Dhariwal (2021), ``L_simple + L_vlb`` where the VLB term
trains only the variance (the mean's gradient is stopped), computed for one random t per sample
in bits per dim and rescaled by T / 1000 as improved-diffusion does, which weights it by 0.001
relative to the full sum (their lambda). On top of the reference: a linear learning-rate warm-up
and gradient-norm clipping at 1.

Optional input perturbation (Ning et al. 2023, "DDPM-IP"): the network sees
``sqrt(abar) x0 + sqrt(1 - abar) (eps + gamma xi)`` but is asked for eps.

Runs are resumable: everything (weights, EMA, optimiser, RNG states, loss log) lives in the run
directory and is written atomically every ``save_every`` steps.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._atomic import atomic_write, atomic_write_text
from ..schedules import VPSchedule

__all__ = ["TrainConfig", "train", "hybrid_loss", "export_model", "DEMO_FLAGS"]

# The shipped Fashion-MNIST model: 1 channel at 32x32 (28 padded), ADM blocks.
DEMO_FLAGS: dict[str, Any] = {
    "image_size": 32,
    "in_channels": 1,
    "num_channels": 32,
    "channel_mult": "1,2,2",
    "num_res_blocks": 1,
    "attention_resolutions": "8",
    "num_head_channels": 32,
    "learn_sigma": True,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_new_attention_order": True,
    "dropout": 0.1,
    "class_cond": False,
}


@dataclass
class TrainConfig:
    flags: dict = field(default_factory=lambda: dict(DEMO_FLAGS))
    schedule: str = "cosine"
    num_timesteps: int = 1000
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup: int = 200
    steps: int = 8000
    ema_decay: float = 0.999
    input_perturbation: float = 0.0
    seed: int = 0
    save_every: int = 200
    data: str | None = None

    def validate(self) -> None:
        for name in ("batch_size", "steps", "num_timesteps", "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr", "ema_decay", "input_perturbation", "weight_decay"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.lr == 0:
            raise ValueError("lr must be > 0 (at 0 nothing trains)")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def _normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p of 8-bit data x in [-1, 1] under N(mean, e^{2 log_scale}) integrated over its bin."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (centered + 1 / 255))
    cdf_min = torch.special.ndtr(inv_std * (centered - 1 / 255))
    log_cdf_plus = cdf_plus.clamp_min(1e-12).log()
    log_one_minus_cdf_min = (1 - cdf_min).clamp_min(1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp_min(1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def hybrid_loss(net: nn.Module, schedule: VPSchedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, *, gamma: float = 0.0, xi: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """L_simple + L_vlb (bits/dim) for an eps-prediction net with learned-range variance."""
    abar = schedule.alphas_cumprod.to(x0.device)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    betas = schedule.betas.to(x0.device)
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_logvar_clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]]))

    def g(a: torch.Tensor) -> torch.Tensor:
        return a[t].float().reshape(-1, 1, 1, 1)

    # Forward process (with optional input perturbation).
    noise_in = eps if not gamma else eps + gamma * xi
    x_t = g(abar.sqrt()) * x0 + g((1 - abar).sqrt()) * noise_in
    out = net(x_t, t)
    c = x0.shape[1]
    eps_pred, v = out[:, :c], out[:, c:]
    mse = ((eps - eps_pred) ** 2).mean(dim=(1, 2, 3))

    # VLB term, mean gradient stopped: only the variance learns from it.
    c0 = g(abar_prev.sqrt() * betas / (1 - abar))
    ct = g((1 - betas).sqrt() * (1 - abar_prev) / (1 - abar))
    true_mean = c0 * x0 + ct * x_t
    x0_pred = (x_t - g((1 - abar).sqrt()) * eps_pred.detach()) / g(abar.sqrt())
    model_mean = c0 * x0_pred + ct * x_t
    frac = (v + 1) / 2
    model_logvar = frac * g(betas.log()) + (1 - frac) * g(post_logvar_clipped)
    kl = _normal_kl(true_mean, g(post_logvar_clipped), model_mean, model_logvar).mean(dim=(1, 2, 3)) / math.log(2)
    nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar).mean(dim=(1, 2, 3)) / math.log(2)
    # improved-diffusion rescales the VLB by T / 1000, so lambda = 0.001 holds for any T.
    vb = torch.where(t == 0, nll, kl) * (schedule.num_timesteps / 1000.0)

    loss = (mse + vb).mean()
    return loss, {"mse": float(mse.detach().mean()), "vb": float(vb.detach().mean())}


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _build(cfg: TrainConfig) -> nn.Module:
    from .adm import create_adm_model

    return create_adm_model(cfg.flags)


def train(cfg: TrainConfig, run_dir: str | os.PathLike, *, progress: bool = True, max_seconds: float | None = None) -> Path:
    """Train (or resume) in ``run_dir``. Returns the run directory.

    ``max_seconds`` stops cleanly after a checkpoint once that much wall time has passed, so a
    long run can be split over several sessions; rerun the same command to continue.
    """
    from safetensors.torch import save as save_safetensors
    from tqdm import tqdm

    from ..data.fashion_mnist import load_fashion_mnist, to_model_space

    cfg.validate()
    run = Path(run_dir)
    ckpt_path = run / "checkpoint.pt"
    cfg_path = run / "train_config.json"
    if cfg_path.exists():
        # The step count may change between invocations (the schedule does not depend on it),
        # so a run can be extended, or exported at an earlier checkpoint. Where the data lives
        # may change too: it is Fashion-MNIST's train split wherever it is read from.
        saved = json.loads(cfg_path.read_text())
        mine = json.loads(json.dumps(asdict(cfg)))
        if {k: v for k, v in saved.items() if k not in ("steps", "data")} != {k: v for k, v in mine.items() if k not in ("steps", "data")}:
            raise ValueError(f"{run} holds a run with a different configuration; use a new --run-dir")

    # Data first, so that a wrong --data leaves no run directory behind; then model, optimiser.
    images, _ = load_fashion_mnist("train", cfg.data)
    data = to_model_space(images, cfg.flags["image_size"])  # [60000, 1, 32, 32]
    if not cfg_path.exists():
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg_path, json.dumps(asdict(cfg), indent=2) + "\n")
    schedule = VPSchedule(cfg.schedule, cfg.num_timesteps)
    torch.manual_seed(cfg.seed)
    net = _build(cfg).to(memory_format=torch.channels_last)
    ema = _build(cfg).to(memory_format=torch.channels_last)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, log = 0, []
    if ckpt_path.exists():
        try:
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{ckpt_path}: not a readable checkpoint ({type(err).__name__}); delete it to restart the run from step 0") from None
        if state["step"] > cfg.steps:
            raise ValueError(f"{run} is already at step {state['step']}, past --steps {cfg.steps}")
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        step, log = state["step"], state["log"]

    def save() -> None:
        state = {"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": step, "log": log}
        atomic_write(ckpt_path, lambda f: torch.save(state, f))
        atomic_write(run / "ema.safetensors", lambda f: f.write(save_safetensors({k: v.contiguous() for k, v in ema.state_dict().items()})))
        atomic_write_text(run / "loss.json", json.dumps(log) + "\n")

    start = time.time()
    net.train()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train", unit="step")
    acc: dict[str, list[float]] = {"loss": [], "mse": [], "vb": []}
    while step < cfg.steps:
        # Batch.
        idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
        x0 = data[idx].contiguous(memory_format=torch.channels_last)
        t = torch.randint(cfg.num_timesteps, (cfg.batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen).contiguous(memory_format=torch.channels_last)
        xi = torch.randn(x0.shape, generator=gen) if cfg.input_perturbation else None

        # Optimiser step with linear warmup.
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
        loss, parts = hybrid_loss(net, schedule, x0, t, eps, gamma=cfg.input_perturbation, xi=xi)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

        # EMA (with the usual warm-up of the decay).
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        step += 1
        acc["loss"].append(loss.item())
        acc["mse"].append(parts["mse"])
        acc["vb"].append(parts["vb"])
        bar.update(1)
        bar.set_postfix(loss=f"{acc['loss'][-1]:.4f}")

        if step % cfg.save_every == 0 or step == cfg.steps:
            log.append({"step": step, **{k: float(np.mean(v)) for k, v in acc.items()}, "time": time.time()})
            acc = {k: [] for k in acc}
            save()
            if max_seconds is not None and time.time() - start > max_seconds:
                break
    bar.close()
    return run


def export_model(run_dir: str | os.PathLike, out_prefix: str | os.PathLike, *, extra: dict | None = None) -> tuple[Path, Path]:
    """Write the EMA weights as ``<prefix>.safetensors`` and the config as ``<prefix>.json``."""
    from safetensors.torch import load_file
    from safetensors.torch import save as save_safetensors

    run = Path(run_dir)
    cfg = json.loads((run / "train_config.json").read_text())
    log = json.loads((run / "loss.json").read_text())
    weights = load_file(str(run / "ema.safetensors"))
    out = Path(out_prefix)
    meta = {
        "format": "epsscale.model/1",
        "arch": "adm",
        "flags": cfg["flags"],
        "schedule": cfg["schedule"],
        "num_timesteps": cfg["num_timesteps"],
        "prediction": "eps",
        "learn_sigma": bool(cfg["flags"].get("learn_sigma", False)),
        "data": "fashion-mnist",
        "crop": 28,
        "training": {**{k: cfg[k] for k in ("batch_size", "lr", "steps", "ema_decay", "input_perturbation", "seed")}, "steps_done": log[-1]["step"] if log else 0, "final_loss": log[-1] if log else None},
        **(extra or {}),
    }
    st = out.with_suffix(".safetensors")
    atomic_write(st, lambda f: f.write(save_safetensors({k: v.contiguous() for k, v in weights.items()})))
    atomic_write_text(out.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return st, out.with_suffix(".json")
