"""The nightly job on the real nights and frames of ``../shared/``, as a Markdown table.

    python bench/real_nights.py [--shared ../shared] [--out /tmp/real-qa] [--workers 2]

Each real sequence is laid out as one night (a symlink under a temporary raw root), run
with the default configuration and shipped models, and every row is printed: class,
classifier, FWHM (px and arcsec), ellipticity, direction coherence, sky, u, flags and the
reason. The stage times per detector and the whole frame's time per megapixel are printed
at the end.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from survey_qa import paths
from survey_qa.pipeline.schema import TIME_COLUMNS

NIGHTS = {"2018-10-12": "real-nights/cminsky__asteroid2713",
          "2019-03-26": "real-nights/LowellObservatory__DeadParrots",
          "2018-07-29": "real-nights/mommermi__cloudynight",
          "2020-01-01": "real-frames"}
HIDDEN_FLAGS = {"HEADER_FALLBACK", "SATURATION_INFERRED", "NONFINITE_PIXELS"}
STAGES = TIME_COLUMNS


def _cell(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, float) and np.isfinite(value) else ""


def table(rows: pd.DataFrame) -> str:
    from survey_qa.pipeline.flags import decode_flags

    out = ["| exposure | class | FWHM px | FWHM \" | e | coh. | sky | u | flags | reason |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows.itertuples():
        flags = ", ".join(f for f in decode_flags(r.qa_flags) if f not in HIDDEN_FLAGS)
        cls = r.quality_class if r.status == "ok" else "failed"
        text = r.reason if r.status == "ok" else r.error
        out.append(f"| {r.exposure} | {cls} ({r.classifier}) | {_cell(r.fwhm_px, '.2f')} | "
                   f"{_cell(r.fwhm_arcsec, '.2f')} | {_cell(r.ellipticity, '.2f')} | "
                   f"{_cell(r.elongation_coherence, '.2f')} | {_cell(r.sky_level, '.1f')} | "
                   f"{_cell(r.sky_nonuniformity, '.3f')} | {flags} | {text} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    p.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="real-qa-")))
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)

    from survey_qa.config import load_config
    from survey_qa.flows.nightly import run_night

    raw = a.out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    cfg = load_config(overrides={"run": {"raw_root": str(raw), "out_root": str(a.out / "qa"),
                                         "progress": False},
                                 "cluster": {"workers": a.workers}})
    for night, folder in NIGHTS.items():
        link = raw / night
        if not link.exists():
            link.symlink_to((a.shared / folder).resolve(), target_is_directory=True)
        summary = run_night(cfg, night, echo=lambda *x, **k: None)
        rows = pd.read_parquet(summary.exposures_catalog).sort_values(["mjd_obs", "exposure"])
        print(f"\n### {folder} ({len(rows)} rows, night {night})\n")
        print(table(rows))
    rows = pd.read_parquet(paths.catalog_root(a.out / "qa", "exposures"))
    ok = rows[(rows.status == "ok") & (rows.detector != "ALL")]
    print("\nmedian time per detector (s): " + ", ".join(
        f"{c[2:-2]} {ok[c].median():.3f}" for c in STAGES))
    single = ok[ok.n_detectors == 1]
    per_mpx = single.t_total_s / (single.nx * single.ny / 1e6)
    print(f"whole frame ({len(single)} single-detector files): median "
          f"{single.t_total_s.median():.3f} s, {per_mpx.median():.3f} s per megapixel "
          f"(range {per_mpx.min():.3f}-{per_mpx.max():.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
