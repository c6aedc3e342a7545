"""survey-qa on a real SLURM cluster: dask-jobqueue worker jobs, sbatch, srun.

Start a cluster first, then select these tests by their marker::

    eval "$(hpc/slurm-local.sh start)"     # a single-node SLURM on this machine
    pytest -m slurm
    hpc/slurm-local.sh stop

With ``SURVEY_QA_SLURM_AUTOSTART=1`` the session fixture runs ``start`` itself and
``stop`` at the end. Selected with ``-m slurm`` and no cluster reachable, the tests fail
(they never skip silently); in a run that does not select the marker they are skipped.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads
import pytest

from survey_qa.hpc.local_slurm import write_loopback_site

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
SLURM_LOCAL = ROOT / "hpc" / "slurm-local.sh"
SURVEY_QA = str(Path(sys.executable).with_name("survey-qa"))
NIGHT = "2024-03-01"
N_FRAMES = 10
FRAME_PX = 512
VOLATILE = {"processed_at", "path"}  # differ between two runs of the same frames
TIMINGS = os.environ.get("SURVEY_QA_SLURM_TIMINGS")  # optional JSON file of wall times

INSTRUCTIONS = """SLURM is not reachable ({why}).
Start the single-node cluster of this project and point the tests at it:
    eval "$(hpc/slurm-local.sh start)"
    pytest -m slurm
    hpc/slurm-local.sh stop
or let the tests start and stop it: SURVEY_QA_SLURM_AUTOSTART=1 pytest -m slurm"""


def _marker_selected(config) -> bool:
    expr = config.getoption("markexpr") or ""
    return bool(re.search(r"(?<!not )\bslurm\b", expr))


def _sh(args, timeout_s=60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, **kwargs)


def _reachable() -> str | None:
    """None when sinfo answers and a job step runs, else why not."""
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():
        return f"SLURM_CONF={conf} does not exist"
    if not (conf or Path("/etc/slurm/slurm.conf").exists()):
        return "SLURM_CONF is not set and /etc/slurm/slurm.conf does not exist"
    if shutil.which("sinfo") is None:
        return "sinfo is not installed"
    try:
        info = _sh(["sinfo", "-h", "-o", "%T"], timeout_s=20)
        if info.returncode or not info.stdout.strip():
            return f"sinfo failed: {info.stderr.strip()[:300]}"
        step = _sh(["srun", "-N", "1", "-n", "1", "-t", "1", "--mem=64", "hostname"],
                   timeout_s=90)
    except subprocess.TimeoutExpired as exc:
        return f"{exc.cmd[0]} did not answer in {exc.timeout} s"
    if step.returncode:
        return f"srun hostname failed: {step.stderr.strip()[:300]}"
    return None


@pytest.fixture(scope="session", autouse=True)
def slurm_cluster(request):
    """A reachable SLURM cluster, or a test failure that says how to get one."""
    if not _marker_selected(request.config):
        pytest.skip("needs a SLURM cluster: select with `pytest -m slurm` "
                    "(after `eval \"$(hpc/slurm-local.sh start)\"`)")
    started = False
    if os.environ.get("SURVEY_QA_SLURM_AUTOSTART") == "1" and _reachable() is not None:
        out = _sh([str(SLURM_LOCAL), "start"], timeout_s=600)
        if out.returncode:
            pytest.fail(f"hpc/slurm-local.sh start failed:\n{out.stderr}", pytrace=False)
        (line,) = [s for s in out.stdout.splitlines() if s.startswith("export SLURM_CONF=")]
        os.environ["SLURM_CONF"] = line.split("=", 1)[1]
        started = True
    why = _reachable()
    if why is not None:
        pytest.fail(INSTRUCTIONS.format(why=why), pytrace=False)
    yield os.environ.get("SLURM_CONF")
    if started:
        _sh([str(SLURM_LOCAL), "stop"], timeout_s=120)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "SURVEY_QA": SURVEY_QA}


def _record(name: str, value) -> None:
    if TIMINGS:
        path = Path(TIMINGS)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[name] = value
        path.write_text(json.dumps(data, indent=1))


@pytest.fixture(scope="module")
def raw_night(tmp_path_factory):
    """A small simulated night (seeded): N_FRAMES frames of FRAME_PX pixels, mostly good
    (the DDP test trains the autoencoder on its confidently good frames)."""
    from survey_qa.flows.simulate import simulate_night

    raw = tmp_path_factory.mktemp("raw")
    simulate_night(raw, NIGHT, N_FRAMES, seed=11, size_px=FRAME_PX, mix="realistic")
    return raw


def _site_config(folder: Path, job_name: str) -> Path:
    """The site configuration of a SLURM night: 2 one-core worker jobs on loopback.
    The rule classifier's confident good frames are the autoencoder's references."""
    return write_loopback_site(folder, walltime="00:20:00", run={"classifier": "rules"},
                               job_name=job_name, death_timeout_s=30)


def _night_command(raw: Path, out: Path, config: Path, cluster: str) -> list[str]:
    return [SURVEY_QA, "--night", NIGHT, "--raw-root", str(raw), "--out-root", str(out),
            "--config", str(config), "--cluster", cluster, "--workers", "2"]


def _catalog(out: Path) -> pd.DataFrame:
    table = pads.dataset(out / "catalogs" / "exposures", format="parquet",
                         partitioning="hive").to_table()
    return table.to_pandas()


def _comparable(df: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in df.columns if c not in VOLATILE and not c.startswith("t_")]
    df = df[keep].astype({"night": str})
    return df.sort_values(["exposure", "detector"]).reset_index(drop=True)


def _assert_every_exposure_once(df: pd.DataFrame, raw: Path) -> None:
    files = sorted(p.name.split(".")[0] for p in (raw / NIGHT).iterdir()
                   if ".fit" in p.name)
    assert len(files) == N_FRAMES
    assert not df.duplicated(["exposure", "detector"]).any()
    assert sorted(df["exposure"].unique()) == files
    assert (df["status"] == "ok").all(), df.loc[df["status"] != "ok", ["exposure", "error"]]


def _worker_job_ids(log_dir: Path, job_name: str) -> set[str]:
    return {m.group(1) for p in log_dir.glob(f"{job_name}-*.err")
            if (m := re.fullmatch(rf"{re.escape(job_name)}-(\d+)\.err", p.name))}


def _run_night(raw: Path, out: Path, config: Path, cluster: str) -> float:
    """Run the night through the command line; return its wall time (s)."""
    t0 = time.perf_counter()
    run = _sh(_night_command(raw, out, config, cluster), timeout_s=600, env=_env())
    wall_s = time.perf_counter() - t0
    assert run.returncode == 0, f"{cluster}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return wall_s


@pytest.fixture(scope="module")
def local_night(raw_night, tmp_path_factory):
    """The same night on a LocalCluster of 2 workers: (out_root, wall time in s)."""
    folder = tmp_path_factory.mktemp("local")
    config = _site_config(folder, "unused")
    return folder / "out", _run_night(raw_night, folder / "out", config, "local")


def test_night_on_slurm_equals_local(raw_night, local_night, tmp_path):
    job_name = f"sqa-night-{os.getpid()}"
    config = _site_config(tmp_path, job_name)
    local_out, local_wall_s = local_night
    wall_s = {"slurm": _run_night(raw_night, tmp_path / "slurm", config, "slurm"),
              "local": local_wall_s}
    slurm, local = _catalog(tmp_path / "slurm"), _catalog(local_out)
    _assert_every_exposure_once(slurm, raw_night)
    _assert_every_exposure_once(local, raw_night)
    pd.testing.assert_frame_equal(_comparable(slurm), _comparable(local), check_exact=True)
    # The SLURM night really ran in two SLURM worker jobs.
    jobs = _worker_job_ids(tmp_path / "worker-logs", job_name)
    assert len(jobs) == 2, jobs
    logs = "".join(p.read_text() for p in (tmp_path / "worker-logs").glob("*.err"))
    assert logs.count("Registered to:") >= 2
    _record("night_wall_s", {**wall_s, "frames": N_FRAMES, "frame_px": FRAME_PX})
    print(f"\nwall time, {N_FRAMES} frames of {FRAME_PX} px, 2 workers: "
          f"SLURM {wall_s['slurm']:.1f} s, local {wall_s['local']:.1f} s")


def _squeue_jobs(job_name: str) -> list[str]:
    out = _sh(["squeue", "-h", "-n", job_name, "-t", "RUNNING", "-o", "%i"])
    return out.stdout.split()


def test_night_survives_a_cancelled_worker_job(raw_night, tmp_path):
    job_name = f"sqa-fault-{os.getpid()}"
    config = _site_config(tmp_path, job_name)
    out = tmp_path / "out"
    done = out / "_work" / f"night={NIGHT}" / "exposures"
    proc = subprocess.Popen(_night_command(raw_night, out, config, "slurm"), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(done.glob("*.parquet")):  # the first results
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no exposure finished in 300 s"
            time.sleep(0.05)
        jobs = _squeue_jobs(job_name)
        assert len(jobs) == 2, jobs
        cancel = _sh(["scancel", jobs[0]])
        n_done_at_cancel = len(list(done.glob("*.parquet")))
        assert cancel.returncode == 0, cancel.stderr
        log, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log[-3000:]
    assert n_done_at_cancel < N_FRAMES, "the night ended before the worker job was cancelled"
    assert jobs[0] not in _squeue_jobs(job_name)
    _assert_every_exposure_once(_catalog(out), raw_night)
    print(f"\ncancelled worker job {jobs[0]} after {n_done_at_cancel}/{N_FRAMES} exposures")


def test_nights_as_a_job_array(tmp_path):
    """hpc/nights.sh submits hpc/night.sbatch as a real array job, one night per task."""
    from survey_qa.flows.simulate import simulate_night

    nights = ["2024-03-02", "2024-03-03"]
    for seed, night in enumerate(nights):
        simulate_night(tmp_path / "raw", night, 2, seed=seed, size_px=256)
    run = _sh([str(ROOT / "hpc" / "nights.sh"), "--sbatch-arg=--wait",
               "--sbatch-arg=--cpus-per-task=1", "--sbatch-arg=--mem=2G",
               "--sbatch-arg=--time=15", "--list-dir", str(tmp_path / "lists"), *nights,
               "--", "--raw-root", str(tmp_path / "raw"), "--out-root", str(tmp_path / "out"),
               "--no-progress"], timeout_s=600, env=_env(), cwd=tmp_path)
    logs = {p.name: p.read_text() for p in tmp_path.glob("survey-qa-night-*.out")}
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{logs}"
    lines = run.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == nights
    array_id = lines[0].split("\t")[1].split("_")[0]
    assert [line.split("\t")[1] for line in lines] == [f"{array_id}_0", f"{array_id}_1"]
    df = _catalog(tmp_path / "out")
    assert not df.duplicated(["night", "exposure", "detector"]).any()
    for i, night in enumerate(nights):
        log = logs[f"survey-qa-night-{array_id}_{i}.out"]
        assert f"survey-qa night {night}" in log and f"array task {i}" in log
        assert df.loc[df["night"].astype(str) == night, "exposure"].nunique() == 2


def test_ddp_training_on_two_ranks(local_night, tmp_path):
    """2 CPU ranks in one allocation: sbatch hpc/train.sbatch, srun, Lightning DDP."""
    out, _ = local_night
    weights = tmp_path / "autoencoder.safetensors"
    log = tmp_path / "train.log"
    t0 = time.perf_counter()
    run = _sh(["timeout", "600", "sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2",
               "--gpus-per-node=0", "--cpus-per-task=1", "--mem-per-cpu=3G", "--time=15",
               f"--output={log}", str(ROOT / "hpc" / "train.sbatch"), "autoencoder",
               "--accelerator", "cpu", "--out-root", str(out), "--night", NIGHT,
               "--max-epochs", "1", "--checkpoint-dir", str(tmp_path / "checkpoints"),
               "--output", str(weights)],
              timeout_s=660, env=_env(), cwd=tmp_path)
    text = log.read_text() if log.exists() else ""
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{text[-5000:]}"
    assert "GLOBAL_RANK: 0" in text and "GLOBAL_RANK: 1" in text, text[-5000:]
    assert "MEMBER: 2/2" in text
    assert weights.exists() and weights.stat().st_size > 0
    assert text.count("weights written to") == 1  # by global rank 0 only
    assert (tmp_path / "checkpoints" / "autoencoder" / "last.ckpt").is_file()
    _record("train_wall_s", time.perf_counter() - t0)
