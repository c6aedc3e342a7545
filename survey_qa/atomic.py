"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

Every writer in survey-qa goes through :func:`atomic_target`: the content is written to a
hidden temporary file in the target's folder and renamed over the target (a rename within
one file system is atomic on POSIX). A crash leaves at most a hidden ``.<name>.*.tmp``
file, which :func:`survey_qa.flows.workdir.remove_temporaries` cleans up. Writers that
choose a format by the file's suffix (``np.savez``) are given an open file instead.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


TEMPORARY_GLOB = ".*.tmp"
"""The names of the temporary files :func:`atomic_target` writes (a hidden ``.<name>.<id>.tmp``)."""


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike, *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``.

    Parameters
    ----------
    path
        The file to write. Its folder is created when missing.
    mode
        Permission bits given to the file before the rename (e.g. ``0o644`` for package
        data that every user reads); the process's default when None.

    Examples
    --------
    >>> with atomic_target(out / "table.parquet") as tmp:  # doctest: +SKIP
    ...     pq.write_table(table, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_target(path, mode=mode) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, mode: int | None = None) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the path."""
    return write_bytes(path, text.encode("utf-8"), mode=mode)
