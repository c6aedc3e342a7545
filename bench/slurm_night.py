"""Night throughput: wall time, frames per hour per core and the scaling from 1 to N
workers, on a LocalCluster and on SLURM worker jobs, and whether the catalogs agree.

Simulates (or reuses) a night, then runs ``survey-qa --night`` through the command line
(one core per worker, ``OMP_NUM_THREADS=1``), ``--repeat`` times each, alternating:

- ``--cluster local --workers 1``,
- ``--cluster local --workers N`` (``--workers``, default 2),
- ``--cluster slurm --workers N`` (left out with ``--no-slurm``).

For each kind it reports the median wall time of the whole night (start-up included), the
frames per hour and the frames per hour per core (``frames / (wall * workers)``), and the
parallel efficiency against the one-worker local run, ``wall_1 / (N * wall_N)``. From the
catalog of the N-worker local run it reports the median per-frame ``t_total_s`` (one
frame on one core, warm worker) and the median time of each stage per frame (one row per
exposure: a mosaic's ``ALL`` row, which sums its detectors). The SLURM catalog is
compared column by column with the N-worker local one, and the one-worker local catalog
with the N-worker one (timings and ``processed_at`` aside).

Peak resident memory (MiB) of a local run is measured in two ways: exactly, as the
largest peak of any process of the run's process tree (``wait4`` of the ``survey-qa``
process: the client and every worker process it reaped), and per worker process as the
kernel's high-water mark ``VmHWM`` of the processes under ``survey-qa``, read every
``--sample-s`` seconds (a lower bound: growth after the last reading is missed). For
SLURM only the client's process tree is measured; the worker jobs run under ``slurmd``
and their memory is not measured here.

``--distinct K`` simulates only K distinct exposures and fills the night up to
``--frames`` with hard links (copies where linking fails) named ``<exposure>_rNNN`` with
the original suffix, each a separate exposure of the night. The truth table under
``_truth/`` describes only the K simulated exposures; the night run does not read it.
Repeated frames measure throughput, not accuracy: the catalog repeats the same
measurements, and the run's timings are those of K kinds of frame.

SLURM needs a running cluster (``eval "$(hpc/slurm-local.sh start)"``); without
``sbatch`` and a ``squeue`` that answers, the script stops with a message (use
``--no-slurm``). Usage::

    OMP_NUM_THREADS=1 python bench/slurm_night.py [--frames 10] [--distinct K]
        [--size 512] [--workers 2] [--repeat 1] [--no-slurm] [--slurm-memory 2GiB]
        [--workdir /tmp/survey-qa-bench-slurm] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads

from survey_qa import paths
from survey_qa.hpc.local_slurm import write_loopback_site
from survey_qa.pipeline.io import discover_night, exposure_id, night_exposures
from survey_qa.pipeline.schema import TIME_COLUMNS

NIGHT = "2024-03-01"
SURVEY_QA = str(Path(sys.executable).with_name("survey-qa"))
COMPLETE = ".complete"
"""Marker file in a raw root whose night is fully written."""
LOG_TAIL_LINES = 20


# ---------------------------------------------------------------------------- the night


def repeat_name(path: Path, repetition: int) -> Path:
    """The file name of a frame's ``repetition``-th repeat: ``<exposure>_rNNN<suffix>``."""
    base = exposure_id(path)
    return path.with_name(f"{base}_r{repetition:03d}{path.name[len(base):]}")


def link_or_copy(source: Path, target: Path) -> str:
    """Hard-link ``target`` to ``source``, else copy it; return ``"link"`` or ``"copy"``."""
    try:
        os.link(source, target)
        return "link"
    except OSError:
        shutil.copy2(source, target)
        return "copy"


def fill_night(raw_root: Path, night: str, n_frames: int) -> dict[str, int]:
    """Repeat a night's frames, in order, until it has ``n_frames`` exposures.

    Frame ``i`` (0-based, ``i >= K`` for K distinct frames) repeats distinct frame
    ``i % K`` under :func:`repeat_name` with repetition ``i // K``.

    Returns
    -------
    dict
        How many repeats were hard-linked (``link``) and copied (``copy``).
    """
    distinct = discover_night(raw_root, night)
    if not distinct:
        raise ValueError(f"no frames in {paths.night_dir(raw_root, night)}")
    done = {"link": 0, "copy": 0}
    for i in range(len(distinct), n_frames):
        source = distinct[i % len(distinct)]
        done[link_or_copy(source, repeat_name(source, i // len(distinct)))] += 1
    return done


def prepare_night(work: Path, n_frames: int, n_distinct: int, size_px: int, seed: int
                  ) -> Path:
    """A raw root whose night has ``n_frames`` exposures, ``n_distinct`` of them simulated.

    A raw root is reused when its night was completed (:data:`COMPLETE`), otherwise it
    is written anew.
    """
    raw = work / f"raw-{n_frames}x{size_px}-d{n_distinct}-s{seed}"
    if (raw / COMPLETE).is_file():
        return raw
    if raw.exists():
        shutil.rmtree(raw)
    from survey_qa.flows.simulate import simulate_night

    t0 = time.perf_counter()
    simulate_night(raw, NIGHT, n_distinct, seed=seed, size_px=size_px)
    t_sim = time.perf_counter() - t0
    repeats = fill_night(raw, NIGHT, n_frames)
    found = len(night_exposures(raw, NIGHT))
    if found != n_frames:
        raise RuntimeError(f"{raw}: {found} exposures instead of {n_frames}")
    (raw / COMPLETE).write_text("")
    print(f"night: {n_distinct} frames simulated in {t_sim:.0f} s, {repeats['link']} "
          f"repeats linked, {repeats['copy']} copied", flush=True)
    return raw


# ---------------------------------------------------------------------------- one run


@dataclass
class Run:
    """One kind of night run and what its repetitions measured."""

    name: str
    cluster: str
    workers: int
    out: Path
    wall_s: list[float] = field(default_factory=list)
    tree_peak_rss_mib: list[float] = field(default_factory=list)
    worker_peak_rss_mib: list[float] = field(default_factory=list)

    @property
    def median_wall_s(self) -> float:
        return statistics.median(self.wall_s)


def process_parents() -> dict[int, int]:
    """``{pid: parent pid}`` of every process this user may see."""
    parents = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children...)."""
    children: dict[int, list[int]] = {}
    for child, parent in process_parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def vm_hwm_kib(pid: int) -> int | None:
    """A process's peak resident memory so far (``VmHWM``, KiB), or None when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class DescendantPeaks(threading.Thread):
    """Reads ``VmHWM`` of every process below a pid every ``interval_s`` seconds."""

    def __init__(self, pid: int, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.peak_kib: dict[int, int] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            for pid in descendants(self.pid):
                hwm = vm_hwm_kib(pid)
                if hwm is not None:
                    self.peak_kib[pid] = max(hwm, self.peak_kib.get(pid, 0))

    def stop(self) -> float:
        """Stop reading; the largest peak seen (MiB; NaN when no process was seen)."""
        self._stop_event.set()
        self.join()
        return max(self.peak_kib.values()) / 1024 if self.peak_kib else float("nan")


def log_tail(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-LOG_TAIL_LINES:])


def run_night(raw: Path, run: Run, config: Path, log: Path, sample_s: float) -> None:
    """One ``survey-qa --night`` run from scratch; appends its wall time and memory peaks.

    Stops the benchmark with the end of the run's log when the run fails.
    """
    cmd = [SURVEY_QA, "--night", NIGHT, "--raw-root", str(raw), "--out-root", str(run.out),
           "--config", str(config), "--cluster", run.cluster, "--workers", str(run.workers),
           "--force"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = DescendantPeaks(proc.pid, sample_s)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    worker_peak = sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{run.name}: survey-qa exited with {proc.returncode}; "
                         f"the end of {log}:\n{log_tail(log)}")
    run.wall_s.append(wall)
    run.tree_peak_rss_mib.append(usage.ru_maxrss / 1024)  # ru_maxrss is in KiB on Linux
    run.worker_peak_rss_mib.append(worker_peak)


def slurm_problem() -> str | None:
    """Why SLURM cannot take jobs now (no ``sbatch``/``squeue``, no answer), else None."""
    for command in ("sbatch", "squeue"):
        if shutil.which(command) is None:
            return f"'{command}' is not on the PATH"
    try:
        answer = subprocess.run(["squeue", "-h"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "'squeue' did not answer within 30 s"
    if answer.returncode != 0:
        last = (answer.stderr.strip().splitlines() or [f"exit status {answer.returncode}"])[-1]
        return f"'squeue' failed: {last}"
    return None


# ---------------------------------------------------------------------------- results


def catalog(out: Path) -> pd.DataFrame:
    """The night's exposure rows, sorted, without run-dependent columns."""
    df = pads.dataset(paths.catalog_root(out, "exposures"), format="parquet",
                      partitioning="hive").to_table().to_pandas()
    return df.sort_values(["exposure", "detector"]).reset_index(drop=True)


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    """The columns that do not depend on the run (no timings, no ``processed_at``)."""
    keep = [c for c in df.columns if not c.startswith("t_") and c not in ("processed_at",)]
    return df[keep].astype({"night": str})


def difference(a: pd.DataFrame, b: pd.DataFrame) -> str:
    """The first line of how two catalogs differ, '' when they are equal."""
    try:
        pd.testing.assert_frame_equal(comparable(a), comparable(b), check_exact=True)
    except AssertionError as exc:
        return str(exc).strip().splitlines()[0]
    return ""


def frame_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One measured row per exposure: a mosaic's ``ALL`` row, else its detector row."""
    ok = df[df["status"] == "ok"]
    mosaics = set(ok.loc[ok["detector"] == "ALL", "exposure"])
    return ok[(ok["detector"] == "ALL") | ~ok["exposure"].isin(mosaics)]


def stage_medians(df: pd.DataFrame) -> dict[str, float]:
    """Median seconds per frame of each stage and of the whole frame (``t_total_s``)."""
    frames = frame_rows(df)
    return {c: float(frames[c].median()) for c in TIME_COLUMNS if c in frames}


def run_summary(run: Run, n_frames: int, wall_1_s: float) -> dict:
    """Median wall time, rates, efficiency against one worker and memory of one kind."""
    wall = run.median_wall_s
    return {
        "cluster": run.cluster, "workers": run.workers, "frames": n_frames,
        "wall_s": run.wall_s, "median_wall_s": wall,
        "frames_per_hour": 3600 * n_frames / wall,
        "frames_per_hour_per_core": 3600 * n_frames / (wall * run.workers),
        "efficiency_vs_1_worker": wall_1_s / (run.workers * wall),
        "peak_rss_mib_process_tree": max(run.tree_peak_rss_mib),
        "peak_rss_mib_worker_sampled": (max(run.worker_peak_rss_mib)
                                        if run.cluster == "local" else None),
    }


def markdown(summaries: dict[str, dict], stages_s: dict[str, float]) -> str:
    """The runs as a Markdown table, then the per-frame stage medians."""
    lines = ["| run | workers | frames | wall s | frames/h | frames/h per core "
             "| efficiency vs 1 worker | peak RSS MiB (tree / worker) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in summaries.items():
        worker = s["peak_rss_mib_worker_sampled"]
        memory = (f"{s['peak_rss_mib_process_tree']:.0f} / "
                  + (f"{worker:.0f}" if worker is not None else "not measured"))
        lines.append(f"| {name} | {s['workers']} | {s['frames']} | {s['median_wall_s']:.1f} "
                     f"| {s['frames_per_hour']:.0f} | {s['frames_per_hour_per_core']:.0f} "
                     f"| {s['efficiency_vs_1_worker']:.2f} | {memory} |")
    lines += ["", "| per frame (median) | s |", "|---|---:|"]
    lines += [f"| {c} | {v:.3f} |" for c, v in stages_s.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=10, help="exposures in the night")
    p.add_argument("--distinct", type=int, default=None,
                   help="exposures simulated; the rest repeat them (default: all)")
    p.add_argument("--size", type=int, default=512, help="detector side (pixels)")
    p.add_argument("--workers", type=int, default=2, help="workers (cores) of the N runs")
    p.add_argument("--repeat", type=int, default=1, help="runs of each kind")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--no-slurm", action="store_true", help="leave out the SLURM run")
    p.add_argument("--slurm-memory", default="2GiB",
                   help="memory of each SLURM worker job (its Dask memory limit)")
    p.add_argument("--sample-s", type=float, default=0.5,
                   help="seconds between readings of the worker processes' VmHWM")
    p.add_argument("--workdir", default="/tmp/survey-qa-bench-slurm")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    a.distinct = a.frames if a.distinct is None else a.distinct
    if not 1 <= a.distinct <= a.frames:
        p.error("--distinct must be between 1 and --frames")
    if a.workers < 1 or a.repeat < 1:
        p.error("--workers and --repeat must be at least 1")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if not a.no_slurm and (problem := slurm_problem()):
        raise SystemExit(f"SLURM is not reachable: {problem}. Start one with "
                         f"eval \"$(hpc/slurm-local.sh start)\", or pass --no-slurm.")
    work = Path(a.workdir)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    raw = prepare_night(work, a.frames, a.distinct, a.size, a.seed)
    config = write_loopback_site(work, walltime="01:00:00", memory=a.slurm_memory)

    n = a.workers
    runs = {"local 1": Run("local 1", "local", 1, work / "out-local-1")}
    if n > 1:
        runs[f"local {n}"] = Run(f"local {n}", "local", n, work / f"out-local-{n}")
    if not a.no_slurm:
        runs[f"slurm {n}"] = Run(f"slurm {n}", "slurm", n, work / f"out-slurm-{n}")
    for i in range(a.repeat):
        for name, run in runs.items():
            log = work / "logs" / f"{name.replace(' ', '-')}-{i + 1}.log"
            run_night(raw, run, config, log, a.sample_s)
            print(f"run {i + 1} {name:9s}: {run.wall_s[-1]:7.1f} s", flush=True)

    wall_1 = runs["local 1"].median_wall_s
    summaries = {name: run_summary(run, a.frames, wall_1) for name, run in runs.items()}
    local_n = catalog(runs[f"local {n}"].out)
    differences = {}
    if n > 1:
        differences[f"local 1 vs local {n}"] = difference(catalog(runs["local 1"].out),
                                                          local_n)
    if not a.no_slurm:
        differences[f"slurm {n} vs local {n}"] = difference(catalog(runs[f"slurm {n}"].out),
                                                            local_n)
    stages_s = stage_medians(local_n)
    result = {
        "frames": a.frames, "distinct": a.distinct, "size_px": a.size, "workers": n,
        "repeat": a.repeat, "seed": a.seed,
        "runs": summaries,
        "parallel_efficiency_local": summaries[f"local {n}"]["efficiency_vs_1_worker"],
        "median_frame_s_one_core": stages_s["t_total_s"],
        "frame_frames_per_hour_per_core": 3600 / stages_s["t_total_s"],
        "median_stage_s_per_frame": stages_s,
        "catalogs_identical": {k: not v for k, v in differences.items()},
        "difference": differences,
        "load_average": os.getloadavg(),
    }
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    print(markdown(summaries, stages_s))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
