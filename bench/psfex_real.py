"""FWHM and time per stage on real frames: survey-qa next to SourceExtractor + PSFEx.

For every light frame in ``<shared>/real-frames`` and ``<shared>/real-nights`` (sub-folders
too; ``.fit``, ``.fits``, ``.fits.bz2``; bias, dark and flat frames are skipped by their
``IMAGETYP`` / ``OBSTYPE`` / ``FRAMETYP``), on one core:

- survey-qa reads the frame (overscan trimmed, Bayer frames binned 2x2) and runs
  background, sources, PSF and stamps, each timed in CPU seconds (``process_time``; the
  tools' CPU time from ``getrusage``), so that a machine busy with other work does not
  inflate the comparison;
- the pixels survey-qa measured (the first detector, after trimming and binning) are
  written to a temporary FITS file, on which Debian's ``source-extractor`` and ``psfex``
  run (one thread each), so that both tools see the same pixels.

Like with like: PSFEx's ``FWHM_Mean`` is the FWHM of its PSF model, which describes the
PSF as the pixels see it (pixel-convolved); it is compared with survey-qa's
``fwhm_image_px`` (the fitted profile convolved with the pixel, geometric mean of the
axes, with any elongation). survey-qa's catalog column ``fwhm_px`` is the seeing before
pixelisation and image motion; it is printed next to PSFEx's ``FWHM_PixelFree_Mean``.
The median and worst relative difference are taken over frames where PSFEx accepted at
least ``--min-stars`` stars.

Usage::

    OMP_NUM_THREADS=1 python bench/psfex_real.py [--shared DIR] [--limit N]
"""
from __future__ import annotations

import argparse
import bz2
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from astropy.io import fits

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (the SourceExtractor configuration of bench/speed.py)

def vignet_px(fwhm_px: float) -> int:
    """Odd vignet and PSF-model side for PSFEx: 6 FWHM (room for defocused donuts), 21 to
    71 px (bench/speed.py's 35 px is too small for donuts, and PSFEx's time grows with
    the cube of the model's pixels)."""
    side = 6.0 * fwhm_px if math.isfinite(fwhm_px) else 35.0
    return int(np.clip(2 * math.ceil(side / 2) + 1, 21, 71))


PSFEX_CONFIG = (speed.PSFEX_CONFIG.replace("SAMPLE_FWHMRANGE 1.0,30.0",
                                           "SAMPLE_FWHMRANGE 1.0,40.0")
                .replace("PSFVAR_DEGREES 2", "PSFVAR_DEGREES 0"))
"""bench/speed.py's PSFEx settings with room for donuts and one PSF per frame
(``PSFVAR_DEGREES 0``): ``FWHM_Mean`` is then the frame's mean PSF, which survey-qa's
median over stars describes, and PSFEx runs several times faster on crowded frames."""
CALIBRATION_TYPES = ("bias", "zero", "dark", "flat", "sky flat", "dome")
TYPE_KEYS = ("IMAGETYP", "OBSTYPE", "FRAMETYP")
SUFFIXES = (".fit", ".fits", ".fits.bz2")


def default_shared() -> Path:
    env = os.environ.get("SURVEY_QA_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


def discover(shared: Path) -> list[Path]:
    """Frame files under real-frames and real-nights, sorted."""
    out = []
    for folder in ("real-frames", "real-nights"):
        root = shared / folder
        if root.is_dir():
            out += [p for p in root.rglob("*") if p.is_file()
                    and p.name.lower().endswith(SUFFIXES)]
    return sorted(out)


def is_calibration(path: Path) -> bool:
    with fits.open(path) as hdul:
        header = hdul[0].header
        for key in TYPE_KEYS:
            value = str(header.get(key, "")).strip().lower()
            if value and any(value.startswith(t) for t in CALIBRATION_TYPES):
                return True
    return False


def plain_copy(path: Path, tmp: Path) -> Path:
    """The frame as a plain FITS file (bz2 decompressed into ``tmp``)."""
    if not path.name.lower().endswith(".bz2"):
        return path
    out = tmp / path.name[:-4]
    with bz2.open(path, "rb") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def run_survey_qa(path: Path, cfg):
    """Read the first detector and run background, sources, PSF and stamps, each timed in
    CPU seconds (``process_time``: a machine busy with other work does not inflate it).

    Returns (detector, number of sources, PSF result, times by stage).
    """
    from survey_qa.pipeline import background, io, psf, sources, stamps

    clock = time.process_time
    t0 = clock()
    det = io.read_detectors(path, cfg.io)[0]
    t = {"read": clock() - t0}
    if not hasattr(det, "data"):
        raise RuntimeError(str(det))
    t0 = clock()
    bkg = background.measure_background(det.data, det.mask, cfg.background)
    t["background"] = clock() - t0
    t0 = clock()
    src = sources.extract_sources(det.data, bkg, det.mask, cfg.sources, det.meta.saturate_adu)
    t["sources"] = clock() - t0
    t0 = clock()
    star = psf.select_psf_stars(src, det.data.shape, cfg.psf)
    res = psf.measure_psf(det.data, bkg, src, star, cfg.psf, mask=det.mask)
    src = psf.annotate_sources(src, star, res, det.data.shape, cfg.psf)
    t["psf"] = clock() - t0
    t0 = clock()
    stamps.cut_stamps(det.data, bkg, src, res.psf_star, cfg.stamps)
    t["stamps"] = clock() - t0
    return det, len(src), res, t


def run_astromatic(det, work: Path, fwhm_px: float) -> dict:
    """SourceExtractor + PSFEx on the pixels survey-qa measured (vignets sized for stars
    of about ``fwhm_px``)."""
    image = work / "image.fits"
    header = fits.Header()
    sat = float(det.meta.saturate_adu)
    header["SATURATE"] = sat if math.isfinite(sat) and sat > 0 else 1e30
    gain = float(det.meta.gain_e_per_adu)
    header["GAIN"] = gain if math.isfinite(gain) and gain > 0 else 1.0
    data = np.asarray(det.data, np.float32)
    if det.mask is not None:
        data = np.where(det.mask, np.float32(0.0), data)
    fits.writeto(image, data, header, overwrite=True)
    share = "/usr/share/source-extractor"
    params, sex_cfg = work / "sex.param", work / "sex.conf"
    catalog, psf_cfg, xml = work / "cat.ldac", work / "psfex.conf", work / "psfex.xml"
    v = vignet_px(fwhm_px)
    params.write_text(speed.SEX_PARAMS.replace(
        f"VIGNET({speed.VIGNET_PX},{speed.VIGNET_PX})", f"VIGNET({v},{v})"))
    sex_cfg.write_text(speed.SEX_CONFIG.format(catalog=catalog, params=params, share=share))
    psf_cfg.write_text(PSFEX_CONFIG.replace("PSF_SIZE 25,25", f"PSF_SIZE {v},{v}")
                       .format(out=work, xml=xml))
    t0 = speed.children_cpu()
    subprocess.run(["source-extractor", str(image), "-c", str(sex_cfg)], check=True,
                   capture_output=True)
    t_sex = speed.children_cpu() - t0
    t0 = speed.children_cpu()
    ok = subprocess.run(["psfex", str(catalog), "-c", str(psf_cfg)],
                        capture_output=True).returncode == 0
    t_psfex = speed.children_cpu() - t0
    fields = psfex_fields(xml) if ok and xml.exists() else {}
    return {"t_sex": t_sex, "t_psfex": t_psfex,
            "fwhm": float(fields.get("FWHM_Mean", "nan") or "nan"),
            "fwhm_free": float(fields.get("FWHM_PixelFree_Mean", "nan") or "nan"),
            "n_stars": int(float(fields.get("NStars_Accepted_Total", "0") or 0))}


def psfex_fields(xml: Path) -> dict[str, str]:
    """The first row of PSFEx's ``PSF_Fields`` table, by field name."""
    for table in ET.parse(xml).iter():
        if table.tag.endswith("TABLE") and table.get("ID") == "PSF_Fields":
            names = [f.get("name") for f in table.iter() if f.tag.endswith("FIELD")]
            row = next(r for r in table.iter() if r.tag.endswith("TR"))
            return dict(zip(names, [td.text for td in row if td.tag.endswith("TD")]))
    return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=default_shared())
    ap.add_argument("--limit", type=int, default=0, help="at most this many frames (0: all)")
    ap.add_argument("--min-stars", type=int, default=20)
    ap.add_argument("--match", default="", help="only paths containing this text")
    speed.add_reference_option(ap)
    a = ap.parse_args(argv)
    if not speed.ready_to_time(a.no_reference):
        return 1
    files = [p for p in discover(a.shared) if a.match in str(p)]
    if not files:
        print(f"no frames under {a.shared}")
        return 1
    from survey_qa.config import load_config

    cfg = load_config()
    rows, diffs = [], []
    for path in files[:a.limit or None]:
        with tempfile.TemporaryDirectory() as tmp:
            plain = plain_copy(path, Path(tmp))
            if is_calibration(plain):
                continue
            try:
                det, n_src, res, t = run_survey_qa(plain, cfg)
            except Exception as e:  # a frame survey-qa cannot read: say so, go on
                print(f"{path.name}: survey-qa failed: {e}")
                continue
            guess = float(getattr(res, "fwhm_image_px", res.fwhm_px))
            astro = (run_astromatic(det, Path(tmp), guess) if not a.no_reference else
                     {"t_sex": math.nan, "t_psfex": math.nan, "fwhm": math.nan,
                      "fwhm_free": math.nan, "n_stars": 0})
        image_fwhm = float(getattr(res, "fwhm_image_px", math.nan))
        diff = image_fwhm / astro["fwhm"] - 1 if astro["fwhm"] > 0 else math.nan
        counted = astro["n_stars"] >= a.min_stars and math.isfinite(diff)
        if counted:
            diffs.append(diff)
        name = path.name if len(path.name) <= 34 else path.name[:15] + "~" + path.name[-18:]
        rows.append([name, f"{det.data.shape[1]}x{det.data.shape[0]}",
                     f"{res.n_used}/{astro['n_stars']}", res.fwhm_px, astro["fwhm_free"],
                     image_fwhm, astro["fwhm"], f"{100 * diff:+.1f}%" + ("" if counted else "*"),
                     t["read"], t["background"], t["sources"], t["psf"], t["stamps"],
                     astro["t_sex"], astro["t_psfex"]])
        print(speed.table(rows[-1:], HEADER).splitlines()[-1], flush=True)
    print("\nFWHM (px) and CPU time per stage (s, one thread); * = PSFEx accepted fewer than "
          f"{a.min_stars} stars or failed (not counted)")
    print(speed.table(rows, HEADER))
    if diffs:
        d = np.abs(np.array(diffs))
        worst = diffs[int(np.argmax(d))]
        print(f"\nfwhm_image_px vs PSFEx FWHM_Mean on {len(diffs)} frames: median |diff| "
              f"{100 * np.median(d):.1f}%, median diff {100 * np.median(diffs):+.1f}%, "
              f"worst {100 * worst:+.1f}%")
    times = np.array([[r[i] for i in range(8, 15)] for r in rows], float)
    if len(times):
        med = np.median(times, axis=0)
        print("median CPU time (s): read {:.3f}, background {:.3f}, sources {:.3f}, psf {:.3f}, "
              "stamps {:.3f}; SExtractor {:.3f}, PSFEx {:.3f}".format(*med))
    return 0


HEADER = ["frame", "size", "stars qa/PSFEx", "qa fwhm_px", "PSFEx pixfree", "qa image",
          "PSFEx", "diff", "read", "backgr", "sources", "psf", "stamps", "SEx", "PSFEx t"]


if __name__ == "__main__":
    sys.exit(main())
