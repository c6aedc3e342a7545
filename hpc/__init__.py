"""survey-qa on clusters: the cluster kinds and their factory (:mod:`.cluster`), the site
file of a SLURM on one machine (:mod:`.local_slurm`) and the SLURM scripts.

The scripts ship with the package; :func:`script_path` finds them in a source tree and
in an installed wheel alike::

    sbatch "$(python -c 'from survey_qa.hpc import script_path; print(script_path("night.sbatch"))')" 2024-03-01
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

SCRIPTS = ("slurm-local.sh", "night.sbatch", "nights.sh", "train.sbatch")


def script_path(name: str) -> Path:
    """Path of one of the packaged SLURM scripts.

    Parameters
    ----------
    name
        One of :data:`SCRIPTS`.

    Raises
    ------
    ValueError
        For a name that is not a packaged script.
    """
    if name not in SCRIPTS:
        raise ValueError(f"{name!r} is not one of {SCRIPTS}")
    return Path(str(resources.files(__name__) / name))
