"""``velocity``: RNA velocity from the fitted kinetics, in scVelo's layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from anndata import AnnData

from .._validation import (
    VelofitInputError,
    VelofitKeyError,
    check_adata,
    check_bool,
    check_key,
    check_number,
)
from ..core.kinetics import KineticParams, velocities
from ._recover_dynamics import DEFAULT_MIN_LIKELIHOOD, select_velocity_genes

_REQUIRED = ("fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling", "fit_likelihood", "fit_status")


def velocity(
    adata: AnnData,
    *,
    vkey: str = "velocity",
    min_likelihood: float = DEFAULT_MIN_LIKELIHOOD,
    copy: bool = False,
) -> AnnData | None:
    """Spliced and unspliced velocities of every fitted gene at every cell's fitted time.

    ``v_s = beta u(t) - gamma s(t)`` and ``v_u = alpha_k - beta u(t)`` evaluated on the model
    trajectory at the cell's time (as scVelo's dynamical mode does, without its soft mixing
    of the two phases), in the units of ``Ms`` and ``Mu`` per unit of the gene's clock.

    Parameters
    ----------
    adata
        Data after :func:`velofit.tl.recover_dynamics`.
    vkey
        Name of the velocity layer (``f"{vkey}_u"`` for unspliced).
    min_likelihood
        ``fit_likelihood`` threshold of ``var[f"{vkey}_genes"]``.
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy if ``copy=True``. Written: ``layers[vkey]``, ``layers[f"{vkey}_u"]``
    (``nan`` for genes not fitted), ``var[f"{vkey}_genes"]``, ``uns[f"{vkey}_params"]``.
    """
    adata = check_adata(adata)
    check_key("vkey", vkey)
    check_number("min_likelihood", min_likelihood, minimum=0.0, maximum=1.0)
    check_bool("copy", copy)
    missing = [k for k in _REQUIRED if k not in adata.var.columns]
    if missing or "fit_t" not in adata.layers:
        raise VelofitKeyError(
            f"no fitted dynamics found (missing {missing or ['layers/fit_t']}); "
            "run velofit.tl.recover_dynamics(adata) first"
        )
    _check_fitted(adata)
    out = adata.copy() if copy else adata
    var = out.var
    fitted = np.flatnonzero(np.asarray(var["fit_status"] == "ok"))
    v_s = np.full(out.shape, np.nan)
    v_u = np.full(out.shape, np.nan)
    if fitted.size:
        scaling = var["fit_scaling"].to_numpy(dtype=float)[fitted]
        params = KineticParams(
            var["fit_alpha"].to_numpy(dtype=float)[fitted],
            var["fit_beta"].to_numpy(dtype=float)[fitted] * scaling,
            var["fit_gamma"].to_numpy(dtype=float)[fitted],
            var["fit_t_"].to_numpy(dtype=float)[fitted],
            scaling,
        )
        t = np.asarray(out.layers["fit_t"])[:, fitted]
        with jax.enable_x64(True):
            vu, vs = velocities(jnp.asarray(t, jnp.float64), KineticParams(*map(jnp.asarray, params)))
            v_s[:, fitted] = np.asarray(vs)
            v_u[:, fitted] = np.asarray(vu) * scaling[None, :]
    out.layers[vkey] = v_s
    out.layers[f"{vkey}_u"] = v_u
    out.var[f"{vkey}_genes"] = select_velocity_genes(out, min_likelihood)
    out.uns[f"{vkey}_params"] = {"mode": "dynamical", "min_likelihood": min_likelihood}
    return out if copy else None


def _check_fitted(adata: AnnData) -> None:
    """Genes marked fitted must have finite positive parameters and finite times."""
    var = adata.var
    ok = np.flatnonzero(np.asarray(var["fit_status"] == "ok"))
    if ok.size == 0:
        return
    params = np.stack(
        [var[k].to_numpy(dtype=float)[ok] for k in ("fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling")]
    )
    t = np.asarray(adata.layers["fit_t"])[:, ok]
    with np.errstate(invalid="ignore"):
        bad = ~(np.all(np.isfinite(params) & (params > 0), axis=0) & np.all(np.isfinite(t), axis=0))
    if bad.any():
        names = list(adata.var_names[ok[bad]][:5])
        raise VelofitInputError(
            f"{int(bad.sum())} gene(s) marked fit_status == 'ok' have non-finite or non-positive fit_alpha/"
            f"fit_beta/fit_gamma/fit_t_/fit_scaling or non-finite layers['fit_t'], e.g. {names}; "
            "rerun velofit.tl.recover_dynamics(adata) instead of editing its output"
        )
