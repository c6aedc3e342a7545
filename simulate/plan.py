"""Night plans: what each exposure of a simulated night is, and its random generators.

:func:`plan_night` decides the class, file format and start time of every exposure;
:func:`simulate_exposure` draws a planned exposure's spec and renders its detectors,
deterministically from the night's seed, the night and the exposure's index.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np

from survey_qa.pipeline.schema import CLASSES
from survey_qa.simulate.draw import draw_spec
from survey_qa.simulate.render import render_detector
from survey_qa.simulate.spec import DOMAINS, ExposureSpec, SimDetector


@dataclass
class FramePlan:
    """What one exposure of a simulated night should be."""

    index: int
    exposure: str
    quality_class: str
    ambiguous: bool
    file_format: str
    date_obs: str
    expnum: int
    size_px: int
    n_detectors: int | None = None
    overrides: dict = field(default_factory=dict)  # extra keyword arguments of draw_spec

    @property
    def filename(self) -> str:
        ext = {"fits": ".fits", "fits.fz": ".fits.fz", "fits.gz": ".fits.gz",
               "mosaic": ".fits", "mosaic.fz": ".fits.fz"}[self.file_format]
        return self.exposure + ext


MIXES = {
    "balanced": {c: 1.0 for c in CLASSES},
    "realistic": {"good": 0.55, "bad_seeing": 0.15, "bad_tracking": 0.1,
                  "very_bad_tracking": 0.05, "background_issues": 0.15},
}
FORMAT_SHARES = {"fits": 0.6, "fits.fz": 0.12, "fits.gz": 0.12, "mosaic": 0.1, "mosaic.fz": 0.06}


def night_times(night: str, n: int, rng: np.random.Generator) -> list[str]:
    """Increasing ISO UTC start times from 20:00 on the night's date to 05:30 next morning."""
    start = datetime.fromisoformat(night).replace(hour=20, tzinfo=timezone.utc)
    span_s = 9.5 * 3600.0
    slot = span_s / max(n, 1)
    out = []
    for i in range(n):
        t = start + timedelta(seconds=i * slot + rng.uniform(0.0, 0.5 * slot))
        out.append(t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}")
    return out


def plan_night(night: str, n_frames: int, *, seed: int = 0, mix: str = "balanced",
               ambiguous_fraction: float = 0.0, size_px: int = 4096,
               format_shares: dict | None = None, domain: str = "default"
               ) -> list[FramePlan]:
    """Composition of a simulated night: class, format and time of every exposure.

    ``balanced`` gives the five classes in equal shares (shuffled), ``realistic`` mostly
    good frames. A share ``ambiguous_fraction`` of the frames is drawn from the spec's gaps.
    Mosaics have detectors of ``size_px // 2``. ``domain`` (:data:`DOMAINS`) is passed to
    :func:`draw_spec`: in the ``wide`` domain ``size_px`` is the largest detector side and
    the night is taken with one to three instruments
    (:func:`~survey_qa.simulate.draw.camera_of`), each with its own detector shape,
    filters, raw layout and illumination pattern.
    """
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; expected one of {sorted(MIXES)}")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    if n_frames < 1:
        raise ValueError("n_frames must be at least 1")
    if not 0.0 <= ambiguous_fraction <= 1.0:
        raise ValueError("ambiguous_fraction must be in [0, 1]")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _night_number(night), 0]))
    shares = MIXES[mix]
    if mix == "balanced":
        classes = [CLASSES[i % len(CLASSES)] for i in range(n_frames)]
        rng.shuffle(classes)
    else:
        p = np.array(list(shares.values()))
        classes = [list(shares)[i] for i in rng.choice(len(shares), n_frames, p=p / p.sum())]
    fs = format_shares or FORMAT_SHARES
    fmts = list(fs)
    pf = np.array([fs[f] for f in fmts], dtype=float)
    formats = [fmts[i] for i in rng.choice(len(fmts), n_frames, p=pf / pf.sum())]
    ambiguous = rng.random(n_frames) < ambiguous_fraction
    times = night_times(night, n_frames, rng)
    stem = night.replace("-", "")
    plans = []
    cameras = _night_cameras(night, seed, n_frames) if domain == "wide" else None
    for i in range(n_frames):
        mosaic = formats[i].startswith("mosaic")
        over = {} if domain == "default" else {"domain": domain}
        if cameras is not None:
            over["camera_seed"] = cameras[i] + (1 if mosaic else 0)  # a mosaic camera
        plans.append(FramePlan(i, f"{stem}_{i + 1:04d}", classes[i], bool(ambiguous[i]),
                               formats[i], times[i], i + 1,
                               size_px // 2 if mosaic else size_px, overrides=over))
    return plans


def _night_cameras(night: str, seed: int, n_frames: int) -> list[int]:
    """Camera seed of every frame of a wide-domain night: one to three instruments (even
    seeds; a mosaic frame uses the seed after its camera's, a mosaic camera)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _night_number(night), 2]))
    n_cameras = int(rng.integers(1, 4))
    seeds = 2 * rng.integers(0, 2**30, n_cameras)
    return [int(seeds[k]) for k in rng.integers(0, n_cameras, n_frames)]


def _night_number(night: str) -> int:
    try:
        return int(datetime.fromisoformat(night).strftime("%Y%m%d"))
    except ValueError:
        raise ValueError(f"night must be YYYY-MM-DD, got {night!r}") from None


def exposure_seeds(night: str, seed: int, index: int, n_detectors: int
                   ) -> tuple[np.random.Generator, list[np.random.Generator]]:
    """Generators of one exposure: one for its spec, one per detector (deterministic)."""
    ss = np.random.SeedSequence([seed, _night_number(night), 1, index])
    children = ss.spawn(1 + n_detectors)
    return np.random.default_rng(children[0]), [np.random.default_rng(c) for c in children[1:]]


def simulate_exposure(plan: FramePlan, night: str, seed: int
                      ) -> tuple[ExposureSpec, list[SimDetector]]:
    """Draw the spec of a planned exposure and render all its detectors."""
    n_det_max = 8
    spec_rng, det_rngs = exposure_seeds(night, seed, plan.index, n_det_max)
    spec = draw_spec(spec_rng, plan.quality_class, exposure=plan.exposure,
                     size_px=plan.size_px, ambiguous=plan.ambiguous,
                     file_format=plan.file_format, n_detectors=plan.n_detectors,
                     date_obs=plan.date_obs, expnum=plan.expnum, **plan.overrides)
    return spec, [render_detector(spec, i, det_rngs[i]) for i in range(spec.n_detectors)]
