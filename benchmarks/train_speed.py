"""Which training set-up is fastest on this CPU: the recipe against its alternatives, side by side.

    python benchmarks/train_speed.py --steps 3 --rounds 5

One optimiser step of the training recipe (``epsscale.models.train.optimiser_step``: hybrid loss,
backward, clipping, AdamW, EMA) on random data (speed does not depend on it), for:

* the recipe: 28×28 without padding, ``channels_last``, batch 64, ``--threads`` threads;
* 32×32 (Fashion-MNIST padded to 32, attention at 16 and 8 instead of 14 and 7);
* the default memory format instead of ``channels_last``;
* batches of 32 and 128;
* one thread fewer (where ``--threads`` > 1).

Variants run interleaved (A, B, C, ..., A, B, C, ...) for ``--rounds`` rounds of ``--steps``
steps each, after one warm-up step; the table gives medians, and images per second relative to
the recipe (> 1: faster per training image).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(size: int, channels_last: bool, batch: int):
    """A step function for one variant, with its own network, optimiser and batch."""
    from epsscale.models.adm import create_adm_model
    from epsscale.models.train import DEMO_FLAGS, TrainConfig, loss_tables, optimiser_step
    from epsscale.schedules import VPSchedule

    flags = dict(DEMO_FLAGS, image_size=size, attention_resolutions="14,7" if size == 28 else f"{size // 2},{size // 4}")
    cfg = TrainConfig(flags=flags, batch_size=batch)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    net = create_adm_model(flags).to(memory_format=fmt).train()
    ema = create_adm_model(flags).to(memory_format=fmt).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = VPSchedule(cfg.schedule, cfg.num_timesteps)
    tables = loss_tables(schedule, "cpu")
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand(batch, 1, size, size, generator=gen) * 2 - 1).contiguous(memory_format=fmt)
    eps = torch.randn(x0.shape, generator=gen).contiguous(memory_format=fmt)
    t = torch.randint(cfg.num_timesteps, (batch,), generator=gen)
    ema_params = list(ema.parameters())
    state = {"step": 1000}

    def step() -> None:
        optimiser_step(net, opt, ema_params, schedule, x0, t, eps, None, cfg, state["step"], tables)
        state["step"] += 1

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="steps per variant and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.steps < 1 or args.rounds < 1 or args.threads < 1:
        ap.error("--steps, --rounds and --threads must be positive")

    # (name, image size, channels_last, batch, threads)
    variants = [("recipe: 28x28, channels_last, batch 64", 28, True, 64, args.threads),
                ("32x32 (padded)", 32, True, 64, args.threads),
                ("default memory format", 28, False, 64, args.threads),
                ("batch 32", 28, True, 32, args.threads),
                ("batch 128", 28, True, 128, args.threads)]
    if args.threads > 1:
        variants.append((f"{args.threads - 1} thread{'s' if args.threads > 2 else ''}", 28, True, 64, args.threads - 1))
    steps = {}
    for name, size, cl, batch, threads in variants:
        torch.set_num_threads(threads)
        steps[name] = build(size, cl, batch)
        steps[name]()  # warm-up
    times: dict[str, list[float]] = {v[0]: [] for v in variants}
    for _ in range(args.rounds):
        for name, _, _, _, threads in variants:
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            times[name].append((time.perf_counter() - t0) / args.steps)

    per_image = {name: statistics.median(times[name]) / batch for name, _, _, batch, _ in variants}
    ref = per_image[variants[0][0]]
    print(f"torch {torch.__version__}, {args.rounds} rounds x {args.steps} steps, medians\n")
    print("| variant | threads | s / step | images / s | per image vs recipe |")
    print("|---|---|---|---|---|")
    for name, _, _, batch, threads in variants:
        print(f"| {name} | {threads} | {statistics.median(times[name]):.3f} | {1 / per_image[name]:.1f} | {ref / per_image[name]:.2f}x |")


if __name__ == "__main__":
    main()
