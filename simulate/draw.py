"""Drawing the truth parameters of an exposure for a quality class (:func:`draw_spec`).

The defining quantity of a class comes from the clean ranges of quality-classes.md (or
from its gap, for an ambiguous frame), the others from the good ranges; a defect frame may
also carry defects of lower priority (by the pipeline's
:data:`~survey_qa.pipeline.schema.PRIORITY`), which leave its class unchanged. A wide
night is taken with one to three instruments (:func:`camera_of`): the frames of one share
their detector shape, filters, raw layout and illumination pattern (vignetting, dust), so
that a pipeline can learn that pattern from the night, as on a real night; the pixel scale
follows each frame's seeing, so that every class spans the FWHM range.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from astropy.time import Time

from survey_qa.pipeline.schema import CLASSES, PRIORITY
from survey_qa.simulate.spec import (BACKGROUND_KINDS, CONFOUNDERS, DOMAINS, FILE_FORMATS,
                                     HEADER_STYLES, PSF_PROFILES, SENSITIVE_KEYS, TRAIL_KINDS,
                                     WIDE, WIDE_CONFOUNDERS, ExposureSpec, instrument_seed)
from survey_qa.simulate.truth import LIMITS


_FILTERS = {  # filter -> sky rate range (electrons / s / arcsec^2) for a 1-4 m telescope
    "u": (1.0, 40.0), "g": (3.0, 120.0), "r": (5.0, 250.0), "i": (8.0, 400.0),
    "z": (10.0, 500.0), "V": (4.0, 200.0), "R": (5.0, 250.0), "B": (2.0, 80.0),
    "Ha": (0.3, 10.0), "L": (5.0, 300.0),
}


def loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _choice(rng: np.random.Generator, options: dict) -> str:
    keys = list(options)
    p = np.array([options[k] for k in keys], dtype=float)
    return str(keys[int(rng.choice(len(keys), p=p / p.sum()))])


def _draw_seeing(rng: np.random.Generator, zone: str) -> float:
    L = LIMITS
    if zone == "good":
        return float(rng.uniform(0.5, L.good_seeing_arcsec))
    if zone == "bad":
        return loguniform(rng, L.bad_seeing_arcsec, 4.0)
    return float(rng.uniform(L.good_seeing_arcsec + 0.01, L.bad_seeing_arcsec - 0.01))


def _draw_tracking(rng: np.random.Generator, zone: str, kind: str | None) -> tuple[str, float]:
    """Trail kind and trail ratio r for a zone: good | bad | very_bad | ambiguous."""
    L = LIMITS
    if zone == "good":
        kind = kind or _choice(rng, {"none": 0.35, "linear": 0.3, "periodic": 0.2, "wind": 0.15})
        if kind == "none":
            return kind, 0.0
        return kind, float(rng.uniform(0.05, L.good_trail_ratio))
    if zone == "bad":
        kind = kind or _choice(rng, {"linear": 0.35, "periodic": 0.25, "wind": 0.25, "jump": 0.15})
        hi = L.jump_trail_ratio if kind == "jump" else L.very_bad_trail_ratio
        return kind, float(rng.uniform(L.bad_trail_ratio, hi - 0.02))
    if zone == "very_bad":
        kind = kind or _choice(rng, {"linear": 0.35, "periodic": 0.2, "wind": 0.15, "jump": 0.3})
        if kind == "jump":
            return kind, float(rng.uniform(L.jump_trail_ratio, 6.0))
        return kind, loguniform(rng, L.very_bad_trail_ratio, 12.0)
    kind = kind or _choice(rng, {"linear": 0.4, "periodic": 0.2, "wind": 0.2, "jump": 0.2})
    return kind, float(rng.uniform(L.good_trail_ratio + 0.02, L.bad_trail_ratio - 0.02))


def _draw_background(rng: np.random.Generator, zone: str, kind: str | None) -> tuple[str, float]:
    """Background defect kind and target strength (u, or k in mag for cloud)."""
    if zone == "good":
        return "none", 0.0
    kind = kind or _choice(rng, {"gradient": 0.3, "cloud": 0.3, "scattered": 0.2, "glow": 0.2})
    if zone == "bad":
        return kind, (loguniform(rng, 0.28, 1.5) if kind == "cloud"
                      else loguniform(rng, 0.12, 0.8))
    return kind, (float(rng.uniform(0.07, 0.22)) if kind == "cloud"
                  else float(rng.uniform(0.04, 0.09)))


def _draw_pixscale(rng: np.random.Generator, seeing_arcsec: float, undersampled: bool) -> float:
    if undersampled:
        return seeing_arcsec / float(rng.uniform(1.25, 1.95))
    for _ in range(200):
        p = (loguniform(rng, 0.5, 1.2) if rng.random() < 0.05
             else loguniform(rng, 0.15, 0.5))
        if 2.0 <= seeing_arcsec / p <= 14.0:
            return p
    return seeing_arcsec / 4.0


def draw_spec(rng: np.random.Generator, quality_class: str, *, exposure: str,
              size_px: int = 4096, ambiguous: bool = False, file_format: str = "fits",
              n_detectors: int | None = None, date_obs: str = "2024-03-01T22:00:00.000",
              expnum: int = 1, confounders: tuple[str, ...] | None = None,
              confounder_rate: float = 1.0, extra_defects: bool = True,
              trail_kind: str | None = None, background_kind: str | None = None,
              header_style: str | None = None, seeing_arcsec: float | None = None,
              trail_ratio: float | None = None, pixscale_arcsec: float | None = None,
              domain: str = "default", camera_seed: int | None = None) -> ExposureSpec:
    """Sample the physical parameters of one exposure of a quality class.

    Parameters
    ----------
    rng
        Source of randomness (the spec is a pure function of its state).
    quality_class
        One of ``CLASSES``: the values of the quantities that define it come from the clean
        ranges of the spec, the others from the 'good' ranges, except that a defect frame
        may also carry defects of lower priority when ``extra_defects`` (its class stays).
    exposure
        Exposure id.
    size_px
        Detector side in pixels (square detectors); in the ``wide`` domain the longest
        side is drawn between ``min(500, size_px)`` and ``size_px``, with aspect ratios
        of 1 to 1.5.
    ambiguous
        Draw the defining quantity from the spec's gap instead: seeing 1.2-1.6" for
        ``good``/``bad_seeing``, trail ratio 0.5-1.0 for the tracking classes, u 0.03-0.10
        or k 0.05-0.25 mag for ``background_issues``.
    file_format
        One of :data:`FILE_FORMATS`.
    n_detectors
        Detectors of a mosaic (default: 2, 4 or 8 at random; 1 for single formats).
    date_obs
        ISO UTC start of the exposure.
    confounders
        Exactly these confounders (names of :data:`CONFOUNDERS` or
        :data:`WIDE_CONFOUNDERS`); None: each at random with its share times
        ``confounder_rate`` (those of the wide domain only in that domain).
    trail_kind, background_kind, header_style, seeing_arcsec, trail_ratio, pixscale_arcsec
        Force a value instead of drawing it (tests, demo nights). A forced value is used
        as given, even if it moves the frame to another class.
    domain
        One of :data:`DOMAINS`. ``default`` draws exactly what it always drew (same seed,
        same frame). ``wide`` draws pixel scales of 0.1-15"/px and FWHM of 1.2-20 px
        (:data:`WIDE`), bad seeing up to tens of arcsec, frames of 500 px to ``size_px``
        and the :data:`WIDE_CONFOUNDERS`.
    camera_seed
        Wide domain: the instrument the frame was taken with (:func:`camera_of`). Frames
        of one camera share their detector shape, filters and the instrument confounders
        (raw layout and bias, vignetting, dust donuts, Bayer pattern), as the frames of
        one night do; None: the frame draws its own.

    Returns
    -------
    ExposureSpec
    """
    if quality_class not in CLASSES:
        raise ValueError(f"unknown quality class {quality_class!r}; expected one of {CLASSES}")
    if file_format not in FILE_FORMATS:
        raise ValueError(f"unknown file format {file_format!r}; expected one of {FILE_FORMATS}")
    if trail_kind is not None and trail_kind not in TRAIL_KINDS:
        raise ValueError(f"unknown trail kind {trail_kind!r}")
    if background_kind is not None and background_kind not in BACKGROUND_KINDS:
        raise ValueError(f"unknown background kind {background_kind!r}")
    if header_style is not None and header_style not in HEADER_STYLES:
        raise ValueError(f"unknown header style {header_style!r}")
    known = set(CONFOUNDERS) | set(WIDE_CONFOUNDERS)
    if confounders is not None and set(confounders) - known:
        raise ValueError(f"unknown confounders {sorted(set(confounders) - known)}")
    if size_px < 32:
        raise ValueError("size_px must be at least 32")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    wide = domain == "wide"

    seeing_zone, track_zone, bg_zone = _zones(rng, quality_class, ambiguous, extra_defects)
    chosen = _draw_confounders(rng, confounders, confounder_rate)
    camera = camera_of(camera_seed, size_px, confounder_rate) if wide and camera_seed is not None \
        else None
    if wide and confounders is None:
        frame_wide = set(_draw_wide_confounders(rng, confounder_rate))
        if camera is not None:  # the instrument decides its own confounders
            frame_wide = (frame_wide - set(CAMERA_CONFOUNDERS)) | set(camera["confounders"])
        chosen = tuple(sorted(set(chosen) | frame_wide))
    if seeing_arcsec is not None:
        s = seeing_arcsec
    else:
        s = _draw_seeing_wide(rng, seeing_zone) if wide else _draw_seeing(rng, seeing_zone)
    kind, r = _draw_tracking(rng, track_zone, trail_kind)
    if trail_ratio is not None:
        r = float(trail_ratio)
        kind = trail_kind or (kind if kind != "none" or r == 0 else "linear")
    bkind, strength = _draw_background(rng, bg_zone, background_kind)
    if background_kind is not None and bg_zone == "good" and background_kind != "none":
        bkind, strength = _draw_background(rng, "bad", background_kind)
    if bkind == "none":
        strength = 0.0
    draw_scale = _draw_pixscale_wide if wide else _draw_pixscale
    pixscale = pixscale_arcsec or draw_scale(rng, s, "undersampled" in chosen)
    if s / pixscale < 2.0 and "undersampled" not in chosen:
        chosen = tuple(sorted(set(chosen) | {"undersampled"}))
    elif s / pixscale >= 2.0 and "undersampled" in chosen:
        chosen = tuple(c for c in chosen if c != "undersampled")

    # detectors
    if file_format.startswith("mosaic"):
        n_det = n_detectors or int(rng.choice([2, 4, 8], p=[0.2, 0.6, 0.2]))
    else:
        n_det = 1
    if n_det not in (1, 2, 4, 8):
        raise ValueError("n_detectors must be 1, 2, 4 or 8")
    cols, rows = {1: (1, 1), 2: (2, 1), 4: (2, 2), 8: (4, 2)}[n_det]
    if camera is not None:
        nx, ny = camera["shape"]
    else:
        nx, ny = _draw_shape(rng, size_px) if wide else (int(size_px), int(size_px))

    cam = _draw_camera(rng, pixscale, chosen, camera["filters"] if camera else None)
    density = (loguniform(rng, 100.0, 400.0) if "crowded" in chosen
               else loguniform(rng, 1.0, 40.0))  # stars / arcmin^2, sparse to crowded
    if wide:  # small apertures on wide fields reach few stars per arcmin^2
        area_arcmin2 = nx * ny * pixscale**2 / 3600.0
        most = loguniform(rng, *WIDE.stars_per_detector) * (4.0 if "crowded" in chosen else 1.0)
        density = max(min(density, most / area_arcmin2),  # and a field with stars to see
                      WIDE.min_stars_per_detector / area_arcmin2)
    gal_density = loguniform(rng, 0.5, 5.0) if "galaxies" in chosen else 0.0
    # background details; thin cirrus and natural gradients keep good frames good
    if bkind == "cloud":
        cloud_k = strength
        emission = float(rng.uniform(0.0, 1.5))
    else:
        cloud_k = float(rng.uniform(0.0, 0.012)) if rng.random() < 0.3 else 0.0
        emission = float(rng.uniform(0.0, 0.4))
    transparency = float(rng.uniform(0.0, 0.3)) if rng.random() < 0.3 else 0.0

    style = header_style or _choice(rng, {"wcs": 0.7, "pixscale": 0.12, "secpix": 0.08,
                                          "sparse": 0.1})
    missing: tuple[str, ...] = ()
    if style == "sparse":
        k = int(rng.integers(1, 4))
        missing = tuple(sorted(str(m) for m in rng.choice(SENSITIVE_KEYS, size=k, replace=False)))

    t0 = Time(date_obs, format="isot", scale="utc")
    profile, beta = str(rng.choice(PSF_PROFILES)), float(rng.uniform(2.5, 5.0))
    spec = ExposureSpec(
        exposure=exposure, target_class=quality_class, ambiguous=bool(ambiguous),
        seeing_arcsec=float(s),
        psf_profile=profile, moffat_beta=beta if profile == "moffat" else math.nan,
        trail_arcsec=float(r * s), trail_pa_deg=float(rng.uniform(0.0, 180.0)),
        trail_kind=kind, jump_fraction=float(rng.uniform(0.3, 0.7)),
        periodic_period_s=float(rng.uniform(120.0, 900.0)),
        background_kind=bkind, background_strength=float(strength),
        cloud_extinction_mag=float(cloud_k), cloud_emission=emission,
        transparency_mag=transparency, natural_gradient=float(rng.uniform(0.0, 0.015)),
        pixscale_arcsec=float(pixscale), nx=nx, ny=ny,
        n_detectors=n_det, mosaic_cols=cols, mosaic_rows=rows,
        gap_px=int(rng.integers(20, 100)) if n_det > 1 else 0,
        file_format=file_format, sky_level_adu=cam["sky_e"] / cam["gain"],
        star_density_per_arcmin2=float(density),
        cluster_fraction=float(rng.uniform(0.3, 0.8)) if "crowded" in chosen else 0.0,
        galaxy_density_per_arcmin2=float(gal_density),
        n_bright_stars=int(rng.integers(3, 16)) if "saturated_stars" in chosen else 0,
        gain_e_per_adu=cam["gain"], read_noise_e=cam["read_noise"], exptime_s=cam["exptime"],
        filter=cam["filter"], saturate_adu=cam["saturate"], full_well_e=cam["full_well"],
        header_style=style,
        missing_keys=missing, confounders=chosen,
        optics_shear=float(rng.uniform(0.04, 0.15)) if "optics" in chosen else 0.0,
        optics_pattern=str(rng.choice(["radial", "tangential"])) if "optics" in chosen else "",
        optics_fwhm_growth=float(rng.uniform(0.0, 0.08)) if "optics" in chosen else 0.0,
        spikes=bool("saturated_stars" in chosen and rng.random() < 0.5),
        cosmic_ray_rate=float(rng.uniform(1.0, 5.0)) if "cosmic_rays" in chosen else 0.0,
        pixel_size_um=float(rng.choice([9.0, 10.0, 12.0, 13.5, 15.0])),
        hot_pixel_fraction=loguniform(rng, 1e-5, 3e-4) if "hot_pixels" in chosen else 0.0,
        n_bad_columns=int(rng.integers(1, 7)) if "bad_columns" in chosen else 0,
        n_satellites=(int(rng.integers(1, 3)) if "satellite" in chosen else 0)
        + (1 if "aircraft" in chosen else 0),
        date_obs=t0.isot, mjd_obs=float(t0.mjd), airmass=float(rng.uniform(1.0, 2.2)),
        object_name=f"FIELD_{int(rng.integers(0, 10000)):04d}", expnum=int(expnum),
        ra_deg=float(rng.uniform(0.0, 360.0)),
        dec_deg=float(np.degrees(np.arcsin(rng.uniform(-0.95, 0.95)))),
        rotation_deg=float(rng.choice([0.0, 90.0, 180.0, 270.0]) + rng.normal(0.0, 0.5)),
        field_seed=int(rng.integers(0, 2**31 - 1)), domain=domain,
        camera_seed=int(camera_seed) if camera is not None else -1,
    )
    if set(chosen) & set(WIDE_CONFOUNDERS):
        spec = _with_wide_features(spec)
    return spec


CAMERA_CONFOUNDERS = ("raw", "vignetting", "dust", "bayer")
"""Wide-domain confounders that belong to the instrument, not to the frame."""


def camera_of(camera_seed: int, size_px: int, confounder_rate: float = 1.0) -> dict:
    """One instrument of a wide-domain night: detector shape (largest side up to
    ``size_px``), 1-3 filters and its :data:`CAMERA_CONFOUNDERS`. The parameters of these
    (bias and overscan, vignetting, dust donuts, Bayer pattern) follow from the seed too,
    so that every frame of the camera has the same illumination pattern, as on a real
    night."""
    rng = np.random.default_rng([camera_seed, 701])
    draws = {name: rng.random() for name in CAMERA_CONFOUNDERS}
    chosen = tuple(sorted(n for n in CAMERA_CONFOUNDERS
                          if draws[n] < WIDE_CONFOUNDERS[n] * confounder_rate))
    shape = _draw_shape(rng, size_px)
    n_filters = int(rng.integers(1, 4))
    filters = [str(f) for f in rng.choice(list(_FILTERS), size=n_filters, replace=False)]
    return {"confounders": chosen, "shape": shape, "filters": sorted(filters)}


def _draw_wide_confounders(rng: np.random.Generator, rate: float) -> tuple[str, ...]:
    draws = {name: rng.random() for name in WIDE_CONFOUNDERS}
    return tuple(sorted(n for n, p in WIDE_CONFOUNDERS.items() if draws[n] < p * rate))


def _draw_seeing_wide(rng: np.random.Generator, zone: str) -> float:
    """Seeing of the wide domain: bad seeing reaches the tens of arcsec of coarse cameras."""
    if zone != "bad":
        return _draw_seeing(rng, zone)
    lo, hi = WIDE.bad_seeing_arcsec
    mid = 4.0  # half of the frames as on survey telescopes, half optics-limited
    return loguniform(rng, lo, mid) if rng.random() < 0.5 else loguniform(rng, mid, hi)


def _draw_pixscale_wide(rng: np.random.Generator, seeing_arcsec: float,
                        undersampled: bool) -> float:
    """A pixel scale in ``WIDE.pixscale_arcsec`` giving an FWHM in ``WIDE.fwhm_px``
    (under 2 px when ``undersampled``), log-uniform."""
    (p_lo, p_hi), (f_lo, f_hi) = WIDE.pixscale_arcsec, WIDE.fwhm_px
    fwhm_lo, fwhm_hi = (f_lo, 2.0) if undersampled else (2.0, f_hi)
    lo, hi = max(p_lo, seeing_arcsec / fwhm_hi), min(p_hi, seeing_arcsec / fwhm_lo)
    if lo >= hi:  # this sampling is out of reach at this seeing: any allowed FWHM
        lo, hi = max(p_lo, seeing_arcsec / f_hi), min(p_hi, seeing_arcsec / f_lo)
    return loguniform(rng, lo, max(hi, lo))


def _draw_shape(rng: np.random.Generator, size_px: int) -> tuple[int, int]:
    """(nx, ny) of a wide-domain detector: longest side 500 px (or ``size_px`` when
    smaller) to ``size_px``, aspect 1-1.5, even sides (Bayer cells)."""
    lo = min(WIDE.min_side_px, size_px)
    long_side = loguniform(rng, lo, size_px)
    aspect = float(rng.choice([1.0, 1.0, 4.0 / 3.0, 1.3, 1.5]))
    portrait = bool(rng.random() < 0.3)
    short = max(long_side / aspect, min(lo, long_side))

    def even(v: float) -> int:
        return max(32, 2 * int(round(v / 2.0)))
    nx, ny = even(long_side), even(short)
    return (ny, nx) if portrait else (nx, ny)


def _with_wide_features(spec: ExposureSpec) -> ExposureSpec:
    """The parameters of the wide-domain confounders of ``spec`` (from its camera's seed,
    else its field seed, so that the main draws of a frame do not depend on them). A Bayer
    frame whose FWHM is under 2.4 px (1.2 px once binned) is left without its colour
    filters."""
    aux = np.random.default_rng([instrument_seed(spec), 601])
    chosen = set(spec.confounders)
    if "defocus" in chosen and spec.fwhm_px < WIDE.defocus_min_fwhm_px:
        chosen.discard("defocus")  # a donut of a few pixels is not resolved
    if "bayer" in chosen and (spec.n_detectors > 1 or spec.fwhm_px < WIDE.bayer_min_fwhm_px):
        chosen.discard("bayer")  # colour cameras are single chips; binned 2x2 when read
    if "sparse" in chosen:
        chosen.discard("crowded")
    # every draw is made whatever is chosen: each feature's values depend on the seed only
    # (the camera's, when the frame has one: its frames share bias, layout and flat)
    bias = float(min(aux.uniform(200.0, 2000.0), 65535.0 - spec.saturate_adu))
    prescan = int(aux.choice([0, 0, 4, 8, 20, 50]))
    overscan = int(aux.choice([16, 32, 50, 64, 100]))
    over_rows = int(aux.choice([0, 0, 0, 8, 16]))
    vig = loguniform(aux, 0.05, 0.35)
    vdx, vdy = (float(v) for v in aux.uniform(-0.1, 0.1, 2))
    dust = float(aux.uniform(1.0, 6.0))
    pattern = str(aux.choice(["RGGB", "BGGR", "GRBG", "GBRG"]))
    red, blue = float(aux.uniform(0.35, 0.75)), float(aux.uniform(0.3, 0.7))
    defocus, obsc = float(aux.uniform(0.6, 0.92)), float(aux.uniform(0.25, 0.5))
    n_sparse = int(aux.integers(WIDE.sparse_stars[0], WIDE.sparse_stars[1] + 1))
    hot = loguniform(aux, 1e-5, 3e-4)
    out = {}
    if "raw" in chosen:  # no dark frame subtracted: hot pixels are always there
        out.update(raw=True, bias_adu=round(bias, 1), prescan_px=prescan, overscan_px=overscan,
                   overscan_rows=over_rows)
        if spec.hot_pixel_fraction <= 0:
            out["hot_pixel_fraction"] = hot
            chosen.add("hot_pixels")
    out["confounders"] = tuple(sorted(chosen))
    if "vignetting" in chosen:
        out.update(vignetting_corner=vig, vignetting_dx=vdx, vignetting_dy=vdy)
    if "dust" in chosen:
        out["dust_per_detector"] = dust
    if "bayer" in chosen:
        out.update(bayer_pattern=pattern, bayer_red=red, bayer_blue=blue)
    if "defocus" in chosen:
        out.update(defocus_ratio=defocus, obscuration=obsc)
    if "sparse" in chosen:
        area_arcmin2 = spec.nx * spec.ny * spec.pixscale_arcsec**2 / 3600.0
        out.update(star_density_per_arcmin2=n_sparse / area_arcmin2, cluster_fraction=0.0)
    return dataclasses.replace(spec, **out)


def _zones(rng: np.random.Generator, quality_class: str, ambiguous: bool,
           extra_defects: bool) -> tuple[str, str, str]:
    """Zones (good | bad | very_bad | ambiguous) of seeing, tracking and background."""
    zones = {"s": "good", "t": "good", "b": "good"}
    defining = {"bad_seeing": ("s", "bad"), "bad_tracking": ("t", "bad"),
                "very_bad_tracking": ("t", "very_bad"),
                "background_issues": ("b", "bad")}.get(quality_class)
    if defining:
        zones[defining[0]] = defining[1]
    if ambiguous:
        zones[defining[0] if defining else str(rng.choice(["s", "t", "b"]))] = "ambiguous"
    elif extra_defects:  # lower-priority defects leave the class unchanged
        rank = PRIORITY.index(quality_class)
        if rank < PRIORITY.index("bad_seeing") and rng.random() < 0.25:
            zones["s"] = "bad"
        if rank < PRIORITY.index("background_issues") and rng.random() < 0.2:
            zones["b"] = "bad"
    return zones["s"], zones["t"], zones["b"]


def _draw_camera(rng: np.random.Generator, pixscale: float, confounders: tuple[str, ...],
                 filters: list[str] | None = None) -> dict:
    """Filter (one of ``filters``, default all), exposure time, gain, read noise, full well,
    saturation and sky (e-/px)."""
    filt = str(rng.choice(filters or list(_FILTERS)))
    exptime = float(rng.choice([5, 10, 30, 60, 90, 120, 180, 300, 600],
                               p=[0.04, 0.08, 0.14, 0.2, 0.1, 0.14, 0.1, 0.14, 0.06]))
    gain = round(loguniform(rng, 0.5, 5.0), 3)
    read_noise = round(float(rng.uniform(2.0, 15.0)), 2)
    full_well = loguniform(rng, 3.0e4, 2.0e5)
    bias = float(rng.uniform(200.0, 2000.0))  # removed; the ADC range above it is left
    saturate = float(math.floor(min(full_well / gain, 65535.0 - bias)))
    sky_e = loguniform(rng, *_FILTERS[filt]) * exptime * pixscale**2
    sky_e = float(np.clip(sky_e, 3.0, 0.3 * saturate * gain))
    if "bright_sky" in confounders:  # moonlit but flat
        sky_e = float(min(max(sky_e * rng.uniform(8.0, 40.0), 3000.0), 0.35 * saturate * gain))
    return {"filter": filt, "exptime": exptime, "gain": gain, "read_noise": read_noise,
            "full_well": float(full_well), "saturate": saturate, "sky_e": sky_e}


def _draw_confounders(rng: np.random.Generator, forced: tuple[str, ...] | None,
                      rate: float) -> tuple[str, ...]:
    draws = {name: rng.random() for name in CONFOUNDERS}  # always consume the same draws
    if forced is not None:
        return tuple(sorted(forced))
    return tuple(sorted(n for n, p in CONFOUNDERS.items() if draws[n] < p * rate))
