"""Short SHA-256 digests: the one place epsscale hashes things.

Digests identify weights, seed lists, sampling jobs and cached statistics in manifests and cache
keys. All are the first ``length`` hex digits (16 by default) of a SHA-256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

__all__ = ["describe", "digest_bytes", "digest_file", "digest_json", "digest_ints", "digest_tensor", "digest_state", "digest_tree"]


def digest_bytes(data: bytes | Iterable[bytes], length: int = 16) -> str:
    """SHA-256 of ``data`` (bytes, or an iterable of byte chunks hashed in order)."""
    h = hashlib.sha256()
    for chunk in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
        h.update(chunk)
    return h.hexdigest()[:length]


def digest_file(path: str | os.PathLike, length: int = 16) -> str:
    """SHA-256 of a file's contents, read in 1 MiB chunks."""
    with open(path, "rb") as f:
        return digest_bytes(iter(lambda: f.read(1 << 20), b""), length)


def digest_json(obj: Any, length: int = 16) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys; ``str`` for what JSON cannot hold)."""
    return digest_bytes(json.dumps(obj, sort_keys=True, default=str).encode(), length)


def digest_ints(values: Iterable[int], length: int = 16) -> str:
    """SHA-256 of integers as little-endian int64 (seed lists, labels)."""
    return digest_bytes(np.asarray(list(values), dtype=np.int64).tobytes(), length)


def digest_tensor(t: torch.Tensor, length: int = 16) -> str:
    """SHA-256 of a tensor's bytes (its dtype and shape are not included)."""
    t = t.detach().cpu().contiguous()
    return digest_bytes(t.reshape(-1).view(torch.uint8).numpy().tobytes(), length)


def digest_state(module: torch.nn.Module, length: int = 16) -> str:
    """SHA-256 of a module's state dict: names and values, in name order."""
    return digest_bytes((piece for k, v in sorted(module.state_dict().items()) for piece in (k.encode(), v.detach().cpu().contiguous().numpy().tobytes())), length)


def digest_tree(path: str | os.PathLike, length: int = 12) -> str:
    """SHA-256 of a file's or folder's resolved path and the relative name, size and modification
    time of every file under it. Cheap (no contents read), and it changes when any file does:
    a folder's own size and time do not change when a file inside it is replaced."""
    p = Path(path).resolve()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]

    def pieces() -> Iterable[bytes]:
        yield str(p).encode()
        for f in files:
            st = f.stat()
            yield f"|{f.relative_to(p) if f != p else ''}|{st.st_size}|{st.st_mtime_ns}".encode()

    return digest_bytes(pieces(), length)


def describe(o: Any) -> Any:
    """A JSON-able description of a value (sampler options, a plan's settings) that is the same in
    every process and every run: resume manifests, cache keys and schedule JSONs record it.

    ``str(obj)`` of a function or hook embeds a memory address; here an object becomes its
    type's name plus its plain scalar attributes (e.g. a guidance ``scale``, DCW's ``c``), a
    dataclass its fields, a tensor its dtype, shape and digest, a float its ``repr``.
    """
    if o is None or isinstance(o, (bool, int, str)):
        return o
    if isinstance(o, float):
        return repr(o)
    if isinstance(o, (list, tuple)):
        if len(o) > 64:  # a table: its digest
            return ["sequence", len(o), digest_json([describe(v) for v in o])]
        return [describe(v) for v in o]
    if isinstance(o, dict):
        return {str(k): describe(v) for k, v in sorted(o.items(), key=lambda kv: str(kv[0]))}
    if isinstance(o, torch.Tensor):
        t = o.detach().cpu().contiguous()
        return ["tensor", str(t.dtype), list(t.shape), digest_tensor(t)]
    if isinstance(o, np.ndarray):
        return describe(torch.from_numpy(np.ascontiguousarray(o)))
    if dataclasses.is_dataclass(o) and not isinstance(o, type):  # its compared fields (a VPSchedule's kind and table, ...)
        return [type(o).__qualname__, describe({f.name: getattr(o, f.name) for f in dataclasses.fields(o) if f.compare})]
    name = getattr(o, "__qualname__", None) or f"{type(o).__module__}.{type(o).__qualname__}"
    attrs = {k: v for k, v in vars(o).items() if isinstance(v, (bool, int, float, str)) and not k.startswith("_")} if hasattr(o, "__dict__") and not callable(getattr(o, "__code__", None)) else {}
    return [name, describe(attrs)]
