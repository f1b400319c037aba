"""``epsscale sample``: sample seeds to an ADM-style ``.npz`` (and a PNG grid), resumably."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from . import common
from .common import UserError

DESCRIPTION = """\
Sample one image per seed from any model epsscale reads, with or without Epsilon Scaling, to
an ADM-style .npz (arr_0: uint8 NHWC; arr_1: labels of class-conditional models). A seed's
sample depends only on the seed, so runs split over processes (torchrun) and resume after a
kill: finished batches wait in OUT.parts/ until the .npz is written.

examples:
  epsscale sample --sampler ddpm --steps 20 --seeds 0-99 --out fm.npz --grid fm.png
  epsscale sample --sampler heun --steps 10 --eps-scale 1.005 --seeds 0-999 --out es.npz
  epsscale sample --model toy --sampler heun --steps 18 --disc karras --out toy.npz --grid toy.png
"""


def add_parser(sub: Any) -> None:
    s = sub.add_parser("sample", help="sample seeds to an ADM-style .npz", description=DESCRIPTION)
    common.add_model_options(s)
    common.add_sampling_options(s)
    g = s.add_argument_group("run")
    g.add_argument("--seeds", type=common.seeds_type, default=None, help="e.g. 0-49999 or 1,2,5-10 (default: 0-63, or --num_samples of --flags)")
    g.add_argument("--batch", type=common.positive_int, default=None, help=f"network batch (default: the fewest batches of at most {common.MAX_BATCH}, evened out; --batch_size of --flags)")
    g.add_argument("--out", required=True, help="output .npz (arr_0: uint8 NHWC)")
    g.add_argument("--grid", "--png", dest="grid", default=None, metavar="FILE.png", help="also write a PNG grid of the first 64 samples")
    g.add_argument("--work-dir", default=None, help="where finished batches wait for the .npz (default: OUT.parts)")
    common.add_run_options(s)
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import distributed as dist
    from ..plan import schedule_mismatch

    common.set_threads(args)
    dist.init()
    out = common.writable(args.out, "--out")
    if out.suffix != ".npz":
        raise UserError(f"--out must end in .npz, got {out}")
    grid_png = common.writable(args.grid, "--grid") if args.grid else None
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".parts")
    if grid_png is not None and grid_png.resolve() in (out.resolve(), work.resolve()):
        raise UserError(f"--grid {grid_png} would overwrite {'--out' if grid_png.resolve() == out.resolve() else 'the work directory'}; give the PNG another name")
    plan = common.build_plan(args)
    why = schedule_mismatch(plan.lam, plan)
    if why:
        common.warn(f"--eps-schedule {args.eps_schedule}: {why}")

    if plan.name == "toy":
        return _sample_toy(args, plan, out, grid_png)
    seeds = args.seeds if args.seeds is not None else list(range(int(plan.meta.get("num_samples", 64))))
    if args.labels is not None:
        if plan.cycle_labels:
            raise UserError("--labels does not apply to a text-to-image pipeline: its prompts come from --prompt-file, in turn over the seeds")
        if not plan.num_classes:
            raise UserError(f"--labels: {plan.name} is an unconditional network")
        plan = plan.replace(labels=tuple(common.parse_labels(args.labels, len(seeds), plan.num_classes)))
    batch = args.batch or int(plan.meta.get("batch_size", 0)) or common.auto_batch(len(seeds))
    t0 = time.time()
    from ..sampling import sample_seeds

    res = sample_seeds(plan, seeds, batch_size=batch, work_dir=work, outputs=(out, grid_png), progress=not args.quiet)
    if res is None:  # not rank 0
        return 0
    from ..data.images import save_npz
    from ..plots import save_image_grid
    from ..store import finish

    images, labels_out = res
    save_npz(out, images, labels_out)
    if grid_png:
        save_image_grid(images[:64], grid_png)
    finish(work)
    if not args.quiet:
        print(f"wrote {len(images)} samples to {out} ({plan.sampler}, {plan.steps} steps, {plan.nfe} network evaluations each, lambda {common.format_lam(plan.lam)}) in {time.time() - t0:.1f}s")
    return 0


def _sample_toy(args: argparse.Namespace, plan: Any, out: Path, grid_png: Path | None) -> int:
    """2-D points take no time: one batch, on rank 0 alone under torchrun; saved as float64."""
    import numpy as np

    from .. import distributed as dist
    from .._atomic import atomic_write
    from ..plots import scatter_points
    from ..samplers import StackedGenerator

    if args.labels is not None:
        raise UserError("--labels needs a class-conditional model")
    idle = [opt for opt, given in (("--batch", args.batch), ("--work-dir", args.work_dir)) if given is not None]
    if idle:
        common.warn(f"{', '.join(idle)} do{'es' if len(idle) == 1 else ''} not apply to --model toy (2-D points, one batch, no work directory): ignored")
    if dist.rank() != 0:
        return 0
    seeds = args.seeds if args.seeds is not None else list(range(64))
    gen = StackedGenerator(seeds)
    x, cond = plan.start(gen)
    pts = plan.quantize(plan.run(plan.scaled_denoiser(), x, gen, cond))
    atomic_write(out, lambda f: np.savez(f, arr_0=pts))
    if grid_png:
        scatter_points([("samples", pts)], grid_png)
    if not args.quiet:
        print(f"wrote {len(pts)} 2-D samples to {out}")
    return 0
