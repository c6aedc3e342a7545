"""The cluster factory: one code path for a local machine and a SLURM cluster.

Each cluster kind (``cluster.kind`` of the configuration) is one :class:`ClusterKind`
class, registered under its name in :data:`KINDS`: :class:`LocalCluster` gives a
:class:`distributed.LocalCluster`, :class:`SlurmCluster` a
:class:`dask_jobqueue.SLURMCluster` (one Dask worker job per SLURM job). A kind says which
cluster class to start with which arguments, and how many workers a night asks for.

``make_cluster(cfg)`` starts the cluster of ``cfg.kind``; the flow then connects a
``distributed.Client`` to it and calls ``scale_for_night`` once it knows how many frames
the night holds. ``render_job_script(cfg)`` returns the batch script a SLURM worker job
would run, without a scheduler and without submitting anything, so that the
configuration can be checked on a laptop.

The configuration is validated once, when it is loaded
(:func:`survey_qa.config.load_config`); a block built in code is checked with
:func:`survey_qa.config.validate_block`. Nothing here validates it again.
"""
from __future__ import annotations

import abc
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

from survey_qa.config import CLUSTER_KINDS, ClusterConfig

# Scheduler address written into a rendered script that is not submitted.
PLACEHOLDER_SCHEDULER = "tcp://<scheduler-address>:8786"


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


class ClusterKind(abc.ABC):
    """One place the nightly job can run: which Dask cluster, and how it is sized.

    A subclass names itself with ``name`` (a value of ``cluster.kind``, listed in
    :data:`survey_qa.config.CLUSTER_KINDS`) and is registered in :data:`KINDS` when it is
    defined. The methods take the ``cluster`` block of the configuration, already
    validated.
    """

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name not in CLUSTER_KINDS:
            raise TypeError(f"cluster kind {cls.name!r} is not in "
                            f"survey_qa.config.CLUSTER_KINDS {CLUSTER_KINDS}")
        KINDS[cls.name] = cls()

    @abc.abstractmethod
    def spec(self, cfg: ClusterConfig) -> tuple[type, dict[str, Any]]:
        """The cluster class and the keyword arguments that start it."""

    def make(self, cfg: ClusterConfig):
        """Start the cluster and return it."""
        cls, kwargs = self.spec(cfg)
        return cls(**kwargs)

    @abc.abstractmethod
    def plan(self, cfg: ClusterConfig, n_frames: int) -> ScalePlan:
        """How many workers (or worker jobs) a night of ``n_frames`` frames asks for."""

    def scale(self, cluster: Any, plan: ScalePlan) -> None:
        """Ask ``cluster`` for what ``plan`` says; by default the cluster is left as it is."""


#: The registered cluster kinds by name (each :class:`ClusterKind` subclass adds itself).
KINDS: dict[str, ClusterKind] = {}


class LocalKind(ClusterKind):
    """A :class:`distributed.LocalCluster`: ``workers`` processes (one per core when 0)."""

    name = "local"

    def spec(self, cfg: ClusterConfig) -> tuple[type, dict[str, Any]]:
        from distributed import LocalCluster

        return LocalCluster, {
            "n_workers": self.n_workers(cfg),
            "threads_per_worker": cfg.threads_per_worker,
            "processes": True,
            "memory_limit": cfg.memory_limit,
            **({"dashboard_address": cfg.dashboard_address} if cfg.dashboard_address else
               {"dashboard_address": ":0", "scheduler_kwargs": {"dashboard": False}}),
        }

    def plan(self, cfg: ClusterConfig, n_frames: int) -> ScalePlan:
        n = self.n_workers(cfg)
        return ScalePlan("fixed", n, n)

    @staticmethod
    def n_workers(cfg: ClusterConfig) -> int:
        """Worker processes: ``cfg.workers``, or one per core when it is 0."""
        return cfg.workers or os.cpu_count() or 1


class SlurmKind(ClusterKind):
    """A :class:`dask_jobqueue.SLURMCluster`: the scheduler runs in this process and each
    Dask worker is a SLURM job, fixed in number (``workers > 0``) or adaptive."""

    name = "slurm"

    def spec(self, cfg: ClusterConfig) -> tuple[type, dict[str, Any]]:
        from dask_jobqueue import SLURMCluster

        return SLURMCluster, {**slurm_job_kwargs(cfg),
                              "scheduler_options": self.scheduler_options(cfg)}

    def plan(self, cfg: ClusterConfig, n_frames: int) -> ScalePlan:
        if cfg.workers > 0:
            return ScalePlan("fixed", cfg.workers, cfg.workers)
        s = cfg.slurm
        needed = math.ceil(n_frames / tasks_per_job(cfg))
        return ScalePlan("adaptive", s.min_jobs, max(s.min_jobs, min(s.max_jobs, needed)))

    def scale(self, cluster: Any, plan: ScalePlan) -> None:
        if plan.mode == "fixed":
            cluster.scale(jobs=plan.maximum_jobs)
        else:
            cluster.adapt(minimum_jobs=plan.minimum_jobs, maximum_jobs=plan.maximum_jobs)

    @staticmethod
    def scheduler_options(cfg: ClusterConfig) -> dict[str, Any]:
        """Options of the scheduler that runs in this process (its dashboard)."""
        if cfg.dashboard_address is None:
            # The scheduler always serves HTTP; a free port keeps it off :8787.
            return {"dashboard": False, "dashboard_address": ":0"}
        return {"dashboard_address": cfg.dashboard_address}

    @staticmethod
    def job_script(cfg: ClusterConfig) -> str:
        """The batch script of one worker job, with a placeholder scheduler address."""
        from dask_jobqueue.slurm import SLURMJob

        job = SLURMJob(scheduler=PLACEHOLDER_SCHEDULER, name="dummy-name",
                       **slurm_job_kwargs(cfg))
        return job.job_script()


def cluster_kind(cfg: ClusterConfig) -> ClusterKind:
    """The registered kind of ``cfg.kind``.

    Raises
    ------
    ValueError
        For a kind that no :class:`ClusterKind` registers.
    """
    try:
        return KINDS[cfg.kind]
    except KeyError:
        raise ValueError(f"cluster.kind {cfg.kind!r} is not one of {tuple(KINDS)}") from None


def cluster_spec(cfg: ClusterConfig) -> tuple[type, dict[str, Any]]:
    """The cluster class and its keyword arguments for ``cfg``.

    Parameters
    ----------
    cfg
        The ``cluster`` block, already validated.

    Returns
    -------
    tuple
        ``(cls, kwargs)`` such that ``cls(**kwargs)`` starts the cluster.
    """
    return cluster_kind(cfg).spec(cfg)


def make_cluster(cfg: ClusterConfig):
    """Start the Dask cluster that ``cfg`` describes and return it.

    Parameters
    ----------
    cfg
        The ``cluster`` block, already validated. ``kind="local"`` gives a
        :class:`distributed.LocalCluster` with ``workers`` processes (one per core when
        0); ``kind="slurm"`` gives a :class:`dask_jobqueue.SLURMCluster` whose scheduler
        runs in this process and which has no worker job yet: call
        :func:`scale_for_night` next.

    Returns
    -------
    distributed.SpecCluster
        The running cluster; close it (or use it as a context manager) when done.

    Raises
    ------
    ValueError
        For a kind that is not registered.
    """
    return cluster_kind(cfg).make(cfg)


def render_job_script(cfg: ClusterConfig) -> str:
    """The batch script of one SLURM worker job, without a scheduler or a submission.

    It is the script :meth:`dask_jobqueue.SLURMCluster.job_script` gives for the same
    configuration, with a placeholder where the scheduler address goes.

    Parameters
    ----------
    cfg
        The ``cluster`` block, already validated (its ``kind`` does not matter).

    Returns
    -------
    str
        The script: ``#SBATCH`` header, prologue and the ``dask worker`` command line.
    """
    return SlurmKind.job_script(cfg)


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
    return cluster_kind(cfg).plan(cfg, n_frames)


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
    kind = cluster_kind(cfg)
    plan = plan_scaling(cfg, n_frames)
    kind.scale(cluster, plan)
    return plan
