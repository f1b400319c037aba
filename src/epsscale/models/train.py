"""The trainer behind ``epsscale train``: an ADM-style eps-prediction model with learned variance.

Loss: the hybrid objective of Nichol & Dhariwal (2021), ``L_simple + L_vlb`` where the VLB term
trains only the variance (the mean's gradient is stopped), computed for one random t per sample
in bits per dim and rescaled by T / 1000 as improved-diffusion does, which weights it by 0.001
relative to the full sum (their lambda). On top of the reference: a linear learning-rate warm-up
and gradient-norm clipping at 1.

Optional input perturbation (Ning et al. 2023, "DDPM-IP"): the network sees
``sqrt(abar) x0 + sqrt(1 - abar) (eps + gamma xi)`` but is asked for eps.

Runs are resumable: everything (weights, EMA, optimiser, RNG states, loss log) lives in the run
directory and is written atomically every ``save_every`` steps, and when the run is interrupted
(Ctrl-C or SIGTERM) at the end of the step in flight. ``snapshot_every`` also keeps the EMA
weights and the full checkpoint of every N-th step under ``snapshots/``, for studies of training
progress and for forks (``init_from``: continue another run's checkpoint with, say, input
perturbation switched on).

Learning rate: a linear warm-up over ``warmup`` steps, then constant (``lr_schedule="constant"``)
or a half cosine from ``lr`` down to 0 at ``steps`` (``"cosine"``, the default).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._atomic import atomic_write, atomic_write_text
from ..checks import check_int
from ..schedules import VPSchedule

__all__ = ["TrainConfig", "TrainingInterrupted", "train", "hybrid_loss", "optimiser_step", "export_model", "learning_rate", "DEMO_FLAGS"]

# The training recipe's network (the shipped model's successor, in training: README, "The
# Fashion-MNIST model"): 1 channel at 28x28 (no padding: 28 -> 14 -> 7), ADM blocks.
DEMO_FLAGS: dict[str, Any] = {
    "image_size": 28,
    "in_channels": 1,
    "num_channels": 32,
    "channel_mult": "1,2,2",
    "num_res_blocks": 2,
    "attention_resolutions": "14,7",
    "num_head_channels": 32,
    "learn_sigma": True,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_new_attention_order": True,
    "dropout": 0.0,
    "class_cond": False,
}
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    flags: dict = field(default_factory=lambda: dict(DEMO_FLAGS))
    schedule: str = "cosine"
    num_timesteps: int = 1000
    batch_size: int = 64
    lr: float = 5e-4
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    warmup: int = 500
    steps: int = 16000
    ema_decay: float = 0.9995
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
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {self.warmup!r}")
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


def loss_tables(schedule: VPSchedule, device: str | torch.device) -> dict[str, torch.Tensor]:
    """The per-timestep constants of :func:`hybrid_loss` on ``device`` (float64, indexed by t).

    Computing them once per run, rather than every step, spares a GPU run two host-to-device
    copies (each a synchronisation) per step; the values are the same either way."""
    abar = schedule.alphas_cumprod.to(device)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    betas = schedule.betas.to(device)
    post_var = betas * (1 - abar_prev) / (1 - abar)
    return {
        "sqrt_abar": abar.sqrt(),
        "sqrt_one_minus_abar": (1 - abar).sqrt(),
        "c0": abar_prev.sqrt() * betas / (1 - abar),
        "ct": (1 - betas).sqrt() * (1 - abar_prev) / (1 - abar),
        "log_beta": betas.log(),
        "post_logvar_clipped": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
    }


def hybrid_loss(
    net: nn.Module, schedule: VPSchedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, *, gamma: float = 0.0, xi: torch.Tensor | None = None,
    tables: dict[str, torch.Tensor] | None = None, sync: bool = True,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """L_simple + L_vlb (bits/dim) for an eps-prediction net with learned-range variance.

    Returns the loss and its parts, ``{"mse": ..., "vb": ...}``, as floats; with ``sync=False``
    as detached 0-d tensors, so that a GPU step need not wait for its result. ``tables``:
    :func:`loss_tables` of ``schedule`` on ``x0``'s device (computed here if not given)."""
    k = tables if tables is not None else loss_tables(schedule, x0.device)

    def g(a: torch.Tensor) -> torch.Tensor:
        return a[t].float().reshape(-1, 1, 1, 1)

    # Forward process (with optional input perturbation).
    noise_in = eps if not gamma else eps + gamma * xi
    x_t = g(k["sqrt_abar"]) * x0 + g(k["sqrt_one_minus_abar"]) * noise_in
    out = net(x_t, t)
    c = x0.shape[1]
    eps_pred, v = out[:, :c], out[:, c:]
    mse = ((eps - eps_pred) ** 2).mean(dim=(1, 2, 3))

    # VLB term, mean gradient stopped: only the variance learns from it.
    c0 = g(k["c0"])
    ct = g(k["ct"])
    true_mean = c0 * x0 + ct * x_t
    x0_pred = (x_t - g(k["sqrt_one_minus_abar"]) * eps_pred.detach()) / g(k["sqrt_abar"])
    model_mean = c0 * x0_pred + ct * x_t
    frac = (v + 1) / 2
    model_logvar = frac * g(k["log_beta"]) + (1 - frac) * g(k["post_logvar_clipped"])
    kl = _normal_kl(true_mean, g(k["post_logvar_clipped"]), model_mean, model_logvar).mean(dim=(1, 2, 3)) / math.log(2)
    nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar).mean(dim=(1, 2, 3)) / math.log(2)
    # improved-diffusion rescales the VLB by T / 1000, so lambda = 0.001 holds for any T.
    vb = torch.where(t == 0, nll, kl) * (schedule.num_timesteps / 1000.0)

    loss = (mse + vb).mean()
    parts = {"mse": mse.detach().mean(), "vb": vb.detach().mean()}
    return loss, ({k: float(v) for k, v in parts.items()} if sync else parts)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based): warm-up, then constant or cosine."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    p = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

# Fields that may change between invocations of one run: where the data lives (it is Fashion-MNIST's
# train split wherever it is read from), and, for a constant learning rate, the step count, so that
# a run can be extended or exported at an earlier checkpoint. A cosine schedule depends on it.
_FREE_FIELDS = ("data",)


def _config_difference(saved: dict, mine: dict) -> list[str]:
    """Names (and both values) of the fields that make ``mine`` another run than ``saved``."""
    free = set(_FREE_FIELDS)
    if mine.get("lr_schedule") == "constant" and saved.get("lr_schedule", "constant") == "constant":
        free.add("steps")
    diff = []
    for key in sorted(set(saved) | set(mine)):
        if key in free:
            continue
        a, b = saved.get(key, "<absent>"), mine.get(key, "<absent>")
        if key == "flags" and isinstance(a, dict) and isinstance(b, dict):
            diff += [f"flags.{k}: {a.get(k, '<absent>')!r} in the run, {b.get(k, '<absent>')!r} now" for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
        elif a != b:
            diff.append(f"{key}: {a!r} in the run, {b!r} now")
    return diff


def optimiser_step(
    net: nn.Module, opt: torch.optim.Optimizer, ema_params: list[torch.Tensor], schedule: VPSchedule, x0: torch.Tensor, t: torch.Tensor,
    eps: torch.Tensor, xi: torch.Tensor | None, cfg: TrainConfig, step: int, tables: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One step of the recipe at ``step`` (0-based): the learning rate of the step, the hybrid loss,
    gradients clipped to norm 1, AdamW, then the EMA (its decay warmed up as (1 + step)/(10 + step))."""
    for group in opt.param_groups:
        group["lr"] = learning_rate(cfg, step)
    loss, parts = hybrid_loss(net, schedule, x0, t, eps, gamma=cfg.input_perturbation, xi=xi, tables=tables, sync=False)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    decay = min(cfg.ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, list(net.parameters()), 1 - decay)
    return loss, parts


def _build(cfg: TrainConfig) -> nn.Module:
    from .adm import create_adm_model

    return create_adm_model(cfg.flags)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped ``train`` after it saved the step in flight; ``step`` says which."""

    def __init__(self, step: int, run: Path) -> None:
        super().__init__(f"interrupted: checkpoint saved at step {step} in {run}; rerun the same command to resume from there")
        self.step = step


def train(
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    progress: bool = True,
    max_seconds: float | None = None,
    snapshot_every: int | None = None,
    init_from: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Train (or resume) in ``run_dir``. Returns the run directory.

    ``max_seconds`` stops cleanly after a checkpoint once that much wall time has passed, so a
    long run can be split over several sessions; rerun the same command to continue.
    ``snapshot_every`` keeps ``snapshots/ema_stepNNNNNN.safetensors`` and
    ``snapshots/checkpoint_stepNNNNNN.pt`` every that many steps. ``init_from`` starts a new run
    from another run's checkpoint file (weights, EMA, optimiser, RNG states, step and loss log);
    only the configuration in ``cfg`` is new. Ctrl-C (or SIGTERM) finishes the step in flight,
    saves a checkpoint and raises ``TrainingInterrupted``.
    """
    from safetensors.torch import save as save_safetensors
    from tqdm import tqdm

    from ..data.fashion_mnist import load_fashion_mnist, to_model_space

    cfg.validate()
    run = Path(run_dir)
    ckpt_path = run / "checkpoint.pt"
    cfg_path = run / "train_config.json"
    if snapshot_every is not None:
        check_int(snapshot_every, "snapshot_every")
    if cfg_path.exists():
        saved = json.loads(cfg_path.read_text())
        diff = _config_difference(saved, json.loads(json.dumps(asdict(cfg))))
        if diff:
            raise ValueError(f"{run} holds a run with a different configuration ({'; '.join(diff)}); use a new --run-dir")
    init_path = Path(init_from) if init_from is not None else None
    fork_record = run / "init_from.json"
    if init_path is not None and ckpt_path.exists():
        # A fork that was interrupted: the same command resumes it from its own checkpoint.
        recorded = json.loads(fork_record.read_text()) if fork_record.is_file() else {}
        if recorded.get("path") != str(init_path.resolve()):
            raise ValueError(f"{run} already holds a checkpoint of another run; --init-from starts a new run (or reruns the same fork)")
        init_path = None
    elif init_path is not None and not init_path.is_file():
        raise ValueError(f"--init-from {init_path}: no such checkpoint file")

    # Data first, so that a wrong --data leaves no run directory behind; then model, optimiser.
    images, _ = load_fashion_mnist("train", cfg.data)
    data = to_model_space(images, int(cfg.flags["image_size"]))  # [60000, 1, size, size]
    if not cfg_path.exists():
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg_path, json.dumps(asdict(cfg), indent=2) + "\n")
    if init_path is not None:
        atomic_write_text(fork_record, json.dumps({"path": str(init_path.resolve())}) + "\n")
    schedule = VPSchedule(cfg.schedule, cfg.num_timesteps)
    device = torch.device(device)
    data = data.to(device)
    torch.manual_seed(cfg.seed)
    net = _build(cfg).to(device, memory_format=torch.channels_last)
    ema = _build(cfg).to(device, memory_format=torch.channels_last)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, log = 0, []
    acc: dict[str, list[float]] = {"loss": [], "mse": [], "vb": []}
    source = ckpt_path if ckpt_path.exists() else init_path
    if source is not None:
        try:
            state = torch.load(source, map_location=device, weights_only=True)
        except Exception as err:
            raise ValueError(f"{source}: not a readable checkpoint ({type(err).__name__}); delete it to restart the run from step 0") from None
        if state["step"] > cfg.steps:
            raise ValueError(f"{source} is already at step {state['step']}, past --steps {cfg.steps}")
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        step, log = state["step"], state["log"]
        acc = state.get("acc", acc)  # the losses of a block that an interrupt cut short

    def save(path: Path = ckpt_path) -> None:
        state = {"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": step, "log": log, "acc": _floats(acc)}
        atomic_write(path, lambda f: torch.save(state, f))
        if path == ckpt_path:
            atomic_write(run / "ema.safetensors", lambda f: f.write(save_safetensors({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})))
            atomic_write_text(run / "loss.json", json.dumps(log) + "\n")
            atomic_write_text(run / "state.json", json.dumps({"step": step}) + "\n")  # the step ema.safetensors is at

    def snapshot() -> None:
        snaps = run / "snapshots"
        snaps.mkdir(exist_ok=True)
        shutil.copyfile(run / "ema.safetensors", snaps / f".ema_step{step:06d}.tmp")
        os.replace(snaps / f".ema_step{step:06d}.tmp", snaps / f"ema_step{step:06d}.safetensors")
        save(snaps / f"checkpoint_step{step:06d}.pt")

    # Ctrl-C and SIGTERM finish the step in flight, so that the checkpoint is a consistent state.
    stop: list[int] = []
    handlers = {}
    if threading_main():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda signum, frame: stop.append(signum))

    # On a GPU, nothing in a step waits for the GPU: the constants live there, the batch goes over
    # from pinned memory, the losses stay tensors until a checkpoint logs them, and the EMA is one
    # multi-tensor update. On the CPU the arithmetic is the same, operation for operation.
    tables = loss_tables(schedule, device)
    if device.type == "cuda":
        def put(x: torch.Tensor) -> torch.Tensor:
            return x.pin_memory().to(device, non_blocking=True)
    else:
        def put(x: torch.Tensor) -> torch.Tensor:
            return x.to(device)
    ema_params = list(ema.parameters())

    start = time.time()
    net.train()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train", unit="step")
    try:
        while step < cfg.steps:
            # Batch (drawn on the CPU, so that a run is the same batch for batch on any device).
            idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
            x0 = data[put(idx)].contiguous(memory_format=torch.channels_last)
            t = put(torch.randint(cfg.num_timesteps, (cfg.batch_size,), generator=gen))
            eps = put(torch.randn(x0.shape, generator=gen)).contiguous(memory_format=torch.channels_last)
            xi = put(torch.randn(x0.shape, generator=gen)) if cfg.input_perturbation else None

            loss, parts = optimiser_step(net, opt, ema_params, schedule, x0, t, eps, xi, cfg, step, tables)
            step += 1
            acc["loss"].append(loss.detach())
            acc["mse"].append(parts["mse"])
            acc["vb"].append(parts["vb"])
            bar.update(1)

            saved = False
            if step % cfg.save_every == 0 or step == cfg.steps:
                acc = _floats(acc)
                log.append({"step": step, **{k: float(np.mean(v)) for k, v in acc.items()}, "lr": learning_rate(cfg, step - 1), "time": time.time()})
                bar.set_postfix(loss=f"{log[-1]['loss']:.4f}")
                acc = {k: [] for k in acc}
                save()
                saved = True
            if snapshot_every and step % snapshot_every == 0:
                if not saved:  # between checkpoints: save one first
                    save()
                    saved = True
                snapshot()
            if saved and max_seconds is not None and time.time() - start > max_seconds:  # stop after a save
                break
            if stop:
                save()
                raise TrainingInterrupted(step, run)
    finally:
        bar.close()
        for sig, h in handlers.items():
            signal.signal(sig, h)
    return run


def _floats(acc: dict[str, list]) -> dict[str, list[float]]:
    """The step losses as Python floats (they are kept as tensors between checkpoints)."""
    return {k: [float(x) for x in v] for k, v in acc.items()}


def threading_main() -> bool:
    """Signal handlers can only be installed from the main thread."""
    import threading

    return threading.current_thread() is threading.main_thread()


def export_model(run_dir: str | os.PathLike, out_prefix: str | os.PathLike, *, extra: dict | None = None, step: int | None = None) -> tuple[Path, Path]:
    """Write the EMA weights as ``<prefix>.safetensors`` and the config as ``<prefix>.json``.

    ``step``: the EMA weights of that snapshot (``snapshots/ema_stepNNNNNN.safetensors``)
    instead of the run's latest.
    """
    from safetensors.torch import load_file
    from safetensors.torch import save as save_safetensors

    run = Path(run_dir)
    cfg = json.loads((run / "train_config.json").read_text())
    log = json.loads((run / "loss.json").read_text())
    source = run / "ema.safetensors" if step is None else run / "snapshots" / f"ema_step{step:06d}.safetensors"
    if step is None and (run / "state.json").is_file():
        step_done = int(json.loads((run / "state.json").read_text())["step"])
    else:
        step_done = step if step is not None else (log[-1]["step"] if log else 0)
    if not source.is_file():
        raise ValueError(f"{source}: no such EMA weights" + ("" if step is None else " (was the run trained with --snapshot-every?)"))
    weights = load_file(str(source))
    if step is not None:
        log = [e for e in log if e["step"] <= step]
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
        "crop": min(28, int(cfg["flags"].get("image_size", 28))),  # Fashion-MNIST is 28 px; a bigger net pads it
        "training": {**{k: cfg[k] for k in ("batch_size", "lr", "steps", "ema_decay", "input_perturbation", "seed") if k in cfg}, "lr_schedule": cfg.get("lr_schedule", "constant"), "steps_done": step_done, "final_loss": log[-1] if log else None},
        **(extra or {}),
    }
    st = out.with_suffix(".safetensors")
    atomic_write(st, lambda f: f.write(save_safetensors({k: v.contiguous() for k, v in weights.items()})))
    atomic_write_text(out.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return st, out.with_suffix(".json")
