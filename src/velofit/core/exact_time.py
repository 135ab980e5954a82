"""Exact time assignment of MODEL.md section 3: grid search, then safeguarded Newton steps.

For every cell and gene, ``tau = argmin (u - u(tau))^2 / std_u^2 + (s - s(tau))^2 / std_s^2``
is found separately in each phase and the better phase is kept. The grid search runs as a
``lax.scan`` over groups of grid points, each group's distances fused into its minimum, so
that memory stays at a few ``(n_cells, n_genes)`` arrays (never cells x grid x genes). The
refinement uses the ODE itself for the derivatives of the curve (``u' = alpha_k - beta u``,
``s' = beta u - gamma s``), takes Newton steps inside a trust region of one grid spacing and
keeps a step only if it lowers the distance, so the refined time is never worse than the best
grid point. scVelo stops at the grid.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .buffers import evaluate_once
from .kinetics import KineticParams, phase_state, switch_state

#: Most bits of a float32 distance's mantissa that may hold a grid index (n_grid <= 4096).
_MAX_INDEX_BITS = 12
#: Grid points compared per vectorised loop of the search.
_GRID_GROUP = 8


def _curve_terms(tau, u, s, u0, s0, alpha_k, beta, gamma, std_u, std_s):
    """Distance of ``(u, s)`` to the curve at ``tau`` with its first two tau-derivatives."""
    # Three outputs read the curve: evaluated once (each output's fusion recomputed it).
    state = evaluate_once(phase_state, tau, u0, s0, alpha_k, beta, gamma)
    return _terms_at(state, u, s, alpha_k, beta, gamma, std_u, std_s)


def _terms_at(state, u, s, alpha_k, beta, gamma, std_u, std_s):
    """:func:`_curve_terms` given the curve's state ``(u(tau), s(tau))``."""
    cu, cs = state
    vu = alpha_k - beta * cu
    vs = beta * cu - gamma * cs
    au = -beta * vu
    as_ = beta * vu - gamma * vs
    wu, ws = 1.0 / (std_u * std_u), 1.0 / (std_s * std_s)
    eu, es = u - cu, s - cs
    dist = wu * eu * eu + ws * es * es
    grad = -2.0 * (wu * eu * vu + ws * es * vs)
    hess = 2.0 * (wu * (vu * vu - eu * au) + ws * (vs * vs - es * as_))
    return dist, grad, hess


def _scaled_grid(u, s, u0, s0, alpha_k, beta, gamma, spacing, std_u, std_s, n_grid):
    """Observations and grid points of :func:`grid_search_phase` as float32 in residual units.

    The search compares distances in float32 (twice the SIMD width; it is most of the cost
    of timing every cell), on abundances measured from the curve's middle grid point in
    units of their residual scales, so that neither the scale nor a large offset of a gene's
    values costs precision or overflows. It only picks the start of the float64
    refinement: a near-tie (within float32 rounding) may pick either point.
    Returns ``(su, ss, grid_su, grid_ss, grid_u, grid_s)``, the grid's with a leading axis
    of ``n_grid`` and the data's rank after it (``grid_u``, ``grid_s``: the curve at the
    grid points in float64).
    """
    grid = spacing * jnp.arange(n_grid, dtype=u.dtype).reshape((n_grid,) + (1,) * jnp.ndim(spacing))
    grid_u, grid_s = phase_state(grid, u0, s0, alpha_k, beta, gamma)
    mid_u, mid_s = grid_u[n_grid // 2], grid_s[n_grid // 2]
    f32 = jnp.float32
    su, ss = ((u - mid_u) / std_u).astype(f32), ((s - mid_s) / std_s).astype(f32)
    grid_su, grid_ss = ((grid_u - mid_u) / std_u).astype(f32), ((grid_s - mid_s) / std_s).astype(f32)
    rank = su.ndim + 1
    return su, ss, *(g.reshape(g.shape[:1] + (1,) * (rank - g.ndim) + g.shape[1:])
                     for g in (grid_su, grid_ss, grid_u, grid_s))


def grid_search_phase(u, s, u0, s0, alpha_k, beta, gamma, length, std_u, std_s, n_grid):
    """Best of ``n_grid`` evenly spaced times of one phase for every observation.

    Parameters
    ----------
    u, s
        Scaled unspliced and spliced abundance, shape ``(n_cells, n_genes)``.
    u0, s0, alpha_k
        Start state and transcription rate of the phase, shape ``(n_genes,)``.
    beta, gamma
        Rates, shape ``(n_genes,)``.
    length
        Length of the phase: ``tau`` is searched in ``[0, length]``, shape ``(n_genes,)``.
    std_u, std_s
        Residual scales, shape ``(n_genes,)``.
    n_grid
        Number of grid points (static, at least 2).

    Returns
    -------
    ``(tau, dist)``: the best grid time and its squared scaled distance (float32), each
    ``(n_cells, n_genes)``.
    """
    tau, dist, _, _ = _nearest_grid_point(u, s, u0, s0, alpha_k, beta, gamma, length, std_u, std_s, n_grid)
    return tau, dist


def _nearest_grid_point(u, s, u0, s0, alpha_k, beta, gamma, length, std_u, std_s, n_grid, penalty=None):
    """:func:`grid_search_phase`, with the curve's float64 state ``(u, s)`` at the chosen point and
    its index; ``penalty`` (non-negative, shaped like the grid: ``(n_grid, ...)``) is added to
    every grid point's distance before the comparison."""
    index_bits = max(1, (n_grid - 1).bit_length())
    if index_bits > _MAX_INDEX_BITS:
        raise ValueError(f"n_grid must be at most {1 << _MAX_INDEX_BITS}, got {n_grid}")
    spacing = length / (n_grid - 1)
    scaled = partial(_scaled_grid, n_grid=n_grid)
    su, ss, grid_su, grid_ss, grid_u, grid_s = evaluate_once(scaled, u, s, u0, s0, alpha_k, beta, gamma, spacing,
                                                             std_u, std_s)
    # A non-negative float32 orders as its bit pattern: each point's index is written into
    # the lowest mantissa bits of its distance, and the smallest packed value carries the
    # nearest point (distances equal in all but those bits tie, the lowest index winning,
    # which the refinement makes immaterial). The minimum runs over groups of points, each
    # group one vectorised loop; carrying the best distance and time through a scan over
    # single points ran five times slower, one reduction over all points twice.
    index_mask = jnp.int32((1 << index_bits) - 1)
    index = jnp.arange(n_grid, dtype=jnp.int32).reshape((n_grid,) + (1,) * su.ndim)
    n_groups = -(-n_grid // _GRID_GROUP)
    pad = n_groups * _GRID_GROUP - n_grid  # repeats of the last point: ties, never chosen over it

    def grouped(a):
        a = jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]) if pad else a
        return a.reshape((n_groups, _GRID_GROUP) + a.shape[1:])

    def search(best, points):
        gu, gs, k, *extra = points
        eu, es = su[None] - gu, ss[None] - gs
        value = eu * eu + es * es
        if extra:
            value = value + extra[0]
        bits = jax.lax.bitcast_convert_type(value, jnp.int32)
        return jnp.minimum(best, jnp.min((bits & ~index_mask) | k, axis=0)), None

    first = jnp.full(su.shape, jnp.iinfo(jnp.int32).max, jnp.int32)
    points = (grouped(grid_su), grouped(grid_ss), grouped(index))
    if penalty is not None:
        points += (grouped(penalty.astype(jnp.float32)),)
    best, _ = jax.lax.scan(search, first, points)
    dist = jax.lax.bitcast_convert_type(best & ~index_mask, jnp.float32)
    index = best & index_mask
    tau = spacing * index.astype(u.dtype)
    # The curve at the chosen points is read from the grid (a gather costs a fraction of an
    # evaluation of the curve).
    state = tuple(jnp.take_along_axis(jnp.broadcast_to(g, (n_grid,) + index.shape), index[None], axis=0)[0]
                  for g in (grid_u, grid_s))
    return tau, dist, state, index


def refine_newton(tau, u, s, u0, s0, alpha_k, beta, gamma, length, radius, std_u, std_s, n_newton, state=None):
    """Safeguarded Newton steps on the squared distance to the curve, within ``[0, length]``.

    Each step is clipped to a trust region (initially ``radius``, shrunk four-fold after a
    rejected step) and kept only if it lowers the distance.

    Parameters
    ----------
    tau
        ``(n_cells, n_genes)`` starting times within the phase.
    u, s
        Scaled unspliced and spliced abundance.
    u0, s0, alpha_k
        Start state and transcription rate of each cell's phase (broadcasting).
    beta, gamma
        Rates.
    length
        Upper bound of ``tau`` (broadcasting).
    radius
        Initial trust radius (broadcasting), e.g. the grid spacing.
    std_u, std_s
        Residual scales.
    n_newton
        Number of steps (static).
    state
        The curve's ``(u(tau), s(tau))`` at the starting ``tau`` when known (e.g. from the
        grid); computed otherwise.

    Returns
    -------
    ``(tau, dist)``, with ``dist`` never above its value at the starting ``tau``.
    """
    args = (u, s, u0, s0, alpha_k, beta, gamma, std_u, std_s)
    if state is None:
        dist, grad, hess = _curve_terms(tau, *args)
    else:
        dist, grad, hess = _terms_at(state, u, s, alpha_k, beta, gamma, std_u, std_s)
    radius = jnp.broadcast_to(radius, tau.shape)

    def refine(_, carry):
        tau, dist, grad, hess, radius = carry
        safe_hess = jnp.where(hess > 0, hess, 1.0)
        newton = jnp.where(hess > 0, -grad / safe_hess, -jnp.sign(grad) * radius)
        cand = jnp.clip(tau + jnp.clip(newton, -radius, radius), 0.0, length)
        c_dist, c_grad, c_hess = _curve_terms(cand, *args)
        accept = c_dist < dist
        return (
            jnp.where(accept, cand, tau),
            jnp.where(accept, c_dist, dist),
            jnp.where(accept, c_grad, grad),
            jnp.where(accept, c_hess, hess),
            jnp.where(accept, radius, 0.25 * radius),
        )

    tau, dist, *_ = jax.lax.fori_loop(0, n_newton, refine, (tau, dist, grad, hess, radius))
    return tau, dist


def exact_times(u, s, params: KineticParams, tau_max, std_u, std_s, n_grid=32, n_newton=4, penalty=None):
    """Assign each cell the absolute time of its nearest point on the whole trajectory.

    Both phases are grid-searched and refined; the nearer refined point wins. (Refining only
    the phase with the nearer grid point fails just after the switch, where the end of
    induction and the start of repression are the same point.)

    With ``penalty``, the search minimises distance plus a penalty per grid point instead
    (e.g. ``-2 sigma^2 log prior``: the posterior's MAP, :mod:`velofit.core.time_prior`):
    each phase's best grid point is refined on the distance alone (the nearest point of
    that branch), and the phase whose refined distance plus its starting point's penalty is
    smaller wins.

    Parameters
    ----------
    u, s
        Scaled unspliced ``Mu / scaling`` and spliced ``Ms``, shape ``(n_cells, n_genes)``.
    params
        Kinetic parameters of shape ``(n_genes,)``.
    tau_max
        Longest repression time considered, shape ``(n_genes,)``.
    std_u, std_s
        Residual scales of scaled unspliced and spliced, shape ``(n_genes,)``.
    n_grid, n_newton
        Grid points per phase and Newton refinement steps.
    penalty
        Optional ``(2, n_grid, n_genes)`` non-negative penalty of every grid point (induction
        then repression; grid point ``k`` of a phase is ``tau = k * length / (n_grid - 1)``),
        in the units of the squared scaled distance.

    Returns
    -------
    ``(t, dist)``: absolute times and squared scaled distances, each ``(n_cells, n_genes)``.
    """
    alpha, beta, gamma, t_ = params.alpha, params.beta, params.gamma, params.t_
    zero = jnp.zeros_like(alpha)
    u_, s_ = switch_state(params)
    scales = (std_u, std_s)

    # Both phases at once along a leading axis (induction, repression): one program, half the code.
    u0, s0, alpha_k, length = (jnp.stack([a, b])[:, None, :] for a, b in
                               ((zero, u_), (zero, s_), (alpha, zero), (t_, tau_max)))
    # The penalty as the grid is laid out: (n_grid, phase, 1, genes).
    grid_penalty = None if penalty is None else jnp.swapaxes(penalty, 0, 1)[:, :, None, :]
    tau, _, state, index = _nearest_grid_point(u, s, u0, s0, alpha_k, beta, gamma, length, *scales, n_grid,
                                               grid_penalty)
    radius = length / (n_grid - 1)
    tau, dist = refine_newton(tau, u, s, u0, s0, alpha_k, beta, gamma, length, radius, *scales, n_newton, state)
    score = dist if penalty is None else dist + jnp.take_along_axis(penalty, index, axis=1)
    on = score[0] <= score[1]
    return jnp.where(on, tau[0], t_ + tau[1]), jnp.where(on, dist[0], dist[1])


def local_times(t_prev, u, s, params: KineticParams, tau_max, std_u, std_s, n_grid=32, n_newton=4):
    """Refine every cell's previous time within the phase it now falls in (no grid search).

    Between EM iterations the parameters move little, so the nearest point on the curve is
    close to the previous one: safeguarded Newton steps from ``t_prev`` (trust radius one
    grid spacing, as in :func:`exact_times`) find it at a fraction of the cost of a grid
    search. Cells cannot change phase here; the periodic full searches of the hard EM
    (:class:`~velofit.core.hard_em.EMConfig` ``full_every``) let them.

    Parameters
    ----------
    t_prev
        ``(n_cells, n_genes)`` previous absolute times.
    u, s, params, tau_max, std_u, std_s, n_grid, n_newton
        As for :func:`exact_times` (``n_grid`` only sets the trust radius).

    Returns
    -------
    ``(t, dist)``: absolute times and squared scaled distances, each ``(n_cells, n_genes)``.
    """
    alpha, beta, gamma, t_ = params.alpha, params.beta, params.gamma, params.t_
    u_, s_ = switch_state(params)
    on = t_prev < t_
    zero = jnp.zeros_like(u)
    u0, s0 = jnp.where(on, zero, u_), jnp.where(on, zero, s_)
    alpha_k = jnp.where(on, alpha, zero)
    length = jnp.where(on, t_, tau_max)
    tau = jnp.clip(jnp.where(on, t_prev, t_prev - t_), 0.0, length)
    radius = length / (n_grid - 1)
    tau, dist = refine_newton(tau, u, s, u0, s0, alpha_k, beta, gamma, length, radius, std_u, std_s, n_newton)
    return jnp.where(on, tau, t_ + tau), dist
