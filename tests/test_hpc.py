"""The cluster factory and the SLURM scripts, without a SLURM cluster."""
import dataclasses
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from survey_qa.config import (CLUSTER_KINDS, ClusterConfig, SlurmConfig, load_config,
                              validate_block)
from survey_qa.hpc import SCRIPTS, script_path
from survey_qa.hpc.cluster import (KINDS, ClusterKind, ScalePlan, cluster_spec, make_cluster,
                                   plan_scaling, render_job_script, scale_for_night)
from survey_qa.hpc.local_slurm import write_loopback_site

HPC = Path(__file__).resolve().parents[1] / "hpc"
# distributed warns when its scratch folder takes over 1 s to create: on a loaded machine
# that is a fact about the machine, not a fault of the code under test.
SLOW_SCRATCH = pytest.mark.filterwarnings(
    "ignore:Creating scratch directories is taking a surprisingly long time:UserWarning")


def slurm_cfg(**slurm) -> ClusterConfig:
    return ClusterConfig(kind="slurm", dashboard_address=None, slurm=SlurmConfig(**slurm))


def header(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


# ------------------------------------------------------------------ rendered job script


def test_job_script_holds_the_configuration(tmp_path):
    cfg = load_config(overrides={"cluster": {"kind": "slurm", "slurm": {
        "queue": "short", "account": "astro42", "cores": 8, "processes": 2,
        "memory": "16GiB", "walltime": "02:30:00",
        "job_extra_directives": ["--qos=low", "--constraint=haswell"],
        "interface": "ib0", "local_directory": str(tmp_path / "scratch"),
        "log_directory": str(tmp_path / "logs"), "job_name": "qa-night"}}})
    script = render_job_script(cfg.cluster)
    lines = header(script)
    for expected in ("#SBATCH -p short", "#SBATCH -A astro42", "#SBATCH -n 1",
                     "#SBATCH --cpus-per-task=8", "#SBATCH --mem=16G",
                     "#SBATCH -t 02:30:00", "#SBATCH --qos=low",
                     "#SBATCH --constraint=haswell", "#SBATCH -J qa-night",
                     f"#SBATCH -o {tmp_path / 'logs'}/qa-night-%J.out"):
        assert expected in lines, f"{expected!r} not in {lines}"
    worker = script.strip().splitlines()[-1]
    assert worker.startswith(f"{sys.executable} -m distributed.cli.dask_worker ")
    assert "--interface ib0" in worker
    assert "--nworkers 2" in worker and "--nthreads 4" in worker
    assert "--memory-limit 8.00GiB" in worker  # the job's memory split between processes
    assert f"--local-directory {tmp_path / 'scratch'}" in worker
    assert (tmp_path / "logs").is_dir()


def test_job_script_defaults():
    script = render_job_script(ClusterConfig())
    lines = header(script)
    assert not any(line.startswith(("#SBATCH -p", "#SBATCH -A")) for line in lines)
    assert "#SBATCH -t 01:00:00" in lines and "#SBATCH --cpus-per-task=2" in lines
    assert "export OMP_NUM_THREADS=1" in script
    assert f"{sys.executable} -m distributed.cli.dask_worker" in script
    assert "--death-timeout 120.0" in script
    assert "--interface" not in script


def test_job_script_python_and_prologue():
    cfg = slurm_cfg(python="/opt/qa/bin/python",
                    job_script_prologue=["module load gcc", "source /opt/qa/env.sh"])
    script = render_job_script(cfg)
    assert "/opt/qa/bin/python -m distributed.cli.dask_worker" in script
    body = script.splitlines()
    assert body.index("module load gcc") < body.index("source /opt/qa/env.sh")
    assert sys.executable not in script


@SLOW_SCRATCH
def test_rendered_script_is_the_clusters_own(tmp_path):
    cfg = slurm_cfg(queue="debug", cores=2, memory="2GiB", interface="lo",
                    job_extra_directives=["--qos=low"], log_directory=str(tmp_path))
    cls, kwargs = cluster_spec(cfg)
    assert cls.__name__ == "SLURMCluster"
    with make_cluster(cfg) as cluster:  # starts a scheduler only: nothing is submitted
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        real = cluster.job_script().replace(cluster.scheduler_address,
                                            "tcp://<scheduler-address>:8786")
        assert len(cluster.workers) == 0
    assert real == render_job_script(cfg)


# ------------------------------------------------------------------ local cluster, scaling


@SLOW_SCRATCH
def test_local_cluster_runs_tasks():
    cfg = ClusterConfig(kind="local", workers=2, dashboard_address=None)
    from distributed import Client, LocalCluster

    with make_cluster(cfg) as cluster, Client(cluster) as client:
        assert isinstance(cluster, LocalCluster)
        plan = scale_for_night(cluster, cfg, n_frames=50)
        assert plan == ScalePlan("fixed", 2, 2)
        client.wait_for_workers(2, timeout=60)
        pids = set(client.run(os.getpid).values())
        assert len(pids) == 2 and os.getpid() not in pids  # two worker processes
        assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
        assert len(cluster.workers) == 2


@pytest.mark.parametrize("workers, min_jobs, max_jobs, cores, n_frames, expected", [
    (2, 0, 4, 2, 100, ScalePlan("fixed", 2, 2)),       # workers > 0: exactly that many jobs
    (5, 0, 4, 2, 1, ScalePlan("fixed", 5, 5)),
    (0, 0, 4, 2, 100, ScalePlan("adaptive", 0, 4)),    # capped by max_jobs
    (0, 0, 10, 4, 10, ScalePlan("adaptive", 0, 3)),    # 10 frames / 4 cores -> 3 jobs
    (0, 2, 10, 4, 1, ScalePlan("adaptive", 2, 2)),     # never below min_jobs
    (0, 0, 10, 4, 0, ScalePlan("adaptive", 0, 0)),
])
def test_plan_scaling(workers, min_jobs, max_jobs, cores, n_frames, expected):
    cfg = dataclasses.replace(slurm_cfg(min_jobs=min_jobs, max_jobs=max_jobs, cores=cores),
                              workers=workers)
    assert plan_scaling(cfg, n_frames) == expected


def test_plan_scaling_rejects_negative_frames():
    with pytest.raises(ValueError, match="n_frames"):
        plan_scaling(slurm_cfg(), -1)


class RecordingCluster:
    """Stands in for a SLURMCluster: records what the night asked for."""

    def __init__(self):
        self.calls = []

    def scale(self, **kwargs):
        self.calls.append(("scale", kwargs))

    def adapt(self, **kwargs):
        self.calls.append(("adapt", kwargs))


def test_scale_for_night_fixed_and_adaptive():
    fixed = dataclasses.replace(slurm_cfg(), workers=3)
    cluster = RecordingCluster()
    scale_for_night(cluster, fixed, 40)
    assert cluster.calls == [("scale", {"jobs": 3})]

    adaptive = slurm_cfg(min_jobs=1, max_jobs=8, cores=4)
    cluster = RecordingCluster()
    plan = scale_for_night(cluster, adaptive, 20)
    assert plan == ScalePlan("adaptive", 1, 5)
    assert cluster.calls == [("adapt", {"minimum_jobs": 1, "maximum_jobs": 5})]


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("cluster, message", [
    ({"kind": "pbs"}, "not one of"),
    ({"slurm": {"walltime": "1h"}}, "walltime"),
    ({"slurm": {"walltime": "01:00:00:00"}}, "walltime"),
    ({"slurm": {"memory": "lots"}}, "memory size"),
    ({"slurm": {"memory": "1KiB"}}, "less than 1 MiB"),
    ({"slurm": {"job_extra_directives": ["qos=low"]}}, "sbatch option"),
    ({"slurm": {"job_extra_directives": "--qos=low"}}, "is not a"),
    ({"slurm": {"job_name": "two words"}}, "one word"),
    ({"slurm": {"cores": 3, "processes": 2}}, "multiple"),
    ({"slurm": {"cores": 2, "processes": 4}}, "processes"),
    ({"slurm": {"min_jobs": 5, "max_jobs": 2}}, "min_jobs"),
    ({"slurm": {"cores": 0}}, "outside"),
    ({"slurm": {"death_timeout_s": 0.0}}, "outside"),
    ({"memory_limit": "much"}, "memory size"),
    ({"workers": -1}, "outside"),
])
def test_bad_cluster_configuration_raises(cluster, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides={"cluster": cluster})


def test_a_block_built_in_code_is_checked_by_the_same_rules():
    with pytest.raises(ValueError, match="cluster.slurm.walltime"):
        validate_block(slurm_cfg(walltime="soon"), "cluster.")
    with pytest.raises(ValueError, match="cluster.memory_limit"):
        validate_block(ClusterConfig(memory_limit="much"), "cluster.")
    validate_block(slurm_cfg(walltime="2-12"), "cluster.")


def test_configuration_does_not_import_the_cluster_package():
    code = ("import sys; from survey_qa.config import load_config; load_config(); "
            "print([m for m in sys.modules if m.startswith('survey_qa.hpc')])")
    out = run([sys.executable, "-c", code], env={"SURVEY_QA_CONFIG": ""}, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ cluster kinds


def test_every_configured_kind_has_one_registered_class():
    assert tuple(KINDS) == CLUSTER_KINDS
    assert all(kind.name == name for name, kind in KINDS.items())


def test_unknown_kind_is_refused_by_name():
    cfg = ClusterConfig(kind="pbs")  # built in code, never validated
    for call in (make_cluster, cluster_spec):
        with pytest.raises(ValueError, match=r"cluster.kind 'pbs' is not one of \('local', 'slurm'\)"):
            call(cfg)
    with pytest.raises(ValueError, match="not one of"):
        plan_scaling(cfg, 10)


def test_a_kind_outside_the_configuration_cannot_register():
    with pytest.raises(TypeError, match="CLUSTER_KINDS"):
        type("PbsKind", (ClusterKind,), {"name": "pbs"})
    assert "pbs" not in KINDS


def test_local_kind_leaves_its_cluster_as_it_is():
    cluster = RecordingCluster()
    plan = scale_for_night(cluster, ClusterConfig(kind="local", workers=3), n_frames=100)
    assert plan == ScalePlan("fixed", 3, 3) and cluster.calls == []


@pytest.mark.parametrize("walltime", ["30", "30:00", "12:00:00", "2-12", "2-12:30",
                                      "1-00:00:00"])
def test_slurm_walltime_forms_accepted(walltime):
    assert f"#SBATCH -t {walltime}" in header(render_job_script(slurm_cfg(walltime=walltime)))


def test_yaml_slurm_block(tmp_path):
    f = tmp_path / "site.yaml"
    f.write_text("cluster:\n  kind: slurm\n  slurm:\n    queue: long\n    cores: 4\n"
                 "    memory: 12GB\n    max_jobs: 20\n    job_extra_directives: ['--qos=low']\n")
    cfg = load_config(f)
    assert "#SBATCH -p long" in header(render_job_script(cfg.cluster))
    assert plan_scaling(cfg.cluster, 1000) == ScalePlan("adaptive", 0, 20)


def test_loopback_site_file(tmp_path):
    path = write_loopback_site(tmp_path, walltime="00:20:00", run={"classifier": "rules"},
                               job_name="qa-test", death_timeout_s=30)
    cfg = load_config(path, {"cluster": {"kind": "slurm"}})
    assert (cfg.run.progress, cfg.run.classifier) == (False, "rules")
    assert cfg.cluster.dashboard_address is None and cfg.cluster.slurm.death_timeout_s == 30.0
    script = render_job_script(cfg.cluster)
    for expected in ("#SBATCH -t 00:20:00", "#SBATCH -J qa-test", "#SBATCH --mem=2G",
                     "#SBATCH --cpus-per-task=1", f"#SBATCH -o {tmp_path / 'worker-logs'}/"):
        assert any(line.startswith(expected) for line in header(script)), expected
    assert "--interface lo" in script and "--nthreads 1" in script


# ------------------------------------------------------------------ scripts


def run(args, env=None, cwd=None, check=False) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=check,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def fake_command(folder: Path, name: str, body: str) -> Path:
    """An executable that records how it was called (a stand-in for a SLURM command)."""
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def test_scripts_ship_executable_and_parse():
    for name in SCRIPTS:
        path = script_path(name)
        assert path == HPC / name
        assert path.stat().st_mode & stat.S_IXUSR, f"{name} is not executable"
        run(["bash", "-n", str(path)], check=True)
    with pytest.raises(ValueError):
        script_path("cluster.py")


def test_night_sbatch_runs_the_night_on_the_allocated_cores(tmp_path):
    calls = tmp_path / "calls"
    fake = fake_command(tmp_path / "bin", "qa", f'echo "$@" >> {calls}\n')
    env = {"SURVEY_QA": str(fake), "SLURM_CPUS_PER_TASK": "3", "SLURM_JOB_ID": "7"}
    out = run(["bash", str(HPC / "night.sbatch"), "2024-03-01", "--out-root", "/o"], env)
    assert out.returncode == 0, out.stderr
    assert calls.read_text().split() == ["--night", "2024-03-01", "--cluster", "local",
                                         "--workers", "3", "--out-root", "/o"]
    header_lines = [line for line in (HPC / "night.sbatch").read_text().splitlines()
                    if line.startswith("#SBATCH")]
    assert "#SBATCH --nodes=1" in header_lines and "#SBATCH --ntasks=1" in header_lines


def test_night_sbatch_array_takes_its_night_from_the_list(tmp_path):
    calls = tmp_path / "calls"
    fake = fake_command(tmp_path / "bin", "qa", f'echo "$@" >> {calls}\n')
    nights = tmp_path / "nights.txt"
    nights.write_text("# spring\n2024-03-01\n\n2024-03-02\n2024-03-05\n")
    env = {"SURVEY_QA": str(fake), "SLURM_CPUS_PER_TASK": "2", "SLURM_ARRAY_TASK_ID": "2"}
    out = run(["bash", str(HPC / "night.sbatch"), "--nights-file", str(nights), "--force"],
              env)
    assert out.returncode == 0, out.stderr
    assert calls.read_text().split()[:2] == ["--night", "2024-03-05"]
    assert calls.read_text().split()[-1] == "--force"
    env["SLURM_ARRAY_TASK_ID"] = "3"
    out = run(["bash", str(HPC / "night.sbatch"), "--nights-file", str(nights)], env)
    assert out.returncode != 0 and "no night 3" in out.stderr
    out = run(["bash", str(HPC / "night.sbatch")], env)
    assert out.returncode != 0 and "usage" in out.stderr


def test_train_sbatch_starts_one_rank_per_task_with_srun(tmp_path):
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "srun", f'echo "$@" >> {calls}\n')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SURVEY_QA": "survey-qa",
           "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2", "SLURM_JOB_ID": "9"}
    out = run(["bash", str(HPC / "train.sbatch"), "autoencoder", "--out-root", "/o",
               "--accelerator", "cpu"], env)
    assert out.returncode == 0, out.stderr
    args = calls.read_text().split()
    assert args[:4] == ["--kill-on-bad-exit=1", "survey-qa", "train", "autoencoder"]
    text = " ".join(args)
    assert "--devices 4 --num-nodes 2 --strategy ddp --accelerator gpu" in text
    assert text.endswith("--out-root /o --accelerator cpu")  # given options come last, win
    del env["SLURM_NTASKS_PER_NODE"]
    out = run(["bash", str(HPC / "train.sbatch"), "autoencoder"], env)
    assert out.returncode != 0 and "--ntasks-per-node" in out.stderr
    lines = (HPC / "train.sbatch").read_text().splitlines()
    for directive in ("--nodes=", "--ntasks-per-node=", "--gpus-per-node="):
        assert any(line.startswith(f"#SBATCH {directive}") for line in lines)


def fake_sbatch(tmp_path: Path) -> tuple[dict, Path]:
    calls = tmp_path / "sbatch-calls"
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "sbatch",
                 f'echo "$@" >> {calls}\necho "$(( $(wc -l < {calls}) + 100 ));surveyqa"\n')
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, calls


def test_nights_array(tmp_path):
    env, calls = fake_sbatch(tmp_path)
    out = run([str(HPC / "nights.sh"), "--max-parallel", "2", "--sbatch-arg=--cpus-per-task=8",
               "2024-03-01", "2024-03-02", "2024-03-03", "--", "--raw-root", "/raw"],
              env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["2024-03-01\t101_0", "2024-03-02\t101_1",
                                       "2024-03-03\t101_2"]
    (call,) = calls.read_text().splitlines()
    args = call.split()
    assert "--array=0-2%2" in args and "--cpus-per-task=8" in args
    assert args[args.index("--nights-file") - 1] == str(HPC / "night.sbatch")
    listed = Path(args[args.index("--nights-file") + 1])
    assert listed.read_text().split() == ["2024-03-01", "2024-03-02", "2024-03-03"]
    assert args[-2:] == ["--raw-root", "/raw"]


def test_nights_chain_from_file(tmp_path):
    env, calls = fake_sbatch(tmp_path)
    nights = tmp_path / "nights.txt"
    nights.write_text("2024-03-01\n# cloudy, skip\n2024-03-04")  # no final newline
    out = run([str(HPC / "nights.sh"), "--chain", "--after-ok", "--file", str(nights)],
              env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["2024-03-01\t101", "2024-03-04\t102"]
    first, second = calls.read_text().splitlines()
    assert "--dependency" not in first and first.endswith("night.sbatch 2024-03-01")
    assert "--dependency=afterok:101" in second.split()


@pytest.mark.parametrize("args", [[], ["2024-3-1"], ["--max-parallel", "0", "2024-03-01"],
                                  ["--bogus", "2024-03-01"]])
def test_nights_rejects_bad_arguments(tmp_path, args):
    env, calls = fake_sbatch(tmp_path)
    out = run([str(HPC / "nights.sh"), *args], env, cwd=tmp_path)
    assert out.returncode == 2
    assert not calls.exists()  # nothing submitted


def test_slurm_local_config(tmp_path):
    env = {"SURVEY_QA_SLURM_DIR": str(tmp_path), "SURVEY_QA_SLURM_PORT": "7817"}
    out = run([str(HPC / "slurm-local.sh"), "config"], env)
    assert out.returncode == 0, out.stderr
    conf = dict(line.split("=", 1) for line in out.stdout.splitlines()
                if "=" in line and not line.startswith(("#", "NodeName", "PartitionName")))
    assert conf["SlurmctldHost"] == socket.gethostname().split(".")[0] + "(127.0.0.1)"
    assert conf["SlurmctldPort"] == "7817" and conf["SlurmdPort"] == "7818"
    assert conf["StateSaveLocation"].startswith(str(tmp_path))
    assert conf["AuthInfo"] == f"socket={tmp_path}/munge/munge.socket.2"
    assert conf["ProctrackType"] == "proctrack/linuxproc" and conf["TaskPlugin"] == "task/none"
    assert int(conf["DefMemPerCPU"]) > 0
    node = next(line for line in out.stdout.splitlines() if line.startswith("NodeName="))
    assert f"CPUs={os.cpu_count()}" in node


def test_slurm_local_status_and_stop_touch_only_their_own_daemons(tmp_path):
    env = {"SURVEY_QA_SLURM_DIR": str(tmp_path)}
    script = str(HPC / "slurm-local.sh")
    out = run([script, "status"], env)
    assert out.returncode == 3 and "slurmctld: stopped" in out.stdout
    # A PID file naming a process that is not the daemon (a stale file after a reboot):
    # stop must leave that process alone.
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "run").mkdir()
        for daemon in ("slurmd", "slurmctld", "munged"):
            (tmp_path / "run" / f"{daemon}.pid").write_text(f"{bystander.pid}\n")
        assert run([script, "stop"], env).returncode == 0
        assert bystander.poll() is None
        assert not list((tmp_path / "run").glob("*.pid"))
        assert run([script, "stop"], env).returncode == 0  # idempotent
    finally:
        bystander.send_signal(signal.SIGTERM)
        bystander.wait(timeout=10)
    assert run([script, "bogus"], env).returncode == 2
