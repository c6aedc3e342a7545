"""Simulated survey frames with known truth (GalSim + numpy), following quality-classes.md.

Pure functions, no file I/O: :func:`draw_spec` samples the physical parameters of one
exposure for a quality class, :func:`render_detector` renders one detector of it, and
:func:`build_hdulist` / :func:`mask_hdulist` assemble FITS HDUs in memory. The flow
``survey_qa.flows.simulate`` writes whole nights to disk.

Modules, each depending only on those above it:

- :mod:`.profiles`: round PSF profiles of atmosphere and optics, defocused donuts;
- :mod:`.spec`: what an exposure is (:class:`ExposureSpec`, :class:`SimDetector`), its
  kinds, confounders and domains, and the focal-plane layout of its detectors;
- :mod:`.truth`: the class limits of the spec, the truth classes (with the pipeline's
  priority and mosaic rules) and the truth table rows;
- :mod:`.draw`: drawing a spec for a quality class, the instruments of a wide night;
- :mod:`.sky`: smooth node fields and the smooth sky of a detector;
- :mod:`.psf`: image motion and the effective PSF;
- :mod:`.sources`: stars, galaxies, extended light and streaks;
- :mod:`.camera`: the uncorrected flat, cosmetics, cosmic rays, bleeding, raw frames;
- :mod:`.hdus`: FITS headers and HDUs;
- :mod:`.render`: one detector, from sky to pixels with its truth;
- :mod:`.plan`: night plans and the generators of each exposure;
- :mod:`.sequence`: a night of exposures of one field (one scene seen through a drifting
  pointing) under conditions that change with time, and its truth.

Conventions
-----------
- Pixel coordinates are 0-based with pixel centres at integers (numpy convention); a
  detector image is indexed ``image[y, x]``.
- Position angles are degrees from +x towards +y, in [0, 180).
- Images are calibrated frames in ADU: bias removed, sky kept, float32. A raw frame
  (``raw``) is written as the camera writes it: ``uint16`` with its bias level, prescan
  and overscan; ``SimDetector.image`` is then its exposed pixels less the bias, the grid
  the reader measures.
"""
from survey_qa.simulate.camera import illumination, raw_frame, raw_shape
from survey_qa.simulate.draw import CAMERA_CONFOUNDERS, camera_of, draw_spec
from survey_qa.simulate.hdus import (build_hdulist, detector_header, exposure_header,
                                     mask_hdulist)
from survey_qa.simulate.plan import (FORMAT_SHARES, MIXES, FramePlan, exposure_seeds,
                                     night_times, plan_night, simulate_exposure)
from survey_qa.simulate.profiles import effective_fwhm
from survey_qa.simulate.psf import (atmosphere_profile, drift_path, motion_kernel,
                                    psf_ellipticity)
from survey_qa.simulate.render import render_detector
from survey_qa.simulate.sequence import Pointing, Scene, Sequence, plan_sequence
from survey_qa.simulate.sky import sky_nodes
from survey_qa.simulate.spec import (BACKGROUND_KINDS, CONFOUNDERS, DOMAINS, FILE_FORMATS,
                                     HEADER_STYLES, PSF_PROFILES, SENSITIVE_KEYS, TRAIL_KINDS,
                                     WIDE, WIDE_CONFOUNDERS, ExposureSpec, SimDetector,
                                     WideDomain, detector_hdu, detector_id)
from survey_qa.simulate.truth import (LIMITS, MASK_EXTINCTION_MAG, MASK_LIGHT_FRACTION,
                                      Limits, exposure_class, truth_class, truth_records)

__all__ = [
    "BACKGROUND_KINDS", "CAMERA_CONFOUNDERS", "CONFOUNDERS", "DOMAINS", "FILE_FORMATS",
    "FORMAT_SHARES", "HEADER_STYLES", "LIMITS", "MASK_EXTINCTION_MAG", "MASK_LIGHT_FRACTION",
    "MIXES", "PSF_PROFILES", "SENSITIVE_KEYS", "TRAIL_KINDS", "WIDE", "WIDE_CONFOUNDERS",
    "ExposureSpec", "FramePlan", "Limits", "Pointing", "Scene", "Sequence", "SimDetector",
    "WideDomain",
    "atmosphere_profile", "build_hdulist", "camera_of", "detector_hdu", "detector_header",
    "detector_id", "draw_spec", "drift_path", "effective_fwhm", "exposure_class",
    "exposure_header", "exposure_seeds", "illumination", "mask_hdulist", "motion_kernel",
    "night_times", "plan_night", "plan_sequence", "psf_ellipticity", "raw_frame", "raw_shape",
    "render_detector", "simulate_exposure", "sky_nodes", "truth_class", "truth_records",
]
