"""Which default batch: sampling throughput against the network batch, side by side in one run.

    python benchmarks/batch_speed.py --threads 1 --repeats 3

The training recipe's architecture (DEMO_FLAGS; random weights: speed does not depend on them), DDPM at
5 steps, batches of 16 ... 512 interleaved (A, B, C, ..., A, B, C, ...), medians reported as
images per second and relative to the fastest. ``epsscale`` picks its default batch from this: the
fewest batches of at most ``MAX_BATCH`` rows, evened out (``epsscale.cli.common.auto_batch``), so
padding never adds a whole batch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="16,32,64,128,256,512")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None, help="a model directory (default: the training recipe's architecture, DEMO_FLAGS, with random weights)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from epsscale.adapters import VPDenoiser
    from epsscale.data.images import quantize_adm
    from epsscale.models.adm import create_adm_model
    from epsscale.models.pretrained import build_plan, load_model
    from epsscale.models.train import DEMO_FLAGS
    from epsscale.plan import SamplingPlan
    from epsscale.sampling import sample_seeds
    from epsscale.schedules import VPSchedule

    if args.model:
        plan = build_plan(load_model(args.model), sampler="ddpm", steps=args.steps, sampler_opts={"clip": 1.0})
        what = args.model
    else:
        torch.manual_seed(0)
        net = create_adm_model(DEMO_FLAGS).eval().requires_grad_(False).to(memory_format=torch.channels_last)
        sch = VPSchedule("cosine")
        size = int(DEMO_FLAGS["image_size"])
        plan = SamplingPlan(VPDenoiser(net, sch, learn_sigma=True), sch.grid(str(args.steps)), "ddpm", (1, size, size), quantize_adm, sampler_opts={"clip": 1.0})
        what = f"the training recipe's architecture ({sum(p.numel() for p in net.parameters()):,} parameters, random weights)"
    batches = [int(b) for b in args.batches.split(",")]
    times: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(args.repeats):
        for b in batches:
            t0 = time.perf_counter()
            sample_seeds(plan, range(b), batch_size=b)
            times[b].append((time.perf_counter() - t0) / b)
    per = {b: statistics.median(v) for b, v in times.items()}
    best = min(per.values())
    print(f"{what}; ddpm, {args.steps} steps; {args.threads} thread(s); median of {args.repeats} interleaved runs\n")
    print("| batch | ms per image | images/s | vs fastest |")
    print("|---|---|---|---|")
    for b in batches:
        print(f"| {b} | {1000 * per[b]:.1f} | {1 / per[b]:.1f} | {best / per[b]:.2f} |")


if __name__ == "__main__":
    main()
