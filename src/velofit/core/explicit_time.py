"""Explicit (closed-form) latent time of MODEL.md section 2.

Each observation is inverted per gene and per phase in O(1):

* from unspliced alone (eq. 11): ``tau = -(1/beta) ln((u - u_inf) / (u0 - u_inf))``;
* from ``s~ = s - beta~ u`` with ``beta~ = beta / (gamma - beta)`` (eq. 10):
  ``tau = -(1/gamma) ln((s~ - s~_inf) / (s~0 - s~_inf))``.

The ``s~`` form is used where it is well conditioned: where unspliced saturates faster than
spliced (``beta > gamma``, the u-based log flattens out) and ``gamma`` is not close to
``beta`` (where ``beta~`` blows up). Elsewhere the u-based form is used. This is scVelo's rule
with a guard band around ``gamma == beta``.
"""

from __future__ import annotations

import jax.numpy as jnp

from .kinetics import KineticParams, phase_state, switch_state

#: Relative gap between beta and gamma below which the s~ form is not used.
_S_TILDE_MARGIN = 0.05
#: Log arguments are clipped to [_LOG_FLOOR, 1] so that no time is infinite.
_LOG_FLOOR = 1e-6


def _clipped_neg_log(ratio):
    return -jnp.log(jnp.clip(ratio, _LOG_FLOOR, 1.0))


def invert_phase(u, s, u0, s0, alpha_k, beta, gamma):
    """Time since the start of one phase that explains ``(u, s)``, in closed form.

    Parameters
    ----------
    u, s
        Observed scaled-unspliced and spliced abundance, e.g. ``(n_cells, n_genes)``.
    u0, s0
        State at the start of the phase (broadcasting against ``u``).
    alpha_k
        Transcription rate of the phase (``alpha`` for induction, ``0`` for repression).
    beta, gamma
        Splicing and degradation rates.

    Returns
    -------
    ``tau >= 0`` of the broadcast shape (not yet clipped to the phase's length).
    """
    u_inf = alpha_k / beta
    denom_u = u0 - u_inf
    safe_denom_u = jnp.where(denom_u == 0, -1.0, denom_u)
    tau_u = _clipped_neg_log((u - u_inf) / safe_denom_u) / beta

    use_s = beta > gamma * (1.0 + _S_TILDE_MARGIN)
    safe_gap = jnp.where(use_s, gamma - beta, -1.0)
    beta_t = beta / safe_gap
    s_t_inf = -alpha_k * beta / (gamma * safe_gap)
    denom_s = s0 - beta_t * u0 - s_t_inf
    safe_denom_s = jnp.where(denom_s == 0, 1.0, denom_s)
    tau_s = _clipped_neg_log((s - beta_t * u - s_t_inf) / safe_denom_s) / gamma
    return jnp.where(use_s, tau_s, tau_u)


def explicit_times(u, s, params: KineticParams, tau_max, std_u, std_s):
    """Assign each cell an absolute time by the explicit formulas and the nearer phase.

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

    Returns
    -------
    ``(t, dist)``: absolute times of shape ``(n_cells, n_genes)`` (``tau`` for induced cells,
    ``t_ + tau_`` for repressed ones, whichever reconstructed point lies closer) and the
    squared scaled distance of each cell to its reconstructed point.
    """
    alpha, beta, gamma, t_ = params.alpha, params.beta, params.gamma, params.t_
    tau_on = jnp.clip(invert_phase(u, s, 0.0, 0.0, alpha, beta, gamma), 0.0, t_)
    u_, s_ = switch_state(params)
    tau_off = jnp.clip(invert_phase(u, s, u_, s_, 0.0, beta, gamma), 0.0, tau_max)

    def distance(tau, u0, s0, alpha_k):
        cu, cs = phase_state(tau, u0, s0, alpha_k, beta, gamma)
        du, ds = (u - cu) / std_u, (s - cs) / std_s
        return du * du + ds * ds

    d_on = distance(tau_on, 0.0, 0.0, alpha)
    d_off = distance(tau_off, u_, s_, 0.0)
    on = d_on <= d_off
    return jnp.where(on, tau_on, t_ + tau_off), jnp.where(on, d_on, d_off)
