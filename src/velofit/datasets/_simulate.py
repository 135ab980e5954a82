"""``simulate``: cells drawn from the kinetics of MODEL.md section 1, with the truth attached."""

from __future__ import annotations

from typing import Any

import anndata
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..core.kinetics import KineticParams, trajectory

#: Options of ``time_density`` and the density of ``x = t / t_max`` on ``[0, 1]`` each draws from.
TIME_DENSITIES: dict[str, str] = {
    "uniform": "Uniform(0, 1)",
    "early": "Beta(1, 3): density 3 (1 - x)^2, median 1 - 2^(-1/3) ~ 0.206",
    "late": "Beta(3, 1): density 3 x^2, median 2^(-1/3) ~ 0.794",
    "bursts": "equal mixture of Normal(0.25, 0.07^2) and Normal(0.75, 0.07^2), truncated to [0, 1]",
}
#: Centres and standard deviation of the two ``"bursts"`` components, in units of ``t_max``.
_BURST_CENTRES = (0.25, 0.75)
_BURST_SD = 0.07
#: Log-scale standard deviation of the per-cell size factor of the count layers.
_SIZE_FACTOR_SD = 0.25
#: Number of (cell, gene) points per compiled evaluation of the kinetics.
_EVAL_CHUNK = 1 << 16
#: Padding of the last chunk, per column (t, alpha, beta, gamma, t_, scaling): a harmless point.
_EVAL_FILL = (0.0, 1.0, 1.0, 1.0, 1.0, 1.0)


def simulate(
    n_obs: int = 1000,
    n_vars: int = 100,
    *,
    seed: int = 0,
    noise: float = 0.1,
    time_density: str = "uniform",
    t_max: float = 20.0,
    switch_range: tuple[float, float] = (0.3, 0.9),
    alpha_mean: float = 5.0,
    beta_mean: float = 0.5,
    gamma_mean: float = 0.3,
    rate_sd: float = 0.5,
    steady_state_fraction: float = 0.0,
) -> anndata.AnnData:
    """Simulate spliced and unspliced abundances from the dynamical model, with known truth.

    All cells share one clock ``t``; every gene starts at ``(0, 0)`` at ``t = 0``, is induced
    until its switching time ``t_`` and represses after (MODEL.md section 1), with
    ``scaling = 1``. Random numbers come from ``numpy.random.default_rng(seed)``, so the same
    arguments always give the same data.

    Generative process, per gene ``g`` and cell ``i``:

    * ``alpha_g = alpha_mean * exp(rate_sd * z)`` with ``z ~ Normal(0, 1)``, and likewise
      (independently) ``beta_g`` and ``gamma_g``: log-normal with medians ``alpha_mean``,
      ``beta_mean``, ``gamma_mean`` and log-scale standard deviation ``rate_sd``.
    * ``t__g = t_max * Uniform(switch_range[0], switch_range[1])``.
    * ``t_i = t_max * x_i`` with ``x_i`` drawn from ``time_density`` (see below), except that a
      fraction ``steady_state_fraction`` of the cells (rounded to whole cells) sits at
      ``t_i = 0``, the steady state ``(0, 0)`` before induction.
    * ``true_u``, ``true_s`` = the model at ``t_i`` (evaluated in float64).
    * ``Mu = max(0, true_u + noise * q99(true_u[:, g]) * e)`` with ``e ~ Normal(0, 1)`` and
      ``q99`` the gene's 99th percentile over cells; likewise ``Ms`` from ``true_s``.
    * ``unspliced ~ Poisson(size_i * true_u)``, ``spliced ~ Poisson(size_i * true_s)`` with a
      per-cell size factor ``size_i = exp(0.25 * Normal(0, 1))``, so that normalisation in
      :func:`velofit.pp.filter_and_normalize` has library sizes to remove.

    Parameters
    ----------
    n_obs
        Number of cells, ``>= 1``.
    n_vars
        Number of genes, ``>= 1``.
    seed
        Seed of the random number generator.
    noise
        Standard deviation of the Gaussian noise of ``Mu``/``Ms``, relative to each gene's
        99th percentile; ``0`` gives ``Mu == true_u`` and ``Ms == true_s`` exactly.
    time_density
        Density of ``x = t / t_max`` on ``[0, 1]``:

        - ``"uniform"``: ``Uniform(0, 1)``.
        - ``"early"``: ``Beta(1, 3)``, density ``3 (1 - x)^2`` (median ~0.206).
        - ``"late"``: ``Beta(3, 1)``, density ``3 x^2`` (median ~0.794).
        - ``"bursts"``: equal-weight mixture of ``Normal(0.25, 0.07^2)`` and
          ``Normal(0.75, 0.07^2)``, truncated to ``[0, 1]`` (draws outside are redrawn).
    t_max
        Length of the time range, ``> 0``.
    switch_range
        ``(low, high)`` with ``0 < low <= high <= 1``: switching times are uniform on
        ``[low * t_max, high * t_max]``.
    alpha_mean, beta_mean, gamma_mean
        Medians of the log-normal transcription, splicing and degradation rates, ``> 0``.
    rate_sd
        Log-scale standard deviation of the rates, ``>= 0`` (``0``: every gene has the medians).
    steady_state_fraction
        Fraction of cells, in ``[0, 1)``, placed at ``t = 0``.

    Returns
    -------
    AnnData of shape ``(n_obs, n_vars)`` with

    - ``layers["Mu"]``, ``layers["Ms"]``: noisy moments, dense float64 ``(n_obs, n_vars)``.
    - ``layers["unspliced"]``, ``layers["spliced"]``: Poisson counts, int32 CSR.
    - ``X``: the spliced counts as float32 CSR.
    - ``layers["true_u"]``, ``layers["true_s"]``: noise-free abundances, dense float64.
    - ``obs["true_t"]``: the time of each cell; ``obs["true_size_factor"]``: its size factor.
    - ``var["true_alpha"]``, ``var["true_beta"]``, ``var["true_gamma"]``, ``var["true_t_"]``,
      ``var["true_scaling"]`` (all ones).
    - ``uns["simulate"]``: the arguments of the call.

    Examples
    --------
    >>> import velofit as vf
    >>> adata = vf.datasets.simulate(n_obs=200, n_vars=10, time_density="early", seed=1)
    >>> adata.layers["Ms"].shape
    (200, 10)
    """
    _check_arguments(
        n_obs=n_obs,
        n_vars=n_vars,
        noise=noise,
        time_density=time_density,
        t_max=t_max,
        switch_range=switch_range,
        alpha_mean=alpha_mean,
        beta_mean=beta_mean,
        gamma_mean=gamma_mean,
        rate_sd=rate_sd,
        steady_state_fraction=steady_state_fraction,
    )
    rng = np.random.default_rng(seed)
    alpha = alpha_mean * np.exp(rate_sd * rng.standard_normal(n_vars))
    beta = beta_mean * np.exp(rate_sd * rng.standard_normal(n_vars))
    gamma = gamma_mean * np.exp(rate_sd * rng.standard_normal(n_vars))
    t_switch = t_max * rng.uniform(switch_range[0], switch_range[1], size=n_vars)
    scaling = np.ones(n_vars)

    t = t_max * _draw_time_fractions(rng, n_obs, time_density)
    n_steady = round(steady_state_fraction * n_obs)
    t[rng.permutation(n_obs)[:n_steady]] = 0.0

    true_u, true_s = _evaluate(t, alpha, beta, gamma, t_switch, scaling)
    mu = _add_noise(rng, true_u, noise)
    ms = _add_noise(rng, true_s, noise)
    size_factor = np.exp(_SIZE_FACTOR_SD * rng.standard_normal(n_obs))
    unspliced = sp.csr_matrix(rng.poisson(size_factor[:, None] * true_u).astype(np.int32))
    spliced = sp.csr_matrix(rng.poisson(size_factor[:, None] * true_s).astype(np.int32))

    obs = pd.DataFrame(
        {"true_t": t, "true_size_factor": size_factor},
        index=pd.Index([f"cell_{i}" for i in range(n_obs)]),
    )
    var = pd.DataFrame(
        {
            "true_alpha": alpha,
            "true_beta": beta,
            "true_gamma": gamma,
            "true_t_": t_switch,
            "true_scaling": scaling,
        },
        index=pd.Index([f"gene_{g}" for g in range(n_vars)]),
    )
    arguments: dict[str, Any] = {
        "n_obs": int(n_obs),
        "n_vars": int(n_vars),
        "seed": int(seed),
        "noise": float(noise),
        "time_density": time_density,
        "t_max": float(t_max),
        "switch_range": [float(switch_range[0]), float(switch_range[1])],
        "alpha_mean": float(alpha_mean),
        "beta_mean": float(beta_mean),
        "gamma_mean": float(gamma_mean),
        "rate_sd": float(rate_sd),
        "steady_state_fraction": float(steady_state_fraction),
    }
    return anndata.AnnData(
        X=spliced.astype(np.float32),
        obs=obs,
        var=var,
        layers={
            "Mu": mu,
            "Ms": ms,
            "unspliced": unspliced,
            "spliced": spliced,
            "true_u": true_u,
            "true_s": true_s,
        },
        uns={"simulate": arguments},
    )


def _check_arguments(
    *,
    n_obs: int,
    n_vars: int,
    noise: float,
    time_density: str,
    t_max: float,
    switch_range: tuple[float, float],
    alpha_mean: float,
    beta_mean: float,
    gamma_mean: float,
    rate_sd: float,
    steady_state_fraction: float,
) -> None:
    for name, value in (("n_obs", n_obs), ("n_vars", n_vars)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if time_density not in TIME_DENSITIES:
        raise ValueError(
            f"unknown time_density {time_density!r}; choose one of {', '.join(map(repr, TIME_DENSITIES))}"
        )
    if not (noise >= 0 and np.isfinite(noise)):
        raise ValueError(f"noise must be finite and >= 0, got {noise!r}")
    if not (t_max > 0 and np.isfinite(t_max)):
        raise ValueError(f"t_max must be finite and > 0, got {t_max!r}")
    if len(switch_range) != 2 or not 0 < switch_range[0] <= switch_range[1] <= 1:
        raise ValueError(
            f"switch_range must be (low, high) with 0 < low <= high <= 1 (fractions of t_max), "
            f"got {switch_range!r}"
        )
    for name, value in (("alpha_mean", alpha_mean), ("beta_mean", beta_mean), ("gamma_mean", gamma_mean)):
        if not (value > 0 and np.isfinite(value)):
            raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    if not (rate_sd >= 0 and np.isfinite(rate_sd)):
        raise ValueError(f"rate_sd must be finite and >= 0, got {rate_sd!r}")
    if not 0 <= steady_state_fraction < 1:
        raise ValueError(f"steady_state_fraction must be in [0, 1), got {steady_state_fraction!r}")


def _draw_time_fractions(rng: np.random.Generator, n_obs: int, time_density: str) -> np.ndarray:
    """Draw ``n_obs`` values of ``t / t_max`` on ``[0, 1]`` from one of :data:`TIME_DENSITIES`."""
    if time_density == "uniform":
        return rng.uniform(0.0, 1.0, size=n_obs)
    if time_density == "early":
        return rng.beta(1.0, 3.0, size=n_obs)
    if time_density == "late":
        return rng.beta(3.0, 1.0, size=n_obs)
    centres = np.asarray(_BURST_CENTRES)[rng.integers(0, len(_BURST_CENTRES), size=n_obs)]
    x = rng.normal(centres, _BURST_SD)
    outside = (x < 0.0) | (x > 1.0)
    while outside.any():
        x[outside] = rng.normal(centres[outside], _BURST_SD)
        outside = (x < 0.0) | (x > 1.0)
    return x


def _evaluate(
    t: np.ndarray,
    alpha: np.ndarray,
    beta: np.ndarray,
    gamma: np.ndarray,
    t_switch: np.ndarray,
    scaling: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Model ``(u, s)`` of shape ``(n_obs, n_vars)`` at cell times ``t`` (float64, numpy).

    The grid is flattened and evaluated in fixed-size chunks so that one compilation serves
    every shape.
    """
    shape = (t.size, alpha.size)
    columns = [np.broadcast_to(t[:, None], shape).ravel()]
    columns += [np.broadcast_to(p[None, :], shape).ravel() for p in (alpha, beta, gamma, t_switch, scaling)]
    n = shape[0] * shape[1]
    u = np.empty(n)
    s = np.empty(n)
    with jax.enable_x64(True):
        for start in range(0, n, _EVAL_CHUNK):
            stop = min(start + _EVAL_CHUNK, n)
            chunk = [_padded(c[start:stop], fill) for c, fill in zip(columns, _EVAL_FILL)]
            u_chunk, s_chunk = _observed_trajectory(*chunk)
            u[start:stop] = np.asarray(u_chunk, dtype=np.float64)[: stop - start]
            s[start:stop] = np.asarray(s_chunk, dtype=np.float64)[: stop - start]
    # exact abundances are >= 0; clip rounding just below zero so Poisson rates stay valid
    return np.maximum(u.reshape(shape), 0.0), np.maximum(s.reshape(shape), 0.0)


def _padded(values: np.ndarray, fill: float) -> jnp.ndarray:
    """``values`` extended with ``fill`` to length ``_EVAL_CHUNK``, as a float64 JAX array."""
    padded = np.pad(values, (0, _EVAL_CHUNK - values.size), constant_values=fill)
    return jnp.asarray(padded, dtype=jnp.float64)


@jax.jit
def _observed_trajectory(
    t: jnp.ndarray,
    alpha: jnp.ndarray,
    beta: jnp.ndarray,
    gamma: jnp.ndarray,
    t_switch: jnp.ndarray,
    scaling: jnp.ndarray,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Observed ``(scaling * u, s)`` at times ``t``; all arguments are flat, of one length."""
    u, s = trajectory(t, KineticParams(alpha=alpha, beta=beta, gamma=gamma, t_=t_switch, scaling=scaling))
    return scaling * u, s


def _add_noise(rng: np.random.Generator, truth: np.ndarray, noise: float) -> np.ndarray:
    """``truth`` plus Gaussian noise of sd ``noise * q99`` per gene, clipped at zero (a copy)."""
    scale = noise * np.percentile(truth, 99, axis=0)
    return np.clip(truth + scale * rng.standard_normal(truth.shape), 0.0, None)
