"""Latency of ``survey-qa watch``: from a 4k frame landing in the night folder to its verdict.

    python bench/watch_latency.py [--frames 20] [--size 4096] [--idle-s 30] [--cores 0]

Simulates ``--frames`` exposures (realistic mix, 4096x4096 single frames or mosaics of four
2048x2048 detectors; cached under bench/out/watch_latency/staging), starts ``survey-qa
watch`` as a subprocess pinned to one core (``taskset``, one thread per library) with the
default models, measures its CPU use while idle, then copies the frames in one at a time.
A frame has landed when its copy is closed; its verdict when the watch prints the frame's
line. After each verdict the benchmark waits until the report is rewritten, so frames do
not queue. The CPU time the watch process spent from landing to verdict is recorded too: on
a busy machine it is what the latency would be on an idle core. Results go to
bench/out/watch_latency/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from survey_qa import paths

NIGHT = "2024-08-01"
OUT = Path(__file__).resolve().parent / "out" / "watch_latency"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--idle-s", type=float, default=30.0)
    p.add_argument("--cores", default="0", help="taskset CPU list for the watch process")
    a = p.parse_args()

    staging = OUT / "staging" / f"{a.size}"
    if len(list(paths.night_dir(staging, NIGHT).glob("*.fits*"))) < a.frames:
        from survey_qa.flows.simulate import simulate_night

        print(f"simulating {a.frames} frames of {a.size} px ...", flush=True)
        simulate_night(staging, NIGHT, a.frames, seed=5150, size_px=a.size, mix="realistic")
    frames = sorted(paths.night_dir(staging, NIGHT).glob("*.fits*"))[: a.frames]
    run = OUT / "run"
    shutil.rmtree(run, ignore_errors=True)
    paths.night_dir(run / "raw", NIGHT).mkdir(parents=True)

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = ["taskset", "-c", a.cores, sys.executable, "-m", "survey_qa.cli", "watch",
           "--night", NIGHT, "--raw-root", str(run / "raw"), "--out-root", str(run / "qa")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    lines: queue.Queue = queue.Queue()

    def read():
        for s in proc.stdout:  # the moment and the CPU time spent when each line comes
            lines.put((time.monotonic(), cpu_seconds(proc.pid), s.rstrip()))

    threading.Thread(target=read, daemon=True).start()

    def wait_for(text: str, timeout: float = 1800.0) -> tuple[float, float]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                t, cpu, line = lines.get(timeout=1)
            except queue.Empty:
                continue
            print("   ", line, flush=True)
            if text in line:
                return t, cpu
        raise SystemExit(f"no {text!r} within {timeout} s")

    wait_for("watching")
    wait_for("report:")  # the empty night's catalogs and page, written at start
    time.sleep(2)
    c0, t0 = cpu_seconds(proc.pid), time.monotonic()
    time.sleep(a.idle_s)
    idle_before = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
    print(f"idle CPU before any frame: {100 * idle_before:.2f}% of a core", flush=True)

    latencies, cpu_latencies = {}, {}
    for f in frames:
        target = paths.night_dir(run / "raw", NIGHT) / f.name
        shutil.copyfile(f, target)
        landed, cpu_landed = time.monotonic(), cpu_seconds(proc.pid)
        exposure = f.name.split(".")[0]
        t, cpu = wait_for(exposure)
        latencies[exposure], cpu_latencies[exposure] = t - landed, cpu - cpu_landed
        print(f"{exposure}: {latencies[exposure]:.2f} s wall, "
              f"{cpu_latencies[exposure]:.2f} s CPU, load {os.getloadavg()[0]:.1f}", flush=True)
        wait_for("report:")

    time.sleep(2)
    c0, t0 = cpu_seconds(proc.pid), time.monotonic()
    time.sleep(a.idle_s)
    idle_after = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)

    values = list(latencies.values())
    result = {
        "frames": len(values), "size_px": a.size, "cores": a.cores,
        "latency_median_s": statistics.median(values), "latency_worst_s": max(values),
        "latency_s": latencies,
        "cpu_latency_median_s": statistics.median(cpu_latencies.values()),
        "cpu_latency_worst_s": max(cpu_latencies.values()), "cpu_latency_s": cpu_latencies,
        "idle_cpu_fraction_before": idle_before, "idle_cpu_fraction_after": idle_after,
        "idle_window_s": a.idle_s, "load_average_at_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }
    (OUT / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "latency_s"}, indent=2))


if __name__ == "__main__":
    main()
