"""The cluster factory: one code path for a local machine and a SLURM cluster.

``make_cluster(cfg)`` turns a :class:`~survey_qa.config.ClusterConfig` into a running Dask
cluster: a :class:`distributed.LocalCluster` for ``kind="local"``, a
:class:`dask_jobqueue.SLURMCluster` (one Dask worker job per SLURM job) for
``kind="slurm"``. The flow then connects a ``distributed.Client`` to it and calls
``scale_for_night`` once it knows how many frames the night holds.

``render_job_script(cfg)`` returns the batch script a SLURM worker job would run, without
a scheduler and without submitting anything, so that the configuration can be checked on
a laptop.
"""
from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

from survey_qa.config import ClusterConfig, _validate_block

# SLURM --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_WALLTIME = re.compile(r"^(\d+-\d+(:\d+(:\d+)?)?|\d+(:\d+(:\d+)?)?)$")
# Scheduler address written into a rendered script that is not submitted.
_PLACEHOLDER_SCHEDULER = "tcp://<scheduler-address>:8786"


@dataclass(frozen=True)
class ScalePlan:
    """How many worker jobs a night asks for.

    Attributes
    ----------
    mode
        ``"fixed"`` (exactly ``maximum_jobs`` jobs, or local workers) or ``"adaptive"``
        (Dask adds and removes jobs between the two bounds as the task load changes).
    minimum_jobs, maximum_jobs
        Bounds on the number of worker jobs (local worker processes for a LocalCluster).
    """

    mode: str
    minimum_jobs: int
    maximum_jobs: int


def check_cluster_config(cfg: ClusterConfig) -> None:
    """Check a cluster block before anything is started or submitted.

    Parameters
    ----------
    cfg
        The ``cluster`` block of the configuration.

    Raises
    ------
    ValueError
        On a field of the wrong type or out of range, a memory size or walltime that
        SLURM would not understand, an ``#SBATCH`` directive that is not an option, or
        conflicting job sizes.
    """
    from dask.utils import parse_bytes

    _validate_block(cfg, "cluster.")
    if cfg.memory_limit not in ("auto", "0"):
        _check_bytes(parse_bytes, cfg.memory_limit, "cluster.memory_limit")
    s = cfg.slurm
    if _check_bytes(parse_bytes, s.memory, "cluster.slurm.memory") < 1024**2:
        raise ValueError(f"cluster.slurm.memory: {s.memory!r} is less than 1 MiB")
    if not _WALLTIME.match(s.walltime.strip()):
        raise ValueError(f"cluster.slurm.walltime: {s.walltime!r} is not a SLURM time "
                         "(e.g. '01:30:00' or '2-00:00:00')")
    for line in s.job_extra_directives:
        if not isinstance(line, str) or not line.strip().startswith("-"):
            raise ValueError(f"cluster.slurm.job_extra_directives: {line!r} is not an "
                             "sbatch option such as '--qos=low'")
    for line in s.job_script_prologue:
        if not isinstance(line, str):
            raise ValueError(f"cluster.slurm.job_script_prologue: {line!r} is not a string")
    if not s.job_name or re.search(r"\s", s.job_name):
        raise ValueError(f"cluster.slurm.job_name: {s.job_name!r} must be one word")
    if s.min_jobs > s.max_jobs:
        raise ValueError("cluster.slurm.min_jobs must not exceed cluster.slurm.max_jobs")
    if s.cores % s.processes:
        raise ValueError(f"cluster.slurm.cores ({s.cores}) must be a multiple of "
                         f"cluster.slurm.processes ({s.processes})")


def _check_bytes(parse_bytes: Any, text: str, name: str) -> int:
    try:
        n_bytes = parse_bytes(text)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name}: {text!r} is not a memory size such as '4GiB'") from exc
    if n_bytes <= 0:
        raise ValueError(f"{name}: {text!r} must be positive")
    return n_bytes


def slurm_job_kwargs(cfg: ClusterConfig) -> dict[str, Any]:
    """Keyword arguments of a dask-jobqueue SLURM worker job, from ``cfg.slurm``.

    Parameters
    ----------
    cfg
        The ``cluster`` block.

    Returns
    -------
    dict
        Arguments shared by :class:`dask_jobqueue.SLURMCluster` and its job class.
    """
    s = cfg.slurm
    return {
        "queue": s.queue,
        "account": s.account,
        "cores": s.cores,
        "processes": s.processes,
        "memory": s.memory,
        "walltime": s.walltime.strip(),
        "job_extra_directives": [line.strip() for line in s.job_extra_directives],
        "job_script_prologue": list(s.job_script_prologue),
        "interface": s.interface,
        "local_directory": s.local_directory,
        "log_directory": s.log_directory,
        "python": s.python or sys.executable,
        "job_name": s.job_name,
        "death_timeout": s.death_timeout_s,
    }


def _scheduler_options(cfg: ClusterConfig) -> dict[str, Any]:
    if cfg.dashboard_address is None:
        # The scheduler always serves HTTP; a free port keeps it off :8787.
        return {"dashboard": False, "dashboard_address": ":0"}
    return {"dashboard_address": cfg.dashboard_address}


def cluster_spec(cfg: ClusterConfig) -> tuple[type, dict[str, Any]]:
    """The cluster class and its keyword arguments for ``cfg``.

    Parameters
    ----------
    cfg
        The ``cluster`` block, already checked.

    Returns
    -------
    tuple
        ``(cls, kwargs)`` such that ``cls(**kwargs)`` starts the cluster.
    """
    if cfg.kind == "local":
        from distributed import LocalCluster

        return LocalCluster, {
            "n_workers": cfg.workers or os.cpu_count() or 1,
            "threads_per_worker": cfg.threads_per_worker,
            "processes": True,
            "memory_limit": cfg.memory_limit,
            **({"dashboard_address": cfg.dashboard_address} if cfg.dashboard_address else
               {"dashboard_address": ":0", "scheduler_kwargs": {"dashboard": False}}),
        }
    if cfg.kind == "slurm":
        from dask_jobqueue import SLURMCluster

        return SLURMCluster, {**slurm_job_kwargs(cfg),
                              "scheduler_options": _scheduler_options(cfg)}
    raise ValueError(f"cluster.kind {cfg.kind!r} is not one of ('local', 'slurm')")


def make_cluster(cfg: ClusterConfig):
    """Start the Dask cluster that ``cfg`` describes and return it.

    Parameters
    ----------
    cfg
        The ``cluster`` block. ``kind="local"`` gives a :class:`distributed.LocalCluster`
        with ``workers`` processes (one per core when 0); ``kind="slurm"`` gives a
        :class:`dask_jobqueue.SLURMCluster` whose scheduler runs in this process and
        which has no worker job yet: call :func:`scale_for_night` next.

    Returns
    -------
    distributed.SpecCluster
        The running cluster; close it (or use it as a context manager) when done.

    Raises
    ------
    ValueError
        When the configuration is invalid (see :func:`check_cluster_config`).
    """
    check_cluster_config(cfg)
    cls, kwargs = cluster_spec(cfg)
    return cls(**kwargs)


def render_job_script(cfg: ClusterConfig) -> str:
    """The batch script of one SLURM worker job, without a scheduler or a submission.

    It is the script :meth:`dask_jobqueue.SLURMCluster.job_script` gives for the same
    configuration, with a placeholder where the scheduler address goes.

    Parameters
    ----------
    cfg
        The ``cluster`` block (its ``kind`` does not matter).

    Returns
    -------
    str
        The script: ``#SBATCH`` header, prologue and the ``dask worker`` command line.

    Raises
    ------
    ValueError
        When the configuration is invalid.
    """
    from dask_jobqueue.slurm import SLURMJob

    check_cluster_config(cfg)
    job = SLURMJob(scheduler=_PLACEHOLDER_SCHEDULER, name="dummy-name",
                   **slurm_job_kwargs(cfg))
    return job.job_script()


def tasks_per_job(cfg: ClusterConfig) -> int:
    """Tasks one SLURM worker job runs at once (processes x threads per process)."""
    s = cfg.slurm
    return s.processes * (s.cores // s.processes)


def plan_scaling(cfg: ClusterConfig, n_frames: int) -> ScalePlan:
    """How many worker jobs a night of ``n_frames`` frames asks for.

    Parameters
    ----------
    cfg
        The ``cluster`` block. ``workers > 0`` fixes the number of jobs (local worker
        processes for ``kind="local"``); otherwise a SLURM night adapts between
        ``slurm.min_jobs`` and the jobs that keep every frame busy, at most
        ``slurm.max_jobs``.
    n_frames
        Frames (tasks) of the night.

    Returns
    -------
    ScalePlan
        The plan; it has no side effect.
    """
    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}")
    if cfg.kind == "local":
        n = cfg.workers or os.cpu_count() or 1
        return ScalePlan("fixed", n, n)
    if cfg.workers > 0:
        return ScalePlan("fixed", cfg.workers, cfg.workers)
    s = cfg.slurm
    needed = math.ceil(n_frames / tasks_per_job(cfg))
    return ScalePlan("adaptive", s.min_jobs, max(s.min_jobs, min(s.max_jobs, needed)))


def scale_for_night(cluster, cfg: ClusterConfig, n_frames: int) -> ScalePlan:
    """Ask for the worker jobs a night needs.

    Parameters
    ----------
    cluster
        The cluster from :func:`make_cluster`. A LocalCluster already has its workers
        and is left as it is.
    cfg
        The same ``cluster`` block.
    n_frames
        Frames of the night.

    Returns
    -------
    ScalePlan
        What was asked for: ``cluster.scale(jobs=...)`` for a fixed plan,
        ``cluster.adapt(minimum_jobs=..., maximum_jobs=...)`` for an adaptive one.
    """
    plan = plan_scaling(cfg, n_frames)
    if cfg.kind != "slurm":
        return plan
    if plan.mode == "fixed":
        cluster.scale(jobs=plan.maximum_jobs)
    else:
        cluster.adapt(minimum_jobs=plan.minimum_jobs, maximum_jobs=plan.maximum_jobs)
    return plan
