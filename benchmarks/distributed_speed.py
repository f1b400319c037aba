"""Distributed sampling speed: samples/s at world size 1 vs 2 (torchrun, gloo), side by side.

    python benchmarks/distributed_speed.py --seeds 0-127 --steps 10 --batch 32 --repeats 3

Every configuration runs what ``epsscale sample`` runs (the plan of an epsscale model and
``sample_seeds`` with a work directory; under ``torchrun --nproc_per_node=2`` for world size 2),
on the shipped Fashion-MNIST architecture
(``DEMO_FLAGS``, random weights, since speed does not depend on them) unless ``--model``
names a model directory. The time is taken inside the command, on rank 0, from a barrier after
the model is loaded to the end of ``sample_seeds`` (sampling, shard writes and assembly), so
process start-up is left out; the end-to-end wall time of the command is shown too. Runs are
interleaved (A, B, C, A, B, C, ...) and medians reported, because this machine is noisy.

Configurations: world size 1 with 1 thread, and world size 2 with 1 thread per process (two
cores used by data parallelism). ``--intra-op`` adds world size 1 with 2 threads (the same cores
used by torch's intra-op parallelism instead).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def worker(argv: list[str]) -> int:
    """One rank of a run (launched by ``main``): build the plan, then time ``sample_seeds`` on rank 0
    from a barrier to the written .npz, as ``epsscale sample`` runs it (work directory included)."""
    timing_file, model, sampler, steps, seeds, batch, out = argv
    import epsscale.distributed as dist
    from epsscale.data.images import save_npz
    from epsscale.models.pretrained import build_plan
    from epsscale.sampling import parse_seeds, sample_seeds
    from epsscale.store import finish

    dist.init()
    plan = build_plan(model, sampler=sampler, steps=int(steps), sampler_opts={"clip": 1.0} if sampler in ("ddpm", "ddim") else {})
    work = Path(out + ".parts")
    dist.barrier()
    t0 = time.perf_counter()
    res = sample_seeds(plan, parse_seeds(seeds), batch_size=int(batch), work_dir=work)
    if dist.rank() == 0:
        save_npz(out, *res)
        finish(work)
        Path(timing_file).write_text(json.dumps({"seconds": time.perf_counter() - t0, "world_size": dist.world_size()}))
    return 0


def make_model(directory: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from epsscale.models.adm import create_adm_model
    from epsscale.models.train import DEMO_FLAGS

    torch.manual_seed(0)
    net = create_adm_model(DEMO_FLAGS)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(directory / "model.safetensors"))
    cfg = {"format": "epsscale.model/1", "arch": "adm", "flags": DEMO_FLAGS, "schedule": "cosine", "num_timesteps": 1000, "prediction": "eps", "learn_sigma": True, "crop": 28}
    (directory / "model.json").write_text(json.dumps(cfg))
    return directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the shipped architecture, random weights)")
    ap.add_argument("--seeds", default="0-127")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sampler", default="ddpm")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--intra-op", action="store_true", help="also time world size 1 with 2 threads")
    args = ap.parse_args()

    from epsscale.sampling import parse_seeds

    n = len(parse_seeds(args.seeds))
    torchrun = Path(sys.executable).with_name("torchrun")
    tmp = Path(tempfile.mkdtemp(prefix="epsscale-dist-bench-"))
    try:
        model = Path(args.model) if args.model else make_model(tmp / "model")
        configs = {
            "world size 1, 1 thread": ([sys.executable], 1),
            "world size 2, 1 thread each": ([str(torchrun), "--nproc_per_node=2", "--standalone"], 1),
        }
        if args.intra_op:
            configs["world size 1, 2 threads"] = ([sys.executable], 2)
        seconds: dict[str, list[float]] = {k: [] for k in configs}
        walls: dict[str, list[float]] = {k: [] for k in configs}
        outputs: dict[str, Path] = {}
        for rep in range(args.repeats):
            for name, (launcher, threads) in configs.items():
                out = tmp / f"out-{len(outputs)}-{rep}.npz"
                timing = tmp / "timing.json"
                cmd = [*launcher, str(HERE), "--worker", str(timing), str(model), args.sampler, str(args.steps), args.seeds, str(args.batch), str(out)]
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, env=env)
                walls[name].append(time.perf_counter() - t0)
                got = json.loads(timing.read_text())
                assert got["world_size"] == (2 if "size 2" in name else 1)
                seconds[name].append(got["seconds"])
                outputs.setdefault(name, out)

        # Same samples everywhere (the invariance the speed-up must not cost).
        import numpy as np

        arrays = [np.load(p)["arr_0"] for p in outputs.values()]
        same = all(np.array_equal(a, arrays[0]) for a in arrays)

        base = statistics.median(seconds["world size 1, 1 thread"])
        print(f"{n} samples, {args.sampler}, {args.steps} steps, batch {args.batch}, model {'shipped architecture (random weights)' if not args.model else args.model}; "
              f"median of {args.repeats} interleaved runs; cores: {os.cpu_count()}; identical samples: {same}\n")
        print("| configuration | sampling s | samples/s | ratio vs world size 1 (1 thread) | end-to-end s |")
        print("|---|---|---|---|---|")
        for name in configs:
            s = statistics.median(seconds[name])
            print(f"| {name} | {s:.2f} | {n / s:.1f} | {base / s:.2f}x | {statistics.median(walls[name]):.1f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2:]))
    main()
