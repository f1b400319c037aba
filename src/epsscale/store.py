"""The resumable work directory of a sampling run: manifest, shards and lock.

* Outputs are named by seed. Each finished batch is written atomically to the work directory as
  ``seeds-{first:06d}-{last:06d}.npz`` (its smallest and largest seed; the file stores the
  seeds themselves, the uint8 images and the labels), so a shard describes itself.
* Resuming works seed by seed. On start, rank 0 reads the shards already in the work directory
  and the ranks split the seeds that are still missing. A run killed at any moment (SIGKILL)
  and restarted with the same command therefore loses at most the batch each rank had in
  flight, and ends with the same output. Because samples depend only on their seeds, the
  restart may use another number of processes; it keeps the interrupted run's batch size
  (recorded in ``run.json``), whatever it is given, so that the result is bit-identical. The
  manifest refuses to resume with a different model, sampler, grid, lambda or seed list, and
  names the setting that differs.
* Nothing is ever half-written: shards, the manifest and the final ``.npz`` go to a temporary
  name first and are moved into place with ``os.replace``. A restart deletes the temporary files
  a killed run left behind. An advisory lock keeps two runs out of one work directory.
* Every rank writes its shards into the one work directory, so across several machines it must
  be on a shared file system.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ._atomic import atomic_open, atomic_write_text
from .distributed import rank
from .hashing import describe, digest_ints, digest_json

__all__ = ["Job", "job_options", "manifest_for", "shard_name", "read_shard", "write_shard", "prepare", "assemble", "finish", "remove_stale_temps"]

log = logging.getLogger("epsscale")


# ---------------------------------------------------------------------------------------------
# The job: everything that determines a sample besides its seed
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
    settings: str = ""  # a digest of the rest of the plan's settings (guidance, prompts, a classifier, ...)

    def key(self) -> str:
        return digest_json(asdict(self))

    def fields(self) -> dict[str, Any]:
        """What a manifest records to name a differing setting: the grid as a digest."""
        d = asdict(self)
        d["sigmas"] = digest_json(d["sigmas"])
        return d


def job_options(options: Any) -> str:
    """The sampler options of a job as canonical JSON (see :func:`epsscale.hashing.describe`)."""
    return json.dumps(describe(options or {}), sort_keys=True)


_SHARD = re.compile(r"seeds-(\d+)-(\d+)\.npz")
# What follows ".{name}." in the temporary names of epsscale._atomic: "<pid>.<hex>.tmp".
_TEMP_REST = re.compile(r"\d+(?:\.[0-9a-f]+)?\.tmp")


def shard_name(batch: Sequence[int]) -> str:
    """``seeds-{first:06d}-{last:06d}.npz``: the smallest and largest seed of a batch.

    Shards of one run hold disjoint seed sets, so their smallest seeds, and names, differ.
    """
    return f"seeds-{min(batch):06d}-{max(batch):06d}.npz"


# ---------------------------------------------------------------------------------------------
# Shards and temporaries
# ---------------------------------------------------------------------------------------------


def write_shard(wd: Path, seeds: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
    """Write one finished batch atomically (under a temporary name, fsynced, then moved)."""
    try:
        with atomic_open(wd / shard_name(seeds.tolist())) as f:
            np.savez(f, seeds=seeds, images=images, labels=labels)
    except OSError as e:
        raise ValueError(f"cannot write a shard to {wd}: {e.strerror or e}") from None


def read_shard(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
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
# Manifest, resume and assembly
# ---------------------------------------------------------------------------------------------


def manifest_for(job: Job, seeds: Sequence[int], labels: Sequence[int] | None, *, world_size: int, batch_size: int, meta: dict | None = None) -> dict:
    """The ``run.json`` of a run: the job (its key and fields), digests of seeds and labels."""
    return {
        **(meta or {}),
        "job": job.key(), "job_fields": job.fields(), "seeds": digest_ints(seeds), "labels": None if labels is None else digest_ints(labels),
        "num_seeds": len(seeds), "world_size": world_size, "batch_size": batch_size,
    }


def _differences(old: dict, new: dict) -> list[str]:
    """The settings that make ``new`` another run than ``old``, by name."""
    out = []
    a, b = old.get("job_fields"), new.get("job_fields")
    if old.get("job") != new.get("job"):
        if isinstance(a, dict) and isinstance(b, dict):
            names = {"sigmas": "grid (steps, discretisation or sigma-max)", "options": "sampler options", "lam": "lambda", "model": "model weights", "settings": "model settings (guidance, prompts, classifier, flags)"}
            out += [names.get(k, k) for k in b if a.get(k) != b.get(k)]
        else:
            out.append("sampling settings")
    if old.get("seeds") != new.get("seeds"):
        out.append("seed list")
    if old.get("labels") != new.get("labels"):
        out.append("labels")
    return out or ["settings"]


def prepare(wd: Path, manifest: dict, seeds: Sequence[int], outputs: Sequence[Path]) -> tuple[_Lock, dict[Path, tuple], int]:
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
                raise ValueError(f"{wd} holds an unfinished run with different settings ({', '.join(_differences(old, manifest))} differ); rerun that command, or delete {wd}")
            kept = old.get("batch_size")
            if isinstance(kept, int) and not isinstance(kept, bool) and kept >= 1 and kept != manifest["batch_size"]:
                log.warning("resuming with the interrupted run's batch size %d, not %d, so that the result is bit-identical", kept, manifest["batch_size"])
                manifest = {**manifest, "batch_size": kept}
        atomic_write_text(mpath, json.dumps(manifest, indent=2, default=str) + "\n")

        # Finished shards.
        wanted = set(seeds)
        done: dict[Path, tuple] = {}
        for p in sorted(wd.iterdir()):
            if not _SHARD.fullmatch(p.name):
                continue
            got = read_shard(p)
            if got is None or not set(got[0].tolist()) <= wanted:
                log.warning("ignoring damaged or foreign shard %s", p)
                p.unlink(missing_ok=True)
                continue
            done[p] = got
        return lock, done, manifest["batch_size"]
    except BaseException:
        lock.release()
        raise


def assemble(wd: Path, seeds: Sequence[int], parts: dict[Path, tuple]) -> list[tuple]:
    """Rank 0: all shards in the work directory (those read at start plus the new ones)."""
    for p in sorted(wd.iterdir()):
        if _SHARD.fullmatch(p.name) and p not in parts:
            got = read_shard(p)
            if got is not None:
                parts[p] = got
    have: set[int] = set()
    for s, _, _ in parts.values():
        have.update(s.tolist())
    missing = [s for s in seeds if s not in have]
    if missing:
        raise ValueError(f"{len(missing)} samples (seed {missing[0]} first) are missing from {wd} after sampling; rerun the same command to finish")
    return list(parts.values())


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
