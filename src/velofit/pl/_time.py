"""Figures of the shared latent time: the learned prior, per-cell posteriors, the EM trace."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .._validation import VelofitInputError, VelofitKeyError, check_adata


def _time_store(adata: AnnData, *keys: str) -> dict:
    store = adata.uns.get("velofit", {})
    missing = [k for k in keys if k not in store]
    if missing:
        raise VelofitKeyError(
            f"uns['velofit'] lacks {missing}; run velofit.tl.latent_time(adata) (or a shared fit) first"
        )
    return store


def _new_axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size)
    return fig, fig.add_subplot(1, 1, 1)


def time_prior(adata: AnnData, *, bins: int = 40, ax: Axes | None = None) -> Figure:
    """The time prior learned on the shared clock, over the histogram of latent times.

    Parameters
    ----------
    adata
        Data after :func:`velofit.tl.latent_time`.
    bins
        Histogram bins of ``obs["latent_time"]``.
    ax
        Axes to draw into (default: a new figure).

    Returns
    -------
    The :class:`~matplotlib.figure.Figure`; the prior is drawn as a density (weights divided
    by the grid spacing), as is the histogram.
    """
    adata = check_adata(adata, what="pl.time_prior")
    store = _time_store(adata, "time_grid", "prior")
    grid = np.asarray(store["time_grid"], np.float64)
    prior = np.asarray(store["prior"], np.float64)
    spacing = (grid[-1] - grid[0]) / max(grid.size - 1, 1)
    fig, ax = _new_axes(ax, (5.0, 3.2))
    if "latent_time" in adata.obs:
        ax.hist(adata.obs["latent_time"].to_numpy(np.float64), bins=bins, range=(0.0, 1.0), density=True,
                color="0.8", label="latent time of cells")
    ax.plot(grid, prior / spacing, color="C0", lw=2, label="prior")
    ax.axhline(1.0, color="0.4", lw=0.8, ls="--", label="uniform")
    kind = store.get("latent_time_params", {}).get("prior", "")
    ax.set(xlabel="shared time", ylabel="density", title=f"time prior ({kind})" if kind else "time prior")
    ax.legend(frameon=False, fontsize="small")
    return fig


def posterior(
    adata: AnnData,
    cells: Sequence[int] | Sequence[str] | np.ndarray | None = None,
    *,
    n_cells: int = 6,
    ax: Axes | None = None,
) -> Figure:
    """Posterior over the shared clock of selected cells, with their posterior means.

    Parameters
    ----------
    adata
        Data after :func:`velofit.tl.latent_time`.
    cells
        Integer positions, ``obs_names`` or a boolean mask; default ``n_cells`` cells evenly
        spread over latent time.
    n_cells
        Number of cells shown when ``cells`` is ``None``.
    ax
        Axes to draw into (default: a new figure).

    Returns
    -------
    The :class:`~matplotlib.figure.Figure`.
    """
    adata = check_adata(adata, what="pl.posterior")
    store = _time_store(adata, "time_grid")
    if "latent_time_posterior" not in adata.obsm:
        raise VelofitKeyError("obsm['latent_time_posterior'] not found; run velofit.tl.latent_time(adata) first")
    grid = np.asarray(store["time_grid"], np.float64)
    q = np.asarray(adata.obsm["latent_time_posterior"], np.float64)
    idx = _cell_positions(adata, cells, n_cells)
    fig, ax = _new_axes(ax, (5.0, 3.2))
    spacing = (grid[-1] - grid[0]) / max(grid.size - 1, 1)
    for k, i in enumerate(idx):
        color = f"C{k % 10}"
        ax.plot(grid, q[i] / spacing, color=color, lw=1.5, label=str(adata.obs_names[i]))
        if "latent_time" in adata.obs:
            ax.axvline(float(adata.obs["latent_time"].iloc[i]), color=color, lw=0.8, ls=":")
    ax.set(xlabel="shared time", ylabel="posterior density", title="posterior over time")
    ax.legend(frameon=False, fontsize="x-small", ncols=2)
    return fig


def loglik(adata: AnnData, *, ax: Axes | None = None) -> Figure:
    """Log-likelihood per EM iteration of the latent-time / shared fit (never decreasing).

    Parameters
    ----------
    adata
        Data after :func:`velofit.tl.latent_time` or a shared fit.
    ax
        Axes to draw into (default: a new figure).

    Returns
    -------
    The :class:`~matplotlib.figure.Figure`.
    """
    adata = check_adata(adata, what="pl.loglik")
    trace = np.asarray(_time_store(adata, "loglik")["loglik"], np.float64)
    trace = trace[np.isfinite(trace)]
    if trace.size == 0:
        raise VelofitInputError("uns['velofit']['loglik'] is empty; nothing to plot")
    fig, ax = _new_axes(ax, (5.0, 3.2))
    ax.plot(np.arange(trace.size), trace, marker="o", ms=2.5, lw=1.2)
    ax.set(xlabel="EM iteration", ylabel="log-likelihood", title="soft EM")
    return fig


def _cell_positions(adata: AnnData, cells, n_cells: int) -> np.ndarray:
    if cells is None:
        if "latent_time" in adata.obs:
            order = np.argsort(adata.obs["latent_time"].to_numpy(np.float64), kind="stable")
        else:
            order = np.arange(adata.n_obs)
        take = np.linspace(0, adata.n_obs - 1, min(max(n_cells, 1), adata.n_obs)).round().astype(int)
        return order[take]
    arr = np.asarray(cells)
    if arr.dtype == bool:
        if arr.shape != (adata.n_obs,):
            raise VelofitInputError(f"a boolean cells mask must have length n_obs={adata.n_obs}, got {arr.shape}")
        return np.flatnonzero(arr)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < -adata.n_obs or arr.max() >= adata.n_obs):
            raise VelofitInputError(f"cells has positions outside [0, {adata.n_obs})")
        return np.atleast_1d(arr) % adata.n_obs
    index = adata.obs_names.get_indexer(np.atleast_1d(arr).astype(str))
    if np.any(index < 0):
        raise VelofitKeyError(f"cells not in obs_names, e.g. {list(np.atleast_1d(arr)[index < 0][:5])}")
    return index
