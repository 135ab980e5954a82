"""One time per cell for all genes: the shared clock of MODEL.md sections 3 and 5.

Parametrisation
---------------
All cells share a clock ``t`` in ``[0, 1]``. Gene ``g`` follows the kinetics of MODEL.md
section 1 in *clock units*: it sits at ``(0, 0)`` until its onset ``t0_g`` (any real number; a
negative onset means the gene was already on when the observed process began), is induced
for a length ``d_g`` and represses afterwards:

    (u_g(t), s_g(t)) = trajectory(max(t - t0_g, 0); alpha_g, beta_g, gamma_g, t_ = d_g)

Its parameters are the columns of ``theta`` (shape ``(6, n_genes)``), rows
``log alpha, log beta, log gamma, log d, log scaling, t0`` (:data:`THETA_ROWS`). This is
identifiable: a per-gene clock speed ``k_g`` would only rescale ``alpha, beta, gamma`` and
``d``, so it is absorbed into them, and a per-gene clock map ``gene time = k_g (t - t0_g)`` of a
per-gene fit becomes ``alpha k, beta k, gamma k, t_ / k, t0`` (:func:`fit_clock_maps`).
The shared clock itself is defined up to one affine map common to all genes; velofit fixes it
at initialisation (:func:`align_gene_fit`), where the initial clock spans ``[0, 1]``.

Data are standardised per gene (``x_u = Mu / std_u``, ``x_s = Ms / std_s``) and stored in gene
chunks of shape ``(n_chunks, n_cells, chunk)`` (padding genes have weight 0), so that every
pass over the data holds one chunk of cells x genes at a time and never a cells x grid x genes
array: the squared distances of all cells to all grid points are accumulated as
``||x - m||^2 = x^2 - 2 x m + m^2``, a matrix product over the genes of a chunk.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._host import aligned_empty, aligned_zeros, to_device
from .kinetics import KineticParams, trajectory

#: Meaning of the rows of ``theta``.
THETA_ROWS = ("log_alpha", "log_beta", "log_gamma", "log_d", "log_scaling", "t0")
#: Directions of ``theta`` moved in a full fit (every parameter).
FULL_DIRECTIONS = np.eye(6)
#: Directions moved when only the clock map of a per-gene fit is learned: ``log k`` (adds to
#: the log rates, subtracts from ``log d``) and ``t0``; the kinetic shape stays fixed.
ALIGN_DIRECTIONS = np.array(
    [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]
)


#: Storage type of the standardised moments (7 significant digits, below any measurement's
#: precision; half the memory of float64). Every computation upcasts one chunk to float64.
DATA_DTYPE = np.dtype(np.float32)


class SharedData(NamedTuple):
    """Standardised moments in gene chunks (build with :func:`prepare_data`).

    Attributes
    ----------
    xu, xs
        ``(n_chunks, n_cells, chunk)`` ``Mu / std_u`` and ``Ms / std_s``, stored as
        :data:`DATA_DTYPE`.
    w
        ``(n_chunks, n_cells, chunk)`` boolean: the cells each gene is fitted on (``False`` for
        padding); or ``(n_chunks, 1, chunk)`` when every gene is fitted on every cell (a
        per-gene mask, broadcast over the cells: :func:`upcast_chunk`).
    std_u, std_s
        ``(n_genes_padded,)`` per-gene standard deviations used to standardise (float64).
    n_gene
        ``(n_genes_padded,)`` weighted number of cells of each gene.
    n_cell
        ``(n_cells,)`` number of weighted observations of each cell (2 per gene: u and s).
    log_jac
        ``(n_cells,)`` ``sum_g w (log std_u + log std_s)``: turns densities of the
        standardised data into densities of ``Mu, Ms``.
    """

    xu: jnp.ndarray
    xs: jnp.ndarray
    w: jnp.ndarray
    std_u: jnp.ndarray
    std_s: jnp.ndarray
    n_gene: jnp.ndarray
    n_cell: jnp.ndarray
    log_jac: jnp.ndarray


def prepare_data(mu, ms, weights=None, std_u=None, std_s=None, chunk_size=None) -> SharedData:
    """Standardise and chunk moments, one gene chunk at a time (call under x64).

    No full-size float64 copy of the input is made: each chunk of columns is read, converted
    to float64, standardised and stored (:data:`DATA_DTYPE`).

    Parameters
    ----------
    mu, ms
        ``(n_cells, n_genes)`` unspliced and spliced moments (NumPy arrays, any float dtype).
    weights
        ``(n_cells, n_genes)`` boolean cells each gene is fitted on (default: all).
    std_u, std_s
        ``(n_genes,)`` scales (default: the standard deviations over the weighted cells).
    chunk_size
        Genes per chunk (default: all genes in one chunk).

    Returns
    -------
    :class:`SharedData`; genes beyond ``n_genes`` are padding.
    """
    n_cells, n_genes = mu.shape
    width = max(1, min(chunk_size or n_genes, n_genes))
    n_chunks = -(-n_genes // width)
    n_padded = n_chunks * width
    xu = aligned_zeros((n_chunks, n_cells, width), DATA_DTYPE)  # aligned: JAX uses them in place
    xs = aligned_zeros((n_chunks, n_cells, width), DATA_DTYPE)
    w = aligned_zeros((n_chunks, 1 if weights is None else n_cells, width), bool)
    scales = {"u": np.ones(n_padded), "s": np.ones(n_padded)}
    given = {"u": std_u, "s": std_s}
    for k in range(n_chunks):
        cols = slice(k * width, min((k + 1) * width, n_genes))
        m = cols.stop - cols.start
        wk = np.ones((1, m), bool) if weights is None else np.asarray(weights[:, cols]) > 0
        w[k, :, :m] = wk
        n = np.maximum(np.broadcast_to(wk, (n_cells, m)).sum(axis=0), 1)
        for key, source, target in (("u", mu, xu), ("s", ms, xs)):
            # C order whatever the reader returns: the sums below then round the same way for
            # in-memory, on-disk and sparse layers (bitwise the same scales).
            x = np.ascontiguousarray(source[:, cols], np.float64)
            if given[key] is None:
                mean = np.where(wk, x, 0.0).sum(axis=0) / n
                scale = np.sqrt(np.where(wk, (x - mean) ** 2, 0.0).sum(axis=0) / n)
            else:
                scale = np.asarray(given[key], np.float64)[cols]
            scale = np.where(scale > 0, scale, 1.0)
            scales[key][cols] = scale
            target[k, :, :m] = x / scale
    return _with_weights(xu, xs, w, scales["u"], scales["s"])


def _with_weights(xu, xs, w, std_u, std_s) -> SharedData:
    """Assemble :class:`SharedData` from chunked arrays (``w`` NumPy boolean, scales float64)."""
    n_cells = xu.shape[1]
    log_scale = (np.log(std_u) + np.log(std_s)).reshape(w.shape[0], w.shape[2])
    log_jac = np.zeros(n_cells)
    for k in range(w.shape[0]):  # chunk by chunk: no full-size float copy of the weights
        log_jac += w[k].astype(np.float64) @ log_scale[k]  # (a per-gene mask broadcasts)
    per_cell = n_cells // w.shape[1]  # cells each entry of w stands for: 1, or all of them
    return SharedData(
        xu=to_device(xu),
        xs=to_device(xs),
        w=to_device(w),
        std_u=jnp.asarray(std_u, jnp.float64),
        std_s=jnp.asarray(std_s, jnp.float64),
        n_gene=jnp.asarray(per_cell * w.sum(axis=1).reshape(-1), jnp.float64),
        n_cell=jnp.asarray(np.broadcast_to(2.0 * w.sum(axis=(0, 2)), (n_cells,))),
        log_jac=jnp.asarray(log_jac),
    )


def reweight(data: SharedData, weights) -> SharedData:
    """The same standardised data with other fitting cells (no copy of the moments).

    Parameters
    ----------
    data
        Chunked data.
    weights
        ``(n_cells, n_genes)`` boolean cells each of the ``n_genes <= n_genes_padded`` genes is
        fitted on (padding genes keep none): an array, or anything read as ``weights[:, cols]``
        with a ``shape`` (read one chunk of columns at a time).

    Returns
    -------
    :class:`SharedData`.
    """
    n_chunks, n_cells, width = data.xu.shape
    w = aligned_zeros((n_chunks, n_cells, width), bool)
    for k in range(n_chunks):  # chunk by chunk: no transposed full-size copy
        cols = slice(k * width, min((k + 1) * width, weights.shape[1]))
        if cols.stop > cols.start:  # (a chunk of padding only keeps no cell)
            w[k, :, : cols.stop - cols.start] = weights[:, cols] > 0
    return _with_weights(data.xu, data.xs, w, np.asarray(data.std_u), np.asarray(data.std_s))


def subset_cells(data: SharedData, cells) -> SharedData:
    """The data of some cells only (same standardisation scales; a copy of those cells).

    Parameters
    ----------
    data
        Chunked data.
    cells
        Positions of the cells kept.

    Returns
    -------
    :class:`SharedData` of ``len(cells)`` cells.
    """
    cells = np.asarray(cells)

    def take(a):
        a = np.asarray(a)
        if a.shape[1] == 1:  # a per-gene mask holds for any cells
            return a
        out = aligned_empty((a.shape[0], cells.size, a.shape[2]), a.dtype)
        return np.take(a, cells, axis=1, out=out)

    return _with_weights(take(data.xu), take(data.xs), take(data.w), np.asarray(data.std_u), np.asarray(data.std_s))


def cell_block(data: SharedData, start, size: int) -> SharedData:
    """Cells ``start .. start + size`` of the data (a slice inside a compiled program).

    Parameters
    ----------
    data
        Chunked data.
    start
        First cell (may be traced).
    size
        Number of cells (static).

    Returns
    -------
    :class:`SharedData` of ``size`` cells; per-gene fields are those of ``data``.
    """
    cells = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, start, size, axis=axis)
    return data._replace(
        xu=cells(data.xu, 1), xs=cells(data.xs, 1), w=data.w if data.w.shape[1] == 1 else cells(data.w, 1),
        n_cell=cells(data.n_cell, 0), log_jac=cells(data.log_jac, 0),
    )


def upcast_chunk(xu, xs, w, like):
    """One chunk's stored moments and weights in the computation's float type.

    Parameters
    ----------
    xu, xs, w
        A chunk of :class:`SharedData`'s ``xu``, ``xs`` (:data:`DATA_DTYPE`) and ``w`` (boolean).
    like
        An array of the computation's type (float64 under x64).

    Returns
    -------
    ``(xu, xs, w)`` of ``like``'s dtype, ``w`` broadcast to the cells (a per-gene mask).
    """
    return xu.astype(like.dtype), xs.astype(like.dtype), jnp.broadcast_to(w, xu.shape).astype(like.dtype)


def _chunks(data: SharedData, *per_gene):
    """Reshape per-gene arrays ``(..., n_genes_padded)`` to ``(n_chunks, ..., chunk)``."""
    n_chunks, _, width = data.xu.shape
    return tuple(jnp.moveaxis(a.reshape(a.shape[:-1] + (n_chunks, width)), -2, 0) for a in per_gene)


def predict(theta, t, std_u, std_s):
    """Standardised model abundances on the shared clock.

    Parameters
    ----------
    theta
        ``(6, n_genes)`` parameters (rows :data:`THETA_ROWS`).
    t
        Clock times broadcasting against ``(n_genes,)``, e.g. ``grid[:, None]``.
    std_u, std_s
        ``(n_genes,)`` standardisation scales.

    Returns
    -------
    ``(m_u, m_s)``: ``scaling u / std_u`` and ``s / std_s``, of the broadcast shape.
    """
    p = KineticParams(*jnp.exp(theta[:5]))
    u, s = trajectory(jnp.maximum(t - theta[5], 0.0), p)
    return p.scaling * u / std_u, s / std_s


def _predict_derivatives(theta, t, std_u, std_s):
    """:func:`predict` with first and second clock derivatives (zero before onset)."""
    p = KineticParams(*jnp.exp(theta[:5]))
    tau = t - theta[5]
    on = tau > 0
    tau = jnp.maximum(tau, 0.0)
    u, s = trajectory(tau, p)
    alpha_k = jnp.where(tau < p.t_, p.alpha, 0.0)
    vu = jnp.where(on, alpha_k - p.beta * u, 0.0)
    vs = jnp.where(on, p.beta * u - p.gamma * s, 0.0)
    au, as_ = -p.beta * vu, p.beta * vu - p.gamma * vs
    cu = p.scaling / std_u
    return (cu * u, s / std_s), (cu * vu, vs / std_s), (cu * au, as_ / std_s)


def grid_distances(theta, var_u, var_s, data: SharedData, grid):
    """Weighted squared distances of every cell to the model at every grid time.

    ``D_ij = sum_g w_ig [(x_u,ig - m_u,g(t_j))^2 / var_u,g + (x_s,ig - m_s,g(t_j))^2 / var_s,g]``,
    accumulated over gene chunks by one matrix product per chunk.

    Parameters
    ----------
    theta
        ``(6, n_genes_padded)`` parameters.
    var_u, var_s
        ``(n_genes_padded,)`` residual variances (standardised units).
    data
        Chunked data.
    grid
        ``(n_grid,)`` clock times.

    Returns
    -------
    ``(D, log_det)``: ``(n_cells, n_grid)`` distances and ``(n_cells,)``
    ``sum_g w_ig (log var_u,g + log var_s,g)``.
    """
    n_cells = data.xu.shape[1]

    def body(carry, chunk):
        a, bc, log_det = carry
        xu, xs, w, th, vu, vs, su, ss = chunk
        xu, xs, w = upcast_chunk(xu, xs, w, su)
        mu_, ms_ = predict(th, grid[:, None], su, ss)  # (n_grid, chunk)
        a = a + jnp.sum(w * (xu * xu / vu + xs * xs / vs), axis=1)
        left = jnp.concatenate([-2.0 * w * xu / vu, -2.0 * w * xs / vs, w], axis=1)
        right = jnp.concatenate([mu_, ms_, mu_ * mu_ / vu + ms_ * ms_ / vs], axis=1)
        bc = bc + left @ right.T
        log_det = log_det + w @ (jnp.log(vu) + jnp.log(vs))
        return (a, bc, log_det), None

    dtype = data.std_u.dtype
    init = (jnp.zeros(n_cells, dtype), jnp.zeros((n_cells, grid.shape[0]), dtype), jnp.zeros(n_cells, dtype))
    chunks = (data.xu, data.xs, data.w) + _chunks(data, theta, var_u, var_s, data.std_u, data.std_s)
    (a, bc, log_det), _ = jax.lax.scan(body, init, chunks)
    return jnp.maximum(a[:, None] + bc, 0.0), log_det


def _time_terms(t, theta, var_u, var_s, data: SharedData):
    """Per cell ``f(t_i) = sum_g w r^2`` and its first two derivatives in ``t_i``."""

    def body(carry, chunk):
        f, g, h = carry
        xu, xs, w, th, vu, vs, su, ss = chunk
        xu, xs, w = upcast_chunk(xu, xs, w, su)
        (mu_, ms_), (du, ds), (d2u, d2s) = _predict_derivatives(th, t[:, None], su, ss)
        eu, es = xu - mu_, xs - ms_
        f = f + jnp.sum(w * (eu * eu / vu + es * es / vs), axis=1)
        g = g - 2.0 * jnp.sum(w * (eu * du / vu + es * ds / vs), axis=1)
        h = h + 2.0 * jnp.sum(w * ((du * du - eu * d2u) / vu + (ds * ds - es * d2s) / vs), axis=1)
        return (f, g, h), None

    zero = jnp.zeros_like(t)
    chunks = (data.xu, data.xs, data.w) + _chunks(data, theta, var_u, var_s, data.std_u, data.std_s)
    (f, g, h), _ = jax.lax.scan(body, (zero, zero, zero), chunks)
    return f, g, h


def score_terms(t, theta, var_u, var_s, data: SharedData):
    """Per cell ``f''(t_i)`` and ``sum_g f_g'(t_i)^2``, with ``f = sum_g f_g`` as in :func:`shared_times`.

    The two halves of the sandwich (robust) variance ``sum_g f_g'^2 / f''^2`` of a cell's
    time: it grows where the genes pull the cell's time in different directions, whether or
    not the model's noise level says they should.

    Parameters
    ----------
    t
        ``(n_cells,)`` clock times.
    theta, var_u, var_s, data
        As for :func:`shared_times`.

    Returns
    -------
    ``(h, s2)``: each ``(n_cells,)``.
    """

    def body(carry, chunk):
        h, s2 = carry
        xu, xs, w, th, vu, vs, su, ss = chunk
        xu, xs, w = upcast_chunk(xu, xs, w, su)
        (mu_, ms_), (du, ds), (d2u, d2s) = _predict_derivatives(th, t[:, None], su, ss)
        eu, es = xu - mu_, xs - ms_
        score = -2.0 * w * (eu * du / vu + es * ds / vs)
        s2 = s2 + jnp.sum(score * score, axis=1)
        h = h + 2.0 * jnp.sum(w * ((du * du - eu * d2u) / vu + (ds * ds - es * d2s) / vs), axis=1)
        return (h, s2), None

    zero = jnp.zeros_like(t)
    chunks = (data.xu, data.xs, data.w) + _chunks(data, theta, var_u, var_s, data.std_u, data.std_s)
    (h, s2), _ = jax.lax.scan(body, (zero, zero), chunks)
    return h, s2


def shared_times(theta, var_u, var_s, data: SharedData, grid, n_newton: int = 3):
    """Multi-gene exact time (MODEL.md section 3): ``argmin_t sum_g`` weighted residual^2.

    A grid search over ``grid`` followed by ``n_newton`` safeguarded Newton steps per cell
    (trust region of one grid spacing, shrunk after a rejected step; a step is kept only if
    it lowers the cell's distance, so the result is never worse than the best grid point).

    Parameters
    ----------
    theta
        ``(6, n_genes_padded)`` parameters on the shared clock.
    var_u, var_s
        ``(n_genes_padded,)`` residual variances weighting the genes.
    data
        Chunked data.
    grid
        ``(n_grid,)`` increasing clock times; the result lies in ``[grid[0], grid[-1]]``.
    n_newton
        Newton steps (static).

    Returns
    -------
    ``(t, f)``: ``(n_cells,)`` times and their summed weighted squared residuals.
    """
    dist, _ = grid_distances(theta, var_u, var_s, data, grid)
    t = grid[jnp.argmin(dist, axis=1)]
    spacing = (grid[-1] - grid[0]) / (grid.shape[0] - 1)
    return refine_times(t, theta, var_u, var_s, data, grid[0], grid[-1], spacing, n_newton)


def refine_times(t, theta, var_u, var_s, data: SharedData, lo, hi, radius, n_newton: int):
    """Safeguarded Newton steps on every cell's summed weighted squared residual ``f``.

    Steps are clipped to a trust region (``radius``, shrunk four-fold after a rejected step)
    and to ``[lo, hi]``, and kept only if they lower ``f``: the result is never worse than
    the starting time.

    Parameters
    ----------
    t
        ``(n_cells,)`` starting clock times.
    theta, var_u, var_s, data
        As for :func:`shared_times`.
    lo, hi
        Bounds of the times (scalars or ``(n_cells,)``).
    radius
        Initial trust radius (scalar or ``(n_cells,)``).
    n_newton
        Newton steps (static).

    Returns
    -------
    ``(t, f)``: ``(n_cells,)`` times and their summed weighted squared residuals.
    """
    radius = jnp.broadcast_to(radius, t.shape).astype(t.dtype)
    inf = jnp.full_like(t, jnp.inf)
    zero = jnp.zeros_like(t)

    def refine(_, carry):
        # The first pass evaluates the starting time itself (g = 0 gives a zero step, f = inf accepts).
        t, (f, g, h), radius = carry
        newton = jnp.where(h > 0, -g / jnp.where(h > 0, h, 1.0), -jnp.sign(g) * radius)
        cand = jnp.clip(t + jnp.clip(newton, -radius, radius), lo, hi)
        c_terms = _time_terms(cand, theta, var_u, var_s, data)
        accept = c_terms[0] < f
        pick = lambda new, old: jnp.where(accept, new, old)
        radius = jnp.where(accept | jnp.isinf(f), radius, 0.25 * radius)
        return pick(cand, t), tuple(map(pick, c_terms, (f, g, h))), radius

    t, (f, _, _), _ = jax.lax.fori_loop(0, n_newton + 1, refine, (t, (inf, zero, zero), radius))
    return t, f


shared_times_jit = jax.jit(shared_times, static_argnames=("n_newton",))


def residual_variances(theta, t, data: SharedData, floor: float = 1e-4):
    """Per-gene mean squared standardised residual of each species at cell times ``t``.

    Parameters
    ----------
    theta
        ``(6, n_genes_padded)`` parameters.
    t
        ``(n_cells,)`` clock times.
    data
        Chunked data.
    floor
        Smallest variance returned (padding genes get 1).

    Returns
    -------
    ``(var_u, var_s)``, each ``(n_genes_padded,)``.
    """

    def body(_, chunk):
        xu, xs, w, th, su, ss = chunk
        xu, xs, w = upcast_chunk(xu, xs, w, su)
        mu_, ms_ = predict(th, t[:, None], su, ss)
        return None, (jnp.sum(w * (xu - mu_) ** 2, axis=0), jnp.sum(w * (xs - ms_) ** 2, axis=0))

    chunks = (data.xu, data.xs, data.w) + _chunks(data, theta, data.std_u, data.std_s)
    _, (su, ss) = jax.lax.scan(body, None, chunks)
    n = data.n_gene
    safe = jnp.maximum(n, 1.0)
    var_u = jnp.where(n > 0, jnp.maximum(su.reshape(-1) / safe, floor), 1.0)
    var_s = jnp.where(n > 0, jnp.maximum(ss.reshape(-1) / safe, floor), 1.0)
    return var_u, var_s


residual_variances_jit = jax.jit(residual_variances, static_argnames=("floor",))


#: A gene locates a cell on its clock when the cell's fitted point is nearer than the gene's
#: onset ``(0, 0)`` by more than this, in squared standardised residuals (one residual
#: variance): see :func:`located_times`.
ONSET_MARGIN = 1.0
#: A cell located by fewer than this fraction of the genes takes its first clock from all of them.
MIN_LOCATED_FRACTION = 0.05


def located_times(mu, ms, t, params: KineticParams, std_u, std_s, margin: float = ONSET_MARGIN) -> np.ndarray:
    """Where a per-gene fit's time tells where the cell is on the gene's clock.

    A cell near ``(0, 0)`` is as near the gene's onset (time 0) as to the end of its
    repression, where the per-gene fit may have put it: its time there says nothing about
    whether the cell is before or after the gene's activity. Such times are not *located*:
    the cell's fitted point is not nearer than the onset by more than ``margin`` (squared
    standardised distance, as in the fit's loss). Cells without a time are not located.

    Parameters
    ----------
    mu, ms
        ``(n_cells, n_genes)`` observed unspliced and spliced moments.
    t
        ``(n_cells, n_genes)`` per-gene fitted times (``nan`` where none).
    params
        Per-gene parameters (``beta`` in scaled-unspliced units, as
        :func:`velofit.core.kinetics.trajectory` takes them), each ``(n_genes,)``.
    std_u, std_s
        ``(n_genes,)`` residual scales of the fit.
    margin
        Least improvement over the onset, in residual variances.

    Returns
    -------
    ``(n_cells, n_genes)`` boolean.
    """
    mu, ms, t = (np.asarray(a, np.float64) for a in (mu, ms, t))
    known = np.isfinite(t)
    with jax.enable_x64(True):
        p = KineticParams(*(jnp.asarray(np.asarray(a, np.float64)) for a in params))
        u, s = (np.asarray(a) for a in trajectory(jnp.asarray(np.where(known, t, 0.0)), p))
    xu, xs = mu / std_u, ms / std_s
    fitted = (np.asarray(params.scaling) * u / std_u - xu) ** 2 + (s / std_s - xs) ** 2
    onset = xu * xu + xs * xs
    return known & (onset - fitted > margin)


def clock_start(t_gene, span, located=None) -> np.ndarray:
    """The first shared clock: per cell, the median of its per-gene times as fractions of their spans.

    Every gene's time is divided by its span (:func:`time_spans`; so that it runs from 0 at
    onset to 1, induction before repression); the first shared time of a cell is the median
    of these over the genes that locate it (``located``, :func:`located_times`; all genes
    where fewer than :data:`MIN_LOCATED_FRACTION` do), rescaled to span ``[0, 1]``. Without
    ``located``, near-silent genes vote with the arbitrary side (onset or late repression)
    their per-gene fits chose, and where half of them choose each side, a small change of
    the fits moves whole groups of cells (measured on pancreas_739: the ductal cells).
    Computed in blocks of cells (no full-size temporary), so the per-gene times can be freed
    once this has run.

    Parameters
    ----------
    t_gene
        ``(n_cells, n_genes)`` per-gene times (e.g. ``GeneFit.t``), ``nan`` where unknown;
        read in blocks of rows (``t_gene[rows]``), so a view that reads rows on demand works.
    span
        ``(n_genes,)`` spans (:func:`time_spans`, ``nan`` where unknown).
    located
        ``(n_cells, n_genes)`` boolean (read as ``located[rows]``), or ``None``: every gene votes.

    Returns
    -------
    ``(n_cells,)`` times in ``[0, 1]``.
    """
    usable = np.where(np.isfinite(span) & (span > 0), span, np.nan)
    n_cells, n_genes = t_gene.shape
    least = max(1, int(np.ceil(MIN_LOCATED_FRACTION * n_genes)))
    tau = np.empty(n_cells)
    for rows in _row_blocks(t_gene.shape):
        norm = np.clip(np.asarray(t_gene[rows], np.float64) / usable, 0.0, 1.0)
        with warnings.catch_warnings():  # a cell without any finite time: nan, filled below
            warnings.simplefilter("ignore", RuntimeWarning)
            median = np.nanmedian(norm, axis=1)
            if located is not None:
                votes = np.asarray(located[rows], bool) & np.isfinite(norm)
                enough = votes.sum(axis=1) >= least
                median = np.where(enough, np.nanmedian(np.where(votes, norm, np.nan), axis=1), median)
        tau[rows] = median
    tau = np.where(np.isfinite(tau), tau, np.nanmedian(tau))
    return _unit_range(tau)


def time_spans(t_gene, weights: np.ndarray) -> np.ndarray:
    """Per gene, the largest time over its weighted cells (``nan`` where it has none).

    Parameters
    ----------
    t_gene
        ``(n_cells, n_genes)`` per-gene times, ``nan`` where unknown (read as ``t_gene[rows]``).
    weights
        ``(n_cells, n_genes)`` boolean cells each gene was fitted on.

    Returns
    -------
    ``(n_genes,)`` float64.
    """
    span = np.full(t_gene.shape[1], -np.inf)
    for rows in _row_blocks(t_gene.shape):
        block = np.where(weights[rows], t_gene[rows], np.nan)
        span = np.fmax(span, np.max(np.where(np.isnan(block), -np.inf, block), axis=0))
    return np.where(np.isinf(span), np.nan, span)


def _row_blocks(shape: tuple[int, int], target_bytes: int = 64 * 1024**2):
    """Slices of rows of an ``(n_rows, n_cols)`` array, each about ``target_bytes`` of float64."""
    step = max(1, target_bytes // (8 * max(shape[1], 1)))
    return [slice(start, start + step) for start in range(0, shape[0], step)]


def _unit_range(x: np.ndarray) -> np.ndarray:
    lo, hi = np.min(x), np.max(x)
    return (x - lo) / (hi - lo) if hi > lo else np.full_like(x, 0.5)


def _map_fractions(n: int):
    """Candidate ``(a, b)`` of the map search, as fractions of the gene's time span."""
    a = np.linspace(-1.0, 0.9, n)
    b = np.linspace(0.1, 2.5, n)
    aa, bb = np.meshgrid(a, b, indexing="ij")
    keep = bb > aa + 0.1
    return aa[keep], bb[keep]


def fit_clock_maps(shape, span, tau, data: SharedData, n_search: int = 12):
    """Per-gene clock maps ``gene time = k (t - t0)`` by a search over the data's residuals.

    The map is searched as the gene times ``a`` at ``t = 0`` and ``b`` at ``t = 1`` (so
    ``k = b - a > 0``, ``t0 = -a / k``) on a grid of fractions of the gene's time span; the
    pair with the smallest standardised squared residual of ``Mu, Ms`` at the cells' shared
    times ``tau`` wins. This uses the kinetics rather than the per-gene times, which are not an
    affine function of the shared time where a gene's fit is ambiguous (e.g. late repression
    cells near ``(0, 0)`` are given early times). Call under x64.

    Parameters
    ----------
    shape
        ``(5, n_genes_padded)`` ``log(alpha, beta, gamma, t_, scaling)`` on each gene's clock.
    span
        ``(n_genes_padded,)`` each gene's time span on its clock (e.g. its largest fitted time).
    tau
        ``(n_cells,)`` shared times in ``[0, 1]`` (a subset of cells is enough).
    data
        Chunked data of the same cells.
    n_search
        Grid points per end of the map (static).

    Returns
    -------
    ``(6, n_genes_padded)`` ``theta``.
    """
    fa, fb = (jnp.asarray(f, span.dtype) for f in _map_fractions(n_search))

    def theta_of(a, b):
        k = b - a
        lk = jnp.log(k)
        return jnp.concatenate([shape[:3] + lk, shape[3:4] - lk, shape[4:5], (-a / k)[None]])

    def loss_of(theta):
        def body(total, chunk):
            xu, xs, w, th, su, ss = chunk
            xu, xs, w = upcast_chunk(xu, xs, w, su)
            mu_, ms_ = predict(th, tau[:, None], su, ss)
            return total, jnp.sum(w * ((xu - mu_) ** 2 + (xs - ms_) ** 2), axis=0)

        chunks = (data.xu, data.xs, data.w) + _chunks(data, theta, data.std_u, data.std_s)
        return jax.lax.scan(body, None, chunks)[1].reshape(-1)

    def search(best, fractions):
        a, b = fractions[0] * span, fractions[1] * span
        theta = theta_of(a, b)
        loss = loss_of(theta)
        better = loss < best[0]
        return (jnp.where(better, loss, best[0]), jnp.where(better, theta, best[1])), None

    first = theta_of(fa[0] * span, fb[0] * span)
    init = (loss_of(first), first)
    (_, theta), _ = jax.lax.scan(search, init, jnp.stack([fa, fb], axis=1))
    return theta


fit_clock_maps_jit = jax.jit(fit_clock_maps, static_argnames=("n_search",))


def align_gene_fit(data: SharedData, grid, params, span, tau, n_rounds: int = 2, max_cells: int = 1000, seed: int = 0):
    """Map per-gene fits onto one shared clock: the initialisation of the shared-time EM.

    The first clock is :func:`clock_start`'s; then, ``n_rounds`` times, each gene's clock map
    is fitted (:func:`fit_clock_maps`, on at most ``max_cells`` random cells) and the shared
    time re-estimated by the multi-gene exact time (:func:`shared_times`). Call under x64.

    Parameters
    ----------
    data
        Chunked data of the genes (``n_genes`` real genes, then padding).
    grid
        ``(n_grid,)`` clock times.
    params
        ``(5, n_genes)`` per-gene ``alpha, beta, gamma, t_, scaling`` (``beta`` in
        scaled-unspliced units), each on the gene's own clock.
    span, tau
        :func:`clock_start` of the per-gene times: ``(n_genes,)`` each gene's largest time on
        its clock (``nan`` where unknown: ``t_`` is used) and the ``(n_cells,)`` first clock.
    n_rounds
        Rounds of map fitting and shared time (at least 1).
    max_cells
        Most cells used by the map search.
    seed
        Seed of the cell subset.

    Returns
    -------
    ``(theta, var_u, var_s, tau)``: ``(6, n_genes_padded)`` parameters, residual variances
    and ``(n_cells,)`` shared times.
    """
    params = np.asarray(params, np.float64)
    n_cells = data.xu.shape[1]
    n_genes, n_padded = params.shape[1], data.std_u.shape[0]
    fill = n_padded - n_genes
    shape = np.concatenate([np.log(params), np.repeat(np.log(params[:, :1]), fill, axis=1)], axis=1)
    span = np.asarray(span, np.float64)
    span = np.where(np.isfinite(span) & (span > 0), span, params[3])
    span = np.concatenate([span, np.repeat(span[:1], fill)])
    rows = np.arange(n_cells)
    if n_cells > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(n_cells, max_cells, replace=False))
    sub = data._replace(xu=data.xu[:, rows], xs=data.xs[:, rows], w=data.w if data.w.shape[1] == 1 else data.w[:, rows])
    shape, span = jnp.asarray(shape), jnp.asarray(span)
    tau = np.asarray(tau, np.float64)
    for _ in range(max(n_rounds, 1)):
        theta = fit_clock_maps_jit(shape, span, jnp.asarray(tau[rows]), sub)
        var_u, var_s = residual_variances_jit(theta, jnp.asarray(tau), data)
        tau = np.asarray(shared_times_jit(theta, var_u, var_s, data, grid)[0])
    var_u, var_s = residual_variances_jit(theta, jnp.asarray(tau), data)
    return theta, var_u, var_s, tau
