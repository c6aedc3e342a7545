"""The cluster factory: one code path for a local machine and a SLURM cluster."""
from __future__ import annotations

import os

from survey_qa.config import ClusterConfig


def make_cluster(cfg: ClusterConfig):
    """Start the Dask cluster that ``cfg`` describes and return it.

    ``kind="local"`` gives a :class:`distributed.LocalCluster` with ``workers`` processes
    (one per core when 0).
    """
    if cfg.kind == "local":
        from distributed import LocalCluster

        n = cfg.workers or os.cpu_count() or 1
        return LocalCluster(n_workers=n, threads_per_worker=cfg.threads_per_worker,
                            processes=True, memory_limit=cfg.memory_limit,
                            dashboard_address=cfg.dashboard_address)
    raise ValueError(f"cluster.kind {cfg.kind!r} is not supported yet")
