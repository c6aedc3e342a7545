"""Site configuration for SLURM worker jobs on this one machine.

The single-node SLURM that ``hpc/slurm-local.sh`` starts runs the worker jobs next to the
scheduler, so they talk over the loopback interface. :func:`write_loopback_site` writes
the site file (``--config``) that the SLURM tests and ``bench/slurm_night.py`` run a
night with.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def loopback_site(folder: Path, walltime: str, run: dict[str, Any] | None = None,
                  **slurm: Any) -> dict[str, Any]:
    """The configuration of a night on one-core, one-process SLURM worker jobs.

    Parameters
    ----------
    folder
        Where the worker jobs write their logs (``folder/worker-logs``).
    walltime
        Walltime of each worker job (SLURM ``--time``).
    run
        Further settings of the ``run`` block (the progress bar is off).
    **slurm
        Further settings of the ``cluster.slurm`` block (``job_name``,
        ``death_timeout_s``...).

    Returns
    -------
    dict
        The ``run`` and ``cluster`` blocks, as :func:`survey_qa.config.load_config` reads
        them from a file.
    """
    return {
        "run": {"progress": False, **(run or {})},
        "cluster": {
            "dashboard_address": None,
            "slurm": {"cores": 1, "processes": 1, "memory": "2GiB", "walltime": walltime,
                      "interface": "lo", "log_directory": str(folder / "worker-logs"),
                      **slurm},
        },
    }


def write_loopback_site(folder: Path, walltime: str, run: dict[str, Any] | None = None,
                        **slurm: Any) -> Path:
    """Write :func:`loopback_site` as ``folder/site.yaml`` and return its path."""
    path = Path(folder) / "site.yaml"
    path.write_text(yaml.safe_dump(loopback_site(Path(folder), walltime, run, **slurm),
                                   sort_keys=False))
    return path
