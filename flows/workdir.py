"""The out-root of a nightly run: checked before work starts, locked while it runs, and
per-exposure results verified before a re-run trusts them.

The work folder (:func:`survey_qa.paths.work_dir`) holds one exposures file and one sources
file per exposure (:func:`result_file`). A
re-run counts an exposure as done only when both files are whole Parquet files with the
catalog schema and the exposure rows name the file that is there now; anything else is
removed and redone. A temporary file left by a killed run is removed.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from survey_qa import paths
from survey_qa.atomic import TEMPORARY_GLOB
from survey_qa.pipeline import outputs
from survey_qa.pipeline.errors import NightLocked, RunEnvironmentError
from survey_qa.pipeline.schema import EXPOSURE_SCHEMA, SOURCE_SCHEMA, rows_to_table

ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT,
                      errno.EIO}
"""Write errors that are the machine's, not the data's: they stop the run (exit 3)."""


RESULT_KINDS = {"exposures": EXPOSURE_SCHEMA, "sources": SOURCE_SCHEMA}
"""The per-exposure results and their catalog schemas, in the order they are written (the
exposure rows last: they mark the exposure done)."""


def result_file(out_root: str | os.PathLike, night: str, kind: str, exposure: str) -> Path:
    """One exposure's results of one kind (``exposures`` or ``sources``)."""
    return paths.result_file(out_root, night, kind, exposure)


def write_results(out_root: str | os.PathLike, night: str, exposure: str, rows: list[dict],
                  sources: list[pd.DataFrame]) -> None:
    """Write one exposure's results, atomically: its sources (the tables of its detectors,
    catalog columns), then its exposure rows (whose presence marks the exposure done)."""
    frame = (pd.concat(sources, ignore_index=True) if sources
             else SOURCE_SCHEMA.empty_table().to_pandas())
    table = pa.Table.from_pandas(frame[SOURCE_SCHEMA.names], schema=SOURCE_SCHEMA,
                                 preserve_index=False)
    outputs.write_parquet_atomic(table, result_file(out_root, night, "sources", exposure))
    outputs.write_parquet_atomic(rows_to_table(rows),
                                 result_file(out_root, night, "exposures", exposure))


def check_out_root(out_root: str | os.PathLike, min_free_mb: float) -> None:
    """Make sure the out-root can be written and has room, before any work starts.

    Raises
    ------
    RunEnvironmentError
        When the folder cannot be created or written, or has less than ``min_free_mb``
        MiB free.
    """
    root = Path(out_root)
    probe = root / f".survey-qa-probe-{uuid.uuid4().hex}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"x" * 4096)
    except OSError as e:
        raise RunEnvironmentError(f"out-root {root} is not writable: "
                                  f"{e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    free_mb = shutil.disk_usage(root).free / 2**20
    if free_mb < min_free_mb:
        raise RunEnvironmentError(f"out-root {root} has {free_mb:.0f} MiB free; "
                                  f"run.min_free_mb asks for {min_free_mb:g}")


def environment_error(e: OSError, out_root: str | os.PathLike) -> RunEnvironmentError | None:
    """The run-stopping form of a write error, or None when it is not the machine's."""
    code = e.errno
    if code is None:  # pyarrow and others put the errno only in the message
        m = re.search(r"\[Errno (\d+)\]", str(e))
        code = int(m.group(1)) if m else None
    if code in ENVIRONMENT_ERRNOS:
        return RunEnvironmentError(f"cannot write under {out_root}: {os.strerror(code)}"
                                   + (f" ({e.filename})" if e.filename else ""))
    return None


@contextlib.contextmanager
def night_lock(out_root: str | os.PathLike, night: str):
    """Hold the night's lock for the duration of a run.

    An exclusive ``flock`` on :func:`survey_qa.paths.lock_file`: the kernel releases it when the
    process ends, however it ends (kill -9 included), so a dead run never blocks the next.

    Raises
    ------
    NightLocked
        When another live process holds it.
    """
    path = paths.lock_file(out_root, night)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise NightLocked(f"another survey-qa run (pid {holder}) is processing night "
                              f"{night} into {out_root}; wait for it to end") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing releases the lock


def _schema_ok(path: Path, schema: pa.Schema) -> bool:
    """Whether a file is Parquet with these columns and types (Parquet stores a timestamp
    in seconds as milliseconds: any timestamp unit is taken)."""
    try:
        got = pq.read_schema(path)
    except Exception:  # truncated, garbage, not Parquet
        return False
    if got.names != schema.names:
        return False
    return all(a.type == b.type or (pa.types.is_timestamp(a.type)
                                    and pa.types.is_timestamp(b.type))
               for a, b in zip(got, schema))


def _rows_ok(path: Path, exposure: str, source_path: str) -> bool:
    try:
        table = pq.read_table(path, columns=["exposure", "path", "status"])
    except Exception:
        return False
    if table.num_rows == 0:
        return False
    rows = table.to_pylist()
    return all(r["exposure"] == exposure and r["path"] == source_path
               and r["status"] in ("ok", "failed") for r in rows)


def remove_temporaries(folder: Path) -> None:
    """Remove hidden temporary files that a killed run left behind."""
    for p in folder.glob(TEMPORARY_GLOB):
        with contextlib.suppress(OSError):
            p.unlink()


def verified_done(out_root: str | os.PathLike, night: str,
                  files: dict[str, Path]) -> set[str]:
    """Exposures whose per-exposure results are whole; the others' results are removed.

    Parameters
    ----------
    files
        ``{exposure: path}`` of the night's files as discovered now.

    Returns
    -------
    set
        Exposure ids whose exposures and sources files both exist, read as Parquet with
        the catalog schemas, and whose rows belong to the file discovered now.
    """
    work = paths.work_dir(out_root, night)
    done = set()
    for kind in RESULT_KINDS:
        if (work / kind).is_dir():
            remove_temporaries(work / kind)
    for exposure, path in files.items():
        rows = result_file(out_root, night, "exposures", exposure)
        srcs = result_file(out_root, night, "sources", exposure)
        if not (rows.exists() or srcs.exists()):
            continue
        if (_schema_ok(rows, EXPOSURE_SCHEMA) and _schema_ok(srcs, SOURCE_SCHEMA)
                and _rows_ok(rows, exposure, str(path))):
            done.add(exposure)
        else:  # not whole: redo it
            rows.unlink(missing_ok=True)
            srcs.unlink(missing_ok=True)
    return done


def forget_results(out_root: str | os.PathLike, night: str) -> None:
    """Remove every per-exposure result of a night (its array store was rebuilt)."""
    shutil.rmtree(paths.work_dir(out_root, night), ignore_errors=True)


def read_results(out_root: str | os.PathLike, night: str, kind: str,
                 exposures: list[str]) -> pa.Table:
    """The per-exposure results of these exposures as one table with the catalog schema."""
    schema = RESULT_KINDS[kind]
    files = [str(f) for f in (result_file(out_root, night, kind, e) for e in exposures)
             if f.exists()]
    if not files:
        return schema.empty_table()
    tables = [pq.read_table(f, schema=schema) for f in files]
    return pa.concat_tables(tables).select(schema.names).cast(schema)
