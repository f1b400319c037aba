"""Atomic file writes: a reader never sees a half-written file, a killed writer leaves none.

Everything is written to a unique temporary file in the destination's directory, flushed to
disk, then moved over the destination with ``os.replace`` (atomic on POSIX and Windows).
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

__all__ = ["atomic_open", "atomic_write", "atomic_write_text"]


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_open(p) as f: ...`` writes ``p`` all at once, or not at all."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode.replace("w", "x")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(file)`` on a temporary file and move it onto ``path``."""
    with atomic_open(path, "wb") as f:
        write(f)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)
