"""Data-parallel, resumable sampling over seeds (``torchrun`` or a single process).

* Seeds are strided over ranks (rank r takes ``todo[r::world]``) and cut into batches.
* Every sample draws all of its randomness from its own generator (:class:`StackedGenerator`),
  so its random numbers depend only on its seed. The network's float32 kernels, though, may
  round differently for another batch *shape* (on this project's CPU, the shipped model's
  outputs by up to 2e-6; that moves a uint8 pixel by 1 now and then). So every network call has exactly ``batch_size`` rows: a short last batch is
  padded with copies of its last sample and cut back after sampling. With that, a sample is
  bit-identical at any number of processes and across resumes; only a fresh run with another
  batch size may differ in the last bits.
* Outputs are named by seed. Each finished batch is written atomically to the work directory as
  ``seeds-{first:06d}-{last:06d}.npz`` (its smallest and largest seed; the file stores the
  seeds themselves, the uint8 images and the labels), so a shard describes itself.
* Resuming works seed by seed. On start, rank 0 reads the shards already in the work directory
  and the ranks split the seeds that are still missing. A run killed at any moment (SIGKILL)
  and restarted with the same command therefore loses at most the batch each rank had in
  flight, and ends with the same output. Because samples depend only on their seeds, the
  restart may use another number of processes; it keeps the interrupted run's batch size
  (recorded in ``run.json``), whatever it is given, so that the result is bit-identical. The
  manifest refuses to resume with a different model, sampler, grid, lambda or seed list.
* Nothing is ever half-written: shards, the manifest and the final ``.npz`` go to a temporary
  name first and are moved into place with ``os.replace``. A restart deletes the temporary files
  a killed run left behind. An advisory lock keeps two runs out of one work directory.
* Rank 0 assembles the final ``.npz`` in seed order (ADM's format: ``arr_0`` uint8 NHWC,
  ``arr_1`` labels when class-conditional). Every rank writes its shards into the one work
  directory, so across several machines it must be on a shared file system.

gloo on CPU and NCCL on GPU (CPU tensors and object collectives still go through gloo); at
world size 1 no process group is created.
"""

from __future__ import annotations

import atexit
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ._atomic import atomic_open, atomic_write_text
from .adapters import Denoiser, Prediction, _sigma_vector, as_prediction
from .samplers import SAMPLERS, StackedGenerator, prior

__all__ = [
    "rank",
    "world_size",
    "init",
    "barrier",
    "all_reduce_sum",
    "broadcast_object",
    "NonFiniteError",
    "CheckFinite",
    "sample_seeds",
    "parse_seeds",
    "finish",
    "remove_stale_temps",
    "shard_name",
]

log = logging.getLogger("epsscale")

MAX_SEEDS = 10_000_000
SEED_LIMIT = 2**63


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
    """Join the process group that ``torchrun`` describes in the environment (no-op without it).

    gloo on CPU. With CUDA, NCCL for CUDA tensors and gloo for CPU tensors and Python objects
    (``"cpu:gloo,cuda:nccl"``), so the float64 FID sums and the shard bookkeeping, which live
    on the CPU, work under either.
    """
    try:
        ws = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None
    if ws <= 1 or torch.distributed.is_initialized():
        return
    if not torch.distributed.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend=backend)
    # Tear the group down before interpreter exit: gloo's threads aborting in static
    # destructors ("terminate called without an active exception") otherwise kill a rank.
    atexit.register(shutdown)


def shutdown() -> None:
    """Destroy the process group (registered at exit by :func:`init`; safe to call twice)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (float64 sums stay float64)."""
    if world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects; the identity at world size 1)."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


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
        for attr in ("sigma_min", "sigma_max", "round_sigma", "lam", "schedule"):
            if hasattr(denoiser, attr):
                setattr(self, attr, getattr(denoiser, attr))

    def step_of(self, sigma: float) -> int:
        """The 0-based index of the grid step nearest ``sigma`` (in log sigma); -1 for sigma <= 0."""
        if not sigma > 0 or len(self.log_grid) == 0:
            return -1
        return int((self.log_grid - math.log(sigma)).abs().argmin())

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor | Prediction:
        out = self.inner(x, sigma, **cond)
        x0 = as_prediction(out).x0
        if not bool(torch.isfinite(x0).all()):
            s = float(_sigma_vector(sigma, x)[0])
            raise NonFiniteError(f"the network returned NaN or inf at step {self.step_of(s) + 1} of {len(self.log_grid)} (sigma = {s:.6g})")
        return out


# ---------------------------------------------------------------------------------------------
# Files: atomic writes, shards, stale temporaries
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """Everything that determines a sample besides its seed (hashed into the run manifest).

    The batch size and the world size are not part of it: a sample depends only on its seed.
    """

    sampler: str
    sigmas: tuple[float, ...]
    shape: tuple[int, ...]
    prior: str
    lam: str
    options: str
    model: str

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def _stable(o: Any) -> Any:
    """A JSON-able description of a sampler option that is the same in every process.

    ``str(obj)`` of a function or hook embeds a memory address; here an object becomes its
    type's name plus its plain scalar attributes (e.g. a guidance ``scale``), a tensor its hash.
    """
    if o is None or isinstance(o, (bool, int, str)):
        return o
    if isinstance(o, float):
        return repr(o)
    if isinstance(o, (list, tuple)):
        return [_stable(v) for v in o]
    if isinstance(o, dict):
        return {str(k): _stable(v) for k, v in sorted(o.items(), key=lambda kv: str(kv[0]))}
    if isinstance(o, torch.Tensor):
        t = o.detach().cpu().contiguous()
        return ["tensor", str(t.dtype), list(t.shape), hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]]
    if isinstance(o, np.ndarray):
        return _stable(torch.from_numpy(np.ascontiguousarray(o)))
    name = getattr(o, "__qualname__", None) or f"{type(o).__module__}.{type(o).__qualname__}"
    attrs = {k: v for k, v in vars(o).items() if isinstance(v, (bool, int, float, str)) and not k.startswith("_")} if hasattr(o, "__dict__") and not callable(getattr(o, "__code__", None)) else {}
    return [name, _stable(attrs)]


_SHARD = re.compile(r"seeds-(\d+)-(\d+)\.npz")
# What follows ".{name}." in the temporary names of epsscale._atomic: "<pid>.<hex>.tmp".
_TEMP_REST = re.compile(r"\d+(?:\.[0-9a-f]+)?\.tmp")


def shard_name(batch: Sequence[int]) -> str:
    """``seeds-{first:06d}-{last:06d}.npz``: the smallest and largest seed of a batch.

    Shards of one run hold disjoint seed sets, so their smallest seeds, and names, differ.
    """
    return f"seeds-{min(batch):06d}-{max(batch):06d}.npz"


def _atomic_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write an ``.npz`` under a temporary name, fsync it, and move it into place."""
    with atomic_open(path) as f:
        np.savez(f, **arrays)


def _read_shard(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(seeds int64 [n], images [n, ...], labels [n] or [0]), or None for anything damaged."""
    try:
        with np.load(path, allow_pickle=False) as z:
            seeds, images, labels = z["seeds"], z["images"], z["labels"]
    except Exception:  # a damaged shard is recomputed, never trusted
        return None
    n = len(seeds) if seeds.ndim == 1 else -1
    if n < 1 or seeds.dtype.kind not in "iu" or images.ndim < 1 or len(images) != n or labels.ndim != 1 or len(labels) not in (0, n):
        return None
    return seeds.astype(np.int64), images, labels


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed writers of ``path`` left next to it.

    Our writers (``epsscale._atomic``: the final ``.npz``, PNG grids, shards, statistics) write
    ``.{name}.<pid>.<hex>.tmp`` in the same folder and then ``os.replace`` it over ``path``.
    Call this only while no other process writes ``path``.
    """
    p = Path(path)
    removed = []
    prefix = f".{p.name}."
    try:
        entries = list(p.parent.iterdir())
    except OSError:
        return removed
    for q in entries:
        if q.name.startswith(prefix) and _TEMP_REST.fullmatch(q.name[len(prefix) :]) and q.is_file():
            q.unlink(missing_ok=True)
            removed.append(q)
    return removed


def _is_temp(name: str) -> bool:
    """A temporary file an atomic write left in a work directory."""
    return name.startswith(".") and "tmp" in name


def _ours(q: Path) -> bool:
    """A file a work directory's runs write: batches, the manifest, the lock, temporaries."""
    return q.is_file() and (bool(_SHARD.fullmatch(q.name)) or q.name in ("run.json", "lock") or _is_temp(q.name))


def _check_work_dir(wd: Path, outputs: Sequence[Path]) -> None:
    """Refuse a work directory that is not one: it is removed when the run is done, so it must
    hold nothing but what runs write there (and never the final outputs)."""
    for out in outputs:
        o = out.resolve()
        if o == wd or wd in o.parents:
            raise ValueError(f"the work directory {wd} would hold the output {out}, and it is deleted at the end; pass a --work-dir of its own")
    if wd.is_dir():
        foreign = [q.name for q in wd.iterdir() if not _ours(q)]
        if foreign:
            raise ValueError(f"{wd} holds files that epsscale did not write ({', '.join(sorted(foreign)[:3])}); a work directory is deleted at the end, so pass a new or empty --work-dir")
        if any(_SHARD.fullmatch(q.name) for q in wd.iterdir()) and not (wd / "run.json").is_file():
            raise ValueError(f"{wd} holds finished batches but no run.json saying which run they belong to; delete {wd} to start over")


def _trash_dirs(wd: Path) -> list[Path]:
    return [q for q in wd.parent.glob(f".{glob.escape(wd.name)}.removing-*") if q.is_dir()]


class _Lock:
    """An exclusive advisory lock on ``work_dir/lock`` (rank 0; released on exit or kill)."""

    def __init__(self, wd: Path) -> None:
        self.fd: int | None = None
        try:
            import fcntl
        except ImportError:  # no advisory locks here (Windows): go without
            return
        fd = os.open(wd / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ValueError(f"another run is using the work directory {wd}; wait for it, or pass another --work-dir") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------------------------------
# Sampling over seeds
# ---------------------------------------------------------------------------------------------


def _digest(values: Sequence[int] | None) -> str | None:
    if values is None:
        return None
    return hashlib.sha256(np.asarray(values, dtype=np.int64).tobytes()).hexdigest()[:16]


def _prepare(wd: Path, manifest: dict, seeds: Sequence[int], outputs: Sequence[Path]) -> tuple[_Lock, dict[Path, tuple], int]:
    """Rank 0: create/lock the work directory, check the manifest, clean up, read the shards.

    Returns the lock, the finished shards and the batch size to sample with: the interrupted
    run's when resuming (so every network call has the shape it had), else the manifest's.
    """
    try:
        if wd.exists() and not wd.is_dir():
            raise ValueError(f"cannot use work directory {wd}: it is a file")
        _check_work_dir(wd, outputs)
        wd.mkdir(parents=True, exist_ok=True)
        if not os.access(wd, os.W_OK):
            raise ValueError(f"cannot use work directory {wd}: it is not writable")
        lock = _Lock(wd)
    except OSError as e:
        raise ValueError(f"cannot use work directory {wd}: {e.strerror or e}") from None
    try:
        # Leftovers of killed runs: temporaries and half-removed work directories.
        for q in wd.iterdir():
            if _is_temp(q.name):
                q.unlink(missing_ok=True)
        for path in outputs:
            remove_stale_temps(path)
        for trash in _trash_dirs(wd):
            shutil.rmtree(trash, ignore_errors=True)

        # Manifest: same job and seeds, or refuse.
        mpath = wd / "run.json"
        keys = ("job", "seeds", "labels")
        if mpath.exists():
            try:
                old = json.loads(mpath.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                old = None
            if not isinstance(old, dict):
                raise ValueError(f"{mpath} is unreadable, so the batches beside it cannot be matched to this run; delete {wd} to start over")
            if {k: old.get(k) for k in keys} != {k: manifest[k] for k in keys}:
                raise ValueError(f"{wd} holds an unfinished run with different settings; rerun that command, or delete {wd}")
            kept = old.get("batch_size")
            if isinstance(kept, int) and not isinstance(kept, bool) and kept >= 1 and kept != manifest["batch_size"]:
                log.info("resuming with the interrupted run's batch size %d (not %d), so the result is bit-identical", kept, manifest["batch_size"])
                manifest = {**manifest, "batch_size": kept}
        atomic_write_text(mpath, json.dumps(manifest, indent=2, default=str) + "\n")

        # Finished shards.
        wanted = set(seeds)
        done: dict[Path, tuple] = {}
        for p in sorted(wd.iterdir()):
            if not _SHARD.fullmatch(p.name):
                continue
            got = _read_shard(p)
            if got is None or not set(got[0].tolist()) <= wanted:
                log.warning("ignoring damaged or foreign shard %s", p)
                p.unlink(missing_ok=True)
                continue
            done[p] = got
        return lock, done, manifest["batch_size"]
    except BaseException:
        lock.release()
        raise


def _assemble(wd: Path, seeds: Sequence[int], parts: dict[Path, tuple]) -> list[tuple]:
    """Rank 0: all shards in the work directory (those read at start plus the new ones)."""
    for p in sorted(wd.iterdir()):
        if _SHARD.fullmatch(p.name) and p not in parts:
            got = _read_shard(p)
            if got is not None:
                parts[p] = got
    have: set[int] = set()
    for s, _, _ in parts.values():
        have.update(s.tolist())
    missing = [s for s in seeds if s not in have]
    if missing:
        raise ValueError(f"{len(missing)} samples (seed {missing[0]} first) are missing from {wd} after sampling; rerun the same command to finish")
    return list(parts.values())


def _pfgmpp_dim(prior_kind: str) -> int | None:
    """None for the Gaussian priors ("ve", "vp"); D for "pfgmpp:D" (PFGM++ with D extra dimensions)."""
    if prior_kind in ("ve", "vp"):
        return None
    head, _, tail = str(prior_kind).partition(":")
    if head == "pfgmpp" and tail.isdigit() and int(tail) >= 1:
        return int(tail)
    raise ValueError(f"unknown prior kind {prior_kind!r}: expected 've', 'vp' or 'pfgmpp:D' (D a positive integer)")


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
    outputs: Sequence[str | os.PathLike | None] = (),
    progress: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Sample one image per seed; returns (uint8 NHWC in seed order, labels or None) on rank 0.

    With ``work_dir`` every batch is saved as it finishes and a rerun resumes (see the module
    docstring); ``outputs`` names the final files the caller will write, whose stale
    temporaries a restart removes. Class labels: ``labels`` (one per seed) if given, else, for a
    class-conditional model, each seed draws its label from its own generator right after x_T
    (EDM's ``generate.py``). ``prior_kind`` is "vp", "ve" or "pfgmpp:D" (PFGM++ with D extra
    dimensions: x_T's direction is the same normal draw, its radius the draw after the label).
    Other ranks return None.
    """
    from tqdm import tqdm

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seeds to sample")
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds must not repeat")
    if min(seeds) < 0 or max(seeds) >= SEED_LIMIT:
        raise ValueError("seeds must be integers in [0, 2**63)")
    if labels is not None and len(labels) != len(seeds):
        raise ValueError(f"got {len(labels)} labels for {len(seeds)} seeds")
    label_of = dict(zip(seeds, (int(v) for v in labels))) if labels is not None else None
    aug_dim = _pfgmpp_dim(prior_kind)
    if aug_dim is not None:
        from .pfgmpp import pfgmpp_prior_from_normal
    r, w = rank(), world_size()
    guarded = CheckFinite(denoiser, sigmas)
    fn = SAMPLERS[sampler]

    # Work directory: rank 0 checks it and reads what is done; every rank learns the outcome.
    wd = Path(work_dir).resolve() if work_dir is not None else None
    lock: _Lock | None = None
    parts: dict[Path, tuple] = {}
    done: set[int] = set()
    if wd is not None:
        meta = job_meta or {}
        job = Job(sampler, tuple(float(s) for s in sigmas), tuple(int(v) for v in shape), prior_kind, str(meta.get("lam")), json.dumps(_stable(sampler_opts or {}), sort_keys=True), str(meta.get("model")))
        manifest = {"job": job.key(), "seeds": _digest(seeds), "labels": _digest(labels), "num_seeds": len(seeds), "world_size": w, "batch_size": batch_size, **meta}
        status: tuple[str, Any]
        if r == 0:
            try:
                lock, parts, run_batch = _prepare(wd, manifest, seeds, [Path(p) for p in outputs if p is not None])
                status = ("ok", sorted({s for got in parts.values() for s in got[0].tolist()}), run_batch)
            except (ValueError, OSError) as e:
                status = ("error", str(e) if isinstance(e, ValueError) else f"cannot use work directory {wd}: {e.strerror or e}")
        else:
            status = ("ok", [], batch_size)
        status = broadcast_object(status)
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
        bar = tqdm(total=len(seeds), initial=len(done), disable=not progress or r != 0, unit="img", desc=sampler)
        local: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for batch in batches:
            # Always batch_size rows (see the module docstring): pad with the last seed again.
            rows = batch + [batch[-1]] * (batch_size - len(batch))
            gen = StackedGenerator(rows, device=device)
            z = gen.randn((len(rows), *shape), device=device)
            cond: dict[str, torch.Tensor] = {}
            if label_of is not None:
                cond["y"] = torch.tensor([label_of[s] for s in rows], device=device)
            elif num_classes:
                cond["y"] = gen.randint(num_classes, (len(rows),), device=device)
            # PFGM++: the radius is each sample's next draw, after its label, so a seed gets the
            # same label as with EDM's Gaussian prior.
            x = prior(z, sigmas[0], kind=prior_kind) if aug_dim is None else pfgmpp_prior_from_normal(z, sigmas[0], aug_dim, gen)
            with torch.no_grad():
                out = fn(guarded, x, sigmas, noise=gen, cond=cond or None, **(sampler_opts or {}))[: len(batch)]
            cond = {k: v[: len(batch)] for k, v in cond.items()}
            if not bool(torch.isfinite(out).all()):
                raise NonFiniteError(f"the sampler produced NaN or inf at the end of sampling (seeds {batch[0]}...{batch[-1]})")
            images = to_uint8(out)
            lab = cond["y"].cpu().numpy().astype(np.int64) if "y" in cond else np.zeros(0, dtype=np.int64)
            item = (np.asarray(batch, dtype=np.int64), images, lab)
            if wd is not None:
                try:
                    _atomic_npz(wd / shard_name(batch), seeds=item[0], images=images, labels=lab)
                except OSError as e:
                    raise ValueError(f"cannot write a shard to {wd}: {e.strerror or e}") from None
            else:
                local.append(item)
            bar.update(min(len(batch) * w, bar.total - bar.n))
        bar.close()

        # Gather on rank 0.
        if wd is None:
            gathered: list[Any] = [local]
            if w > 1:
                gathered = [None] * w
                torch.distributed.all_gather_object(gathered, local)
            if r != 0:
                return None
            plist = [p for g in gathered for p in g]
        else:
            barrier()
            if r != 0:
                return None
            plist = _assemble(wd, seeds, parts)
    finally:
        if lock is not None:
            lock.release()

    # Put every sample at its seed's place.
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


def finish(work_dir: str | os.PathLike | None) -> None:
    """Remove a work directory after the final output is safely written (rank 0).

    The directory is first renamed (atomically) out of the way, so a kill during the removal
    leaves either the complete work directory (a rerun just reassembles) or a hidden
    ``.NAME.removing-PID`` folder that the next run in that place deletes.
    """
    if work_dir is None or rank() != 0:
        return
    wd = Path(work_dir).resolve()
    if not wd.is_dir():
        return
    foreign = [q.name for q in wd.iterdir() if not _ours(q)]
    if foreign:  # something else was put there during the run: delete only what runs wrote
        log.warning("leaving %s in place: it now holds files epsscale did not write (%s)", wd, ", ".join(sorted(foreign)[:3]))
        for q in wd.iterdir():
            if _ours(q):
                q.unlink(missing_ok=True)
        return
    trash = wd.with_name(f".{wd.name}.removing-{os.getpid()}")
    try:
        os.replace(wd, trash)
    except OSError:
        trash = wd
    shutil.rmtree(trash, ignore_errors=True)
