"""The noiseless image of a sequence frame: what a perfect combination of the night could give.

:func:`noiseless_frame` renders a sequence's scene (:mod:`.sequence`) in one frame's pixels
with the simulator's own source drawing (:func:`~survey_qa.simulate.sources.add_scene`):
no sky, no noise, no cosmic rays, hot pixels or satellite, no patchy cloud and no trail.
The PSF is that of a chosen frame's seeing (by default the frame's own), and the sources are
dimmed by the frame's grey extinction only, so that the image has the photometry of the
frame itself, the photometry a stack registered and scaled onto that frame has (ADU).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from survey_qa.simulate.psf import psf_model
from survey_qa.simulate.sequence import Sequence, frame_spec, render_margin_px
from survey_qa.simulate.sky import sky_nodes
from survey_qa.simulate.sources import add_scene


def noiseless_frame(seq: Sequence, index: int, *, seeing_from: int | None = None,
                    extinction_mag: float | None = None) -> np.ndarray:
    """The scene in frame ``index``'s pixels without sky, noise or detector effects (ADU).

    Parameters
    ----------
    seq
        The planned sequence (:func:`~survey_qa.simulate.sequence.plan_sequence`).
    index
        The frame whose pixel grid (pointing) the image is drawn in.
    seeing_from
        The frame whose seeing and focus give the PSF (untrailed); None: ``index``.
    extinction_mag
        Grey extinction applied to every source; None: frame ``index``'s grey extinction
        (its patchy cloud is left out).

    Returns
    -------
    numpy.ndarray
        ``(ny, nx)`` float32, ADU of frame ``index``'s camera, zero where no source.
    """
    spec = frame_spec(seq, index)
    psf_frame = seq.frames[index if seeing_from is None else seeing_from]
    grey = spec.transparency_mag if extinction_mag is None else float(extinction_mag)
    clean = dataclasses.replace(
        spec, seeing_arcsec=float(psf_frame.seeing_arcsec), trail_arcsec=0.0, trail_kind="none",
        background_kind="none", background_strength=0.0, cloud_extinction_mag=0.0,
        cloud_emission=0.0, transparency_mag=grey, n_satellites=0)
    view = seq.scene.view(seq.frames[index].pointing, clean.nx, clean.ny,
                          render_margin_px(clean.fwhm_px, 0.0))
    light = np.zeros((clean.ny, clean.nx), dtype=np.float32)
    noise_e = math.sqrt(clean.sky_e + clean.read_noise_e ** 2)
    add_scene(light, clean, psf_model(clean, 0), sky_nodes(clean, 0), noise_e, view)
    return light / np.float32(clean.gain_e_per_adu)
