"""``model_loglik``: one goodness-of-fit measure for any scVelo-style fit (velofit's or scVelo's)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from anndata import AnnData

from .._validation import VelofitKeyError, check_adata, dense_layer
from ..core.kinetics import KineticParams, trajectory

_REQUIRED_VAR = ("fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling")
#: Cells x genes evaluated per block (bounds the memory of the evaluation).
_BLOCK_ELEMENTS = 1 << 22


def model_loglik(
    adata: AnnData,
    *,
    spliced_layer: str = "Ms",
    unspliced_layer: str = "Mu",
) -> pd.Series:
    """Mean Gaussian log-likelihood per cell of each gene's fitted model, one definition for all tools.

    The fitted parameters and times are read from scVelo's keys, so the same number can be
    computed for a fit by :func:`velofit.tl.recover_dynamics` and one by scVelo's
    ``recover_dynamics`` and compared directly. For every fitted gene:

    1. the model ``(u(t), s(t))`` is evaluated at each cell's ``layers["fit_t"]`` with
       ``alpha = fit_alpha``, ``beta = fit_beta * fit_scaling`` (both tools store ``beta``
       divided by ``scaling``), ``gamma = fit_gamma``, switching time ``fit_t_`` and start
       ``(0, 0)`` (MODEL.md section 1), in float64; the model's observed abundances are
       ``scaling * u(t) + fit_u0`` and ``s(t) + fit_s0`` (scVelo's basal-transcription
       offsets, as its ``compute_dynamics``; 0 when the columns are absent, and velofit
       writes 0);
    2. the cells used are those with ``Mu > 0`` and ``Ms > 0`` and a finite ``fit_t``;
    3. residuals ``r_u = (scaling * u(t) + fit_u0 - Mu) / std_u`` and
       ``r_s = (s(t) + fit_s0 - Ms) / std_s``,
       with ``std_u``, ``std_s`` the standard deviations of ``Mu``, ``Ms`` over those cells
       (computed from the data, not read from ``fit_std_u``/``fit_std_s``, so the scale does
       not depend on the tool);
    4. with the maximum-likelihood variance ``var = mean(r_u^2 + r_s^2) / 2`` the mean
       log-likelihood per cell of the bivariate isotropic Gaussian is
       ``-log(2 pi var) - 1``.

    Higher is better; the value is invariant to the time alignment of the fit (``fit_t``,
    ``fit_t_`` and the rates rescaled together) and to the scale of the data.

    Parameters
    ----------
    adata
        Data with the moments layers, ``var`` columns ``fit_alpha``, ``fit_beta``,
        ``fit_gamma``, ``fit_t_``, ``fit_scaling`` and ``layers["fit_t"]``. ``fit_status``
        (velofit) is used when present, and ``fit_u0``/``fit_s0`` offsets when present.
    spliced_layer, unspliced_layer
        Layers holding the spliced and unspliced moments the fit was made on.

    Returns
    -------
    :class:`pandas.Series` named ``"model_loglik"`` indexed by ``adata.var_names``; ``nan``
    for genes not fitted (a non-finite or non-positive parameter, ``fit_status != "ok"``, no
    finite ``fit_t``) and for genes with fewer than two usable cells or a constant layer.

    Raises
    ------
    KeyError
        If a ``fit_*`` column, ``layers["fit_t"]`` or a moments layer is missing.
    """
    adata = check_adata(adata)
    var = adata.var
    missing = [key for key in _REQUIRED_VAR if key not in var.columns]
    if "fit_t" not in adata.layers:
        missing.append("layers['fit_t']")
    if missing:
        raise VelofitKeyError(
            f"model_loglik needs a fitted model; missing {missing}. Run velofit.tl.recover_dynamics(adata) "
            "(or scVelo's recover_dynamics) first"
        )
    for layer in (spliced_layer, unspliced_layer):
        if layer not in adata.layers:
            present = ", ".join(sorted(adata.layers.keys())) or "none"
            raise VelofitKeyError(
                f"layer {layer!r} not found (layers present: {present}); pass spliced_layer=/unspliced_layer= "
                "naming the moments the model was fitted on"
            )

    pars = {key: var[key].to_numpy(dtype=float) for key in _REQUIRED_VAR}
    fitted = np.ones(adata.n_vars, dtype=bool)
    for key, values in pars.items():
        fitted &= np.isfinite(values)
        if key != "fit_t_":
            fitted &= values > 0
    fitted &= pars["fit_t_"] >= 0
    if "fit_status" in var.columns:
        fitted &= np.asarray(var["fit_status"] == "ok")
    offsets = []
    for key in ("fit_u0", "fit_s0"):
        values = var[key].to_numpy(dtype=float) if key in var.columns else np.zeros(adata.n_vars)
        values = np.where(np.isnan(values), 0.0, values)
        fitted &= np.isfinite(values)
        offsets.append(values)
    t_all = np.asarray(adata.layers["fit_t"], dtype=float)
    fitted &= np.isfinite(t_all).any(axis=0)

    result = np.full(adata.n_vars, np.nan)
    genes = np.flatnonzero(fitted)
    block = max(1, _BLOCK_ELEMENTS // max(adata.n_obs, 1))
    for start in range(0, genes.size, block):
        idx = genes[start : start + block]
        ms = dense_layer(adata, spliced_layer, idx)
        mu = dense_layer(adata, unspliced_layer, idx)
        result[idx] = _loglik_block(
            t_all[:, idx], mu, ms, *(pars[key][idx] for key in _REQUIRED_VAR), offsets[0][idx], offsets[1][idx]
        )
    return pd.Series(result, index=adata.var_names.copy(), name="model_loglik")


def _loglik_block(t, mu, ms, alpha, beta_obs, gamma, t_, scaling, u0, s0) -> np.ndarray:
    use = (mu > 0) & (ms > 0) & np.isfinite(t)
    n = use.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        std_u = _masked_std(mu, use, n)
        std_s = _masked_std(ms, use, n)
    with jax.enable_x64(True):
        params = KineticParams(
            *(jnp.asarray(p, jnp.float64) for p in (alpha, beta_obs * scaling, gamma, t_, scaling))
        )
        u, s = trajectory(jnp.asarray(np.where(np.isfinite(t), t, 0.0), jnp.float64), params)
        u, s = np.asarray(u), np.asarray(s)
    with np.errstate(invalid="ignore", divide="ignore"):
        r_u = (scaling[None, :] * u + u0[None, :] - mu) / std_u[None, :]
        r_s = (s + s0[None, :] - ms) / std_s[None, :]
        sq = np.where(use, r_u**2 + r_s**2, 0.0)
        var = sq.sum(axis=0) / (2.0 * n)
        out = -np.log(2.0 * np.pi * np.maximum(var, 1e-300)) - 1.0
    ok = (n >= 2) & (std_u > 0) & (std_s > 0) & np.isfinite(out)
    return np.where(ok, out, np.nan)


def _masked_std(x, use, n):
    mean = np.where(use, x, 0.0).sum(axis=0) / n
    return np.sqrt(np.where(use, (x - mean[None, :]) ** 2, 0.0).sum(axis=0) / n)
