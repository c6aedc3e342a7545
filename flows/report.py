"""``survey-qa report``: one self-contained HTML page per night.

The page holds the night's measurements over time (Plotly, its JavaScript inlined so the
file opens without a network), class counts, a sortable and filterable table of every
exposure and detector, a thumbnail of each detector with its autoencoder mask, median star
stamp and SOM map (matplotlib, embedded as base64 PNG), the focal plane of each mosaic,
and a summary to read in ten seconds. The page is laid out by a Jinja2 template
(``survey_qa/templates/night_report.html.j2``).

Thumbnails need the frames themselves; they are cached in
:func:`survey_qa.paths.report_cache` so that the watch mode, which rewrites the page
after every frame, reads only the new frame.
"""
from __future__ import annotations

import base64
import html
import io as _io
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

import survey_qa
from survey_qa import atomic, paths
from survey_qa.config import Config
from survey_qa.pipeline import io, nightview, outputs, selection, skymask
from survey_qa.pipeline.schema import PRIORITY

TEMPLATE = "night_report.html.j2"


def write_report(cfg: Config, night: str, out: str | Path | None = None) -> Path:
    """Build the night's HTML page from its catalogs, arrays and frames; returns its path.

    Raises ``ValueError`` when the night has no exposure catalog.
    """
    out_root = Path(cfg.run.out_root)
    from survey_qa.flows.select import read_night

    exposures, sources = read_night(out_root, night)
    level = selection.weighted_rows(exposures, sources)
    level["time"] = nightview.observation_times(level)
    arrays = ArrayStore.open(paths.zarr_store(out_root, night))
    cache = paths.report_cache(out_root, night)
    block_px = _block_px(cfg)
    cards = [exposure_card(cfg, exposures[exposures["exposure"] == e], arrays, cache, block_px)
             for e in level["exposure"]]
    context = {
        "night": night,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "version": survey_qa.__version__,
        "summary": nightview.summary_lines(
            level["date_obs"].fillna("").tolist(), level["quality_class"].tolist(),
            level["status"].tolist(), level["error"].fillna("").tolist(),
            level["image_type"].fillna("").tolist()),
        "counts": nightview.class_counts(level),
        "colours": nightview.CLASS_COLOURS,
        "timeline": timeline_html(level, cfg, include_js=True),
        "columns": nightview.TABLE_COLUMNS,
        "rows": nightview.table_rows(exposures, level),
        "classes": [*PRIORITY[::-1], "failed"],
        "failed": nightview.failed_rows(exposures),
        "cards": cards,
        "n_exposures": len(level),
        "n_untimed": int(level["time"].isna().sum()),
        "paths": {"exposures": str(paths.catalog_partition(out_root, "exposures", night)),
                  "arrays": str(paths.zarr_store(out_root, night))},
    }
    target = Path(out) if out else paths.report_file(out_root, night)
    return atomic.write_text(target, _template().render(**context))


def try_write_report(cfg: Config, night: str) -> str:
    """The report's path, or why it could not be written: a run never fails for its view."""
    try:
        return str(write_report(cfg, night))
    except Exception as e:  # noqa: BLE001 -- the catalogs stand; say what went wrong
        return f"not written ({type(e).__name__}: {e})"


# ---------------------------------------------------------------------------- plots


def timeline_html(level: pd.DataFrame, cfg: Config, *, include_js: bool) -> str:
    """The night over time: one panel per quantity, markers coloured by class, limits drawn."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    c = cfg.classify
    rows = level[level["time"].notna()].sort_values("time")
    use_arcsec = bool(np.isfinite(rows["fwhm_arcsec"]).any()) if len(rows) else True
    fwhm_col = "fwhm_arcsec" if use_arcsec else "fwhm_px"
    fwhm_limit = c.seeing_limit_arcsec if use_arcsec else c.seeing_limit_px
    rel_flux = nightview.relative_star_flux(rows)
    panels = [
        (fwhm_col, "FWHM (arcsec)" if use_arcsec else "FWHM (px, no pixel scale)",
         rows[fwhm_col], [(fwhm_limit, "seeing limit")] if fwhm_limit else []),
        ("ellipticity", "ellipticity", rows["ellipticity"], []),
        ("trail_ratio", "trail ratio T/s", rows["trail_ratio"],
         [(c.trail_ratio_bad, "bad tracking"), (c.trail_ratio_very_bad, "very bad tracking")]),
        ("sky_level", "sky level (ADU)", rows["sky_level"], []),
        ("sky_noise", "sky noise (ADU)", rows["sky_noise"], []),
        ("sky_nonuniformity", "sky (P99-P1)/median", rows["sky_nonuniformity"],
         [(c.nonuniformity_limit, "background limit")]),
        ("transparency_mag", "transparency: mag fainter than the field's clearest frames "
         "(a line per field)", rows["transparency_mag"],
         [(c.transparency_loss_limit_mag, "thin-cloud limit")]),
        ("extinction_spread_mag", "extinction spread k over the detector (mag)",
         rows["extinction_spread_mag"], [(c.extinction_spread_limit_mag, "patchy-cloud limit")]),
        ("transparency", "star flux per s, relative (same field: transparency)", rel_flux, []),
    ]
    n = len(panels) + 1
    fig = make_subplots(rows=n, cols=1, shared_xaxes=True, vertical_spacing=0.02,
                        subplot_titles=[p[1] for p in panels] + ["class"])
    classes = np.where(rows["status"] == "ok", rows["quality_class"], "failed")
    hover = [f"{e}<br>{k}<br>{html.escape(str(r))[:160]}" for e, k, r in
             zip(rows["exposure"], classes, rows["reason"].where(rows["status"] == "ok",
                                                                  rows["error"]))]
    hover = np.array(hover, dtype=object)
    for i, (key, _, y, limits) in enumerate(panels, start=1):
        for k in [*PRIORITY[::-1], "failed"]:
            sel = classes == k
            if not sel.any():
                continue
            fig.add_trace(go.Scatter(
                x=rows["time"][sel], y=np.asarray(y, float)[sel], mode="markers",
                marker={"color": nightview.CLASS_COLOURS[k], "size": 7}, name=k,
                legendgroup=k, showlegend=(i == 1), hovertext=hover[sel],
                hoverinfo="text+y"), row=i, col=1)
        if key == "transparency_mag":
            for name, curve in nightview.field_curves(rows):
                fig.add_trace(go.Scatter(
                    x=curve["time"], y=curve["transparency_mag"], mode="lines",
                    line={"color": "#999", "width": 1}, name=f"field {name}",
                    showlegend=False, hoverinfo="name"), row=i, col=1)
        for value, label in limits:
            fig.add_hline(y=value, line_dash="dash", line_color="#444", row=i, col=1,
                          annotation_text=f"{label} {value:g}", annotation_position="top left")
    order = [*PRIORITY[::-1], "failed"]
    for k in order:
        sel = classes == k
        if sel.any():
            fig.add_trace(go.Scatter(
                x=rows["time"][sel], y=[k] * int(sel.sum()), mode="markers",
                marker={"color": nightview.CLASS_COLOURS[k], "size": 9, "symbol": "square"},
                name=k, legendgroup=k, showlegend=False, hovertext=hover[sel],
                hoverinfo="text"), row=n, col=1)
    fig.update_yaxes(type="log", row=len(panels), col=1)
    fig.update_yaxes(categoryorder="array", categoryarray=order, row=n, col=1)
    fig.update_xaxes(title_text="DATE-OBS (UTC)", row=n, col=1)
    fig.update_layout(height=170 * n + 80, margin={"l": 60, "r": 20, "t": 40, "b": 40},
                      template="plotly_white", legend={"orientation": "h", "y": 1.02,
                                                       "yanchor": "bottom"})
    return fig.to_html(full_html=False, include_plotlyjs=include_js, div_id="timeline",
                       config={"displaylogo": False, "responsive": True})


# ---------------------------------------------------------------------------- images


@dataclass
class ArrayStore:
    """The night's array store and its frame index; empty when absent or unreadable."""

    path: Path | None
    index: dict[tuple[str, str], int]

    @classmethod
    def open(cls, path: Path) -> "ArrayStore":
        if not path.exists():
            return cls(None, {})
        try:
            return cls(path, outputs.store_frames(path))
        except Exception:  # an empty or half-made store: no arrays to show
            return cls(None, {})

    def get(self, name: str, exposure: str, detector: str) -> np.ndarray | None:
        """One detector's array ``name``, or None when the store does not hold it."""
        i = self.index.get((exposure, detector))
        if self.path is None or i is None:
            return None
        return outputs.read_frames(self.path, name, {0: i}).get(0)


def exposure_card(cfg: Config, rows: pd.DataFrame, arrays: ArrayStore, cache: Path,
                  block_px: int | None) -> dict:
    """Images and text of one exposure: per detector a panel; a focal plane for a mosaic.
    ``block_px`` is the side of an autoencoder mask cell (:func:`_block_px`)."""
    top = selection.exposure_rows(rows).iloc[0]
    dets = rows[rows["detector"] != "ALL"]
    cls = top["quality_class"] if top["status"] == "ok" else "failed"
    stamp = str(top["processed_at"]).replace(" ", "T").replace(":", "")
    key = f"{top['exposure']}__{stamp}"
    images = {}
    pending = [r for _, r in dets.iterrows()
               if r["status"] == "ok" and not (cache / f"{key}__{r['detector']}.png").is_file()]
    previews = {r["detector"]: nightview.stored_preview(
        arrays.get("preview", top["exposure"], r["detector"]),
        arrays.get("preview_shape", top["exposure"], r["detector"])) for r in pending}
    unstored = [r for r in pending if previews[r["detector"]] is None]
    if unstored:  # a store written before previews were stored: read the frame
        previews.update(_previews(cfg, top["path"], unstored))
    for _, r in dets.iterrows():
        if r["status"] != "ok":
            continue
        png = cache / f"{key}__{r['detector']}.png"
        if not png.is_file():
            data = previews.get(r["detector"])
            _write_png(png, detector_panel(r, data, arrays, block_px))
        images[r["detector"]] = _b64(png)
    mosaic = None
    if len(dets) > 1:
        png = cache / f"{key}__focal_plane.png"
        if not png.is_file():
            _write_png(png, focal_plane_png(top["path"], dets, previews, cfg))
        mosaic = _b64(png)
    return {"exposure": top["exposure"], "anchor": nightview.anchor(top["exposure"]), "cls": cls,
            "date_obs": top["date_obs"], "path": top["path"],
            "reason": top["reason"] if top["status"] == "ok" else top["error"],
            "images": images, "mosaic": mosaic, "weight": top.get("weight", math.nan)}


def _previews(cfg: Config, path: str, wanted: list) -> dict[str, np.ndarray]:
    """Thumbnails of the wanted detectors of one file (empty when it cannot be read)."""
    from survey_qa.pipeline.errors import QualityError

    names = {r["detector"] for r in wanted}
    try:
        dets = io.read_detectors(path, cfg.io)
    except (QualityError, OSError):
        return {}
    return {d.detector: nightview.preview(d.data, d.mask, nightview.PREVIEW_SIDE_PX)
            for d in dets if not isinstance(d, QualityError) and d.detector in names}


def _block_px(cfg: Config) -> int | None:
    """Side of an autoencoder mask cell in detector pixels, from the weights' metadata."""
    weights = cfg.autoencoder.weights or (Path(survey_qa.__file__).resolve().parent
                                          / "weights" / "autoencoder.safetensors")
    try:  # the JSON sidecar of the weights (survey_qa.models.weights), read without torch
        meta = json.loads(Path(weights).with_suffix(".json").read_text())
        return int(meta["bin_factor"]) * int(meta["patch_px"])
    except (OSError, ValueError, KeyError):  # no weights: no mask to draw
        return None


def _overlay(ax, cells: np.ndarray, size: tuple[float, float], shape: tuple[int, ...]):
    """Masked cells in translucent red over a thumbnail of ``shape``; the cells span
    ``size`` (width, height) thumbnail pixels from its origin."""
    if not cells.any():
        return
    overlay = np.zeros((*cells.shape, 4), np.float32)
    overlay[cells.astype(bool)] = (1.0, 0.1, 0.1, 0.45)
    ax.imshow(overlay, origin="lower", extent=(-0.5, size[0] - 0.5, -0.5, size[1] - 0.5),
              interpolation="nearest")
    ax.set_xlim(-0.5, shape[1] - 0.5)
    ax.set_ylim(-0.5, shape[0] - 0.5)


def detector_panel(row: pd.Series, thumb: np.ndarray | None, arrays: ArrayStore,
                   block_px: int | None):
    """A matplotlib figure: thumbnail with the mask of its damaged sky (the autoencoder's
    where the frame has none from its field), median star stamp, SOM map."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 2.3), dpi=80)
    axes = fig.subplots(1, 3)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    ax = axes[0]
    if thumb is not None:
        ax.imshow(thumb, cmap="gray", origin="lower", interpolation="nearest")
        ny, nx = int(row["ny"]), int(row["nx"])
        f = max(ny, nx) / max(thumb.shape)
        damaged = arrays.get("defect_mask", row["exposure"], row["detector"])
        mask = arrays.get("ae_mask", row["exposure"], row["detector"])
        if damaged is not None and np.isfinite(row.get("defect_mask_fraction", np.nan)):
            _overlay(ax, skymask.detector_cells(damaged, (ny, nx)), (nx / f, ny / f),
                     thumb.shape)
            ax.set_title("frame + damaged sky", fontsize=8)
        else:
            if mask is not None and block_px:
                gy, gx = mask.shape
                _overlay(ax, mask, (gx * block_px / f, gy * block_px / f), thumb.shape)
            ax.set_title("frame + AE mask", fontsize=8)
    else:
        ax.text(0.5, 0.5, "frame not readable", ha="center", va="center", fontsize=8)
    stamps = arrays.get("stamps", row["exposure"], row["detector"])
    n = arrays.get("n_stamps", row["exposure"], row["detector"])
    ax = axes[1]
    if stamps is not None and n is not None and int(n) > 0:
        ax.imshow(nightview.median_stamp(stamps, int(n)), cmap="magma", origin="lower",
                  interpolation="nearest")
        ax.set_title(f"median of {int(n)} stars", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no star stamps", ha="center", va="center", fontsize=8)
    som = arrays.get("som_occupancy", row["exposure"], row["detector"])
    ax = axes[2]
    if som is not None and np.isfinite(som).any():
        ax.imshow(som.T, cmap="viridis", origin="lower", interpolation="nearest")
        ax.set_title("SOM occupancy", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no SOM map", ha="center", va="center", fontsize=8)
    fig.tight_layout(pad=0.6)
    return fig


def focal_plane_png(path: str, dets: pd.DataFrame, previews: dict, cfg: Config):
    """A mosaic's detectors where they sit in the focal plane, framed in their class colour."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    headers = io.detector_headers(path, cfg.io)
    known = {d for d, _ in headers}
    headers += [(d, {}) for d in dets["detector"] if d not in known]
    placed, how = nightview.focal_plane(headers)
    by_det = {r["detector"]: r for _, r in dets.iterrows()}
    fig = Figure(figsize=(4.2, 4.2), dpi=80)
    ax = fig.subplots()
    for p in placed:
        r = by_det.get(p.detector)
        if r is None:
            continue
        cls = r["quality_class"] if r["status"] == "ok" else "failed"
        colour = nightview.CLASS_COLOURS.get(cls, "#7f7f7f")
        nx, ny = p.nx or 1, p.ny or 1
        thumb = previews.get(p.detector)
        if thumb is not None:
            ax.imshow(thumb, cmap="gray", origin="lower",
                      extent=(p.x0, p.x0 + nx, p.y0, p.y0 + ny))
        ax.add_patch(Rectangle((p.x0, p.y0), nx, ny, facecolor=colour,
                               alpha=0.25 if thumb is not None else 0.8, edgecolor=colour,
                               linewidth=2))
        ax.text(p.x0 + nx / 2, p.y0 + ny / 2, p.detector, ha="center", va="center",
                fontsize=7, color="white", weight="bold")
    ax.autoscale_view()
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"focal plane (placed by {how})", fontsize=8)
    fig.tight_layout(pad=0.3)
    return fig


def _write_png(path: Path, fig) -> None:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    atomic.write_bytes(path, buf.getvalue())


def _b64(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("survey_qa", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]),
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson_attr"] = json.dumps
    return env.get_template(TEMPLATE)
