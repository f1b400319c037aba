"""Data-parallel, resumable sampling over seeds (``torchrun`` or a single process).

* Seeds are strided over ranks (rank r takes ``seeds[r::world]``) and cut into batches.
* Every sample draws all of its randomness from its own generator (:class:`StackedGenerator`),
  so the output never depends on the batch size or the number of processes.
* Each finished batch is written atomically as a shard in a work directory, named by rank,
  world size and batch. A run killed at any moment and restarted with the same command skips
  the finished shards (recomputing at most the batch in flight on each rank) and ends with the
  same output. A run manifest refuses to resume with different settings.
* Rank 0 assembles the final ``.npz`` in seed order (ADM's format: ``arr_0`` uint8 NHWC,
  ``arr_1`` labels when class-conditional), written atomically.

gloo on CPU and NCCL on GPU; at world size 1 no process group is created.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .adapters import Denoiser, Prediction, _sigma_vector, as_prediction
from .samplers import SAMPLERS, StackedGenerator, prior

__all__ = ["rank", "world_size", "init", "barrier", "all_reduce_sum", "NonFiniteError", "CheckFinite", "sample_seeds", "parse_seeds"]


# ---------------------------------------------------------------------------------------------
# Process group
# ---------------------------------------------------------------------------------------------


def world_size() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def rank() -> int:
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


def init() -> None:
    """Join the process group that ``torchrun`` describes in the environment (no-op without it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend)


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (float64 sums stay float64)."""
    if world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------


def parse_seeds(spec: str) -> list[int]:
    """'0-99', '1,2,5-10' -> list of ints (EDM's syntax). Seeds are integers in [0, 2**63)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("seeds must be a list like '0-99' or '1,2,5-10'")
    seeds: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad seed range {part!r}: expected N or A-B with non-negative integers")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            raise ValueError(f"bad seed range {part!r}: the end is before the start")
        if b >= 2**63:
            raise ValueError(f"seed {b} is too large (must be < 2**63)")
        if len(seeds) + (b - a + 1) > 10_000_000:
            raise ValueError("too many seeds (at most 10,000,000)")
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
    """Stop at the first NaN/inf prediction, naming the step (of ``sigmas``) and sigma."""

    def __init__(self, denoiser: Denoiser, sigmas: torch.Tensor) -> None:
        self.inner = denoiser
        self.log_grid = torch.as_tensor(sigmas, dtype=torch.float64)[:-1].log()
        for attr in ("sigma_min", "sigma_max", "round_sigma", "lam", "schedule"):
            if hasattr(denoiser, attr):
                setattr(self, attr, getattr(denoiser, attr))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor | Prediction:
        out = self.inner(x, sigma, **cond)
        x0 = as_prediction(out).x0
        if not bool(torch.isfinite(x0).all()):
            s = float(_sigma_vector(sigma, x)[0])
            step = int((self.log_grid - math.log(s)).abs().argmin()) if s > 0 else -1
            raise NonFiniteError(f"the network returned NaN or inf at step {step} (sigma = {s:.6g})")
        return out


# ---------------------------------------------------------------------------------------------
# Sampling over seeds
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """Everything that determines a sample besides its seed (hashed into the run manifest)."""

    sampler: str
    sigmas: tuple[float, ...]
    shape: tuple[int, ...]
    prior: str
    lam: str
    options: str
    model: str
    batch_size: int

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_shard(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    try:
        with np.load(path) as z:
            return z["seeds"], z["images"], z["labels"]
    except Exception:  # a damaged shard is recomputed, never trusted
        return None


def sample_seeds(
    denoiser: Denoiser,
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    sampler: str,
    sigmas: torch.Tensor,
    to_uint8: Callable[[torch.Tensor], np.ndarray],
    batch_size: int = 64,
    prior_kind: str = "vp",
    sampler_opts: dict | None = None,
    num_classes: int | None = None,
    labels: Sequence[int] | None = None,
    work_dir: str | os.PathLike | None = None,
    job_meta: dict | None = None,
    progress: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Sample one image per seed; returns (uint8 NHWC in seed order, labels or None) on rank 0.

    With ``work_dir`` every batch is saved as it finishes and a rerun resumes. Class labels:
    ``labels`` (one per seed) if given, else, for a class-conditional model, each seed draws its
    label from its own generator right after x_T (EDM's ``generate.py``).
    """
    from tqdm import tqdm

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    seeds = list(seeds)
    if labels is not None and len(labels) != len(seeds):
        raise ValueError(f"got {len(labels)} labels for {len(seeds)} seeds")
    label_of = dict(zip(seeds, labels)) if labels is not None else None
    r, w = rank(), world_size()
    mine = seeds[r::w]
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    guarded = CheckFinite(denoiser, sigmas)
    fn = SAMPLERS[sampler]

    # Work directory and manifest.
    wd = Path(work_dir) if work_dir is not None else None
    if wd is not None:
        job = Job(sampler, tuple(float(s) for s in sigmas), tuple(shape), prior_kind, str((job_meta or {}).get("lam")), json.dumps(sampler_opts or {}, sort_keys=True, default=str), str((job_meta or {}).get("model")), batch_size)
        manifest = {"job": job.key(), "seeds": hashlib.sha256(np.asarray(seeds, dtype=np.int64).tobytes()).hexdigest()[:16], "labels": None if labels is None else hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes()).hexdigest()[:16], "world_size": w, **(job_meta or {})}
        if r == 0:
            wd.mkdir(parents=True, exist_ok=True)
            mpath = wd / "run.json"
            if mpath.exists():
                try:
                    old = json.loads(mpath.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError):
                    old = None
                if old is not None and {k: old.get(k) for k in ("job", "seeds", "labels", "world_size")} != {k: manifest[k] for k in ("job", "seeds", "labels", "world_size")}:
                    raise ValueError(f"{wd} holds an unfinished run with different settings; rerun that command, or delete {wd}")
            tmp = mpath.with_name(f".run.json.tmp{os.getpid()}")
            tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
            os.replace(tmp, mpath)
        barrier()

    # Sample this rank's batches.
    bar = tqdm(total=len(mine), disable=not progress or r != 0, unit="img", desc=sampler)
    local: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for j, batch in enumerate(batches):
        shard = wd / f"shard-r{r}-w{w}-b{j:06d}.npz" if wd is not None else None
        if shard is not None and shard.exists():
            got = _read_shard(shard)
            if got is not None and list(got[0]) == list(batch):
                bar.update(len(batch))
                continue
        gen = StackedGenerator(batch, device=device)
        z = gen.randn((len(batch), *shape), device=device)
        cond: dict[str, torch.Tensor] = {}
        if label_of is not None:
            cond["y"] = torch.tensor([label_of[s] for s in batch], device=device)
        elif num_classes:
            cond["y"] = gen.randint(num_classes, (len(batch),), device=device)
        x = prior(z, sigmas[0], kind=prior_kind)
        with torch.no_grad():
            out = fn(guarded, x, sigmas, noise=gen, cond=cond or None, **(sampler_opts or {}))
        images = to_uint8(out)
        lab = cond["y"].cpu().numpy() if "y" in cond else np.zeros(0, dtype=np.int64)
        if shard is not None:
            _atomic_npz(shard, seeds=np.asarray(batch, dtype=np.int64), images=images, labels=lab)
        else:
            local.append((np.asarray(batch), images, lab))
        bar.update(len(batch))
    bar.close()

    # Assemble on rank 0.
    barrier()
    if wd is None:
        parts = local
        if w > 1:
            gathered: list[Any] = [None] * w
            torch.distributed.all_gather_object(gathered, parts)
            parts = [p for g in gathered for p in g]
        if r != 0:
            return None
    else:
        if r != 0:
            barrier()
            return None
        parts = []
        for rr in range(w):
            for j in range(math.ceil(len(seeds[rr::w]) / batch_size)):
                got = _read_shard(wd / f"shard-r{rr}-w{w}-b{j:06d}.npz")
                if got is None:
                    raise RuntimeError(f"shard {rr}/{j} is missing after sampling; rerun the same command to finish")
                parts.append(got)
    order = {s: i for i, s in enumerate(seeds)}
    n = len(seeds)
    first = parts[0][1]
    images_all = np.empty((n, *first.shape[1:]), dtype=first.dtype)
    labels_all = np.empty(n, dtype=np.int64) if len(parts[0][2]) else None
    for s, im, lab in parts:
        idx = [order[int(v)] for v in s]
        images_all[idx] = im
        if labels_all is not None:
            labels_all[idx] = lab
    if wd is not None:
        barrier()
    return images_all, labels_all


def finish(work_dir: str | os.PathLike | None) -> None:
    """Remove a work directory after the final output is safely written (rank 0)."""
    if work_dir is not None and rank() == 0:
        shutil.rmtree(work_dir, ignore_errors=True)
