"""The same simulated night on SLURM worker jobs and on a LocalCluster: wall time, rate, and
whether the two catalogs agree.

Simulates (or reuses) a night, then runs ``survey-qa --night`` through the command line,
alternating ``--cluster slurm`` and ``--cluster local`` with the same number of workers
(one core each), ``--repeat`` times each. Prints per run the wall time, and at the end the
median wall times, the frames per hour per core of the night as a whole
(``frames / (wall * cores)``, start-up included) and from the per-frame ``t_total_s``
of the catalog (one frame on one core, warm worker), and whether the SLURM and local
catalogs are equal column by column (timings and ``processed_at`` aside).

Needs a running SLURM (``eval "$(hpc/slurm-local.sh start)"``). Usage::

    OMP_NUM_THREADS=1 python bench/slurm_night.py [--frames 10] [--size 512] [--workers 2]
        [--repeat 2] [--workdir /tmp/survey-qa-bench-slurm] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads

from survey_qa import paths
from survey_qa.hpc.local_slurm import write_loopback_site

NIGHT = "2024-03-01"
SURVEY_QA = str(Path(sys.executable).with_name("survey-qa"))


def site_config(folder: Path) -> Path:
    """One-core, one-process SLURM worker jobs on the loopback interface."""
    return write_loopback_site(folder, walltime="01:00:00")


def run_night(raw: Path, out: Path, config: Path, cluster: str, workers: int) -> float:
    """Wall time (s) of one ``survey-qa --night`` run from scratch."""
    cmd = [SURVEY_QA, "--night", NIGHT, "--raw-root", str(raw), "--out-root", str(out),
           "--config", str(config), "--cluster", cluster, "--workers", str(workers),
           "--force"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ,
                                                                "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t0


def catalog(out: Path) -> pd.DataFrame:
    """The night's exposure rows, sorted, without run-dependent columns."""
    df = pads.dataset(paths.catalog_root(out, "exposures"), format="parquet",
                      partitioning="hive").to_table().to_pandas()
    return df.sort_values(["exposure", "detector"]).reset_index(drop=True)


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in df.columns if not c.startswith("t_") and c not in ("processed_at",)]
    return df[keep].astype({"night": str})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--size", type=int, default=512, help="detector side (pixels)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--workdir", default="/tmp/survey-qa-bench-slurm")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()

    work = Path(a.workdir)
    raw = work / f"raw-{a.frames}x{a.size}-s{a.seed}"
    if not paths.night_dir(raw, NIGHT).is_dir():
        from survey_qa.flows.simulate import simulate_night

        simulate_night(raw, NIGHT, a.frames, seed=a.seed, size_px=a.size)
    config = site_config(work)
    walls: dict[str, list[float]] = {"slurm": [], "local": []}
    for i in range(a.repeat):
        for cluster in ("slurm", "local"):
            wall = run_night(raw, work / f"out-{cluster}", config, cluster, a.workers)
            walls[cluster].append(wall)
            print(f"run {i + 1} {cluster:5s}: {wall:6.1f} s", flush=True)

    slurm, local = catalog(work / "out-slurm"), catalog(work / "out-local")
    try:
        pd.testing.assert_frame_equal(comparable(slurm), comparable(local), check_exact=True)
        identical, difference = True, ""
    except AssertionError as exc:
        identical, difference = False, str(exc).splitlines()[0]
    per_frame_s = statistics.median(local["t_total_s"].dropna())
    result = {
        "frames": a.frames, "size_px": a.size, "workers": a.workers, "repeat": a.repeat,
        "wall_s": walls,
        "median_wall_s": {k: statistics.median(v) for k, v in walls.items()},
        "night_frames_per_hour_per_core": {
            k: 3600 * a.frames / (statistics.median(v) * a.workers) for k, v in walls.items()},
        "median_frame_s_one_core": per_frame_s,
        "frame_frames_per_hour_per_core": 3600 / per_frame_s,
        "catalogs_identical": identical, "difference": difference,
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
