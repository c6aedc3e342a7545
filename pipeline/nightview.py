"""What the night report shows, computed from arrays and rows: no files, no plotting.

- :func:`preview` bins and stretches a detector for a thumbnail;
- :func:`focal_plane` places a mosaic's detectors from their headers;
- :func:`summary_lines` is the ten-second summary of a night;
- :func:`class_runs` groups consecutive exposures of one class into time intervals;
- :func:`table_rows`, :func:`failed_rows`, :func:`class_counts`, :func:`observation_times`,
  :func:`relative_star_flux`, :func:`field_curves` and :func:`median_stamp` are the data of
  the page's table, counts, timeline and detector panels.
"""
from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from survey_qa.pipeline.flags import decode_flags
from survey_qa.pipeline.schema import CLASSES, PRIORITY

CLASS_COLOURS = {
    "good": "#2ca02c", "bad_seeing": "#ff7f0e", "background_issues": "#9467bd",
    "bad_tracking": "#d62728", "very_bad_tracking": "#8c1515", "failed": "#7f7f7f",
}
"""One colour per class, shared by every plot of the report."""

_SECTION = re.compile(r"^\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]$")


def preview(data: np.ndarray, mask: np.ndarray | None = None, max_side_px: int = 256,
            ) -> np.ndarray:
    """A detector binned to at most ``max_side_px`` and stretched to [0, 1].

    Binning is an integer block mean (masked pixels left out); the stretch is an asinh of
    the sky-subtracted image in units of the sky noise (median and 1.48 MAD of the binned
    image), so faint stars and sky structure show while bright stars do not saturate the
    whole scale. Empty blocks are 0.
    """
    img = np.asarray(data, dtype=np.float32)
    if mask is not None:
        img = np.where(mask, np.nan, img)
    factor = max(1, math.ceil(max(img.shape) / max_side_px))
    ny, nx = (s // factor * factor for s in img.shape)
    if ny == 0 or nx == 0:
        factor, ny, nx = 1, *img.shape
    blocks = img[:ny, :nx].reshape(ny // factor, factor, nx // factor, factor)
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(blocks)
        n = finite.sum(axis=(1, 3))
        binned = np.where(n > 0, np.where(finite, blocks, 0).sum(axis=(1, 3)) / np.maximum(n, 1),
                          np.nan)
    good = binned[np.isfinite(binned)]
    if good.size == 0:
        return np.zeros(binned.shape, np.float32)
    sky = float(np.median(good))
    noise = float(1.4826 * np.median(np.abs(good - sky))) or float(np.std(good)) or 1.0
    z = np.arcsinh((binned - sky) / (3 * noise))
    lo, hi = -1.0, max(float(np.nanpercentile(z, 99.7)), 1.0)
    out = np.clip((z - lo) / (hi - lo), 0, 1)
    return np.nan_to_num(out, nan=0.0).astype(np.float32)


PREVIEW_SIDE_PX = 192
"""Longest side of a detector's preview (pixels)."""

PREVIEW_VARIABLES = {
    "preview": ((PREVIEW_SIDE_PX, PREVIEW_SIDE_PX), ("preview_y", "preview_x"), "uint8", 0),
    "preview_shape": ((2,), ("axis",), "int32", 0),
}
"""Array-store variables of :func:`preview_arrays` (shape, dimensions, dtype, fill)."""


def preview_arrays(data: np.ndarray, mask: np.ndarray | None) -> dict[str, np.ndarray]:
    """A detector's :func:`preview` for the array store, made where the frame is measured
    so that the night report need not read the frame again: the [0, 1] stretch as
    ``uint8`` (0-255) in the top-left corner of a ``PREVIEW_SIDE_PX`` square, and its
    (ny, nx)."""
    small = preview(data, mask, PREVIEW_SIDE_PX)
    out = np.zeros((PREVIEW_SIDE_PX, PREVIEW_SIDE_PX), np.uint8)
    out[:small.shape[0], :small.shape[1]] = np.round(small * 255).astype(np.uint8)
    return {"preview": out, "preview_shape": np.array(small.shape, np.int32)}


def stored_preview(square: np.ndarray | None, shape: np.ndarray | None) -> np.ndarray | None:
    """The [0, 1] preview back from :func:`preview_arrays`' arrays; None when not stored."""
    if square is None or shape is None or not np.all(np.asarray(shape) > 0):
        return None
    ny, nx = (int(v) for v in shape)
    return square[:ny, :nx].astype(np.float32) / 255


@dataclass(frozen=True)
class Placement:
    """Where a detector lies in the focal plane (pixels, lower-left corner and size)."""

    detector: str
    x0: float
    y0: float
    nx: int
    ny: int


def _section(text) -> tuple[int, int, int, int] | None:
    m = _SECTION.match(str(text or "").strip())
    return tuple(int(v) for v in m.groups()) if m else None


def focal_plane(headers: list[tuple[str, dict]]) -> tuple[list[Placement], str]:
    """Place a mosaic's detectors from their header cards.

    Parameters
    ----------
    headers
        ``(detector, header)`` per detector in file order; a header is any mapping of
        keywords (an astropy Header works).

    Returns
    -------
    placements, how
        ``how`` says what the layout rests on: ``"DETSEC"`` (each detector's section of
        the mosaic), ``"CRPIX"`` (detectors sharing one tangent point, placed by where
        that point falls on each), or ``"grid"`` (in file order on a near-square grid).
    """
    def size(h):
        return int(h.get("NAXIS1", 0) or 0), int(h.get("NAXIS2", 0) or 0)

    secs = [_section(h.get("DETSEC")) for _, h in headers]
    if headers and all(secs):
        out = []
        for (det, _), (x1, x2, y1, y2) in zip(headers, secs):
            out.append(Placement(det, min(x1, x2) - 1, min(y1, y2) - 1,
                                 abs(x2 - x1) + 1, abs(y2 - y1) + 1))
        return out, "DETSEC"
    keys = ("CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2")
    if len(headers) > 1 and all(all(k in h for k in keys) for _, h in headers):
        crval = {(round(float(h["CRVAL1"]), 6), round(float(h["CRVAL2"]), 6))
                 for _, h in headers}
        if len(crval) == 1:
            out = [Placement(det, 1 - float(h["CRPIX1"]), 1 - float(h["CRPIX2"]), *size(h))
                   for det, h in headers]
            return out, "CRPIX"
    n = len(headers)
    cols = max(1, math.ceil(math.sqrt(n)))
    side = max([max(size(h)) for _, h in headers] + [1])
    out = [Placement(det, (i % cols) * side * 1.05, -(i // cols) * side * 1.05, *size(h))
           for i, (det, h) in enumerate(headers)]
    return out, "grid"


def class_runs(times: list[str], classes: list[str]) -> list[tuple[str, str, str, int]]:
    """Consecutive exposures (in time order) of one class: (class, first, last, count)."""
    runs: list[list] = []
    for t, c in zip(times, classes):
        if runs and runs[-1][0] == c:
            runs[-1][2] = t
            runs[-1][3] += 1
        else:
            runs.append([c, t, t, 1])
    return [tuple(r) for r in runs]


def _hhmm(t: str) -> str:
    return t[11:16] if len(t) >= 16 else (t or "?")


CALIBRATION_TYPES = ("bias", "dark", "flat", "zero", "offset", "darkflat")


def summary_lines(times: list[str], classes: list[str], statuses: list[str],
                  errors: list[str], image_types: list[str] | None = None) -> list[str]:
    """The night in a few sentences, one exposure per entry (in time order).

    What share of the sky frames is usable, which defects and when (intervals of
    consecutive exposures), how many files failed and why, and how many calibration
    frames (bias, dark, flat: ``image_types``) were set aside.
    """
    types = [str(t or "").lower() for t in (image_types or [""] * len(classes))]
    calib = collections.Counter(t for t in types if t in CALIBRATION_TYPES)
    keep = [t not in CALIBRATION_TYPES for t in types]
    times, classes, statuses, errors = ([v for v, k in zip(seq, keep) if k]
                                        for seq in (times, classes, statuses, errors))
    n = len(classes)
    if n == 0 and not calib:
        return ["No exposures measured yet."]
    ok = [s == "ok" for s in statuses]
    n_good = sum(1 for c, o in zip(classes, ok) if o and c == "good")
    n_failed = n - sum(ok)
    lines = [f"{n_good} of {n} sky exposures are usable (good), "
             f"{100.0 * n_good / max(n, 1):.0f}%."]
    labels = [c if o else "failed" for c, o in zip(classes, ok)]
    runs = class_runs(times, labels)
    for cls in [*[c for c in PRIORITY if c != "good"], "failed"]:
        spans = [r for r in runs if r[0] == cls]
        if not spans:
            continue
        total = sum(r[3] for r in spans)
        known = [(a or b, b or a) for _, a, b, _k in spans if a or b]  # files without a date
        when = ", ".join(f"{_hhmm(a)}" if _hhmm(a) == _hhmm(b) else f"{_hhmm(a)}-{_hhmm(b)}"
                         for a, b in known[:5])
        more = f" and {len(known) - 5} more" if len(known) > 5 else ""
        when = f"UTC {when}{more}" if known else "time unknown"
        lines.append(f"{cls.replace('_', ' ')}: {total} exposure{'s' * (total > 1)} ({when})")
    if n_failed:
        reasons: dict[str, int] = {}
        for e, o in zip(errors, ok):
            if not o:
                key = (e or "unknown").split(":")[0]
                reasons[key] = reasons.get(key, 0) + 1
        top = "; ".join(f"{k} ({v})" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
        lines.append(f"{n_failed} could not be measured: {top}")
    if calib:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(calib.items()))
        lines.append(f"{sum(calib.values())} calibration frames set aside ({kinds}).")
    return lines


# ---------------------------------------------------------------------------- the page's data


TABLE_COLUMNS = [
    # (column, header, decimals or None for text)
    ("exposure", "exposure", None), ("detector", "det", None), ("date_obs", "DATE-OBS", None),
    ("quality_class", "class", None),
    *[(f"p_{c}", f"p {c.replace('_', ' ')}", 2) for c in CLASSES],
    ("fwhm_arcsec", "FWHM \"", 2), ("fwhm_px", "FWHM px", 2), ("ellipticity", "e", 3),
    ("trail_ratio", "trail T/s", 2), ("sky_level", "sky ADU", 1), ("field", "field", None),
    ("transparency_mag", "transp. mag", 3), ("extinction_spread_mag", "k mag", 3),
    ("sky_noise", "noise ADU", 2), ("sky_nonuniformity", "non-unif.", 3),
    ("n_stars_used", "stars", 0), ("ae_score", "AE score", 2), ("mask_fraction", "masked", 3),
    ("flags", "flags", None), ("reason", "reason", None), ("path", "file", None),
]
"""Columns of the report's table."""


def observation_times(rows: pd.DataFrame) -> pd.Series:
    """DATE-OBS as UTC timestamps (MJD-OBS where DATE-OBS is missing; NaT when neither)."""
    t = pd.to_datetime(rows["date_obs"].replace("", None), errors="coerce", utc=True,
                       format="ISO8601")
    mjd = pd.to_datetime(rows["mjd_obs"] - 40587.0, unit="D", utc=True, errors="coerce")
    return t.fillna(mjd)


def class_counts(level: pd.DataFrame) -> list[tuple[str, int]]:
    """Exposures per class (best class last, as the page lists them), then failed ones."""
    ok = level["status"] == "ok"
    counts = [(c, int(((level["quality_class"] == c) & ok).sum())) for c in PRIORITY[::-1]]
    return counts + [("failed", int((~ok).sum()))]


def cell(value, decimals: int | None) -> tuple[str, str]:
    """(shown text, sort key) of one table cell; numbers with ``decimals`` places."""
    if decimals is None:
        return ("" if value is None else str(value)), ("" if value is None else str(value))
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "", ""
    if not math.isfinite(v):
        return "", ""
    return f"{v:.{decimals}f}", repr(v)


def anchor(exposure: str) -> str:
    """The HTML id of an exposure's card."""
    return "exp-" + "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in exposure)


def table_rows(exposures: pd.DataFrame, level: pd.DataFrame) -> list[dict]:
    """Rows of the page's table: each exposure, then its detectors when it is a mosaic."""
    out = []
    for _, top in level.iterrows():
        group = exposures[exposures["exposure"] == top["exposure"]]
        members = [top] + ([r for _, r in group.iterrows() if r["detector"] != "ALL"]
                           if top["detector"] == "ALL" else [])
        for i, r in enumerate(members):
            cls = r["quality_class"] if r["status"] == "ok" else "failed"
            cells = []
            for col, _, dec in TABLE_COLUMNS:
                if col == "flags":
                    value = " ".join(decode_flags(r["qa_flags"]))
                elif col == "reason":
                    value = r["reason"] if r["status"] == "ok" else r["error"]
                elif col == "quality_class":
                    value = cls
                else:
                    value = r[col]
                cells.append(cell(value, dec))
            out.append({"level": "exposure" if i == 0 else "detector", "cls": cls,
                        "anchor": anchor(r["exposure"]), "cells": cells})
    return out


def failed_rows(exposures: pd.DataFrame) -> list[dict]:
    """The rows that could not be measured: exposure, detector, file and error."""
    bad = exposures[exposures["status"] != "ok"]
    return [{"exposure": r["exposure"], "detector": r["detector"], "path": r["path"],
             "error": r["error"]} for _, r in bad.iterrows()]


def relative_star_flux(rows: pd.DataFrame) -> pd.Series:
    """Star flux per second of exposure relative to the night's highest (on one field:
    the transparency); NaN where unknown."""
    flux = rows["star_flux_adu"] / rows["exptime_s"].where(rows["exptime_s"] > 0)
    best = flux.max()
    return flux / best if np.isfinite(best) and best > 0 else flux * np.nan


def field_curves(rows: pd.DataFrame, column: str = "transparency_mag"
                 ) -> list[tuple[str, pd.DataFrame]]:
    """Each field's curve of ``column`` over the night: ``(field, frame)`` pairs, the frame
    holding ``time`` and ``column`` of the field's rows with a time and a finite value, in
    time order; fields in the order of their first frame."""
    if "field" not in rows or rows.empty:
        return []
    values = pd.to_numeric(rows[column], errors="coerce")
    keep = (rows["field"].fillna("") != "") & values.notna() & rows["time"].notna()
    picked = rows.loc[keep, ["field", "time"]].assign(**{column: values[keep]})
    picked = picked.sort_values("time", kind="stable")
    return [(str(name), group[["time", column]].reset_index(drop=True))
            for name, group in picked.groupby("field", sort=False)]


def median_stamp(stamps: np.ndarray, n: int) -> np.ndarray:
    """The median of a detector's first ``n`` star stamps, stretched for display
    (``arcsinh`` of 50 times the stamp over its peak)."""
    med = np.nanmedian(stamps[:n], axis=0)
    return np.arcsinh(med / (np.nanmax(np.abs(med)) or 1) * 50)
