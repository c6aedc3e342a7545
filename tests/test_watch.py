"""survey-qa watch as a real subprocess, frames copied in one by one, stopped and restarted."""
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

from survey_qa.flows.watch import frame_complete, parse_until

NIGHT = "2024-06-01"
WAIT_S = 240  # generous: the machine may be busy; nothing here asserts a duration


def test_parse_until():
    now = datetime(2024, 6, 1, 22, 0, tzinfo=timezone.utc)
    assert parse_until("05:30", now) == datetime(2024, 6, 2, 5, 30, tzinfo=timezone.utc)
    assert parse_until("23:00", now) == datetime(2024, 6, 1, 23, 0, tzinfo=timezone.utc)
    assert parse_until("2024-06-02T04:00", now) == datetime(2024, 6, 2, 4, tzinfo=timezone.utc)
    assert parse_until(None) is None
    for bad in ("25:00", "soon", "12:xx"):
        with pytest.raises(ValueError, match="--until"):
            parse_until(bad, now)


def test_frame_complete_only_when_whole(tmp_path):
    from astropy.io import fits
    import numpy as np

    whole = tmp_path / "a.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones((200, 200), np.float32))]
                 ).writeto(whole)
    data = whole.read_bytes()
    assert frame_complete(whole)
    for cut in (0, 100, 2880, len(data) - 2880):
        part = tmp_path / f"cut{cut}.fits"
        part.write_bytes(data[:cut])
        assert not frame_complete(part), cut
    import gzip

    gz = tmp_path / "b.fits.gz"
    gz.write_bytes(gzip.compress(data))
    assert frame_complete(gz)
    gz.write_bytes(gzip.compress(data)[:-400])
    assert not frame_complete(gz)


class Watcher:
    """A ``survey-qa watch`` subprocess whose output lines are read as they come."""

    def __init__(self, raw, out, hooks):
        cmd = [sys.executable, "-m", "survey_qa.cli", "watch", "--night", NIGHT,
               "--raw-root", str(raw), "--out-root", str(out), "--classifier", "rules",
               "--on-bad", f'cat > "{hooks}/$SURVEY_QA_EXPOSURE.json"; '
                           f'echo "$SURVEY_QA_CLASS" > "{hooks}/$SURVEY_QA_EXPOSURE.class"']
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, text: str) -> str:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"watch ended before {text!r}:\n" + "\n".join(self.seen))
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} within {WAIT_S} s:\n" + "\n".join(self.seen))

    def stop(self, sig) -> int:
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=WAIT_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        while True:
            try:
                line = self.lines.get(timeout=5)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
        self.reader.join(timeout=10)
        self.proc.stdout.close()
        return rc


def _copy_slowly(src: Path, dst: Path):
    """Write a frame in two parts with a pause between, as a camera would."""
    data = src.read_bytes()
    with open(dst, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(1.5)
        f.write(data[len(data) // 2:])


@pytest.mark.slow
def test_watch_measures_each_frame_once_across_a_restart(tmp_path):
    from survey_qa.flows.simulate import simulate_night

    simulate_night(tmp_path / "staging", NIGHT, 4, seed=1, size_px=256)
    frames = sorted((tmp_path / "staging" / NIGHT).glob("*.fits*"))
    ids = [f.name.split(".")[0] for f in frames]
    raw, out, hooks = tmp_path / "raw", tmp_path / "out", tmp_path / "hooks"
    hooks.mkdir()
    night = raw / NIGHT

    first = Watcher(raw, out, hooks)
    first.wait_for("watching")
    _copy_slowly(frames[0], night / frames[0].name)
    line = first.wait_for(ids[0])
    assert "FAILED" not in line  # measured when whole, not while half written
    shutil.copy(frames[1], night / frames[1].name)
    first.wait_for(ids[1])
    assert first.stop(signal.SIGTERM) == 0
    assert "stopped by signal" in first.seen[-1]

    shutil.copy(frames[2], night / frames[2].name)  # lands while nothing watches

    second = Watcher(raw, out, hooks)
    assert "2 frames already done, 1 to measure" in second.wait_for("watching")
    second.wait_for(ids[2])
    shutil.copy(frames[3], night / frames[3].name)
    second.wait_for(ids[3])
    assert second.stop(signal.SIGINT) == 0

    verdicts = [line.split()[0] for line in first.seen + second.seen
                if line.split() and line.split()[0] in ids]
    assert sorted(verdicts) == sorted(ids)  # every frame once: nothing lost, nothing twice

    exp = pd.read_parquet(out / "catalogs" / "exposures" / f"night={NIGHT}")
    top = exp[exp["detector"] != "ALL"].drop_duplicates("exposure").set_index("exposure")
    top.update(exp[exp["detector"] == "ALL"].set_index("exposure"))
    assert sorted(top.index) == sorted(ids)
    assert (top["status"] == "ok").all()
    for e, row in top.iterrows():
        hook = hooks / f"{e}.json"
        if row["quality_class"] == "good":
            assert not hook.exists()
        else:
            sent = json.loads(hook.read_text())
            assert sent["exposure"] == e and sent["quality_class"] == row["quality_class"]
            assert (hooks / f"{e}.class").read_text().strip() == row["quality_class"]
    page = (out / "reports" / f"{NIGHT}.html").read_text()
    assert all(f'id="exp-{e}"' in page for e in ids)


def test_only_writes_make_a_frame_pending(tmp_path):
    """Opening or reading a frame (the watch's own reads) never queues it again."""
    from survey_qa.flows.watch import drain_events

    folder = tmp_path / NIGHT
    a, b, c = (folder / n for n in ("a.fits", "b.fits", "sub/_truth.fits"))
    events = queue.Queue()
    for kind, path in [("opened", a), ("closed_no_write", a), ("modified", b),
                       ("closed", b), ("created", c), ("created", folder / "notes.txt"),
                       ("closed", folder / "done.fits")]:
        events.put((kind, str(path)))
    pending = {}
    drain_events(events, pending, folder, 0.1, measured={folder / "done.fits"})
    assert list(pending) == [b] and pending[b].closed


def test_frames_are_the_files_a_nightly_run_would_take(tmp_path):
    from survey_qa.pipeline import io

    folder = tmp_path / NIGHT
    assert io.is_frame_file(folder / "sub" / "a.fits.fz", folder)
    assert not io.is_frame_file(folder / "_truth" / "a.fits", folder)
    assert not io.is_frame_file(folder / ".a.fits.tmp", folder)
    assert not io.is_frame_file(folder / "notes.txt", folder)
    assert not io.is_frame_file(tmp_path / "other" / "a.fits", folder)


def test_verdict_of_a_frame_as_text_json_and_environment():
    import math

    from survey_qa.pipeline import verdict

    row = {"exposure": "e1", "status": "ok", "quality_class": "bad_seeing",
           "fwhm_arcsec": math.nan, "fwhm_px": 5.5, "ellipticity": 0.1, "sky_level": 100.0,
           "sky_noise": 5.0, "reason": "FWHM 5.5 px > 4", "processed_at":
           datetime(2024, 3, 1, tzinfo=timezone.utc)}
    line = verdict.verdict_line(row)
    assert line.startswith("e1  bad_seeing  FWHM 5.50 px") and "| FWHM 5.5 px > 4" in line
    sent = json.loads(verdict.row_json(row))
    assert sent["fwhm_arcsec"] is None and sent["processed_at"].startswith("2024-03-01")
    env = verdict.row_env(row, NIGHT)
    assert env["SURVEY_QA_CLASS"] == "bad_seeing" and env["SURVEY_QA_FWHM_ARCSEC"] == ""
    assert verdict.verdict_line({"exposure": "e2", "status": "failed", "error": "x"}) == \
        "e2  FAILED  x"
