"""``epsscale train``: train (or resume) an epsscale model on Fashion-MNIST."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import common
from .common import UserError

DESCRIPTION = """\
Train an ADM-style UNet (eps-prediction, learned variance, cosine schedule) on Fashion-MNIST's
train split with the hybrid loss of improved DDPM, AdamW, EMA and a cosine learning rate; the
defaults are the recipe of the shipped model's successor (in training; see the README). Everything lives in --run-dir and is saved
atomically every 200 steps and on Ctrl-C: rerun the same command to resume. --export writes
the EMA weights as PREFIX.safetensors + PREFIX.json, which --model PREFIX (or its folder) reads.

examples:
  epsscale train --run-dir runs/my-model --steps 16000 --export runs/my-model/model
  epsscale train --run-dir runs/ip --init-from runs/my-model/snapshots/checkpoint_step012000.pt --input-perturbation 0.1
"""


def add_parser(sub: Any) -> None:
    t = sub.add_parser("train", help="train or resume the Fashion-MNIST model", description=DESCRIPTION)
    t.add_argument("--run-dir", required=True, help="the run's folder (created; rerun to resume)")
    t.add_argument("--steps", type=common.positive_int, default=12000, help="optimiser steps in all")
    t.add_argument("--batch", type=common.positive_int, default=64, help="images per step")
    t.add_argument("--lr", type=common.positive_float, default=5e-4, help="peak learning rate (AdamW)")
    t.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine", help="after the warm-up: a half cosine down to 0 at --steps, or constant")
    t.add_argument("--warmup", type=common.nonneg_int, default=500, help="linear warm-up steps")
    t.add_argument("--ema", type=common.nonneg_float, default=0.9995, help="EMA decay of the exported weights")
    t.add_argument("--input-perturbation", type=common.nonneg_float, default=0.0, metavar="GAMMA", help="DDPM-IP's gamma: the network sees eps + gamma xi, the target stays eps (Ning et al. 2023 use 0.1)")
    t.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the batches")
    t.add_argument("--data", default=None, metavar="DIR", help="folder with Fashion-MNIST's IDX .gz files (default: $EPSSCALE_FASHION_MNIST, else /usr/share/datasets/fashion-mnist)")
    t.add_argument("--snapshot-every", type=common.positive_int, default=None, metavar="N", help="also keep the EMA weights and the checkpoint of every N-th step under RUN_DIR/snapshots/")
    t.add_argument("--init-from", default=None, metavar="CHECKPOINT.pt", help="start a new run from another run's checkpoint (e.g. a snapshot), with this command's settings")
    t.add_argument("--max-minutes", type=common.nonneg_float, default=None, help="stop after the checkpoint that follows this much time; rerun to continue")
    t.add_argument("--export", default=None, metavar="PREFIX", help="afterwards, write PREFIX.safetensors + PREFIX.json from the EMA weights")
    t.add_argument("--karras-sigma-max", type=common.positive_float, default=None, help="with --export: record this as the model's default start of a Karras grid (sampling.karras_sigma_max; without it, 80)")
    t.add_argument("--device", default="cpu", help="where to train: cpu, cuda or cuda:N")
    common.add_run_options(t)
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models.train import TrainConfig, TrainingInterrupted, export_model, train

    if args.karras_sigma_max and not args.export:
        raise UserError("--karras-sigma-max is recorded by --export; give --export PREFIX too")
    common.out_dir(args.run_dir, "--run-dir")
    if args.export:
        common.writable_later(Path(args.export).with_suffix(".safetensors"), "--export")
    import torch

    try:
        dev = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {args.device}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {args.device}: no such CUDA device here ({torch.cuda.device_count() if torch.cuda.is_available() else 0} available)")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device}: expected cpu, cuda or cuda:N")
    common.set_threads(args)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, lr_schedule=args.lr_schedule, warmup=args.warmup, ema_decay=args.ema, input_perturbation=args.input_perturbation, seed=args.seed, data=args.data)
    try:
        run_dir = train(cfg, args.run_dir, progress=not args.quiet, max_seconds=args.max_minutes * 60 if args.max_minutes is not None else None, snapshot_every=args.snapshot_every, init_from=args.init_from, device=args.device)
    except TrainingInterrupted as e:
        common.warn(str(e))
        return 130
    if args.export:
        Path(args.export).parent.mkdir(parents=True, exist_ok=True)
        extra = {"sampling": {"karras_sigma_max": args.karras_sigma_max}} if args.karras_sigma_max else None
        st, js = export_model(run_dir, args.export, extra=extra)
        if not args.quiet:
            print(f"exported {st} and {js}")
    return 0
