"""Phase portraits of fitted genes and convergence traces of the EM."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib as mpl
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .._validation import (
    VelofitInputError,
    VelofitKeyError,
    check_adata,
    check_int,
    dense_layer,
    resolve_var_names,
)
from ..tl._embedding import fitted_params, model_curve

#: Points of the time grid in each phase of a fitted curve.
_CURVE_POINTS = 200


def phase_portrait(
    adata: AnnData,
    genes: str | Sequence[str],
    *,
    basis: tuple[str, str] | None = None,
    color: str | None = None,
    ncols: int = 4,
    ax: Axes | None = None,
) -> Figure:
    """Spliced (x) against unspliced (y) moments of each gene, with the fitted kinetics.

    Per gene: the cells, the fitted trajectory in observed units (``u = fit_scaling *
    u_model``) from ``t = 0`` to the latest fitted time (induction solid, repression dashed),
    the switching point ``(s(t_), u(t_))`` and the steady-state line ``u = (gamma / beta) s``
    (``fit_gamma / fit_beta``). Genes without a fit show the cells only.

    Parameters
    ----------
    adata
        Data with spliced/unspliced moments, ideally after
        :func:`velofit.tl.recover_dynamics`.
    genes
        A gene name or a list of names, one panel each.
    basis
        ``(spliced_layer, unspliced_layer)`` drawn on x and y; default the layers the fit used
        (``uns["recover_dynamics"]``), else ``("Ms", "Mu")``. The fitted curve is drawn only
        on the layers the fit used.
    color
        ``obs`` column (categorical: one colour per category with a legend; numeric: a
        colormap) or a layer name (per gene); default the gene's fitted time ``fit_t`` when
        present, else grey.
    ncols
        Panels per row.
    ax
        Draw into this Axes (only with a single gene).

    Returns
    -------
    The Figure, with one Axes per gene (plus a colorbar Axes for a numeric ``color``).
    """
    adata = check_adata(adata)
    names = [genes] if isinstance(genes, str) else list(genes)
    if not names:
        raise VelofitInputError("genes is empty; pass at least one gene name")
    resolve_var_names(adata, names)  # raises a clear error for unknown names
    idx = adata.var_names.get_indexer(names)  # in the caller's order
    if ax is not None and len(names) != 1:
        raise VelofitInputError(f"ax= draws one gene, but {len(names)} genes were given; leave ax=None")
    check_int("ncols", ncols, minimum=1)
    if basis is not None and (isinstance(basis, str) or len(basis) != 2 or not all(isinstance(b, str) for b in basis)):
        raise VelofitInputError(f"basis must be a pair of layer names (spliced, unspliced), got {basis!r}")
    spliced_layer, unspliced_layer = tuple(basis) if basis is not None else _fit_layers(adata)
    ms = dense_layer(adata, spliced_layer, idx)
    mu = dense_layer(adata, unspliced_layer, idx)

    fig, axes = grid_figure(len(names), ncols=ncols, ax=ax, panel_size=(3.2, 3.0))
    color_key = color if color is not None else ("fit_t" if "fit_t" in adata.layers else None)
    for k, (gene, axis) in enumerate(zip(names, axes)):
        values = _colour_values(adata, color_key, idx[k])
        color_points(axis, ms[:, k], mu[:, k], values, adata, color_key, colorbar=(k == len(names) - 1))
        if (spliced_layer, unspliced_layer) == _fit_layers(adata):  # the curve is in these units
            _draw_fit(axis, adata, idx[k], ms[:, k], mu[:, k], legend=(k == 0))
        axis.set_xlabel(spliced_layer)
        axis.set_ylabel(unspliced_layer)
        axis.set_title(_title(adata, gene, idx[k]), fontsize=9)
    return fig


def loss_trace(adata: AnnData, genes: str | Sequence[str] | None = None) -> Figure:
    """Convergence of the EM: each gene's loss per iteration and the loss summed over genes.

    Parameters
    ----------
    adata
        Data after :func:`velofit.tl.recover_dynamics` (reads ``varm["loss"]``).
    genes
        Genes to draw; default every fitted gene.

    Returns
    -------
    The Figure with two Axes: per-gene loss relative to its value at iteration 0 (log scale),
    and the summed loss per iteration over the drawn genes.
    """
    adata = check_adata(adata)
    if "loss" not in adata.varm:
        raise VelofitKeyError("varm['loss'] not found; run velofit.tl.recover_dynamics(adata) first")
    loss = np.asarray(adata.varm["loss"], dtype=np.float64)
    if genes is None:
        idx = np.flatnonzero(np.any(np.isfinite(loss), axis=1))
    else:
        idx = resolve_var_names(adata, [genes] if isinstance(genes, str) else list(genes))
    loss = loss[idx]
    fig, (ax_gene, ax_total) = grid_figure(2, ncols=2, panel_size=(4.2, 3.2))
    iterations = np.arange(loss.shape[1])
    start = loss[:, :1]
    relative = np.divide(loss, start, out=np.full_like(loss, np.nan), where=start > 0)
    if relative.size:
        ax_gene.plot(iterations, relative.T, color="tab:blue", alpha=min(1.0, 5.0 / max(len(idx), 1)), lw=0.8)
        # a converged gene keeps its last loss: carry it forward so the median covers every gene
        carried = pd.DataFrame(relative).ffill(axis=1).to_numpy()
        carried = carried[np.isfinite(carried[:, 0])]
        if carried.size:
            ax_gene.plot(iterations, np.median(carried, axis=0), color="black", lw=2, label="median")
            ax_gene.legend(frameon=False, fontsize=8)
    ax_gene.set_yscale("log")
    ax_gene.set_xlabel("EM iteration")
    ax_gene.set_ylabel("loss / initial loss")
    ax_gene.set_title(f"per gene ({len(idx)} genes)", fontsize=9)
    total = np.nansum(loss, axis=0) if loss.size else np.zeros(loss.shape[1])
    ax_total.plot(iterations, total, marker="o", ms=3, color="black")
    n_explicit = adata.uns.get("recover_dynamics", {}).get("n_explicit")
    if n_explicit is not None and 0 < int(n_explicit) < loss.shape[1] - 1:
        ax_total.axvline(int(n_explicit), color="grey", ls=":", lw=1, label="explicit -> exact time")
        ax_total.legend(frameon=False, fontsize=8)
    ax_total.set_xlabel("EM iteration")
    ax_total.set_ylabel("summed loss")
    ax_total.set_title("sum over genes", fontsize=9)
    return fig


def _fit_layers(adata: AnnData) -> tuple[str, str]:
    settings = adata.uns.get("recover_dynamics", {})
    return str(settings.get("spliced_layer", "Ms")), str(settings.get("unspliced_layer", "Mu"))


def _is_fitted(adata: AnnData, gene: int) -> bool:
    needed = ("fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling", "fit_status")
    return all(k in adata.var.columns for k in needed) and adata.var["fit_status"].iloc[gene] == "ok"


def _title(adata: AnnData, name: str, gene: int) -> str:
    if "fit_status" not in adata.var.columns:
        return name
    if not _is_fitted(adata, gene):
        return f"{name} (not fitted: {adata.var['fit_status'].iloc[gene]})"
    if "fit_likelihood" in adata.var.columns:
        return f"{name}  (likelihood {adata.var['fit_likelihood'].iloc[gene]:.2f})"
    return name


def _colour_values(adata: AnnData, key: str | None, gene: int):
    if key is None:
        return None
    if key in adata.obs.columns:
        return adata.obs[key]
    if key in adata.layers:
        column = adata.layers[key][:, [gene]]
        column = column.toarray() if sp.issparse(column) else column
        return np.asarray(column, dtype=np.float64).ravel()
    raise VelofitKeyError(f"color={key!r} is neither an obs column nor a layer")


def _draw_fit(
    axis: Axes, adata: AnnData, gene: int, spliced: np.ndarray, unspliced: np.ndarray, *, legend: bool
) -> None:
    if not _is_fitted(adata, gene):
        return
    params = fitted_params(adata, np.array([gene]))
    t_switch = float(params.t_[0])
    t_end = t_switch
    if "fit_t" in adata.layers:
        t_end = max(t_end, float(np.nanmax(np.asarray(adata.layers["fit_t"][:, gene]))))
    grid_on = np.linspace(0.0, t_switch, _CURVE_POINTS)[:, None]
    grid_off = np.linspace(t_switch, max(t_end, t_switch), _CURVE_POINTS)[:, None]
    u_on, s_on = model_curve(grid_on, params)
    u_off, s_off = model_curve(grid_off, params)
    axis.plot(s_on[:, 0], u_on[:, 0], color="tab:purple", lw=2, label="induction")
    axis.plot(s_off[:, 0], u_off[:, 0], color="tab:purple", lw=2, ls="--", label="repression")
    axis.scatter([s_on[-1, 0]], [u_on[-1, 0]], marker="*", s=140, color="tab:red",
                 edgecolor="black", linewidth=0.6, zorder=5, label="switch")
    ratio = float(adata.var["fit_gamma"].iloc[gene] / adata.var["fit_beta"].iloc[gene])
    s_max = float(np.nanmax([np.nanmax(spliced), np.nanmax(s_on), np.nanmax(s_off)]))
    u_max = float(np.nanmax([np.nanmax(unspliced), np.nanmax(u_on), np.nanmax(u_off)]))
    if np.isfinite(ratio) and ratio > 0 and np.isfinite(s_max) and np.isfinite(u_max):
        s_end = min(s_max, u_max / ratio)  # stay inside the data's box
        axis.plot([0.0, s_end], [0.0, ratio * s_end], color="grey", ls=":", lw=1.2, label="steady state")
    if legend:
        axis.legend(frameon=False, fontsize=6, loc="upper left")


# ------------------------------------------------------------------ shared figure helpers


def grid_figure(
    n_panels: int, *, ncols: int = 4, ax: Axes | None = None, panel_size: tuple[float, float] = (3.2, 3.0)
) -> tuple[Figure, list[Axes]]:
    """A Figure with ``n_panels`` Axes on a grid (unused grid cells removed), or ``ax``'s Figure.

    Parameters
    ----------
    n_panels
        Number of Axes wanted.
    ncols
        Panels per row.
    ax
        Use this Axes (then ``n_panels`` must be 1).
    panel_size
        ``(width, height)`` of one panel in inches.

    Returns
    -------
    ``(figure, axes)`` with ``len(axes) == n_panels``.
    """
    if ax is not None:
        return ax.figure, [ax]
    ncols = max(1, min(ncols, n_panels))
    nrows = -(-n_panels // ncols)
    # Figure() rather than pyplot: no global figure registry, nothing to close, no show().
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    grid = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for extra in grid[n_panels:]:
        extra.remove()
    return fig, list(grid[:n_panels])


def color_points(
    axis: Axes,
    x: np.ndarray,
    y: np.ndarray,
    values,
    adata: AnnData,
    key: str | None,
    *,
    colorbar: bool = True,
    size: float | None = None,
) -> None:
    """Scatter ``(x, y)`` coloured by categorical or numeric ``values`` (grey when ``None``).

    Parameters
    ----------
    axis
        Target Axes.
    x, y
        ``(n_obs,)`` coordinates.
    values
        ``None``, a categorical/string Series (one colour per category, scanpy's
        ``uns[f"{key}_colors"]`` when present, with a legend) or numeric values (viridis).
    adata
        The data (for stored category colours).
    key
        Name shown in the legend or on the colorbar.
    colorbar
        Add a colorbar for numeric values.
    size
        Marker size; default from the number of points.
    """
    size = size if size is not None else float(np.clip(3000.0 / max(len(x), 1), 2.0, 30.0))
    if values is None:
        axis.scatter(x, y, s=size, color="lightgrey", edgecolor="none", rasterized=True)
        return
    series = pd.Series(values) if not isinstance(values, pd.Series) else values
    if isinstance(series.dtype, pd.CategoricalDtype) or series.dtype == object or series.dtype == bool:
        categories = series.astype("category")
        names = list(categories.cat.categories)
        stored = adata.uns.get(f"{key}_colors") if key is not None else None
        palette = list(stored) if stored is not None and len(stored) >= len(names) else [
            mpl.colormaps["tab20"](k % 20) for k in range(len(names))
        ]
        codes = categories.cat.codes.to_numpy()
        for k, name in enumerate(names):
            mask = codes == k
            axis.scatter(x[mask], y[mask], s=size, color=palette[k], edgecolor="none", label=str(name), rasterized=True)
        axis.legend(frameon=False, fontsize=6, markerscale=2, loc="best")
        return
    numeric = np.asarray(series, dtype=np.float64)
    if not np.isfinite(numeric).any():
        axis.scatter(x, y, s=size, color="lightgrey", edgecolor="none", rasterized=True)
        return
    order = np.argsort(numeric, kind="stable")  # latest on top
    points = axis.scatter(x[order], y[order], c=numeric[order], s=size, cmap="viridis", edgecolor="none", rasterized=True)
    if colorbar:
        axis.figure.colorbar(points, ax=axis, label=key, shrink=0.8)
