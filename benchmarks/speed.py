"""Speed: ES on/off, sampler overhead, a diffusers DDIM loop, and the other fixes' cost, side by side in one run.

docs/design.md, "Performance targets": wall(ES) / wall(no ES) <= 1.01; total sampling time / (NFE x bare forward)
<= 1.05 at batch 256 on the demo model; no slower than diffusers' loop on the same UNet.

Runs are interleaved (A, B, A, B, ...) and medians are reported, because this machine is noisy.
The last table times each fix for exposure bias against the plain sampler (``--fix-samplers``):
ES, TSR, Time-Shift (the paper's window) and DCW add no network evaluation; this is what they
cost beyond it.

    python benchmarks/speed.py --threads 2 --batch 256 --steps 10 --repeats 3
    python benchmarks/speed.py --device cuda --batch 256 --steps 10 --repeats 5   # on a GPU

On CUDA every timing waits for the GPU (``torch.cuda.synchronize``) before it stops, TF32 is off
(as in tests/test_cuda.py), and each sampler runs once untimed first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samplers", default="ddpm,ddim,euler,heun,dpmpp_2m")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--fix-samplers", default="ddim,ddpm", help="samplers of the fixes' table ('' skips it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda, but torch sees no CUDA device")
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    from epsscale import StackedGenerator, eps_scaling, prior
    from epsscale.models.pretrained import load_model
    from epsscale.samplers import SAMPLERS, nfe

    model = load_model("fmnist", device=dev)
    net, den = model.net, model.denoiser
    shape = (args.batch, *model.shape)
    sigmas = model.schedule.grid(str(args.steps))
    seeds = list(range(args.batch))

    # Bare network forward (the unit of cost).
    x_vp = torch.randn(shape, device=dev)
    t = torch.full((args.batch,), 500, device=dev)
    with torch.no_grad():
        net(x_vp, t)
        fwd = []
        for _ in range(args.repeats + 2):
            sync()
            t0 = time.perf_counter()
            net(x_vp, t)
            sync()
            fwd.append(time.perf_counter() - t0)
    f = statistics.median(fwd)

    def run(name: str, d, **opts) -> float:
        gen = StackedGenerator(seeds, device=dev)
        x = prior(gen.randn(shape), sigmas[0], kind="vp")
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            SAMPLERS[name](d, x, sigmas, noise=gen, **opts)
        sync()
        return time.perf_counter() - t0

    def run_diffusers_ddim() -> float:
        from diffusers import DDIMScheduler

        sch = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
        sch.set_timesteps(args.steps)
        g = torch.Generator(dev).manual_seed(0)
        x = torch.randn(shape, generator=g, device=dev)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            for ts in sch.timesteps:
                out = net(x, ts.to(dev).expand(args.batch))[:, : shape[1]]
                x = sch.step(out, ts, x).prev_sample
        sync()
        return time.perf_counter() - t0

    es = eps_scaling(den, 1.01)
    rows = []
    for name in args.samplers.split(","):
        run(name, es)  # untimed: first calls of a sampler's kernels (CUDA) and allocations
        base, scaled = [], []
        for _ in range(args.repeats):
            base.append(run(name, den))
            scaled.append(run(name, es))
        b, s = statistics.median(base), statistics.median(scaled)
        n = nfe(name, args.steps)
        rows.append((name, n, b, s, s / b, b / (n * f)))
    ours, theirs = [], []
    run_diffusers_ddim()
    for _ in range(args.repeats):
        ours.append(run("ddim", den))
        theirs.append(run_diffusers_ddim())

    from epsscale import DCW, TSR
    from epsscale.timeshift import TimeShift

    fixes = {"ES (b = 1.01)": (es, {}), "TSR (k = 0.95)": (eps_scaling(den, TSR()), {}),
             "Time-Shift (paper's w)": (den, {"time_shift": TimeShift.for_steps(model.schedule, args.steps)}),
             "DCW (c = 0.005)": (den, {"dcw": DCW(0.005)})}
    fix_rows = []
    for name in filter(None, args.fix_samplers.split(",")):
        times = {"plain": [], **{k: [] for k in fixes}}
        for _ in range(args.repeats):
            times["plain"].append(run(name, den))
            for k, (d, opts) in fixes.items():
                times[k].append(run(name, d, **opts))
        plain = statistics.median(times["plain"])
        fix_rows += [(name, k, statistics.median(v), statistics.median(v) / plain) for k, v in times.items()]

    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"torch {torch.__version__}")
    print(f"model: shipped fmnist ADM UNet ({sum(p.numel() for p in net.parameters()):,} params), batch {args.batch}, {args.steps} steps, {device_name}, medians of {args.repeats}")
    print(f"bare forward: {f:.3f} s/call\n")
    print("| sampler | NFE | no ES (s) | ES (s) | ES / no ES | total / (NFE x forward) |")
    print("|---|---|---|---|---|---|")
    for name, n, b, s, r, o in rows:
        print(f"| {name} | {n} | {b:.2f} | {s:.2f} | {r:.3f} | {o:.3f} |")
    o, t = statistics.median(ours), statistics.median(theirs)
    print(f"\n| loop | seconds | ratio |\n|---|---|---|\n| epsscale ddim | {o:.2f} | {o / t:.3f} |\n| diffusers DDIMScheduler loop | {t:.2f} | 1.000 |")
    if fix_rows:
        print("\n| sampler | fix | seconds | vs plain |\n|---|---|---|---|")
        for name, k, sec, r in fix_rows:
            print(f"| {name} | {k} | {sec:.2f} | {r:.3f} |")


if __name__ == "__main__":
    main()
