"""``survey-qa watch``: rate each frame of a night as it lands, at the telescope.

The night folder is watched with watchdog (inotify on Linux). A new file is measured once
it is whole: its FITS structure parses to the end of its last HDU and either the writer
closed it (a close-after-write event) or its size has not changed for ``settle_s``
seconds. Each frame goes through the nightly flow's own per-exposure function
(:func:`survey_qa.flows.nightly.process_exposure`), so its results land in the same
``_work/`` files a nightly run writes and reads. A verdict line is printed at once;
``--on-bad CMD`` runs for a frame that is not good; then the night's catalogs and report
are rewritten. When the watch stops, the catalogs are gathered once more with the
night-level calibrations a nightly run applies at its end.

Stop and start it at will: at start, every file of the night without whole results is
measured (nothing is lost) and every file with them is skipped (nothing is measured
twice). SIGINT and SIGTERM stop it after the frame in hand, as does ``--until``.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from survey_qa import paths
from survey_qa.config import Config
from survey_qa.pipeline import io, measure, outputs, verdict

SETTLE_S = 2.0
"""Seconds a file's size must stay the same when no close-after-write event is seen."""

COMPRESSED_STREAMS = (".gz", ".bz2")


# ---------------------------------------------------------------------------- arguments, files


def parse_until(text: str | None, now: datetime | None = None) -> datetime | None:
    """The stop time of ``--until``: an ISO date-time (UTC unless it says), or ``HH:MM`` UTC
    (the next such time from ``now``). Raises ``ValueError`` on anything else."""
    if not text:
        return None
    now = now or datetime.now(timezone.utc)
    try:
        hh, mm = (int(v) for v in text.split(":")) if len(text) <= 5 else (None, None)
    except ValueError:
        hh = mm = None
    if hh is not None:
        if not (0 <= hh < 24 and 0 <= mm < 60):
            raise ValueError(f"--until: {text!r} is not a time HH:MM")
        t = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        return t if t > now else t + timedelta(days=1)
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--until: {text!r} is neither HH:MM (UTC) nor an ISO date-time") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def frame_complete(path: str | os.PathLike) -> bool:
    """True when a FITS file holds an image and parses to the end of its last HDU's data.

    For a gzip or bzip2 stream every HDU's data are read (a cut stream raises); otherwise
    the last HDU's data must end within the file (astropy's ``fileinfo``).
    """
    from astropy.io import fits

    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(path, memmap=False, lazy_load_hdus=False) as hdul:
                if not any(len(h.shape or ()) >= 2 for h in hdul if h.is_image):
                    return False  # a frame holds an image: only headers came so far
                if path.name.lower().endswith(COMPRESSED_STREAMS):
                    for h in hdul:
                        _ = h.data
                    return True
                info = hdul.fileinfo(len(hdul) - 1)
                return info["datLoc"] + info["datSpan"] <= size
    except Exception:  # noqa: BLE001 -- any parse error means: not whole yet
        return False


# ---------------------------------------------------------------------------- the loop


@dataclass
class PendingFile:
    """A frame seen landing, not measured yet: its last size, when that changed, and
    whether its writer closed it."""

    size: int = -1
    changed_at: float = 0.0
    closed: bool = False


@dataclass
class WatchSummary:
    """What a watch session did."""

    night: str
    measured: list[str] = field(default_factory=list)
    skipped: int = 0
    bad: list[str] = field(default_factory=list)
    stopped_by: str = ""

    def report(self) -> str:
        return (f"watch {self.night}: {len(self.measured)} frames measured now "
                f"({len(self.bad)} not good), {self.skipped} already done; "
                f"stopped by {self.stopped_by}")


class _Handler:
    """watchdog event handler: file paths onto a queue, with the kind of event."""

    def __init__(self, q: queue.Queue):
        self.q = q

    def dispatch(self, event) -> None:
        if event.is_directory:
            return
        path = getattr(event, "dest_path", "") or event.src_path
        self.q.put((event.event_type, os.fsdecode(path)))


def watch(cfg: Config, night: str, *, until: datetime | None = None,
          on_bad: str | None = None, report: bool = True, settle_s: float = SETTLE_S,
          echo=print) -> WatchSummary:
    """Watch ``<raw_root>/<night>/`` and measure each frame as it lands.

    Parameters
    ----------
    until
        Stop at this time (UTC); None: until SIGINT or SIGTERM.
    on_bad
        Shell command run for a frame that is not good (or failed): the frame's row as
        JSON on its standard input and as ``SURVEY_QA_*`` environment variables.
    report
        Rewrite the night's HTML report after each batch of frames.
    """
    from watchdog.observers import Observer

    from survey_qa.flows import nightly, workdir

    folder = paths.night_dir(cfg.run.raw_root, night)
    folder.mkdir(parents=True, exist_ok=True)
    out_root = Path(cfg.run.out_root)
    models = nightly.load_models(cfg)
    workdir.check_out_root(out_root, cfg.run.min_free_mb)
    summary = WatchSummary(night)
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set())
                for s in (signal.SIGINT, signal.SIGTERM)}
    children: list[subprocess.Popen] = []
    observer = Observer()
    observer.schedule(_Handler(events), str(folder), recursive=True)
    observer.start()  # before the first scan: nothing that lands in between is missed
    try:
        with workdir.night_lock(out_root, night):
            files = io.night_exposures(cfg.run.raw_root, night)
            done = workdir.verified_done(out_root, night, files)
            summary.skipped = len(done)
            pending = {Path(p): PendingFile() for e, p in files.items() if e not in done}
            measured = {Path(p) for e, p in files.items() if e in done}
            echo(f"watching {folder} ({len(done)} frames already done, {len(pending)} to "
                 f"measure){' until ' + until.isoformat() if until else ''}; Ctrl-C stops")
            dirty = bool(pending) or not paths.catalog_file(out_root, "exposures", night).exists()
            while not stop.is_set():
                if until and datetime.now(timezone.utc) >= until:
                    summary.stopped_by = "--until"
                    break
                drain_events(events, pending, folder, 0.25 if pending else 1.0, measured)
                ready = _ready(pending, settle_s)
                for path in ready:
                    del pending[path]
                    if stop.is_set():
                        break
                    measured.add(path)
                    rows = _measure(cfg, night, path, done, models)
                    if rows is None:
                        continue
                    top = measure.exposure_level(rows)[0]
                    echo(verdict.verdict_line(top))
                    summary.measured.append(top["exposure"])
                    if top["status"] != "ok" or top["quality_class"] != "good":
                        summary.bad.append(top["exposure"])
                        if on_bad:
                            children.append(_run_on_bad(on_bad, top, night))
                    dirty = True
                children = [c for c in children if c.poll() is None]
                if dirty and not ready_soon(pending, events):
                    _gather(cfg, night, models)
                    if report:
                        _report(cfg, night, echo)
                    dirty = False
            summary.stopped_by = summary.stopped_by or "signal"
            _gather(cfg, night, models, final=True)
            if report:
                _report(cfg, night, echo)
    finally:
        observer.stop()
        observer.join(timeout=5)
        for s, h in previous.items():
            signal.signal(s, h)
        for c in children:
            try:
                c.wait(timeout=30)
            except subprocess.TimeoutExpired:
                echo(f"--on-bad command still running after 30 s (pid {c.pid}): left running")
    return summary


def ready_soon(pending: dict, events: queue.Queue) -> bool:
    """True when more frames are in flight: gather the catalogs once they are measured."""
    return bool(pending) or not events.empty()


WRITE_EVENTS = ("created", "modified", "moved", "closed")
"""watchdog events that mean a file was written; opening or reading one (the watch's own
reads included) is not."""


def drain_events(events: queue.Queue, pending: dict[Path, PendingFile], folder: Path,
           timeout: float, measured: set[Path]) -> None:
    """Take the file events that arrived; wait up to ``timeout`` for the first one.

    Files already measured are left alone (a frame is measured once).
    """
    try:
        item = events.get(timeout=timeout)
    except queue.Empty:
        return
    while True:
        kind, name = item
        path = Path(name)
        if kind in WRITE_EVENTS and path not in measured and io.is_frame_file(path, folder):
            p = pending.setdefault(path, PendingFile())
            if kind == "closed":
                p.closed = True
        elif kind == "deleted":
            pending.pop(Path(name), None)
        try:
            item = events.get_nowait()
        except queue.Empty:
            return


def _ready(pending: dict[Path, PendingFile], settle_s: float) -> list[Path]:
    """Pending files that are whole now, oldest first."""
    now = time.monotonic()
    out = []
    for path, p in pending.items():
        try:
            size = path.stat().st_size
        except OSError:
            continue
        if size != p.size:
            p.size, p.changed_at = size, now
            if not p.closed:
                continue
        if (p.closed or now - p.changed_at >= settle_s) and frame_complete(path):
            out.append(path)
        elif p.closed and not frame_complete(path):
            p.closed = False  # closed early (written in several sessions): wait for more
    return sorted(out, key=lambda q: pending[q].changed_at)


def _measure(cfg: Config, night: str, path: Path, done: set[str], models) -> list[dict] | None:
    """One frame through the nightly per-exposure function; None when already done."""
    from survey_qa.flows import nightly

    files = io.night_exposures(cfg.run.raw_root, night)
    exposure = next((e for e, p in files.items() if Path(p) == path), None)
    if exposure is None or exposure in done:
        return None
    store = paths.zarr_store(cfg.run.out_root, night)
    frames = nightly.plan_frames(str(path), cfg, exposure)
    stored = outputs.variable_shape(store, "ae_mask") if models.scorer is not None else None
    shape = measure.max_shape([f[2:] for f in frames], stored,
                              models.scorer.block_px if models.scorer is not None else 1)
    index = outputs.setup_zarr(store, [f[:2] for f in frames],
                               measure.array_variables(cfg, models, shape))
    rows = nightly.process_exposure(str(path), cfg, night, str(store), index, exposure)
    done.add(exposure)
    return rows


def _gather(cfg: Config, night: str, models, final: bool = False) -> None:
    """The night's catalogs from every whole per-exposure result.

    During the night the rows are each frame's own measurements; ``final`` (when the watch
    stops) applies the night-level calibrations as a nightly run does when it ends: they
    look at the whole night, so they are not redone after every frame.
    """
    from survey_qa.flows.nightly import gather_night

    gather_night(cfg, night, list(io.night_exposures(cfg.run.raw_root, night)), models,
                 calibrate=final)


def _report(cfg: Config, night: str, echo) -> None:
    from survey_qa.flows.report import try_write_report

    echo(f"report: {try_write_report(cfg, night)}")  # a view: it never stops the watch


def _run_on_bad(command: str, row: dict, night: str) -> subprocess.Popen:
    """Start the user's command with the row on stdin and in the environment."""
    proc = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE,
                            env={**os.environ, **verdict.row_env(row, night)})
    try:
        proc.stdin.write(verdict.row_json(row).encode())
        proc.stdin.close()
    except BrokenPipeError:  # the command does not read its input: fine
        pass
    return proc
