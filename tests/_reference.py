"""Reference implementations shared by the tests, independent of velofit's JAX kernels."""

from __future__ import annotations

import numpy as np


def model(t, alpha, beta, gamma, t_):
    """NumPy closed form of the two-phase model (independent of velofit's kernels; no JAX compile)."""

    def phase(tau, u0, s0, a):
        eb, eg = np.exp(-beta * tau), np.exp(-gamma * tau)
        u = u0 * eb + a / beta * (1 - eb)
        d = gamma - beta
        same = np.abs(d) < 1e-12 * beta
        ratio = np.where(same, -tau * eb, (eg - eb) / np.where(same, 1.0, d))
        return u, s0 * eg + a / gamma * (1 - eg) + (a - beta * u0) * ratio

    u_, s_ = phase(t_, 0.0, 0.0, alpha)
    u_on, s_on = phase(np.minimum(t, t_), 0.0, 0.0, alpha)
    u_off, s_off = phase(np.maximum(t - t_, 0.0), u_, s_, 0.0)
    on = t < t_
    return np.where(on, u_on, u_off), np.where(on, s_on, s_off)


def poisson_counts(n_obs: int, n_vars: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    """Integer ``(Mu, Ms)`` (int64, tied values) drawn around :func:`model`'s trajectory.

    Returns the generator too, so that callers drawing more from it stay reproducible.
    """
    rng = np.random.default_rng(seed)
    params = (
        rng.uniform(2, 6, n_vars),
        rng.uniform(0.5, 2, n_vars),
        rng.uniform(0.2, 1, n_vars),
        rng.uniform(3, 6, n_vars),
    )
    t = rng.uniform(0, 12, (n_obs, n_vars))
    u, s = model(t, *params)
    return rng.poisson(10 * u).astype(np.int64), rng.poisson(10 * s).astype(np.int64), rng
