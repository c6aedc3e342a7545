"""Speed, memory and FWHM accuracy of the whole per-frame job next to SourceExtractor + PSFEx.

Simulates (or reuses) a few single-detector 4096 x 4096 frames, then:

- survey-qa: the nightly job itself (``survey-qa --night``, one worker, one thread), whose
  exposure catalog gives each frame's stage times (read, background, sources, PSF, stamps,
  autoencoder, classification) and ``t_total_s``, the whole frame on a warm worker, writes
  included; the run's peak resident memory (largest process) and its CPU time per frame,
  start-up and model loading included;
- Debian's ``source-extractor`` (background + detection + a FITS_LDAC catalog with
  vignets, ``NTHREADS 1``) and ``psfex`` on that catalog (``NTHREADS 1``), timed by their
  CPU time, with their configuration written to a temporary folder;

and the FWHM each gives: survey-qa's ``fwhm_px`` (the seeing, before pixelisation),
PSFEx's ``FWHM_Mean`` and the median SourceExtractor ``FWHM_IMAGE`` of bright, unflagged
detections on the stellar locus. SourceExtractor and PSFEx run with the defaults Debian
ships (``prepsfex.param``, ``default.psfex``) but for one thread, no check plots and a
wider ``SAMPLE_FWHMRANGE``. The last two describe the pixel-convolved PSF, so they are
compared with the FWHM of the true profile convolved with the pixel.

The survey-qa stage times are wall-clock seconds of a single-threaded worker: run the
benchmark on an otherwise quiet machine.

Usage::

    OMP_NUM_THREADS=1 python bench/speed.py [--raw-root DIR] [--n-frames 3] [--seed 777]
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits

from survey_qa import paths

#: The reference tools the stages are timed against (Debian packages of the same names).
REFERENCE_TOOLS = ("source-extractor", "psfex")

NIGHT = "2024-07-01"
VIGNET_PX = 35  # prepsfex.param default

SEX_PARAMS = """NUMBER
X_IMAGE
Y_IMAGE
XWIN_IMAGE
YWIN_IMAGE
FLUX_APER(1)
FLUXERR_APER(1)
FLUX_AUTO
FLUX_MAX
FLUX_RADIUS
FWHM_IMAGE
A_IMAGE
B_IMAGE
THETA_IMAGE
ELONGATION
SNR_WIN
CLASS_STAR
FLAGS
VIGNET({v},{v})
""".format(v=VIGNET_PX)

SEX_CONFIG = """CATALOG_NAME {catalog}
CATALOG_TYPE FITS_LDAC
PARAMETERS_NAME {params}
DETECT_TYPE CCD
DETECT_MINAREA 5
DETECT_THRESH 5.0
ANALYSIS_THRESH 5.0
FILTER Y
FILTER_NAME {share}/default.conv
DEBLEND_NTHRESH 32
DEBLEND_MINCONT 0.005
CLEAN Y
CLEAN_PARAM 1.0
MASK_TYPE CORRECT
PHOT_APERTURES 12
PHOT_AUTOPARAMS 2.5,3.5
SATUR_KEY SATURATE
SATUR_LEVEL 60000.0
GAIN_KEY GAIN
PIXEL_SCALE 0
SEEING_FWHM 1.0
STARNNW_NAME {share}/default.nnw
BACK_TYPE AUTO
BACK_SIZE 128
BACK_FILTERSIZE 3
BACKPHOTO_TYPE GLOBAL
CHECKIMAGE_TYPE NONE
MEMORY_OBJSTACK 30000
MEMORY_PIXSTACK 3000000
MEMORY_BUFSIZE 1024
VERBOSE_TYPE QUIET
NTHREADS 1
"""

PSFEX_CONFIG = """BASIS_TYPE PIXEL_AUTO
PSF_SAMPLING 0.0
PSF_SIZE 25,25
PSFVAR_KEYS X_IMAGE,Y_IMAGE
PSFVAR_GROUPS 1,1
PSFVAR_DEGREES 2
SAMPLE_AUTOSELECT Y
SAMPLE_FWHMRANGE 1.0,30.0
SAMPLE_VARIABILITY 0.2
SAMPLE_MINSN 20
SAMPLE_MAXELLIP 0.3
CHECKPLOT_TYPE NONE
CHECKIMAGE_TYPE NONE
PSF_DIR {out}
WRITE_XML Y
XML_NAME {xml}
VERBOSE_TYPE QUIET
NTHREADS 1
"""


def simulate(raw_root: str, n_frames: int, seed: int, size_px: int):
    """Single-detector plain-FITS frames (SourceExtractor cannot read .fz); returns truth."""
    from survey_qa.flows.simulate import load_truth, write_night
    from survey_qa.simulate import FramePlan

    truth_file = paths.truth_table(raw_root, NIGHT)
    if not truth_file.exists():
        classes = ["good", "bad_seeing", "good", "bad_tracking", "good"]
        plans = [FramePlan(i, f"speed_{i:02d}", classes[i % len(classes)], False, "fits",
                           f"{NIGHT}T2{i}:00:00.000", i + 1, size_px,
                           overrides={"header_style": "wcs"})
                 for i in range(n_frames)]
        t0 = time.perf_counter()
        write_night(raw_root, NIGHT, plans, seed=seed)
        print(f"simulated {n_frames} frames of {size_px} px in {time.perf_counter() - t0:.0f} s")
    return load_truth(raw_root, NIGHT)[0]


def pixelised_fwhm(truth_row) -> float:
    """FWHM (pixels) of the true seeing profile convolved with the pixel."""
    import galsim

    fwhm = float(truth_row["fwhm_px_true"])
    if truth_row["psf_profile"] == "moffat":
        prof = galsim.Moffat(beta=float(truth_row["moffat_beta"]), fwhm=fwhm)
    else:
        prof = galsim.Kolmogorov(fwhm=fwhm)
    scale = min(0.05, fwhm / 40)
    img = galsim.Convolve(prof, galsim.Pixel(1.0)).drawImage(
        nx=int(8 * fwhm / scale) | 1, ny=int(8 * fwhm / scale) | 1, scale=scale,
        method="no_pixel")
    return float(img.calculateFWHM())


def children_cpu() -> float:
    """CPU time (user + system, s) of the finished child processes."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_night_job(raw_root: str, out_root: str) -> tuple[pd.DataFrame, float, float]:
    """The nightly job on the frames, one worker, one thread, from scratch.

    Returns
    -------
    rows, peak_rss_mb, cpu_s
        The exposure catalog (one row per frame), the peak resident memory of the
        largest process of the run (MB) and the CPU time of the whole run (s).
    """
    cmd = [str(Path(sys.executable).with_name("survey-qa")), "--night", NIGHT,
           "--raw-root", raw_root, "--out-root", out_root, "--workers", "1", "--force"]
    t0 = children_cpu()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ,
                                                                "OMP_NUM_THREADS": "1"})
    cpu_s = children_cpu() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    rows = pd.read_parquet(paths.catalog_file(out_root, "exposures", NIGHT))
    return rows.set_index("exposure"), peak_mb, cpu_s


def run_astromatic(path: str, work: Path) -> dict:
    """SourceExtractor then PSFEx on one frame, timed; returns their FWHM (pixels)."""
    share = "/usr/share/source-extractor"
    params, sex_cfg = work / "sex.param", work / "sex.conf"
    catalog, psf_cfg, xml = work / "cat.ldac", work / "psfex.conf", work / "psfex.xml"
    params.write_text(SEX_PARAMS)
    sex_cfg.write_text(SEX_CONFIG.format(catalog=catalog, params=params, share=share))
    psf_cfg.write_text(PSFEX_CONFIG.format(out=work, xml=xml))
    t0 = children_cpu()
    subprocess.run(["source-extractor", path, "-c", str(sex_cfg)], check=True,
                   capture_output=True)
    t_sex = children_cpu() - t0
    t0 = children_cpu()
    subprocess.run(["psfex", str(catalog), "-c", str(psf_cfg)], check=True, capture_output=True)
    t_psfex = children_cpu() - t0
    with fits.open(catalog) as hdul:
        cat = hdul[2].data
        fwhm_sex = _sextractor_star_fwhm(cat)
        n_sex = len(cat)
    return {"t_sex": t_sex, "t_psfex": t_psfex, "fwhm_sex": fwhm_sex,
            "fwhm_psfex": _psfex_fwhm(xml), "n_sources": n_sex}


def _sextractor_star_fwhm(cat) -> float:
    """Median FWHM_IMAGE of bright, unflagged detections on the stellar locus (the same
    cosmic-ray cut and half-light-radius locus as survey-qa's star selection, fed
    SExtractor's FLUX_RADIUS and moments)."""
    from survey_qa.pipeline.psf import cosmic_ray_like, stellar_locus

    rh = np.asarray(cat["FLUX_RADIUS"], float)
    cr = cosmic_ray_like(rh, np.asarray(cat["A_IMAGE"], float), np.asarray(cat["B_IMAGE"], float),
                         np.asarray(cat["THETA_IMAGE"], float))
    ok = (cat["FLAGS"] == 0) & (cat["SNR_WIN"] > 30) & (cat["FWHM_IMAGE"] > 0) & ~cr
    centre, tol = stellar_locus(rh[ok])
    if not math.isfinite(centre):
        return math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        on_locus = ok & (np.abs(np.log(rh) - centre) < tol)
    return float(np.median(cat["FWHM_IMAGE"][on_locus])) if on_locus.any() else math.nan


def _psfex_fwhm(xml: Path) -> float:
    """FWHM_Mean (pixels) from PSFEx's XML report."""
    tree = ET.parse(xml)
    for table in tree.iter():
        if table.tag.endswith("TABLE") and table.get("ID") == "PSF_Fields":
            names = [f.get("name") for f in table.iter() if f.tag.endswith("FIELD")]
            row = next(r for r in table.iter() if r.tag.endswith("TR"))
            values = [td.text for td in row if td.tag.endswith("TD")]
            return float(values[names.index("FWHM_Mean")])
    return math.nan


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[c if isinstance(c, str) else f"{c:.3f}" for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def add_reference_option(ap: argparse.ArgumentParser) -> None:
    """``--no-reference``: time survey-qa without the reference tools."""
    ap.add_argument("--no-reference", action="store_true",
                    help="time survey-qa alone (no SourceExtractor / PSFEx)")


def ready_to_time(no_reference: bool) -> bool:
    """Whether a timing run can start, saying why not.

    Prints a note when ``OMP_NUM_THREADS`` is not 1 (the timings are per core) and, when
    the reference tools are wanted (``no_reference`` False) but one is not installed,
    which one; returns False in that case.
    """
    if os.environ.get("OMP_NUM_THREADS") != "1":
        print("note: set OMP_NUM_THREADS=1 for per-core timings")
    if no_reference:
        return True
    for tool in REFERENCE_TOOLS:
        if shutil.which(tool) is None:
            print(f"{tool} not found (apt-get install source-extractor psfex)")
            return False
    return True


STAGES = ("read", "background", "sources", "psf", "stamps", "ae", "classify")
MEASURING = STAGES[:5]
"""The stages that do what SourceExtractor + PSFEx do (the first of :data:`STAGES`)."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw-root", default="/tmp/survey-qa-speed")
    ap.add_argument("--out-root", default=None,
                    help="where the nightly job writes (default: a temporary folder)")
    ap.add_argument("--n-frames", type=int, default=3)
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--size-px", type=int, default=4096)
    add_reference_option(ap)
    a = ap.parse_args(argv)
    if not ready_to_time(a.no_reference):
        return 1
    truth = simulate(a.raw_root, a.n_frames, a.seed, a.size_px)
    with tempfile.TemporaryDirectory() as tmp:
        rows, peak_mb, cpu_s = run_night_job(a.raw_root, a.out_root or tmp)
    timing, accuracy = [], []
    for _, tr in truth.sort_values("exposure").iterrows():
        path = str(Path(a.raw_root) / NIGHT / Path(tr["path"]).name)
        ours = rows.loc[tr["exposure"]]
        with tempfile.TemporaryDirectory() as tmp:
            astro = (run_astromatic(path, Path(tmp)) if not a.no_reference else
                     {"t_sex": math.nan, "t_psfex": math.nan, "fwhm_sex": math.nan,
                      "fwhm_psfex": math.nan, "n_sources": 0})
        reference = astro["t_sex"] + astro["t_psfex"]
        stages = [float(ours[f"t_{s}_s"]) for s in STAGES]
        measuring = sum(stages[:len(MEASURING)])
        timing.append([tr["exposure"], *stages, measuring, float(ours["t_total_s"]),
                       astro["t_sex"], astro["t_psfex"], reference, reference / measuring,
                       reference / float(ours["t_total_s"])])
        true_fwhm, pix_fwhm = float(tr["fwhm_px_true"]), pixelised_fwhm(tr)
        fwhm = float(ours["fwhm_px"])
        accuracy.append([tr["exposure"], f"{tr['psf_profile']}", float(tr["trail_ratio"]),
                         true_fwhm, pix_fwhm, fwhm, fwhm / true_fwhm - 1,
                         astro["fwhm_psfex"], astro["fwhm_psfex"] / pix_fwhm - 1,
                         astro["fwhm_sex"], astro["fwhm_sex"] / pix_fwhm - 1,
                         f"{int(ours['n_sources'])}/{astro['n_sources']}"])
    header = ["frame", *STAGES, "measuring", "whole job", "SExtractor", "PSFEx", "SEx+PSFEx",
              "x measuring", "x whole"]
    mean = ["mean"] + [float(np.mean([r[i] for r in timing])) for i in range(1, len(header))]
    measuring, whole, reference = (header.index(c) for c in ("measuring", "whole job",
                                                              "SEx+PSFEx"))
    mean[-2:] = mean[reference] / mean[measuring], mean[reference] / mean[whole]
    megapixels = a.size_px ** 2 / 1e6
    print(f"\nTime per {a.size_px}x{a.size_px} frame, one thread (s): survey-qa's nightly job "
          "(wall, warm worker, writes included) next to SourceExtractor + PSFEx (CPU).\n"
          f"measuring: {' + '.join(MEASURING)}, what SourceExtractor + PSFEx do; "
          "x: how many times faster survey-qa is (the mean row: ratio of the mean times)")
    print(table(timing + [mean], header))
    print(f"\nsurvey-qa: {mean[whole] / megapixels:.3f} s per megapixel; the whole run (start-up, "
          f"model loading, night pass and report included) took {cpu_s / len(timing):.2f} "
          f"CPU s per frame; peak resident memory of its largest process {peak_mb:.0f} MB")
    print("\nFWHM (pixels): survey-qa fwhm_px vs the seeing; PSFEx and SExtractor (which "
          "describe the pixel-convolved PSF) vs the seeing convolved with the pixel")
    print(table(accuracy, ["frame", "profile", "trail r", "true", "true+pix", "qa fwhm_px",
                           "err", "PSFEx", "err", "SEx FWHM_IMAGE", "err", "n src (qa/SEx)"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
