"""Star profile models and their joint least-squares fit (used by :mod:`.psf`).

Two models, both integrated over pixels and evaluated for many stars at once:

**Elliptical Moffat** (8 parameters per star)::

    I(d) = F (beta - 1) sqrt(det C) / pi * (1 + d^T C d)^(-beta) + B

with ``d`` the offset from the centre (x0, y0), ``C = L L^T`` the shape matrix through its
Cholesky factor ``L = [[exp(l11), 0], [l21, exp(l22)]]`` (round stars are then no
singular case) and ``beta = 1 + exp(eta)``. Parameters: x0, y0, F, B, l11, l22, l21, eta.

**Trailed Moffat** (6 per star + 4 shared): a round Moffat (``l11 = l22 = ln(1/alpha)``,
``l21 = 0``) convolved with an image-motion kernel that is the same for every star of
the detector: along the segment ``t (Lx, Ly)``, ``t`` in [-1/2, 1/2], ``K`` points at the
midpoints of equal sub-segments weighted ``(1 - m) / K`` each (a uniform drift; their
spacing is kept below 0.95 sigma of the PSF core, where the ripple is negligible), and the
two ends weighted ``m f`` and ``m (1 - f)``.
``m = 0`` is a uniform linear drift, ``m = 1`` a jump between two positions (doubled
stars), in between a periodic error (time piling up at the turning points). Shared
parameters: Lx, Ly, logit m, logit f. The extent of the motion is ``hypot(Lx, Ly)``.

Pixel integration: the model is averaged over ``n x n`` sub-pixel points; the variance
``1 / (12 n^2)`` that this midpoint rule leaves out of the pixel box is removed from the
fitted sizes afterwards (:func:`moffat_shape`).

All stars are fitted together by one ``scipy.optimize.least_squares`` call whose sparse
Jacobian is block diagonal (a star's parameters touch only its own pixels) plus a few
dense columns for the shared parameters.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import optimize, sparse

N_PARAMS = 8
"""Parameters of the elliptical Moffat per star."""

N_ROUND = 6
"""Parameters of the round Moffat per star in the trailed model: x0, y0, F, B, ln(1/alpha), eta."""

N_SHARED = 4
"""Shared parameters of the trailed model: Lx, Ly, logit m, logit f."""

SIGMA_PER_FWHM = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))

BAD_RESIDUAL = 1e12
"""Stands in for a non-finite residual of a trial step, so that the step is rejected."""


def sample_grid(half: int, n_sub: int, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel sample offsets from a stamp centre, each of shape (pixels, n_sub**2).

    Pixels are ordered row-major over a ``(2 half + 1)`` square stamp; pixel centres are
    at integer offsets. :func:`moffat_model` computes in the grid's ``dtype`` (float32
    halves its time; a fit's steps need no more than float32's 7 digits).
    """
    u = np.arange(-half, half + 1, dtype=float)
    s = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    gy, gx = np.meshgrid(u, u, indexing="ij")
    sy, sx = np.meshgrid(s, s, indexing="ij")
    return ((gx.reshape(-1, 1) + sx.reshape(1, -1)).astype(dtype),
            (gy.reshape(-1, 1) + sy.reshape(1, -1)).astype(dtype))


def moffat_model(p: np.ndarray, gx: np.ndarray, gy: np.ndarray,
                 with_jacobian: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Pixel-averaged elliptical Moffat profiles and their Jacobians, for many stars.

    Parameters
    ----------
    p
        (N, 8) parameters (module notes).
    gx, gy
        (pixels, samples) sub-pixel offsets from the stamp centre (:func:`sample_grid`).
    with_jacobian
        Also return d(model)/d(p).

    Returns
    -------
    model, jacobian
        (N, pixels) and (N, pixels, 8) (or None).
    """
    p = p.astype(gx.dtype, copy=False)  # compute in the grid's precision
    x0, y0, flux, bg = (p[:, k, None, None] for k in range(4))
    a, b, c = np.exp(p[:, 4, None, None]), np.exp(p[:, 5, None, None]), p[:, 6, None, None]
    bm1 = np.exp(p[:, 7, None, None])
    beta = 1.0 + bm1
    dx = gx[None] - x0
    dy = gy[None] - y0
    u = a * dx
    u += c * dy
    v = b * dy
    opq = u * u
    opq += v * v
    opq += 1.0  # 1 + q, q = d^T C d
    lg = np.log(opq)
    f = np.multiply(lg, -beta)
    np.exp(f, out=f)  # (1 + q)^-beta
    k_norm = bm1 * a * b / math.pi
    f *= flux * k_norm
    avg = np.full(gx.shape[1], 1.0 / gx.shape[1], dtype=f.dtype)  # mean over samples
    mean_f = f @ avg
    model = mean_f + bg[:, :, 0]
    if not with_jacobian:
        return model, None
    g = f / opq
    g *= -beta  # d f / d q
    gu, gv = g * u, g * v
    a2, b2, c2 = a[:, :, 0], b[:, :, 0], c[:, :, 0]
    mean_gu = gu @ avg
    jac = np.empty(model.shape + (N_PARAMS,), dtype=model.dtype)
    jac[..., 0] = -2.0 * a2 * mean_gu
    jac[..., 1] = -2.0 * (c2 * mean_gu + b2 * (gv @ avg))
    jac[..., 2] = mean_f / flux[:, :, 0] if np.all(flux != 0) else ((k_norm * np.exp(
        -beta * lg)) @ avg)
    jac[..., 3] = 1.0
    jac[..., 4] = mean_f + 2.0 * a2 * ((gu * dx) @ avg)
    jac[..., 5] = mean_f + 2.0 * b2 * ((gv * dy) @ avg)
    jac[..., 6] = 2.0 * ((gu * dy) @ avg)
    jac[..., 7] = mean_f - bm1[:, :, 0] * ((f * lg) @ avg)
    return model, jac


def sigmoid(z: float) -> float:
    """The logistic function, without overflow for any finite ``z``."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def line_points(n_line: int) -> np.ndarray:
    """Positions along the motion segment, in units of its length: ``n_line`` midpoints
    of equal sub-segments (the uniform part), then the two ends."""
    mid = (np.arange(n_line) + 0.5) / n_line - 0.5
    return np.concatenate([mid, [-0.5, 0.5]])


def line_weights(shared: np.ndarray, n_line: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights of the :func:`line_points` and their derivatives by logit m and logit f."""
    m, f = sigmoid(shared[2]), sigmoid(shared[3])
    uniform = np.concatenate([np.full(n_line, 1.0 / n_line), [0.0, 0.0]])
    ends = np.zeros(n_line + 2)
    ends[-2], ends[-1] = f, 1.0 - f
    w = (1.0 - m) * uniform + m * ends
    dw_dm = m * (1.0 - m) * (ends - uniform)
    dw_df = np.zeros(n_line + 2)
    dw_df[-2], dw_df[-1] = m * f * (1 - f), -m * f * (1 - f)
    return w, dw_dm, dw_df


def round_moffat(p: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round Moffat star parts (no background) and their Jacobians at sample points.

    Parameters
    ----------
    p
        (N, 6): x0, y0, F, B, ln(1/alpha), eta (B is not used here).
    dx, dy
        (N, pixels, samples) offsets of the sample points from each star's centre.

    Returns
    -------
    f, jac
        (N, pixels, samples) profile values and (N, pixels, samples, 6) derivatives by the
        six parameters (the B column is zero).
    """
    w2 = np.exp(2.0 * p[:, 4, None, None])
    bm1 = np.exp(p[:, 5, None, None])
    beta = 1.0 + bm1
    q = w2 * (dx * dx + dy * dy)
    lg = np.log1p(q)
    core = np.exp(-beta * lg)
    k_norm = bm1 * w2 / math.pi
    f = (p[:, 2, None, None] * k_norm) * core
    g = -beta * f / (1.0 + q)  # d f / d q
    jac = np.zeros(f.shape + (N_ROUND,), dtype=f.dtype)
    jac[..., 0] = g * (-2.0 * w2 * dx)
    jac[..., 1] = g * (-2.0 * w2 * dy)
    jac[..., 2] = k_norm * core
    jac[..., 4] = 2.0 * f + 2.0 * g * q
    jac[..., 5] = f * (1.0 - bm1 * lg)
    return f, jac


def trailed_model(p: np.ndarray, shared: np.ndarray, gx: np.ndarray, gy: np.ndarray,
                  n_line: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round Moffats convolved with a shared motion kernel, and their Jacobians.

    Parameters
    ----------
    p
        (N, 6): x0, y0, F, B, ln(1/alpha), eta.
    shared
        (4,): Lx, Ly (pixels), logit m, logit f.
    gx, gy
        Sub-pixel sample offsets (:func:`sample_grid`).
    n_line
        Points along the motion segment.

    Returns
    -------
    model, jac_local, jac_shared
        (N, pixels), (N, pixels, 6), (N, pixels, 4).
    """
    n = p.shape[0]
    dtype = gx.dtype  # the grid's precision, as in moffat_model
    p = p.astype(dtype, copy=False)
    t = line_points(n_line)
    w, dw_dm, dw_df = line_weights(shared, n_line)
    star = np.zeros((n, gx.shape[0]), dtype)
    jac_local = np.zeros((n, gx.shape[0], N_ROUND), dtype)
    jac_shared = np.zeros((n, gx.shape[0], N_SHARED), dtype)
    bx, by = gx[None] - p[:, 0, None, None], gy[None] - p[:, 1, None, None]
    avg = np.full(gx.shape[1], 1.0 / gx.shape[1], dtype)
    for k in range(len(t)):
        if w[k] < 1e-9 and abs(dw_dm[k]) < 1e-9:
            continue  # an end point while the kernel is uniform (m ~ 0)
        fk, jk = round_moffat(p, bx - float(t[k] * shared[0]), by - float(t[k] * shared[1]))
        fk, jk = fk @ avg, np.swapaxes(jk, 2, 3) @ avg  # means over the samples
        star += float(w[k]) * fk
        jac_local += float(w[k]) * jk
        jac_shared[..., 0] += float(w[k] * t[k]) * jk[..., 0]
        jac_shared[..., 1] += float(w[k] * t[k]) * jk[..., 1]
        jac_shared[..., 2] += float(dw_dm[k]) * fk
        jac_shared[..., 3] += float(dw_df[k]) * fk
    jac_local[..., 3] = 1.0
    return star + p[:, 3, None], jac_local, jac_shared


def fit_joint(evaluate, stamps: np.ndarray, weights: np.ndarray, p0: np.ndarray,
              shared0: np.ndarray | None = None, max_nfev: int = 60, ftol: float = 1e-6
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Least-squares fit of many stars at once, with optional shared parameters.

    Parameters
    ----------
    evaluate
        ``evaluate(p, shared) -> (model, jac_local, jac_shared)`` with shapes (N, pixels),
        (N, pixels, P) and (N, pixels, S) (``jac_shared`` None when S = 0).
    stamps
        (N, pixels) data, on the scale of the model.
    weights
        (N, pixels) inverse noise; 0 for pixels that must not count.
    p0
        (N, P) first guess per star.
    shared0
        (S,) first guess of the shared parameters, or None.
    max_nfev
        Most function evaluations.
    ftol
        Stop when the cost changes by less than this fraction.

    Returns
    -------
    p, shared, chi2
        Fitted per-star (N, P) and shared (S,) parameters (None without), and each star's
        chi-square per degree of freedom.
    """
    n, npar = p0.shape
    npix = stamps.shape[1]
    nsh = 0 if shared0 is None else len(shared0)
    per_row = npar + nsh
    cols = np.empty((n, npix, per_row), dtype=np.int64)
    cols[..., :npar] = (np.arange(n) * npar)[:, None, None] + np.arange(npar)
    cols[..., npar:] = n * npar + np.arange(nsh)
    cols = cols.ravel()
    indptr = np.arange(0, n * npix * per_row + 1, per_row)
    cache: dict = {}

    def split(x):
        return x[:n * npar].reshape(n, npar), (x[n * npar:] if nsh else None)

    def run(x):
        if cache.get("x") is None or not np.array_equal(cache["x"], x):
            cache["x"] = x.copy()
            # A wild trial step may overflow: its residuals become huge (and the step is
            # rejected) rather than non-finite.
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                cache["out"] = evaluate(*split(x))
        return cache["out"]

    def residuals(x):
        r = ((run(x)[0] - stamps) * weights).ravel()
        return np.nan_to_num(r, nan=BAD_RESIDUAL, posinf=BAD_RESIDUAL, neginf=-BAD_RESIDUAL)

    def jacobian(x):
        _, jl, js = run(x)
        vals = np.empty((n, npix, per_row))
        vals[..., :npar] = jl * weights[:, :, None]
        if nsh:
            vals[..., npar:] = js * weights[:, :, None]
        np.nan_to_num(vals, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        return sparse.csr_matrix((vals.ravel(), cols, indptr), shape=(n * npix, n * npar + nsh))

    x0 = p0.ravel() if not nsh else np.concatenate([p0.ravel(), shared0])
    res = optimize.least_squares(residuals, x0, jac=jacobian, method="trf", tr_solver="lsmr",
                                 x_scale="jac", ftol=ftol, xtol=1e-6, max_nfev=max_nfev,
                                 tr_options={"atol": 1e-4, "btol": 1e-4})
    p, shared = split(res.x)
    r = res.fun.reshape(n, npix)
    dof = np.maximum((weights > 0).sum(axis=1) - npar, 1)
    return p, shared, (r ** 2).sum(axis=1) / dof


def fwhm_factor(beta: np.ndarray | float) -> np.ndarray:
    """FWHM over alpha of a Moffat: ``2 sqrt(2^(1/beta) - 1)``."""
    return 2.0 * np.sqrt(2.0 ** (1.0 / np.asarray(beta, float)) - 1.0)


def remove_pixel_variance(fwhm_px: np.ndarray, n_sub: int) -> np.ndarray:
    """Remove in quadrature the pixel variance ``1 / (12 n_sub^2)`` a fit left in."""
    missing = (1.0 / (12.0 * n_sub ** 2)) / SIGMA_PER_FWHM ** 2
    return np.sqrt(np.clip(np.asarray(fwhm_px) ** 2 - missing, 1e-6, None))


def moffat_shape(p: np.ndarray, n_sub: int = 1) -> dict[str, np.ndarray]:
    """Intrinsic (pre-pixel) sizes and orientation of fitted elliptical Moffats.

    Parameters
    ----------
    p
        (N, 8) fitted parameters.
    n_sub
        Sub-pixel points per axis used in the fit.

    Returns
    -------
    dict
        ``fwhm_major_px``, ``fwhm_minor_px``, ``ellipticity`` (1 - b/a), ``theta_deg``
        (major axis, [0, 180) from +x toward +y), ``beta``.
    """
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        a, b, c = np.exp(p[:, 4]), np.exp(p[:, 5]), p[:, 6]
        beta = 1.0 + np.exp(p[:, 7])
        c11, c12, c22 = a * a, a * c, c * c + b * b
        mean, diff = 0.5 * (c11 + c22), np.hypot(0.5 * (c11 - c22), c12)
        k = fwhm_factor(beta)
        fmaj = remove_pixel_variance(k / np.sqrt(mean - diff), n_sub)
        fmin = remove_pixel_variance(k / np.sqrt(mean + diff), n_sub)
        ellipticity = 1.0 - fmin / fmaj
        theta = np.degrees(0.5 * np.arctan2(-2.0 * c12, c22 - c11)) % 180.0
    return {"fwhm_major_px": fmaj, "fwhm_minor_px": fmin, "ellipticity": ellipticity,
            "theta_deg": theta, "beta": beta}


def shape_params(fwhm_major_px: np.ndarray, fwhm_minor_px: np.ndarray, theta_deg: np.ndarray,
                 beta: np.ndarray | float) -> np.ndarray:
    """(l11, l22, l21) of Moffats with the given axes FWHM and major-axis angle."""
    k = fwhm_factor(beta)
    amaj, amin = np.asarray(fwhm_major_px) / k, np.asarray(fwhm_minor_px) / k
    t = np.radians(theta_deg)
    cs, sn = np.cos(t), np.sin(t)
    c11 = cs ** 2 / amaj ** 2 + sn ** 2 / amin ** 2
    c22 = sn ** 2 / amaj ** 2 + cs ** 2 / amin ** 2
    c12 = cs * sn * (1 / amaj ** 2 - 1 / amin ** 2)
    l11 = np.sqrt(c11)
    l21 = c12 / l11
    l22 = np.sqrt(np.maximum(c22 - l21 ** 2, 1e-12))
    return np.column_stack([np.log(l11), np.log(l22), l21])


def pixel_convolved_fwhm(fwhm_px: float, beta: float) -> float:
    """FWHM (pixels) of a round Moffat after convolution with the square pixel.

    The profile is what the pixels record (the "effective PSF" that PSFEx models and
    that SourceExtractor's ``FWHM_IMAGE`` measures): the Moffat of FWHM ``fwhm_px`` is
    sampled finely (at least 20 points per FWHM, 8 per pixel), averaged over a 1 x 1 pixel box, and
    its full width at half maximum is read along the x axis through the peak (linear
    interpolation between samples). A point source gives 1 px, the width of the pixel.
    """
    if not (fwhm_px > 0 and beta > 1):
        return math.nan
    k = 2 * int(np.clip(math.ceil(20.0 / fwhm_px), 4, 30))  # samples per pixel, even
    h = 1.0 / k
    n = int(math.ceil((2.0 * fwhm_px + 1.5) / h))
    u = np.arange(-n, n + 1) * h
    alpha2 = (fwhm_px / float(fwhm_factor(beta))) ** 2
    # The pixel box as a symmetric k + 1 tap trapezoid spanning exactly 1 px.
    kernel = np.ones(k + 1)
    kernel[[0, -1]] = 0.5
    kernel /= k
    rows = u[n - k // 2:n + k // 2 + 1]  # the box along y around the peak's row
    prof = (1.0 + (rows[:, None] ** 2 + u[None, :] ** 2) / alpha2) ** -beta
    cut = np.convolve(kernel @ prof, kernel, mode="same")
    cut /= cut.max()
    above = np.flatnonzero(cut >= 0.5)
    lo, hi = above[0], above[-1]
    # Interpolated half-maximum crossings on either side.
    x_lo = lo - (cut[lo] - 0.5) / (cut[lo] - cut[lo - 1])
    x_hi = hi + (cut[hi] - 0.5) / (cut[hi] - cut[hi + 1])
    return float((x_hi - x_lo) * h)


def seeing_fwhm_from_pixel_convolved(image_fwhm_px: float, beta: float) -> float:
    """The Moffat FWHM (pixels, before the pixel) whose pixel-convolved FWHM is
    ``image_fwhm_px`` (inverse of :func:`pixel_convolved_fwhm`); NaN when none is."""
    from scipy.optimize import brentq

    if not (image_fwhm_px > 1.0 and beta > 1):
        return math.nan if not image_fwhm_px > 0 else 0.0
    f = lambda w: pixel_convolved_fwhm(w, beta) - image_fwhm_px  # noqa: E731
    lo = 1e-2
    if f(lo) >= 0:
        return lo
    return float(brentq(f, lo, image_fwhm_px, xtol=1e-4))


def fit_independent(evaluate, stamps: np.ndarray, weights: np.ndarray, p0: np.ndarray,
                    max_iter: int = 15, ftol: float = 1e-4, lam0: float = 1e-3
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Levenberg-Marquardt fits of many stars whose parameters are independent.

    Without shared parameters the normal equations are block diagonal: each star's
    ``(P, P)`` system is solved directly (batched ``numpy.linalg.solve``), with its own
    Marquardt damping ``lam diag(J^T J)``, instead of one large sparse least-squares
    problem. One model and Jacobian evaluation per iteration.

    Parameters
    ----------
    evaluate
        ``evaluate(p) -> (model, jac)`` with shapes (N, pixels) and (N, pixels, P).
    stamps, weights
        (N, pixels) data and inverse noise (0: pixel not used).
    p0
        (N, P) first guess.
    max_iter
        Most iterations (model evaluations after the first).
    ftol
        A star stops when an accepted step lowers its cost by less than this fraction.
    lam0
        First damping factor.

    Returns
    -------
    p, chi2
        Fitted (N, P) parameters and each star's chi-square per degree of freedom.
    """
    n, npar = p0.shape

    def cost_of(model):
        r = (model - stamps) * weights
        c = np.einsum("np,np->n", r, r)
        return r, np.where(np.isfinite(c), c, np.inf)

    p = p0.copy()
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        model, jac = evaluate(p)
    r, cost = cost_of(model)
    lam = np.full(n, lam0)
    active = np.isfinite(cost)
    eye = np.eye(npar)
    for _ in range(max_iter):
        if not active.any():
            break
        jw = np.nan_to_num(jac * weights[:, :, None], nan=0.0, posinf=0.0, neginf=0.0)
        jt = jw.transpose(0, 2, 1)
        a = jt @ jw  # batched J^T J (BLAS; einsum is several times slower here)
        g = (jt @ np.nan_to_num(r)[:, :, None])[..., 0]
        diag = np.maximum(np.einsum("nii->ni", a), 1e-12)
        damped = a + lam[:, None, None] * diag[:, :, None] * eye
        try:
            step = -np.linalg.solve(damped, g[:, :, None])[..., 0]
        except np.linalg.LinAlgError:
            step = -g / (diag * (1.0 + lam[:, None]))
        step[~active] = 0.0
        trial = p + step
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            model_t, jac_t = evaluate(trial)
        r_t, cost_t = cost_of(model_t)
        better = active & (cost_t < cost)
        gain = np.where(better, (cost - cost_t) / np.maximum(cost, 1e-300), 0.0)
        p[better], model[better], jac[better], r[better] = (
            trial[better], model_t[better], jac_t[better], r_t[better])
        cost = np.where(better, cost_t, cost)
        lam = np.where(better, np.maximum(lam / 3.0, 1e-7), np.minimum(lam * 4.0, 1e7))
        active &= ~(better & (gain < ftol)) & (lam < 1e7)
    dof = np.maximum((weights > 0).sum(axis=1) - npar, 1)
    return p, cost / dof
