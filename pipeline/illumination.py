"""Illumination: what the optics do to the sky, told apart from light the sky adds.

Vignetting and dust dim stars and sky alike: they multiply the image. The spec's sky
non-uniformity ``u`` is about light that the sky or the instrument *adds* (gradients,
clouds, scattered light, glow), so a multiplicative pattern must be divided out before
``u`` is measured. Two ways, in order of preference:

1. **A flat field** given by the user: the data are divided by the flat normalised to its
   median (:func:`normalise_flat`, :func:`apply_flat`) before any stage measures them.
2. **The night's own illumination pattern**: every detector stores a coarse map of its
   smooth sky (:func:`coarse_sky_map`, ``SKY_GRID`` x ``SKY_GRID`` cells). Once the night
   is measured, the maps of one detector geometry and filter are normalised to their
   medians and their per-cell median over at least ``min_frames`` frames is the pattern
   (:func:`night_pattern`). Each frame's ``u`` is then measured on ``map / pattern``
   (:func:`corrected_nonuniformity`).

What the night pattern must not absorb
--------------------------------------
A cloud, a gradient or a glow that moves or comes and goes stays: the median over many
frames ignores what is on fewer than half of them. What is on *every* frame of a group
would be absorbed by a plain median: moonlight or light pollution from the same side all
night, on a telescope that stares at one field. Two guards:

- ``mode="radial"`` (the default) keeps only the part of the median pattern that has the
  shape of vignetting: a smooth radial falloff ``1 + a r^2 + b r^4`` around an optical axis
  within ``MAX_AXIS_OFFSET`` of the detector centre (:func:`radial_pattern`). A gradient
  across the field is not radial and stays in ``u``; a radial glow centred on the
  detector would be absorbed (rare: glows come from the edges). Dust donuts are not
  radial and stay too: a flat field is the remedy for them.
- ``mode="median"`` keeps the whole median pattern (dust included): for a survey that
  moves over the sky, so that no sky gradient is on most frames.

A frame with its own flat field never enters the night pattern.

Raw frames of a camera without overscan keep their bias pedestal (about 1000 ADU on an
SBIG STL-1001E) unless the reader subtracts it. The optics scale the sky, not the
pedestal, so the pattern is diluted on frames whose sky is faint next to the pedestal, and
dividing them by the night's pattern over-corrects a little (15-s focus frames at 40% sky
over the bias: u 0.053 -> 0.070). A pedestal fitted from the frames' different sky levels
was tried and is not identifiable on real nights (the light the sky adds changes with the
sky level too); bias subtraction belongs to the reader. The night pass therefore keeps a
frame's raw ``u`` where the pattern makes it larger.
"""
from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np
from scipy import optimize

from survey_qa.pipeline import background
from survey_qa.pipeline.errors import QualityError
from survey_qa.pipeline.flags import bits
from survey_qa.pipeline.records import BackgroundResult, DetectorImage

SKY_GRID = 32
"""Cells along each side of the coarse sky map stored per detector."""

CELL_SAMPLES = 16
"""Pixels along each side of a coarse-map cell that enter its mean (evenly spaced)."""

FLAT_MIN = 0.05
"""Flat-field pixels below this fraction of the flat's median (or not finite) are masked."""

MAX_AXIS_OFFSET = 0.25
"""The optical axis of the radial model lies within this fraction of the detector's half
sides from its centre."""

MIN_PATTERN_CELLS = 16
"""A pattern (or a corrected map) needs at least this many finite cells."""

MIN_PATTERN_CONTRAST = 0.03
"""A night pattern whose own ``P99 - P1`` is below this (the spec's limit of a good sky) is
not used: it would not move a frame out of ``good``, and on a few frames of a telescope
without vignetting it is the noise of a median of unrelated skies (0.003-0.014 on
simulated nights; vignetting gives 0.09-0.6 on the real ones)."""


def normalise_flat(flat: np.ndarray, mask: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """A flat field divided by its median, and the pixels it cannot correct.

    Parameters
    ----------
    flat
        Master flat (any positive scale), 2-D.
    mask
        Pixels of the flat already known bad (True); None: none.

    Returns
    -------
    flat, bad
        float32 flat with median 1 over its good pixels, and True where the flat is not
        finite, masked, or below ``FLAT_MIN`` (there it is set to 1).

    Raises
    ------
    ValueError
        When the flat has no positive finite pixel.
    """
    flat = np.asarray(flat, dtype=np.float32)
    bad = ~np.isfinite(flat) if mask is None else (np.asarray(mask, bool) | ~np.isfinite(flat))
    good = flat[~bad]
    good = good[good > 0]
    if good.size == 0:
        raise ValueError("the flat field has no positive pixel")
    flat = flat / np.float32(np.median(good))
    bad |= ~(flat >= FLAT_MIN)
    return np.where(bad, np.float32(1.0), flat).astype(np.float32), bad


def apply_flat(data: np.ndarray, mask: np.ndarray, flat: np.ndarray, bad: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Divide a detector by a normalised flat (:func:`normalise_flat`).

    Returns the flat-fielded data (float32, C-contiguous) and the mask with the flat's bad
    pixels added. Raises ``ValueError`` when the shapes differ.
    """
    if flat.shape != data.shape:
        raise ValueError(f"the flat field is {flat.shape[1]}x{flat.shape[0]} px, the frame "
                         f"{data.shape[1]}x{data.shape[0]} px")
    out = np.ascontiguousarray(data / flat, dtype=np.float32)
    return out, np.asarray(mask, bool) | bad


@dataclasses.dataclass(frozen=True)
class Flat:
    """A detector's normalised master flat (:func:`normalise_flat`)."""

    name: str
    """The flat's file name, for messages."""
    flat: np.ndarray
    """float32, median 1 over its good pixels."""
    bad: np.ndarray
    """bool: pixels the flat cannot correct."""


def flat_fielded(det: DetectorImage, flat: Flat) -> DetectorImage:
    """The detector divided by its master flat, with the qa flag ``FLAT_FIELDED``.

    Raises
    ------
    QualityError
        When the flat's size differs from the detector's.
    """
    try:
        data, mask = apply_flat(det.data, det.mask, flat.flat, flat.bad)
    except ValueError as e:
        raise QualityError(f"flat field {flat.name}: {e}") from None
    return dataclasses.replace(det, data=data, mask=mask,
                               qa_flags=det.qa_flags | bits("FLAT_FIELDED"))


def _edges(n: int, grid: int) -> np.ndarray:
    return np.linspace(0, n, grid + 1).astype(int)[:-1]


def coarse_sky_map(back: np.ndarray, mask: np.ndarray | None, grid: int = SKY_GRID
                   ) -> np.ndarray:
    """The smooth sky averaged over ``grid`` x ``grid`` cells of unmasked pixels.

    Parameters
    ----------
    back
        Full-size smooth sky (ADU).
    mask
        True on pixels that are not sky (not used); None: none.
    grid
        Cells along each side (fewer on a detector smaller than ``grid`` pixels).

    Returns
    -------
    numpy.ndarray
        float32 map (ADU), NaN on cells without an unmasked sample. Cell ``(i, j)`` covers
        rows ``i ny / grid`` to ``(i + 1) ny / grid`` and likewise in x; its mean is taken
        over :data:`CELL_SAMPLES` evenly spaced rows and columns of it.
    """
    ny, nx = back.shape
    gy, gx = min(grid, ny), min(grid, nx)
    # The sky is smooth: CELL_SAMPLES x CELL_SAMPLES evenly spaced pixels of a cell give its
    # mean (a 4k detector costs 0.01 s instead of 0.4 s).
    step = max(1, min(ny // gy, nx // gx) // CELL_SAMPLES)
    back = back[::step, ::step]
    good = (np.ones(back.shape, bool) if mask is None
            else ~np.asarray(mask, bool)[::step, ::step])
    ys, xs = -(-_edges(ny, gy) // step), -(-_edges(nx, gx) // step)
    total = np.add.reduceat(np.add.reduceat(np.where(good, back, 0.0), ys, axis=0,
                                            dtype=np.float64), xs, axis=1)
    count = np.add.reduceat(np.add.reduceat(good.astype(np.int64), ys, axis=0), xs, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan).astype(np.float32)


SKY_VARIABLES = {
    "sky_map": ((SKY_GRID, SKY_GRID), ("sky_y", "sky_x"), "float32", np.nan),
    "sky_mesh_px": ((), (), "int32", 0),
}
"""Array-store variables of :func:`sky_arrays` (shape, dimensions, dtype, fill)."""


def sky_arrays(bkg: BackgroundResult, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The coarse sky map (ADU, NaN where masked) and mesh size of one detector, which the
    night pass reads (:func:`correct_group`)."""
    return {"sky_map": coarse_sky_map(bkg.back, mask), "sky_mesh_px": np.int32(bkg.mesh_px)}


def _normalised(sky_map: np.ndarray) -> np.ndarray | None:
    finite = sky_map[np.isfinite(sky_map)]
    if finite.size < MIN_PATTERN_CELLS:
        return None
    median = float(np.median(finite))
    return sky_map / median if median > 0 else None


def night_pattern(maps: list[np.ndarray], min_frames: int) -> np.ndarray | None:
    """The per-cell median of the normalised sky maps of one detector geometry.

    Parameters
    ----------
    maps
        Coarse sky maps (:func:`coarse_sky_map`) of the same shape.
    min_frames
        Fewest usable maps (positive median, enough finite cells) for a pattern.

    Returns
    -------
    numpy.ndarray or None
        The pattern normalised to median 1 (NaN where fewer than half of the maps have a
        value); None with fewer than ``min_frames`` usable maps, or when its ``P99 - P1``
        is below ``MIN_PATTERN_CONTRAST``.
    """
    usable = [n for n in (_normalised(np.asarray(m, np.float64)) for m in maps)
              if n is not None]
    if len(usable) < max(min_frames, 1):
        return None
    stack = np.stack(usable)
    enough = np.count_nonzero(np.isfinite(stack), axis=0) * 2 >= len(usable)
    pattern = np.full(stack.shape[1:], np.nan)
    if enough.any():
        pattern[enough] = np.nanmedian(stack[:, enough], axis=0)
    pattern = _normalised(pattern)
    if pattern is None or np.ptp(np.nanpercentile(pattern, [1.0, 99.0])) < MIN_PATTERN_CONTRAST:
        return None
    return pattern


def _cell_coordinates(shape: tuple[int, int], ny_px: int, nx_px: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres in units of the detector's half sides, from its centre."""
    gy, gx = shape
    y = ((_edges(ny_px, gy) + np.append(_edges(ny_px, gy)[1:], ny_px)) / 2 - ny_px / 2)
    x = ((_edges(nx_px, gx) + np.append(_edges(nx_px, gx)[1:], nx_px)) / 2 - nx_px / 2)
    half = math.hypot(nx_px, ny_px) / 2
    yy, xx = np.meshgrid(y / half, x / half, indexing="ij")
    return yy, xx


def radial_model(params: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """``c (1 + a r^2 + b r^4)`` around the axis ``(x0, y0)``; ``params = (c, a, b, x0,
    y0)``, lengths in half-diagonals."""
    c, a, b, x0, y0 = params
    r2 = (xx - x0) ** 2 + (yy - y0) ** 2
    return c * (1.0 + a * r2 + b * r2 * r2)


def radial_pattern(pattern: np.ndarray, ny_px: int, nx_px: int) -> np.ndarray | None:
    """The vignetting-shaped part of a pattern: a radial falloff fitted to it.

    Parameters
    ----------
    pattern
        Normalised night pattern (:func:`night_pattern`), NaN allowed.
    ny_px, nx_px
        Detector size (pixels): the cells are placed at their true aspect.

    Returns
    -------
    numpy.ndarray or None
        ``1 + a r^2 + b r^4`` around an axis within ``MAX_AXIS_OFFSET`` of the detector's
        half sides from its centre, normalised to median 1 on the pattern's grid; None when
        too few cells are finite.
    """
    yy, xx = _cell_coordinates(pattern.shape, ny_px, nx_px)
    ok = np.isfinite(pattern)
    if np.count_nonzero(ok) < MIN_PATTERN_CELLS:
        return None
    half = math.hypot(nx_px, ny_px) / 2
    dx, dy = MAX_AXIS_OFFSET * nx_px / 2 / half, MAX_AXIS_OFFSET * ny_px / 2 / half

    def resid(p):
        return radial_model(p, yy[ok], xx[ok]) - pattern[ok]

    fit = optimize.least_squares(resid, x0=[1.0, 0.0, 0.0, 0.0, 0.0],
                                 bounds=([0.0, -10.0, -10.0, -dx, -dy],
                                         [10.0, 10.0, 10.0, dx, dy]), loss="soft_l1",
                                 f_scale=0.01)
    model = radial_model(fit.x, yy, xx)
    if not np.all(model > 0):
        return None
    return model / np.median(model[ok])


def corrected_nonuniformity(sky_map: np.ndarray, pattern: np.ndarray | float) -> float:
    """``(P99 - P1) / median`` of ``sky_map / pattern`` over the cells where both are finite.

    NaN with fewer than ``MIN_PATTERN_CELLS`` such cells or a median that is not positive.
    """
    ratio = np.asarray(sky_map, np.float64) / pattern
    ratio = ratio[np.isfinite(ratio)]
    if ratio.size < MIN_PATTERN_CELLS:
        return math.nan
    p1, p50, p99 = np.percentile(ratio, [1.0, 50.0, 99.0])
    return float((p99 - p1) / p50) if p50 > 0 else math.nan


# ---------------------------------------------------------------------------- night pass


def _usable(row: dict) -> bool:
    """A measured light frame with a sky to compare, not flat-fielded already."""
    flags = int(row.get("qa_flags") or 0)
    return (row["status"] == "ok" and row["detector"] != "ALL"
            and row.get("image_type") in ("light", "", None)
            and not flags & bits("FLAT_FIELDED", "SKY_UNMEASURED")
            and math.isfinite(row.get("sky_nonuniformity") or math.nan))


def _detector_key(row: dict) -> str:
    """A mosaic detector's name; "" for a single-detector frame, whose name is only the
    HDU that holds it (a compressed copy of the same camera's frame sits in HDU 1)."""
    return row["detector"] if int(row.get("n_detectors") or 1) > 1 else ""


def night_groups(rows: list[dict], stored: set[tuple[str, str]], min_frames: int
                 ) -> list[list[int]]:
    """Positions of the rows that share a night pattern, one list per group.

    Rows are grouped by detector (of a mosaic), size and filter; only usable rows (measured
    light frames with a sky non-uniformity, not flat-fielded) whose (exposure, detector)
    has a sky map in ``stored`` count, and only groups of at least ``min_frames`` rows.
    """
    groups = collections.defaultdict(list)
    for i, r in enumerate(rows):
        if _usable(r) and (r["exposure"], r["detector"]) in stored:
            groups[(_detector_key(r), r["nx"], r["ny"], r.get("filter") or "")].append(i)
    return [members for members in groups.values() if len(members) >= min_frames]


def correct_group(rows: list[dict], sky_maps: dict[int, np.ndarray],
                  mesh_px: dict[int, int], mode: str, min_frames: int) -> dict[int, dict]:
    """Sky non-uniformity of one group's rows measured on ``sky / night pattern``.

    The group's pattern is :func:`night_pattern` of its coarse sky maps (or its radial part
    with ``mode="radial"``); each row gets ``sky_nonuniformity`` from its map divided by it
    (noise floor removed as in the background stage) and the qa flag
    ``ILLUMINATION_NIGHT``. A frame that the pattern does not describe (its map is less
    uniform divided by the pattern than raw: a frame of another pointing or illumination,
    or a faint sky over a bias pedestal) keeps its raw value.

    Parameters
    ----------
    rows
        The night's exposure rows (not changed).
    sky_maps, mesh_px
        The group's coarse sky maps and background mesh sizes, by row position
        (:func:`sky_arrays`).
    mode
        ``background.illumination``: ``median`` or ``radial``.
    min_frames
        ``background.illumination_min_frames``.

    Returns
    -------
    dict
        Row position -> the row with its new value, for the rows that changed.
    """
    first = rows[next(iter(sky_maps))]
    nx, ny = first["nx"], first["ny"]
    pattern = night_pattern(list(sky_maps.values()), min_frames)
    if pattern is not None and mode == "radial":
        pattern = radial_pattern(pattern, ny, nx)
    if pattern is None:
        return {}
    changed = {}
    for i, sky_map in sky_maps.items():
        r = rows[i]
        u = corrected_nonuniformity(sky_map, pattern)
        if not u < corrected_nonuniformity(sky_map, 1.0):
            continue  # the pattern does not describe this frame: its raw u stands
        if mesh_px[i] > 0:
            u = background.remove_noise_floor(u, background.noise_floor(
                r["sky_noise"], r["sky_level"], mesh_px[i]))
        if not math.isfinite(u):
            continue
        changed[i] = {**r, "sky_nonuniformity": u,
                      "qa_flags": int(r["qa_flags"]) | bits("ILLUMINATION_NIGHT")}
    return changed
