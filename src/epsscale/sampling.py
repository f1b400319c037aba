"""Sampling a plan over seeds: batches, one process or many (``torchrun``), resumable.

* Seeds are strided over ranks (rank r takes ``todo[r::world]``) and cut into batches.
* Every sample draws all of its randomness from its own generator
  (:class:`~epsscale.samplers.StackedGenerator`), so its random numbers depend only on its seed.
  The network's float32 kernels, though, may round differently for another batch *shape* (on
  this project's CPU, by up to about 2e-6, which moves a uint8 pixel by 1 now and then). So
  every network call has exactly ``batch_size`` rows: a short last batch is padded with copies
  of its last sample and cut back after sampling. With that, a sample is bit-identical at any
  number of processes and across resumes; only a fresh run with another batch size may differ
  in the last bits.
* With a work directory (:mod:`epsscale.store`) each finished batch is saved as it finishes and
  a rerun resumes; rank 0 assembles the result in seed order (ADM's format: uint8 NHWC images,
  labels when class-conditional).
* :class:`CheckFinite` stops a run at the first NaN or inf prediction, naming the step.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import store
from .adapters import Denoiser, Prediction, as_prediction, forward_attrs, sigma_vector
from .checks import check_int
from .distributed import all_gather_object, barrier, broadcast_object, rank, world_size
from .hashing import describe, digest_json
from .plan import SamplingPlan
from .samplers import StackedGenerator

__all__ = ["parse_seeds", "sample_seeds", "NonFiniteError", "CheckFinite", "MAX_SEEDS", "SEED_LIMIT"]

log = logging.getLogger("epsscale")

MAX_SEEDS = 10_000_000
SEED_LIMIT = 2**63


# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------

_SEED_PART = re.compile(r"(\d{1,19})(?:-(\d{1,19}))?", re.ASCII)


def parse_seeds(spec: str) -> list[int]:
    """'0-99', '1,2,5-10' -> list of ints (EDM's syntax).

    Seeds are distinct integers in [0, 2**63), at most 10,000,000 of them. Anything else raises
    a one-line ``ValueError`` that quotes the offending part.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("seeds must be a list like '0-99' or '1,2,5-10'")
    seeds: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = _SEED_PART.fullmatch(part)
        if m is None:
            shown = part if len(part) <= 40 else part[:37] + "..."
            raise ValueError(f"bad seed range {shown!r}: expected N or A-B with non-negative integers")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise ValueError(f"bad seed range {part!r}: the end is before the start")
        if b >= SEED_LIMIT:
            raise ValueError(f"seed {b} is too large (must be < 2**63)")
        if len(seeds) + (b - a + 1) > MAX_SEEDS:
            raise ValueError(f"too many seeds (at most {MAX_SEEDS:,})")
        seeds.extend(range(a, b + 1))
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds must not repeat")
    return seeds


# ---------------------------------------------------------------------------------------------
# Non-finite guard
# ---------------------------------------------------------------------------------------------


class NonFiniteError(RuntimeError):
    pass


class CheckFinite:
    """Stop at the first NaN/inf prediction, naming the step and sigma.

    Steps are counted from 1 (the first, noisiest step) to ``len(sigmas) - 1``; a model call
    between grid points (Heun's correction, churn) is named by the nearest grid step in log sigma.
    """

    def __init__(self, denoiser: Denoiser, sigmas: torch.Tensor) -> None:
        self.inner = denoiser
        self.log_grid = torch.as_tensor(sigmas, dtype=torch.float64)[:-1].log()
        forward_attrs(self, denoiser)

    def step_of(self, sigma: float) -> int:
        """The 0-based index of the grid step nearest ``sigma`` (in log sigma); -1 for sigma <= 0."""
        if not sigma > 0 or len(self.log_grid) == 0:
            return -1
        return int((self.log_grid - math.log(sigma)).abs().argmin())

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor | Prediction:
        out = self.inner(x, sigma, **cond)
        x0 = as_prediction(out).x0
        if not bool(torch.isfinite(x0).all()):
            s = float(sigma_vector(sigma, x)[0])
            raise NonFiniteError(f"the network returned NaN or inf at step {self.step_of(s) + 1} of {len(self.log_grid)} (sigma = {s:.6g})")
        return out


# ---------------------------------------------------------------------------------------------
# Sampling over seeds
# ---------------------------------------------------------------------------------------------


def _check_seeds(seeds: Sequence[int], labels: Sequence[int] | None) -> list[int]:
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seeds to sample")
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds must not repeat")
    if min(seeds) < 0 or max(seeds) >= SEED_LIMIT:
        raise ValueError("seeds must be integers in [0, 2**63)")
    if labels is not None and len(labels) != len(seeds):
        raise ValueError(f"got {len(labels)} labels for {len(seeds)} seeds")
    return seeds


def sample_seeds(
    plan: SamplingPlan,
    seeds: Sequence[int],
    *,
    batch_size: int = 64,
    work_dir: str | os.PathLike | None = None,
    outputs: Sequence[str | os.PathLike | None] = (),
    progress: bool = False,
    alone: bool = False,
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Sample one image per seed; returns (quantised samples in seed order, labels or None) on rank 0.

    With ``work_dir`` every batch is saved as it finishes and a rerun resumes (see
    :mod:`epsscale.store`); ``outputs`` names the final files the caller will write, whose stale
    temporaries a restart removes. Class labels: ``plan.labels`` (one per seed) if given, else,
    for a class-conditional model, each seed draws its label from its own generator right after
    x_T (EDM's ``generate.py``). Other ranks return None. ``alone``: this process samples every
    seed itself, whatever the process group (a caller that runs on rank 0 only, as calibrate does).
    """
    from tqdm import tqdm

    check_int(batch_size, "batch size")
    seeds = _check_seeds(seeds, plan.labels)
    labels = plan.labels_for(seeds)
    label_of = dict(zip(seeds, labels)) if labels is not None else None
    r, w = (0, 1) if alone else (rank(), world_size())
    guarded = plan.scaled_denoiser(CheckFinite(plan.denoiser, plan.sigmas))
    device = plan.device

    # Work directory: rank 0 checks it and reads what is done; every rank learns the outcome.
    wd = Path(work_dir).resolve() if work_dir is not None else None
    lock: Any = None
    parts: dict[Path, tuple] = {}
    done: set[int] = set()
    if wd is not None:
        meta = {**plan.meta, "model": plan.fingerprint, "lam": repr(plan.lam)}
        job = store.Job(plan.sampler, tuple(float(s) for s in plan.sigmas), plan.shape, plan.prior_kind, str(meta["lam"]), store.job_options(dict(plan.sampler_opts)), str(meta["model"]), digest_json(describe(dict(plan.meta))))
        manifest = store.manifest_for(job, seeds, labels, world_size=w, batch_size=batch_size, meta=meta)
        status: tuple[str, Any, ...]
        if r == 0:
            try:
                lock, parts, run_batch = store.prepare(wd, manifest, seeds, [Path(p) for p in outputs if p is not None])
                status = ("ok", sorted({s for got in parts.values() for s in got[0].tolist()}), run_batch)
            except (ValueError, OSError) as e:
                status = ("error", str(e) if isinstance(e, ValueError) else f"cannot use work directory {wd}: {e.strerror or e}")
        else:
            status = ("ok", [], batch_size)
        status = broadcast_object(status) if w > 1 else status
        if status[0] == "error":
            raise ValueError(status[1])
        done, batch_size = set(status[1]), status[2]
        if done:
            log.info("resuming in %s: %d of %d samples are done", wd, len(done), len(seeds))

    try:
        # This rank's share of what is left.
        todo = [s for s in seeds if s not in done]
        mine = todo[r::w]
        batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]

        # Sample, saving each batch as it finishes.
        bar = tqdm(total=len(seeds), initial=len(done), disable=not progress or r != 0, unit="img", desc=plan.sampler)
        local: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for batch in batches:
            # Always batch_size rows (see the module docstring): pad with the last seed again.
            rows = batch + [batch[-1]] * (batch_size - len(batch))
            gen = StackedGenerator(rows, device=device)
            x, cond = plan.start(gen, [label_of[s] for s in rows] if label_of is not None else None)
            out = plan.run(guarded, x, gen, cond)[: len(batch)]
            cond = {k: v[: len(batch)] for k, v in cond.items()}
            if not bool(torch.isfinite(out).all()):
                raise NonFiniteError(f"the sampler produced NaN or inf at the end of sampling (seeds {batch[0]}...{batch[-1]})")
            images = plan.quantize(out)
            lab = cond["y"].cpu().numpy().astype(np.int64) if "y" in cond else np.zeros(0, dtype=np.int64)
            item = (np.asarray(batch, dtype=np.int64), images, lab)
            if wd is not None:
                store.write_shard(wd, *item)
            else:
                local.append(item)
            bar.update(min(len(batch) * w, bar.total - bar.n))
        bar.close()

        # Gather on rank 0.
        if wd is None:
            gathered = all_gather_object(local) if w > 1 else [local]
            if r != 0:
                return None
            plist = [p for g in gathered for p in g]
        else:
            if w > 1:
                barrier()
            if r != 0:
                return None
            plist = store.assemble(wd, seeds, parts)
    finally:
        if lock is not None:
            lock.release()
    return _in_seed_order(plist, seeds, wd)


def _in_seed_order(plist: list[tuple], seeds: list[int], wd: Path | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Put every sample at its seed's place."""
    order = {s: i for i, s in enumerate(seeds)}
    n = len(seeds)
    first = plist[0][1]
    images_all = np.empty((n, *first.shape[1:]), dtype=first.dtype)
    labels_all = np.empty(n, dtype=np.int64) if len(plist[0][2]) else None
    for s, im, lab in plist:
        if im.shape[1:] != first.shape[1:] or im.dtype != first.dtype or (labels_all is not None) != bool(len(lab)):
            raise ValueError(f"shards in {wd} disagree in image shape, dtype or labels; delete {wd} and rerun")
        idx = [order[int(v)] for v in s]
        images_all[idx] = im
        if labels_all is not None:
            labels_all[idx] = lab
    return images_all, labels_all
