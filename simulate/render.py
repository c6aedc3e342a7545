"""Rendering one detector of an exposure: pixels, header, truth, defect mask, true stars.

The image is a calibrated frame in ADU: bias removed, sky kept, float32. Smooth sky and
sources, multiplied by the uncorrected flat, get hot pixels and bad columns, bleed above
the full well, then Poisson noise (Gaussian approximation where the expected count exceeds
``POISSON_EXACT_BELOW_E``), read noise and cosmic rays, and are clipped at ``SATURATE``.
"""
from __future__ import annotations

import math

import numpy as np

from survey_qa.simulate.camera import (add_cosmetics, add_cosmic_rays, bleed, data_slices,
                                       illumination, raw_frame)
from survey_qa.simulate.hdus import detector_header, exposure_header
from survey_qa.simulate.psf import psf_ellipticity, psf_model
from survey_qa.simulate.sky import nonuniformity, sky_nodes, spread, upsample
from survey_qa.simulate.sources import (SceneView, add_galaxies, add_scene, add_stars,
                                        add_streaks, extended_light)
from survey_qa.simulate.spec import ExposureSpec, SimDetector, detector_hdu, detector_id
from survey_qa.simulate.truth import MASK_EXTINCTION_MAG, MASK_LIGHT_FRACTION, truth_class


POISSON_EXACT_BELOW_E = 50.0


def render_detector(spec: ExposureSpec, index: int, rng: np.random.Generator,
                    scene: SceneView | None = None) -> SimDetector:
    """Render one detector of an exposure.

    Parameters
    ----------
    spec
        The exposure.
    index
        Detector index, 0 .. ``spec.n_detectors - 1`` (row-major in the focal plane).
    rng
        Randomness of this detector (star field, noise, cosmetics); exposure-wide
        structures come from ``spec.field_seed``.
    scene
        The stars and galaxies of a fixed scene in this detector's pixels (a frame of a
        sequence, :mod:`.sequence`); None: the detector draws its own from ``rng``. The
        stars of a scene keep their ``star_id``.

    Returns
    -------
    SimDetector
        Calibrated image (float32 ADU), header, truth, defect mask and true stars.
    """
    if not 0 <= index < spec.n_detectors:
        raise ValueError(f"detector index {index} outside 0..{spec.n_detectors - 1}")
    nx, ny = spec.nx, spec.ny
    gain = spec.gain_e_per_adu
    sky_nodes_ = sky_nodes(spec, index)
    smooth = upsample(sky_nodes_.smooth(), sky_nodes_.step, ny, nx)
    noise_e = math.sqrt(spec.sky_e + spec.read_noise_e**2)

    psf = psf_model(spec, index)
    light = np.zeros((ny, nx), dtype=np.float32)
    if scene is None:
        stars = add_stars(light, rng, spec, psf, sky_nodes_, noise_e)
        n_gal = add_galaxies(light, rng, spec, psf, sky_nodes_, noise_e)
    else:
        stars, n_gal = add_scene(light, spec, psf, sky_nodes_, noise_e, scene)
    extended = extended_light(spec, index, rng)
    streak = np.zeros((ny, nx), dtype=np.float32) if spec.n_satellites else None
    if streak is not None:
        add_streaks(streak, spec, index, noise_e)
    patchy = None
    if np.any(sky_nodes_.patchy_mag > 0):
        patchy = upsample(sky_nodes_.patchy_mag, sky_nodes_.step, ny, nx)
    if extended is not None or streak is not None:
        trans = np.float32(10.0 ** (-0.4 * spec.transparency_mag))
        diffuse = sum(a for a in (extended, streak) if a is not None) * trans
        if patchy is not None:
            diffuse *= 10.0 ** (-0.4 * patchy)
        light += diffuse

    total = smooth + light
    flat, n_dust = illumination(spec, index)
    if flat is not None:  # an uncorrected flat dims sky and sources alike
        total *= flat
    cosmetics = add_cosmetics(total, spec, rng)
    bleed(total, spec.full_well_e)
    np.clip(total, 0.0, None, out=total)
    if spec.sky_e < POISSON_EXACT_BELOW_E:
        image = rng.poisson(total).astype(np.float32)
        image += rng.standard_normal((ny, nx), dtype=np.float32) * np.float32(spec.read_noise_e)
    else:
        image = rng.standard_normal((ny, nx), dtype=np.float32)
        image *= np.sqrt(total + np.float32(spec.read_noise_e**2))
        image += total
    n_cr = add_cosmic_rays(image, spec, rng)
    image /= np.float32(gain)
    np.minimum(image, np.float32(spec.saturate_adu), out=image)
    raw = None
    if spec.raw:
        raw = raw_frame(image, spec, rng)
        image = (raw[data_slices(spec)] - np.float32(spec.bias_adu)).astype(np.float32)

    mask = np.zeros((ny, nx), dtype=bool)
    if np.any(sky_nodes_.light > 0):
        light_full = upsample(sky_nodes_.light, sky_nodes_.step, ny, nx)
        mask |= light_full > MASK_LIGHT_FRACTION * spec.sky_e
    if patchy is not None:
        mask |= patchy > MASK_EXTINCTION_MAG

    u_true = nonuniformity(smooth[::2, ::2])
    k_true = spread(patchy[::2, ::2]) if patchy is not None else 0.0
    stars["flux_adu"] = stars.pop("flux_e") / gain
    ixs = np.clip(np.round(stars["x"].to_numpy()).astype(int), 0, nx - 1)
    iys = np.clip(np.round(stars["y"].to_numpy()).astype(int), 0, ny - 1)
    stars["saturated"] = image[iys, ixs] >= spec.saturate_adu
    stars["illumination"] = (flat[iys, ixs].astype(np.float64) if flat is not None
                             else np.ones(len(stars)))
    name = detector_id(spec, index)
    truth = {
        "exposure": spec.exposure, "detector": name, "detector_index": index,
        "hdu": detector_hdu(spec, index),
        "seeing_arcsec": spec.seeing_arcsec, "fwhm_px_true": spec.fwhm_px,
        "trail_arcsec": spec.trail_arcsec, "trail_ratio": spec.trail_ratio,
        "trail_pa_deg": spec.trail_pa_deg, "trail_kind": spec.trail_kind,
        "ellipticity_true": psf_ellipticity(spec), "u_true": u_true, "k_true": k_true,
        **truth_class(spec.seeing_arcsec, spec.trail_ratio, u_true, k_true, spec.trail_kind),
        "target_class": spec.target_class, "confounders": ",".join(spec.confounders),
        "n_stars": int(len(stars)), "n_saturated_stars": int(stars["saturated"].sum()),
        "n_galaxies": n_gal, "n_cosmic_rays": n_cr, **cosmetics,
        "defect_mask_fraction": float(mask.mean()),
        "sky_level_adu": spec.sky_level_adu, "pixscale_arcsec": spec.pixscale_arcsec,
        "atm_fwhm_arcsec": spec.atm_fwhm_arcsec, "n_dust_donuts": n_dust,
        "read_binning": 2 if spec.bayer_pattern else 1,  # the reader bins Bayer frames 2x2
        "flat_nonuniformity": nonuniformity(flat[::2, ::2]) if flat is not None else 0.0,
    }
    header = {**exposure_header(spec), **detector_header(spec, index)}
    return SimDetector(index, name, image, header, truth, mask, stars, raw)
