"""The night-throughput benchmark's own logic: repeated frames, rates and efficiency."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from survey_qa import paths
from survey_qa.pipeline.io import night_exposures

NIGHT = "2024-03-01"
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "slurm_night.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("slurm_night", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it runs
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def small_night(raw: Path) -> Path:
    """A night folder of two frame files (not real FITS: only their names matter) and a
    truth folder."""
    folder = paths.night_dir(raw, NIGHT)
    (folder / "_truth").mkdir(parents=True)
    (folder / "_truth" / "truth.parquet").write_bytes(b"truth")
    (folder / "a.fits").write_bytes(b"frame a")
    (folder / "b.fits.gz").write_bytes(b"frame b")
    return folder


def test_fill_night_links_repeats_as_separate_exposures(bench, tmp_path):
    folder = small_night(tmp_path)
    done = bench.fill_night(tmp_path, NIGHT, 5)
    exposures = night_exposures(tmp_path, NIGHT)
    assert sorted(exposures) == ["a", "a_r001", "a_r002", "b", "b_r001"]
    assert exposures["b_r001"].name == "b_r001.fits.gz"
    assert done["link"] + done["copy"] == 3
    if done["link"] == 3:
        assert os.path.samefile(exposures["a_r002"], folder / "a.fits")
    assert exposures["a_r002"].read_bytes() == b"frame a"


def test_fill_night_copies_when_linking_fails(bench, tmp_path, monkeypatch):
    small_night(tmp_path)

    def no_link(source, target):
        raise OSError("links not supported")

    monkeypatch.setattr(bench.os, "link", no_link)
    assert bench.fill_night(tmp_path, NIGHT, 4) == {"link": 0, "copy": 2}
    assert night_exposures(tmp_path, NIGHT)["b_r001"].read_bytes() == b"frame b"


def test_summary_gives_rates_and_efficiency(bench, tmp_path):
    one = bench.Run("local 1", "local", 1, tmp_path, wall_s=[100.0, 120.0, 110.0],
                    tree_peak_rss_mib=[500.0], worker_peak_rss_mib=[400.0])
    two = bench.Run("slurm 2", "slurm", 2, tmp_path, wall_s=[80.0],
                    tree_peak_rss_mib=[300.0], worker_peak_rss_mib=[float("nan")])
    s1 = bench.run_summary(one, 200, one.median_wall_s)
    s2 = bench.run_summary(two, 200, one.median_wall_s)
    assert s1["median_wall_s"] == 110.0
    assert s1["efficiency_vs_1_worker"] == 1.0
    assert s2["frames_per_hour"] == pytest.approx(3600 * 200 / 80)
    assert s2["frames_per_hour_per_core"] == pytest.approx(3600 * 200 / 160)
    assert s2["efficiency_vs_1_worker"] == pytest.approx(110 / 160)
    assert s2["peak_rss_mib_worker_sampled"] is None
    table = bench.markdown({"local 1": s1, "slurm 2": s2}, {"t_total_s": 0.5})
    assert "| slurm 2 | 2 | 200 | 80.0 | 9000 | 4500 | 0.69 | 300 / not measured |" in table


def test_frame_rows_take_a_mosaics_all_row(bench):
    df = pd.DataFrame({"exposure": ["m", "m", "m", "s", "f"],
                       "detector": ["1", "2", "ALL", "0", "0"],
                       "status": ["ok", "ok", "ok", "ok", "failed"]})
    rows = bench.frame_rows(df)
    assert list(zip(rows["exposure"], rows["detector"])) == [("m", "ALL"), ("s", "0")]


def test_distinct_defaults_to_all_frames(bench):
    assert bench.parse_args(["--frames", "7"]).distinct == 7
    with pytest.raises(SystemExit):
        bench.parse_args(["--frames", "3", "--distinct", "4"])
