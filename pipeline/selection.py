"""Choosing the frames to stack: a filter expression, a weight, and the stackers' list formats.

Pure functions: tables in, tables or text out; writing files is the flow's business
(:mod:`survey_qa.flows.select`).

The weight of a frame
---------------------
For a star whose flux is limited by the sky noise, the variance of its flux measured in a
frame is proportional to ``(sigma_sky * FWHM)^2 / F^2`` (the noise of ``~FWHM^2`` pixels over
the star's signal). Inverse-variance stacking therefore weights frame *i* by::

    w_i = (F_i / (sigma_sky_i * FWHM_px_i))^2 / max_j(...)

where ``F_i`` is the summed flux (ADU) of the frame's measured, unsaturated point sources
(those not cut short: not saturated, truncated or at the edge), ``sigma_sky_i`` the sky noise
per pixel (ADU) and ``FWHM_px_i`` the PSF FWHM in pixels (the detection moments' FWHM where no
PSF fit exists). Both ``F`` and ``sigma`` are in ADU, so gain and exposure time cancel.
Weights are relative to the best frame of the night (1.0). This follows the spirit of
PixInsight's PSF signal weight (star signal over noise, penalised by PSF size). It compares
frames of the same field: a frame that sees fewer stars (clouds, a different pointing) has a
smaller ``F``.
"""
from __future__ import annotations

import ast
import math
import os
import xml.etree.ElementTree as ET
from pathlib import PurePosixPath

import numpy as np
import pandas as pd

from survey_qa.pipeline.flags import CUT_SHORT, SOURCE_FLAGS, bits

LIST_FORMATS = ("list", "csv", "siril", "pixinsight", "dss")
"""Output formats of ``survey-qa select``."""

CSV_COLUMNS = ("path", "exposure", "quality_class", "weight", "fwhm_arcsec", "fwhm_px",
               "ellipticity", "sky_level", "sky_noise", "star_flux_adu", "n_stars_used",
               "date_obs", "reason")
"""Columns of the CSV output, in order."""

XPSM_NS = "http://www.pixinsight.com/xpsm"


# ---------------------------------------------------------------------------- the rows


def exposure_rows(exposures: pd.DataFrame) -> pd.DataFrame:
    """The row that speaks for each exposure file: ``ALL`` for a mosaic, else its detector.

    Selection is per file (what a stacker loads), so a mosaic is chosen by its exposure row.
    """
    if exposures.empty:
        return exposures.copy()
    is_all = exposures["detector"] == "ALL"
    has_all = set(exposures.loc[is_all, "exposure"])
    keep = is_all | ~exposures["exposure"].isin(has_all)
    return (exposures[keep].drop_duplicates("exposure")
            .sort_values(["date_obs", "exposure"]).reset_index(drop=True))


def star_flux(sources: pd.DataFrame) -> pd.Series:
    """Summed flux (ADU) of each exposure's usable point sources.

    Sources flagged saturated, truncated, at the edge, extended (galaxies, trails count
    towards nothing here) or compact (cosmic rays) are left out.
    """
    if sources.empty:
        return pd.Series(dtype=float, name="star_flux_adu")
    bad = bits(*CUT_SHORT, "EXTENDED", "COMPACT", registry=SOURCE_FLAGS)
    ok = (sources["flags"].astype(np.int64) & bad) == 0
    flux = sources.loc[ok & np.isfinite(sources["flux"]) & (sources["flux"] > 0)]
    return flux.groupby("exposure")["flux"].sum().rename("star_flux_adu")


def frame_weights(rows: pd.DataFrame, flux_adu: pd.Series) -> pd.Series:
    """Relative inverse-variance weights (module docstring), 1.0 for the best frame.

    NaN where a frame has no star flux, no sky noise or no FWHM.
    """
    f = rows["exposure"].map(flux_adu).astype(float)
    fwhm = rows["fwhm_px"].where(np.isfinite(rows["fwhm_px"]), rows["src_fwhm_px"])
    raw = (f / (rows["sky_noise"] * fwhm)) ** 2
    raw = raw.where(np.isfinite(raw) & (raw > 0))
    best = raw.max()
    return (raw / best if np.isfinite(best) and best > 0 else raw).rename("weight")


def weighted_rows(exposures: pd.DataFrame, sources: pd.DataFrame) -> pd.DataFrame:
    """Exposure-level rows (:func:`exposure_rows`) with ``star_flux_adu`` and ``weight``
    (:func:`frame_weights`, relative to the night)."""
    rows = exposure_rows(exposures)
    flux = star_flux(sources)
    rows["star_flux_adu"] = rows["exposure"].map(flux).astype(float)
    rows["weight"] = frame_weights(rows, flux)
    return rows


LIGHT_TYPES = ("light", "object", "science", "")
"""Image types (lower case) of the frames a stacker takes."""


def choose_frames(rows: pd.DataFrame, where: str | None = None,
                  classes: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The pool of a night's measured light frames and the frames chosen from it.

    Parameters
    ----------
    rows
        Weighted exposure-level rows (:func:`weighted_rows`).
    where, classes
        As :func:`apply_filter`.

    Returns
    -------
    pool, chosen
        Both indexed from 0; the chosen frames in time order (``date_obs``).
    """
    light = rows["image_type"].str.lower().isin(LIGHT_TYPES)
    pool = rows[(rows["status"] == "ok") & light]
    chosen = apply_filter(pool, where, classes).sort_values("date_obs", kind="stable")
    return pool.reset_index(drop=True), chosen.reset_index(drop=True)


# ---------------------------------------------------------------------------- the filter


_ALLOWED_NODES = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not,
                  ast.USub, ast.UAdd, ast.Compare, ast.Eq, ast.NotEq, ast.Lt, ast.LtE,
                  ast.Gt, ast.GtE, ast.In, ast.NotIn, ast.Name, ast.Load, ast.Constant,
                  ast.List, ast.Tuple, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Div,
                  ast.BitAnd, ast.BitOr, ast.Invert)


def check_expression(expr: str, columns: list[str]) -> None:
    """Check a ``--where`` expression before pandas evaluates it.

    Allowed: column names, numbers, strings, comparisons, ``and``/``or``/``not``,
    ``in [...]`` and arithmetic. Raises ``ValueError`` with the reason otherwise.
    """
    if not expr or not expr.strip():
        raise ValueError("--where: empty expression")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"--where: not a valid expression ({e.msg}): {expr!r}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise ValueError(f"--where: {type(node).__name__} is not allowed in an expression "
                             "(use columns, constants, comparisons, and/or/not, in [...])")
        if isinstance(node, ast.Name) and node.id not in columns:
            known = ", ".join(sorted(c for c in columns if not c.startswith("t_")))
            raise ValueError(f"--where: unknown column {node.id!r}; columns are: {known}")


def apply_filter(rows: pd.DataFrame, where: str | None = None,
                 classes: list[str] | None = None) -> pd.DataFrame:
    """Rows that pass ``where`` (a pandas query expression) and are of one of ``classes``.

    Failed rows are never selected. Raises ``ValueError`` on a bad expression.
    """
    out = rows[rows["status"] == "ok"]
    if classes:
        out = out[out["quality_class"].isin(classes)]
    if where:
        check_expression(where, list(rows.columns))
        try:
            mask = out.eval(where, engine="python")
        except Exception as e:  # pandas raises many kinds on a type mismatch
            raise ValueError(f"--where: cannot evaluate {where!r}: {e}") from None
        if not (isinstance(mask, pd.Series) and mask.dtype == bool):
            raise ValueError(f"--where: {where!r} does not give true/false per frame")
        out = out[mask]
    return out


# ---------------------------------------------------------------------------- the formats


def plain_list(paths: list[str]) -> str:
    """One path per line."""
    return "".join(f"{p}\n" for p in paths)


def csv_text(selected: pd.DataFrame) -> str:
    """CSV of :data:`CSV_COLUMNS`, one line per selected frame."""
    return selected.loc[:, list(CSV_COLUMNS)].to_csv(index=False, float_format="%.6g")


def dss_filelist(paths: list[str], checked: list[bool]) -> str:
    """DeepSkyStacker's ``.dssfilelist``.

    As DeepSkyStacker's ``FrameList::saveListToFile`` writes it and ``loadFilesFromList``
    reads it: the line ``DSS file list``, the line ``CHECKED<TAB>TYPE<TAB>FILE``, then one
    line per frame: ``1`` (checked) or ``0``, the type (``light``) and the path (absolute,
    or relative to the list's folder).
    """
    lines = ["DSS file list", "CHECKED\tTYPE\tFILE"]
    lines += [f"{int(c)}\tlight\t{PurePosixPath(p)}" for p, c in zip(paths, checked)]
    return "\n".join(lines) + "\n"


def siril_seq(name: str, included: list[bool], fz: bool = False) -> str:
    """A Siril sequence file (``<name>.seq``) for frames ``<name>00001.fit`` ... .

    Siril finds the images of a FITS sequence by name: ``<name>``, the index padded to
    ``fixed_len`` digits, then the FITS extension; the ``I filenum incl`` lines say which
    images are selected (incl 1) for registration and stacking. Header line (version 4
    onwards): ``S 'name' start_index nb_images nb_selected fixed_len reference_image version
    variable_size fz_flag``; ``L -1``: the number of layers is read from the images.
    """
    n, n_sel = len(included), int(sum(included))
    lines = ["#Siril sequence file. Contains list of files (images), selection, and "
             "registration data",
             "#S 'sequence_name' start_index nb_images nb_selected fixed_len "
             "reference_image version variable_size fz_flag",
             f"S '{name}' 1 {n} {n_sel} {SIRIL_FIXED_LEN} -1 4 0 {int(fz)}",
             "L -1"]
    lines += [f"I {i} {int(inc)}" for i, inc in enumerate(included, start=1)]
    return "\n".join(lines) + "\n"


SIRIL_FIXED_LEN = 5


def siril_image_name(name: str, index: int, fz: bool = False) -> str:
    """File name of image ``index`` (1-based) of a Siril FITS sequence (extension .fit)."""
    return f"{name}{index:0{SIRIL_FIXED_LEN}d}.fit" + (".fz" if fz else "")


def pixinsight_xpsm(paths: list[str], checked: list[bool], weights: list[float] | None = None
                    ) -> str:
    """A PixInsight process icon file (``.xpsm``) of an ImageIntegration instance.

    Its ``images`` table holds one row per frame with the columns PixInsight's
    ImageIntegration defines (``enabled``, ``path``, ``drizzlePath``,
    ``localNormalizationDataPath``); unselected frames are present but disabled. Load it
    with Process > Process Icons > Load Process Icons, then open the icon.
    """
    root = ET.Element("xpsm", {"version": "1.0", "xmlns": XPSM_NS})
    inst = ET.SubElement(root, "instance", {"class": "ImageIntegration",
                                             "id": "SurveyQASelection_instance"})
    table = ET.SubElement(inst, "table", {"id": "images", "rows": str(len(paths))})
    for p, c in zip(paths, checked):
        tr = ET.SubElement(table, "tr")
        for col, value in (("enabled", "true" if c else "false"), ("path", str(p)),
                           ("drizzlePath", ""), ("localNormalizationDataPath", "")):
            ET.SubElement(tr, "td", {"id": col, "value": value})
    ET.SubElement(root, "icon", {"id": "SurveyQASelection", "instance":
                                 "SurveyQASelection_instance", "xpos": "8", "ypos": "8"})
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def is_fz(path: str) -> bool:
    """True for a tile-compressed FITS file name (``.fits.fz``/``.fz``)."""
    return os.fspath(path).lower().endswith(".fz")


def finite_or_none(value) -> float | None:
    """A float for JSON/CSV, or None for NaN and missing values."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
