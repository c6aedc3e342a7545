"""What the watch says about one measured frame: a verdict line for the terminal, and the
frame's row as JSON and as ``SURVEY_QA_*`` environment variables for ``--on-bad``.
"""
from __future__ import annotations

import json
import math


def row_json(row: dict) -> str:
    """A catalog row as JSON: NaN as null, times as ISO strings."""
    def plain(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if hasattr(v, "isoformat"):
            return v.isoformat()
        if hasattr(v, "item"):
            return plain(v.item())
        return v
    return json.dumps({k: plain(v) for k, v in row.items()})


def row_env(row: dict, night: str) -> dict[str, str]:
    """``SURVEY_QA_*`` variables of a row, for ``--on-bad``."""
    def text(v):
        if isinstance(v, float):
            return "" if not math.isfinite(v) else f"{v:.6g}"
        return "" if v is None else str(v)
    env = {"SURVEY_QA_NIGHT": night}
    for key in ("exposure", "detector", "path", "status", "reason", "error", "date_obs",
                "fwhm_arcsec", "fwhm_px", "ellipticity", "trail_ratio", "sky_level",
                "sky_noise", "sky_nonuniformity", "n_stars_used", "p_good"):
        env[f"SURVEY_QA_{key.upper()}"] = text(row.get(key))
    env["SURVEY_QA_CLASS"] = "failed" if row.get("status") != "ok" else text(row["quality_class"])
    return env


def verdict_line(row: dict) -> str:
    """One line per frame: class, FWHM, ellipticity, sky, reason."""
    def num(v, fmt):
        return "-" if v is None or not math.isfinite(float(v)) else format(float(v), fmt)
    if row.get("status") != "ok":
        return f"{row['exposure']}  FAILED  {row.get('error', '')}"
    fwhm = (f"FWHM {num(row['fwhm_arcsec'], '.2f')}\"" if math.isfinite(row["fwhm_arcsec"])
            else f"FWHM {num(row['fwhm_px'], '.2f')} px")
    return (f"{row['exposure']}  {row['quality_class']}  {fwhm}  "
            f"e {num(row['ellipticity'], '.3f')}  "
            f"sky {num(row['sky_level'], '.1f')} ± {num(row['sky_noise'], '.1f')} ADU  "
            f"| {row.get('reason', '')}")
