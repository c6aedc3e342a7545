"""Faults around a night: killed runs and workers, concurrent runs, damaged re-run state,
read-only and full out-roots, wrong configuration. Each ends in a documented exit code and
a one-line message, or in a whole night."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from survey_qa import paths
from survey_qa.cli import main
from survey_qa.config import load_config
from survey_qa.flows import workdir
from survey_qa.flows.nightly import run_night
from survey_qa.pipeline.errors import NightLocked, RunEnvironmentError

NIGHT = "2024-03-01"


def star_frame(seed: int, n: int = 192) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n]
    img = np.full((n, n), 300.0)
    for _ in range(25):
        x0, y0 = rng.uniform(12, n - 12, 2)
        img += 2000 * np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / 1.3 ** 2)
    return (rng.poisson(img) + rng.normal(0, 3, img.shape)).astype(np.float32)


def make_night(raw: Path, n_frames: int, size: int = 192) -> Path:
    d = raw / NIGHT
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n_frames):
        h = fits.Header({"EXPTIME": 30.0, "GAIN": 1.0, "RDNOISE": 3.0, "PIXSCALE": 0.4,
                         "SATURATE": 60000.0})
        fits.PrimaryHDU(star_frame(i, size), h).writeto(d / f"f{i:02d}.fits")
    return d


def settings(tmp_path: Path, **run) -> Path:
    """A configuration file for the command line: quick, no dashboard, rules only."""
    path = tmp_path / "qa.yaml"
    lines = ["run:", "  progress: false", "  classifier: rules", "  min_free_mb: 0.1"]
    lines += [f"  {k}: {v}" for k, v in run.items()]
    lines += ["cluster:", "  workers: 1", "  dashboard_address: null",
              "autoencoder:", "  enabled: false", "psf:", "  min_stars: 3"]
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(raw, out, conf, *extra):
    """Run the command line in a new process (its own session, so that it can be killed);
    its output goes to files beside the configuration (a pipe could fill and block it)."""
    cmd = [sys.executable, "-m", "survey_qa.cli", "--night", NIGHT, "--raw-root", str(raw),
           "--out-root", str(out), "--config", str(conf), *extra]
    log = Path(conf).parent / f"run-{time.monotonic_ns()}"
    with open(f"{log}.out", "w") as so, open(f"{log}.err", "w") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, start_new_session=True)
    proc.err_path = Path(f"{log}.err")
    return proc


def finish(proc, timeout=600) -> tuple[int, str]:
    """Wait for a command-line run; its exit code and standard error."""
    code = proc.wait(timeout=timeout)
    return code, proc.err_path.read_text()


def rows(out) -> list[dict]:
    return pads.dataset(Path(out) / "catalogs" / "exposures", format="parquet",
                        partitioning="hive").to_table().to_pylist()


def config(raw, out, **run):
    return load_config(overrides={
        "run": {"raw_root": str(raw), "out_root": str(out), "progress": False,
                "classifier": "rules", "min_free_mb": 0.1, **run},
        "cluster": {"workers": 1, "dashboard_address": None},
        "autoencoder": {"enabled": False}, "psf": {"min_stars": 3}})


def _wait_for(predicate, timeout_s=120.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _kill_group(proc):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _n_done(out) -> int:
    folder = paths.work_dir(out, NIGHT) / "exposures"
    return len(list(folder.glob("*.parquet"))) if folder.is_dir() else 0


# -------------------------------------------------------------------- lock


def test_second_run_on_a_locked_night_exits_4(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_night(raw, 1)
    conf = settings(tmp_path)
    with workdir.night_lock(out, NIGHT):
        code = main(["--night", NIGHT, "--raw-root", str(raw), "--out-root", str(out),
                     "--config", str(conf)])
        err = capsys.readouterr().err
    assert code == 4
    assert f"is processing night {NIGHT}" in err and f"pid {os.getpid()}" in err
    assert len(err.strip().splitlines()) == 1
    assert not (out / "catalogs").exists()
    with pytest.raises(NightLocked):  # the library says the same
        with workdir.night_lock(out, NIGHT), workdir.night_lock(out, NIGHT):
            pass


def test_lock_of_a_killed_process_is_free(tmp_path):
    code = ("import sys, time; from survey_qa.flows import workdir\n"
            f"with workdir.night_lock({str(tmp_path)!r}, {NIGHT!r}):\n"
            "    print('locked', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(NightLocked):
            with workdir.night_lock(tmp_path, NIGHT):
                pass
    finally:
        proc.kill()  # SIGKILL: no clean-up runs in the holder
        proc.wait()
        proc.stdout.close()
    with workdir.night_lock(tmp_path, NIGHT):  # the kernel released it
        pass


def test_concurrent_runs_one_works_the_other_exits(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_night(raw, 4)
    conf = settings(tmp_path)
    first = cli(raw, out, conf)
    try:
        lock = out / "_work" / f"night={NIGHT}.lock"
        assert _wait_for(lambda: lock.exists() and lock.read_text().strip())
        second = cli(raw, out, conf)
        code, err = finish(second)
        if code == 0:  # the first had already ended: nothing to compare
            assert first.poll() is not None
        else:
            assert code == 4 and "another survey-qa run" in err.strip().splitlines()[-1]
        assert finish(first)[0] == 0
    finally:
        _kill_group(first)
    assert len({r["exposure"] for r in rows(out)}) == 4


# -------------------------------------------------------------------- kill -9


def test_kill_9_of_the_run_then_rerun_finishes_the_night(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_night(raw, 6, size=224)
    conf = settings(tmp_path)
    proc = cli(raw, out, conf)
    try:
        _wait_for(lambda: _n_done(out) >= 1 or proc.poll() is not None)
        os.kill(proc.pid, signal.SIGKILL)  # the run itself, as a user or the OOM killer would
        proc.wait()
    finally:
        _kill_group(proc)  # its worker processes, which lose their scheduler
    code, err = finish(cli(raw, out, conf))
    assert code == 0, err
    got = rows(out)
    assert sorted(r["exposure"] for r in got) == [f"f{i:02d}" for i in range(6)]
    assert all(r["status"] == "ok" for r in got)
    leftovers = [p for p in (out / "_work").rglob(".*.tmp")]
    assert not leftovers


def test_kill_9_of_a_worker_loses_nothing(tmp_path):
    psutil = pytest.importorskip("psutil")
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_night(raw, 6, size=224)
    conf = settings(tmp_path)
    proc = cli(raw, out, conf)
    killed = []
    try:
        def worker_busy():
            if proc.poll() is not None:
                return True
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if "spawn_main" in " ".join(child.cmdline()) and _n_done(out) >= 1:
                        child.send_signal(signal.SIGKILL)
                        killed.append(child.pid)
                        return True
            return False

        _wait_for(worker_busy)
        code, err = finish(proc)
    finally:
        _kill_group(proc)
    assert code == 0, err
    got = rows(out)
    assert sorted(r["exposure"] for r in got) == [f"f{i:02d}" for i in range(6)]
    assert all(r["status"] == "ok" for r in got)
    if not killed:
        pytest.skip("the night ended before a worker could be killed")


# -------------------------------------------------------------------- damaged state


def test_rerun_redoes_what_it_cannot_verify(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_night(raw, 5)
    run_night(config(raw, out), NIGHT, echo=lambda *a: None)
    before = {r["exposure"]: r for r in rows(out)}
    def result(kind, exposure):
        return workdir.result_file(out, NIGHT, kind, exposure)

    pq.write_table(pa.table({"a": [1, 2]}), result("exposures", "f00"))  # wrong schema
    result("sources", "f01").unlink()  # sources lost
    result("exposures", "f02").write_bytes(b"garbage")  # not Parquet
    data = result("exposures", "f03").read_bytes()
    result("exposures", "f03").write_bytes(data[: len(data) // 2])  # truncated
    (result("exposures", "f04").parent / ".f04.parquet.0123.tmp").write_bytes(b"half")  # killed
    summary = run_night(config(raw, out), NIGHT, echo=lambda *a: None)
    assert summary.n_processed == 4 and summary.n_skipped == 1
    after = {r["exposure"]: r for r in rows(out)}
    assert set(after) == set(before) and len(rows(out)) == 5
    assert all(r["status"] == "ok" for r in after.values())
    for name in ("f00", "f01", "f02", "f03"):
        assert after[name]["fwhm_px"] == pytest.approx(before[name]["fwhm_px"])
    src = pads.dataset(out / "catalogs" / "sources", format="parquet",
                       partitioning="hive").to_table().to_pandas()
    assert set(src.exposure) == set(before)
    assert not list(paths.work_dir(out, NIGHT).rglob(".*.tmp"))


def test_damaged_array_store_is_rebuilt(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_night(raw, 2)
    summary = run_night(config(raw, out), NIGHT, echo=lambda *a: None)
    (summary.arrays / "zarr.json").write_text("{ not json")
    said = []
    again = run_night(config(raw, out), NIGHT, echo=said.append)
    assert any("damaged array store" in s for s in said)
    assert again.n_processed == 2
    import xarray as xr

    ds = xr.open_zarr(again.arrays, consolidated=False)
    assert sorted(ds.exposure.values.tolist()) == ["f00", "f01"]
    chunk = next((again.arrays / "exposure").rglob("c/*"))
    chunk.write_bytes(b"\x00garbage")  # a damaged coordinate chunk
    third = run_night(config(raw, out), NIGHT, echo=said.append)
    assert third.n_processed == 2 and len(rows(out)) == 2


# -------------------------------------------------------------------- environment


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_read_only_out_root_exits_3_before_the_cluster(tmp_path, capsys):
    raw = tmp_path / "raw"
    make_night(raw, 1)
    conf = settings(tmp_path)
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        code = main(["--night", NIGHT, "--raw-root", str(raw), "--out-root", str(ro / "qa"),
                     "--config", str(conf)])
    err = capsys.readouterr().err
    assert code == 3 and "is not writable: Read-only file system" in err
    assert len(err.strip().splitlines()) == 1


def test_out_root_that_is_a_file_exits_3(tmp_path, capsys):
    raw = tmp_path / "raw"
    make_night(raw, 1)
    (tmp_path / "taken").write_text("a file, not a folder")
    code = main(["--night", NIGHT, "--raw-root", str(raw), "--out-root",
                 str(tmp_path / "taken"), "--config", str(settings(tmp_path))])
    assert code == 3 and "is not writable" in capsys.readouterr().err


def test_too_little_free_space_exits_3(tmp_path, capsys):
    raw = tmp_path / "raw"
    make_night(raw, 1)
    conf = settings(tmp_path, min_free_mb=1e12)
    code = main(["--night", NIGHT, "--raw-root", str(raw), "--out-root", str(tmp_path / "o"),
                 "--config", str(conf)])
    err = capsys.readouterr().err
    assert code == 3 and "MiB free; run.min_free_mb asks for 1e+12" in err


def test_disk_filling_up_during_the_run_exits_3(tmp_path):
    raw = tmp_path / "raw"
    make_night(raw, 6, size=256)
    with _tmpfs(tmp_path / "small", "size=160k") as small:
        with pytest.raises(RunEnvironmentError, match="No space left on device"):
            run_night(config(raw, small / "qa"), NIGHT, echo=lambda *a: None)
        catalogs = small / "qa" / "catalogs"
        if catalogs.exists():  # whole or absent: no half-written catalog
            for part in catalogs.rglob("*.parquet"):
                pq.read_table(part)


# -------------------------------------------------------------------- arguments


def test_broken_or_missing_configuration_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  raw_root: [unclosed\n")
    assert main(["--night", NIGHT, "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "is not valid YAML (line" in err and len(err.strip().splitlines()) == 1
    assert main(["--night", NIGHT, "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "No such file or directory" in capsys.readouterr().err


def test_missing_night_is_an_error_never_a_simulation(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default raw root data/raw, relative to here
    conf = settings(tmp_path)
    assert main(["--night", "2099-01-01", "--config", str(conf)]) == 2
    assert "no night folder" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_dashboard_port_taken_breaks_nothing(tmp_path):
    import socket

    raw, out = tmp_path / "raw", tmp_path / "out"
    make_night(raw, 1)
    sock = socket.socket()
    with contextlib.suppress(OSError):  # taken already: all the better
        sock.bind(("127.0.0.1", 8787))
        sock.listen()
    try:
        cfg = load_config(overrides={
            "run": {"raw_root": str(raw), "out_root": str(out), "progress": False,
                    "classifier": "rules", "min_free_mb": 0.1},
            "cluster": {"workers": 1}, "autoencoder": {"enabled": False}})
        assert cfg.cluster.dashboard_address == ":0"  # the default: a free port
        summary = run_night(cfg, NIGHT, echo=lambda *a: None)
    finally:
        sock.close()
    assert summary.n_processed == 1


def test_a_file_that_kills_its_worker_every_time_gets_a_failed_row(tmp_path):
    from distributed import KilledWorker

    from survey_qa.flows import nightly

    class Dead:  # a finished future whose task killed every worker it ran on
        def result(self):
            raise KilledWorker("process_exposure-1", "tcp://127.0.0.1:1", 3)

    cfg = config(tmp_path / "raw", tmp_path / "out")
    fut = Dead()
    nightly.follow_tasks([fut], iter, cfg, lambda *a: None, NIGHT,
                         {fut: ("poison", str(tmp_path / "raw" / NIGHT / "poison.fits"))})
    (row,) = pq.read_table(workdir.result_file(tmp_path / "out", NIGHT, "exposures",
                                               "poison")).to_pylist()
    assert row["status"] == "failed" and row["detector"] == "ALL"
    assert "worker process died on this file" in row["error"]
    assert workdir.verified_done(tmp_path / "out", NIGHT, {
        "poison": tmp_path / "raw" / NIGHT / "poison.fits"}) == {"poison"}


def test_unreadable_sub_folder_stops_the_night_instead_of_losing_its_files(tmp_path,
                                                                           monkeypatch):
    raw = tmp_path / "raw"
    make_night(raw, 1)
    (raw / NIGHT / "sub").mkdir()
    scandir = os.scandir

    def refuse(path):  # as root, chmod cannot refuse: the operating system's answer instead
        if str(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.raises(RunEnvironmentError, match="cannot read folder .*sub: Permission"):
        run_night(config(raw, tmp_path / "out"), NIGHT, echo=lambda *a: None)
