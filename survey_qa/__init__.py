"""survey-qa: nightly image-quality assessment for astronomical surveys.

The package is split the way the work flows:

- ``survey_qa.pipeline``: pure stages (arrays in, typed records out) and I/O.
- ``survey_qa.flows``: wiring of stages into the nightly job and training jobs.
- ``survey_qa.models``: learned components (SOM, CNN classifier, autoencoder).
- ``survey_qa.hpc``: the Dask cluster factory (local or SLURM) and batch scripts.
- ``survey_qa.simulate``: simulated frames with known truth (a tool, not a stage).
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("survey-qa")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"
