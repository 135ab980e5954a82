"""Exact time assignment of MODEL.md section 3: grid search, then safeguarded Newton steps.

For every cell and gene, ``tau = argmin (u - u(tau))^2 / std_u^2 + (s - s(tau))^2 / std_s^2``
is found separately in each phase and the better phase is kept. The grid search runs as a
``lax.scan`` over grid points so that memory stays at a few ``(n_cells, n_genes)`` arrays
(never cells x grid x genes). The refinement uses the ODE itself for the derivatives of the
curve (``u' = alpha_k - beta u``, ``s' = beta u - gamma s``), takes Newton steps inside a trust
region of one grid spacing and keeps a step only if it lowers the distance, so the refined
time is never worse than the best grid point. scVelo stops at the grid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .kinetics import KineticParams, phase_state, switch_state


def _curve_terms(tau, u, s, u0, s0, alpha_k, beta, gamma, std_u, std_s):
    """Distance of ``(u, s)`` to the curve at ``tau`` with its first two tau-derivatives."""
    cu, cs = phase_state(tau, u0, s0, alpha_k, beta, gamma)
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
    spacing = length / (n_grid - 1)
    points = jnp.arange(n_grid, dtype=u.dtype).reshape((n_grid,) + (1,) * jnp.ndim(spacing))
    grid = spacing * points  # (n_grid, *length.shape)
    grid_u, grid_s = phase_state(grid, u0, s0, alpha_k, beta, gamma)
    shape = jnp.broadcast_shapes(u.shape, grid.shape[1:])
    # The search compares distances in float32 (twice the SIMD width; it is most of the
    # cost of timing every cell), on abundances measured from the curve's middle grid point
    # in units of their residual scales, so that neither the scale nor a large offset of a
    # gene's values costs precision or overflows. It only picks the start of the float64
    # refinement: a near-tie (within float32 rounding) may pick either point.
    f32 = jnp.float32
    mid_u, mid_s = grid_u[n_grid // 2], grid_s[n_grid // 2]
    su, ss = ((u - mid_u) / std_u).astype(f32), ((s - mid_s) / std_s).astype(f32)
    grid_su, grid_ss = ((grid_u - mid_u) / std_u).astype(f32), ((grid_s - mid_s) / std_s).astype(f32)

    def scan_grid(carry, point):
        best_dist, best_tau = carry
        gu, gs, tau = point
        eu, es = su - gu, ss - gs
        dist = eu * eu + es * es
        better = dist < best_dist
        return (jnp.where(better, dist, best_dist), jnp.where(better, tau, best_tau)), None

    init = (jnp.full(shape, jnp.inf, f32), jnp.zeros(shape, u.dtype))
    (dist, tau), _ = jax.lax.scan(scan_grid, init, (grid_su, grid_ss, grid))
    return tau, dist


def refine_newton(tau, u, s, u0, s0, alpha_k, beta, gamma, length, radius, std_u, std_s, n_newton):
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

    Returns
    -------
    ``(tau, dist)``, with ``dist`` never above its value at the starting ``tau``.
    """
    args = (u, s, u0, s0, alpha_k, beta, gamma, std_u, std_s)
    dist, grad, hess = _curve_terms(tau, *args)
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


def exact_times(u, s, params: KineticParams, tau_max, std_u, std_s, n_grid=32, n_newton=4):
    """Assign each cell the absolute time of its nearest point on the whole trajectory.

    Both phases are grid-searched and refined; the nearer refined point wins. (Refining only
    the phase with the nearer grid point fails just after the switch, where the end of
    induction and the start of repression are the same point.)

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
    tau, _ = grid_search_phase(u, s, u0, s0, alpha_k, beta, gamma, length, *scales, n_grid)
    radius = length / (n_grid - 1)
    tau, dist = refine_newton(tau, u, s, u0, s0, alpha_k, beta, gamma, length, radius, *scales, n_newton)
    on = dist[0] <= dist[1]
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
