"""The smooth sky of a detector, built on a coarse node grid.

Smooth sky ``S = B * t + E * (1 - t) + L`` where ``B`` is the undisturbed sky (with a weak
natural gradient), ``t = 10**(-0.4 * K)`` the transmission of patchy cloud with extinction
map ``K`` (mag), ``E`` the light scattered by the clouds and ``L`` the light added by a
background defect (gradient, scattered light, glow). The node fields are upsampled to
full resolution with Catmull-Rom interpolation (:func:`upsample`). A defect is scaled so
that the worst quarter of the detectors of the exposure reaches the spec's
``background_strength``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse

from survey_qa.simulate.spec import ExposureSpec, detector_offset, focal_plane_size


MAX_DEFECT_LIGHT = 50.0  # most defect light, in units of the sky level


def grid_step(n: int) -> int:
    return int(max(4, min(32, math.ceil(n / 128))))


def nodes(n: int, step: int) -> np.ndarray:
    return np.arange(int(math.ceil((n - 1) / step)) + 1) * float(step)


def _interp_matrix(n: int, m: int, step: float) -> sparse.csr_matrix:
    """Catmull-Rom interpolation weights from m nodes (spacing ``step``) to n pixels."""
    t = np.arange(n) / step
    i = np.floor(t).astype(int)
    f = t - i
    weights = (-0.5 * f**3 + f**2 - 0.5 * f, 1.5 * f**3 - 2.5 * f**2 + 1.0,
               -1.5 * f**3 + 2.0 * f**2 + 0.5 * f, 0.5 * f**3 - 0.5 * f**2)
    rows = np.tile(np.arange(n), 4)
    cols = np.concatenate([np.clip(i + d, 0, m - 1) for d in (-1, 0, 1, 2)])
    data = np.concatenate(weights).astype(np.float32)
    return sparse.csr_matrix((data, (rows, cols)), shape=(n, m))


def upsample(coarse: np.ndarray, step: float, ny: int, nx: int) -> np.ndarray:
    """Full-resolution float32 image from node values (nodes at 0, step, 2 step...)."""
    my, mx = coarse.shape
    wy = _interp_matrix(ny, my, step)
    wx = _interp_matrix(nx, mx, step)
    tmp = np.asarray(wy @ coarse.astype(np.float32))      # (ny, mx)
    return np.ascontiguousarray(np.asarray(wx @ tmp.T).T, dtype=np.float32)


def random_field(rng: np.random.Generator, ny: int, nx: int, slope: float) -> np.ndarray:
    """Gaussian random field with power spectrum ~ k**-slope, zero mean, unit std."""
    py, px = 2 * ny, 2 * nx  # padded: no periodic wrap inside the returned part
    ky = np.fft.fftfreq(py)[:, None]
    kx = np.fft.rfftfreq(px)[None, :]
    k = np.hypot(ky, kx)
    k[0, 0] = np.inf
    amp = k ** (-slope / 2.0)
    noise = rng.standard_normal((py, px // 2 + 1)) + 1j * rng.standard_normal((py, px // 2 + 1))
    f = np.fft.irfft2(noise * amp, s=(py, px))[:ny, :nx]
    f -= f.mean()
    sd = f.std()
    return f / sd if sd > 0 else f


def sample_field(field_fp: np.ndarray, step_fp: float, xs: np.ndarray,
                  ys: np.ndarray) -> np.ndarray:
    """Values of a focal-plane node field at focal-plane positions (cubic spline)."""
    return ndimage.map_coordinates(field_fp, [ys / step_fp, xs / step_fp], order=3,
                                   mode="nearest")


@dataclass
class SkyNodes:
    """Coarse node fields of one detector (electrons, mag), see the module docstring."""

    step: float
    base: np.ndarray       # undisturbed sky B
    light: np.ndarray      # defect light L
    patchy_mag: np.ndarray  # patchy extinction K
    emission: float        # cloud light level E (electrons)

    def smooth(self) -> np.ndarray:
        t = 10.0 ** (-0.4 * self.patchy_mag)
        return self.base * t + self.emission * (1.0 - t) + self.light


def _unit_patterns(spec: ExposureSpec, index: int, gx: np.ndarray, gy: np.ndarray,
                   cloud_fp: tuple[np.ndarray, float] | None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Natural gradient (in [-0.5, 0.5]), defect light (max ~1) and cloud (>= 0) patterns.

    ``gx``, ``gy`` are focal-plane coordinates of the detector's nodes (2-D arrays);
    ``cloud_fp`` is the focal-plane cloud field of :func:`_cloud_field`, or None.
    """
    fx, fy = focal_plane_size(spec)
    diag = math.hypot(fx, fy)
    cx, cy = (fx - 1) / 2.0, (fy - 1) / 2.0
    r = np.random.default_rng([spec.field_seed, 201])
    a = r.uniform(0, 2 * np.pi)
    natural = ((gx - cx) * math.cos(a) + (gy - cy) * math.sin(a)) / diag

    light = np.zeros_like(gx)
    rl = np.random.default_rng([spec.field_seed, 202])
    kind = spec.background_kind
    if kind == "gradient":
        a = rl.uniform(0, 2 * np.pi)
        power = rl.uniform(1.0, 2.5)
        proj = ((gx - cx) * math.cos(a) + (gy - cy) * math.sin(a)) / diag + 0.5
        light = np.clip(proj, 0.0, 1.0) ** power
    elif kind == "scattered":
        shape = str(rl.choice(["lobe", "ring", "band"]))
        if shape == "lobe":  # off-axis bright source just outside the field
            ang = rl.uniform(0, 2 * np.pi)
            dist = rl.uniform(0.4, 0.9) * diag
            x0, y0 = cx + dist * math.cos(ang), cy + dist * math.sin(ang)
            w = rl.uniform(0.3, 0.7) * diag
            light = np.exp(-((gx - x0) ** 2 + (gy - y0) ** 2) / (2 * w * w))
        elif shape == "ring":  # out-of-focus ghost of a bright star
            x0, y0 = cx + rl.uniform(-0.3, 0.3) * fx, cy + rl.uniform(-0.3, 0.3) * fy
            rad = rl.uniform(0.15, 0.4) * min(fx, fy)
            w = rl.uniform(0.04, 0.1) * min(fx, fy)
            d = np.hypot(gx - x0, gy - y0)
            light = np.exp(-((d - rad) ** 2) / (2 * w * w)) + 0.3 * np.exp(-d**2 / (2 * rad**2))
        else:  # a band of reflected light across the field
            ang = rl.uniform(0, np.pi)
            off = rl.uniform(-0.3, 0.3) * diag
            w = rl.uniform(0.05, 0.2) * diag
            d = (gx - cx) * math.sin(ang) - (gy - cy) * math.cos(ang) - off
            light = np.exp(-d**2 / (2 * w * w))
    elif kind == "glow":  # amplifier glow, the same corner or edge on every detector
        x0, y0 = detector_offset(spec, index)
        lx, ly = gx - x0, gy - y0
        lam = rl.uniform(0.04, 0.2) * max(spec.nx, spec.ny)
        corner = int(rl.integers(0, 6))
        if corner < 4:
            qx = 0.0 if corner % 2 == 0 else spec.nx - 1.0
            qy = 0.0 if corner < 2 else spec.ny - 1.0
            light = np.exp(-np.hypot(lx - qx, ly - qy) / lam)
        elif corner == 4:
            light = np.exp(-lx / lam)
        else:
            light = np.exp(-(spec.ny - 1.0 - ly) / lam)

    cloud = np.zeros_like(gx) if cloud_fp is None else sample_field(*cloud_fp, gx, gy)
    return natural, light, cloud


def _cloud_field(spec: ExposureSpec) -> tuple[np.ndarray, float]:
    """Patchy cloud pattern (>= 0, clear gaps) on a focal-plane node grid."""
    fx, fy = focal_plane_size(spec)
    step = float(grid_step(max(spec.nx, spec.ny)))
    rc = np.random.default_rng([spec.field_seed, 203])
    f = random_field(rc, len(nodes(fy, step)), len(nodes(fx, step)), rc.uniform(3.0, 4.0))
    thr = np.quantile(f, rc.uniform(0.2, 0.6))
    return np.clip(f - thr, 0.0, None), step


def _detector_nodes(spec: ExposureSpec, index: int) -> tuple[float, np.ndarray, np.ndarray]:
    step = float(grid_step(max(spec.nx, spec.ny)))
    x0, y0 = detector_offset(spec, index)
    gy, gx = np.meshgrid(nodes(spec.ny, step) + y0, nodes(spec.nx, step) + x0, indexing="ij")
    return step, gx, gy


def spread(values: np.ndarray) -> float:
    p1, p99 = np.percentile(values, [1.0, 99.0])
    return float(p99 - p1)


def nonuniformity(values: np.ndarray) -> float:
    med = float(np.median(values))
    return spread(values) / med if med > 0 else math.inf


def _quarter_value(values: list[float]) -> float:
    """The value reached by the worst quarter of detectors (ceil(n/4)-th largest)."""
    return sorted(values, reverse=True)[math.ceil(len(values) / 4) - 1]


def sky_nodes(spec: ExposureSpec, index: int) -> SkyNodes:
    """Coarse smooth-sky fields of one detector, scaled to the spec's targets.

    The defect amplitude is chosen so that the worst quarter of the detectors reaches
    ``background_strength`` (u for light defects, k for cloud), computed over all
    detectors of the exposure.
    """
    sky = spec.sky_e
    cloud_fp = _cloud_field(spec) if spec.cloud_extinction_mag > 0 else None
    per_det = []
    for i in range(spec.n_detectors):
        step, gx, gy = _detector_nodes(spec, i)
        per_det.append((step, *_unit_patterns(spec, i, gx, gy, cloud_fp)))

    cloud_amp = 0.0
    if spec.cloud_extinction_mag > 0:
        spreads = [spread(c) for *_, c in per_det]
        ref = _quarter_value(spreads)
        cloud_amp = spec.cloud_extinction_mag / ref if ref > 0 else 0.0
    emission = spec.cloud_emission * sky

    def build(i: int, amp: float) -> SkyNodes:
        step, nat, light, cloud = per_det[i]
        return SkyNodes(step, sky * (1.0 + spec.natural_gradient * nat), amp * sky * light,
                    cloud_amp * cloud, emission)

    amp = 0.0
    if spec.background_kind in ("gradient", "scattered", "glow") and spec.background_strength > 0:
        target = spec.background_strength
        fixed = np.stack([build(i, 0.0).smooth().ravel() for i in range(spec.n_detectors)])
        light = np.stack([sky * d[2].ravel() for d in per_det])

        def quarter_u(a: float) -> float:  # u reached by the worst quarter of detectors
            p1, p50, p99 = np.percentile(fixed + a * light, [1.0, 50.0, 99.0], axis=1)
            return _quarter_value(list((p99 - p1) / p50))
        lo, hi = 0.0, 1.0
        while quarter_u(hi) < target and hi < MAX_DEFECT_LIGHT:
            hi = min(2.0 * hi, MAX_DEFECT_LIGHT)
        if quarter_u(hi) < target:  # the pattern cannot reach the target: strongest allowed
            lo = hi
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if quarter_u(mid) < target else (lo, mid)
        amp = hi
    return build(index, amp)
