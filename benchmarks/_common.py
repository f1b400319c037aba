"""What the benchmarks share: an FID grid that grows past an end holding its minimum, a JSON
cache that several processes can add to, and writing a report between markers in
benchmarks/RESULTS.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def add_to_json_cache(path: Path, key: str, value: Any) -> dict:
    """Add ``key: value`` to the JSON object in ``path`` and return the whole object. The file is
    read and rewritten (atomically) under an exclusive lock on ``path.lock``, so processes that
    share the cache (one per sampler, say) keep each other's entries."""
    import fcntl
    import json

    from epsscale._atomic import atomic_write_text

    path = Path(path)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = json.loads(path.read_text()) if path.exists() else {}
        cache[key] = value
        atomic_write_text(path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
    return cache


def grid_to_interior_minimum(evaluate: Callable[[float], float], lo: float, hi: float, points: int, cache: Path, key: dict, max_extend: int = 8) -> tuple[Any, int]:
    """``fid_search`` over a grid of b; while the best b is an end of the grid, the grid grows past
    that end by one spacing (at most ``max_extend`` times). Returns the last search's result and
    how many points were newly evaluated in all. Every point is cached in ``cache``."""
    from epsscale.exposure import fid_search

    res = fid_search(evaluate, lo, hi, method="grid", points=points, cache_path=cache, key=key)
    new = res.new_evaluations
    step = (hi - lo) / (points - 1)
    for _ in range(max_extend):
        if res.best_b not in (lo, hi):
            break
        lo, hi = (lo - step, hi) if res.best_b == lo else (lo, hi + step)
        points += 1
        res = fid_search(evaluate, lo, hi, method="grid", points=points, cache_path=cache, key=key)
        new += res.new_evaluations
    return res, new


def write_between_markers(path: Path, begin: str, end: str, text: str) -> None:
    """Replace what stands between the markers ``begin`` and ``end`` in ``path`` with ``text``."""
    from epsscale._atomic import atomic_write_text

    head, sep, rest = path.read_text().partition(begin)
    _, sep2, tail = rest.partition(end)
    if not sep or not sep2:
        raise SystemExit(f"error: {path} has no '{begin}' ... '{end}' markers")
    atomic_write_text(path, f"{head}{begin}\n{text.strip()}\n{end}{tail}")
