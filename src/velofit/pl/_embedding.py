"""Figures on an embedding: latent time and the velocity stream (matplotlib only, no scVelo)."""

from __future__ import annotations

import numpy as np
from anndata import AnnData
from matplotlib.figure import Figure
from scipy.spatial import cKDTree

from .._validation import VelofitInputError, VelofitKeyError, check_adata
from ..tl._embedding import project_embedding
from ._phase import color_points, grid_figure

#: Grid points per axis on which velocities are averaged for the stream plot.
_GRID = 50


def latent_time(adata: AnnData, basis: str = "umap", *, key: str = "latent_time") -> Figure:
    """The embedding coloured by latent time.

    Parameters
    ----------
    adata
        Data with ``obsm[f"X_{basis}"]`` and ``obs[key]`` (from ``velofit.tl.latent_time``).
    basis
        Embedding name (``"umap"`` reads ``obsm["X_umap"]``).
    key
        ``obs`` column with the time.

    Returns
    -------
    The Figure: one Axes and its colorbar.
    """
    adata = check_adata(adata)
    if key not in adata.obs.columns:
        raise VelofitKeyError(f"obs[{key!r}] not found; run velofit.tl.latent_time(adata) first")
    x_emb = _embedding(adata, basis)
    fig, (axis,) = grid_figure(1, panel_size=(4.6, 4.0))
    color_points(axis, x_emb[:, 0], x_emb[:, 1], adata.obs[key].to_numpy(dtype=np.float64), adata, key)
    _decorate(axis, basis, key)
    return fig


def velocity_embedding_stream(
    adata: AnnData,
    basis: str = "umap",
    *,
    vkey: str = "velocity",
    color: str | None = None,
    density: float = 1.0,
    smooth: float = 0.5,
) -> Figure:
    """Streamlines of the velocities projected onto an embedding, over the cells.

    Cell velocities in the embedding are ``obsm[f"{vkey}_{basis}"]`` when present, else
    projected through the velocity graph (:func:`velofit.tl.velocity_embedding`, nothing is
    written to ``adata``). They are averaged on a 50 x 50 grid with Gaussian weights over
    each grid point's nearest cells (scVelo's ``compute_velocity_on_grid``); grid points away
    from the cells or with the slowest 5% of flow are left blank.

    Parameters
    ----------
    adata
        Data with ``obsm[f"X_{basis}"]`` and velocities (``layers[vkey]`` and
        ``obsp["connectivities"]``, or the projection).
    basis
        Embedding name.
    vkey
        Velocity key.
    color
        ``obs`` column colouring the cells; default ``"clusters"`` if present, else
        ``"latent_time"`` if present, else grey.
    density
        Density of the streamlines (matplotlib's ``streamplot``).
    smooth
        Width of the Gaussian weights in grid spacings.

    Returns
    -------
    The Figure: one Axes (plus a colorbar Axes for a numeric ``color``).
    """
    adata = check_adata(adata)
    if density <= 0 or smooth <= 0:
        raise VelofitInputError(f"density and smooth must be > 0, got {density!r} and {smooth!r}")
    x_emb = _embedding(adata, basis)[:, :2]
    key = f"{vkey}_{basis.removeprefix('X_')}"
    v_emb = np.asarray(adata.obsm[key], dtype=np.float64) if key in adata.obsm else project_embedding(
        adata, basis=basis, vkey=vkey
    )
    v_emb = np.nan_to_num(v_emb[:, :2])
    if color is None:
        color = next((c for c in ("clusters", "latent_time") if c in adata.obs.columns), None)
    elif color not in adata.obs.columns:
        raise VelofitKeyError(f"color={color!r} is not an obs column")

    fig, (axis,) = grid_figure(1, panel_size=(5.2, 4.2))
    values = adata.obs[color] if color is not None else None
    color_points(axis, x_emb[:, 0], x_emb[:, 1], values, adata, color)
    gx, gy, u, v = velocity_on_grid(x_emb, v_emb, smooth=smooth)
    speed = np.hypot(u, v)
    if np.isfinite(speed).any() and np.nanmax(speed) > 0:
        width = 0.5 + 1.5 * speed / np.nanmax(speed)
        axis.streamplot(gx, gy, u, v, color="black", linewidth=np.nan_to_num(width), density=density,
                        arrowsize=1.0, zorder=3)
    _decorate(axis, basis, f"{vkey} stream" + (f", {color}" if color else ""))
    return fig


def velocity_on_grid(
    x_emb: np.ndarray, v_emb: np.ndarray, *, n_grid: int = _GRID, smooth: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Average cell velocities on a regular grid over the embedding.

    Parameters
    ----------
    x_emb, v_emb
        ``(n_obs, 2)`` positions and velocities.
    n_grid
        Grid points per axis.
    smooth
        Gaussian width in grid spacings.

    Returns
    -------
    ``(gx, gy, u, v)``: ``(n_grid,)`` axes and ``(n_grid, n_grid)`` components (rows along
    ``gy``), ``nan`` where there are no cells nearby or the flow is in its slowest 5%.
    """
    lo, hi = x_emb.min(axis=0), x_emb.max(axis=0)
    pad = 0.01 * (hi - lo)
    gx = np.linspace(lo[0] - pad[0], hi[0] + pad[0], n_grid)
    gy = np.linspace(lo[1] - pad[1], hi[1] + pad[1], n_grid)
    mesh = np.stack(np.meshgrid(gx, gy), axis=-1).reshape(-1, 2)
    n_obs = x_emb.shape[0]
    k = int(min(n_obs, max(10, n_obs // 50)))
    dists, neighbours = cKDTree(x_emb).query(mesh, k=k)
    dists, neighbours = dists.reshape(len(mesh), k), neighbours.reshape(len(mesh), k)
    sigma = smooth * float(np.mean([gx[1] - gx[0], gy[1] - gy[0]]))
    weight = np.exp(-0.5 * (dists / max(sigma, 1e-12)) ** 2)
    mass = weight.sum(axis=1)
    grid_v = np.einsum("gk,gkd->gd", weight, v_emb[neighbours]) / np.maximum(mass, 1e-300)[:, None]
    # Blank where the nearest cells are farther than ~4 sigma (two grid spacings): no data.
    empty = mass < np.exp(-8.0)
    length = np.linalg.norm(grid_v, axis=1)
    finite = ~empty
    if finite.any():
        empty |= length < np.percentile(length[finite], 5)
    grid_v[empty] = np.nan
    u = grid_v[:, 0].reshape(n_grid, n_grid)
    v = grid_v[:, 1].reshape(n_grid, n_grid)
    return gx, gy, u, v


def _embedding(adata: AnnData, basis: str) -> np.ndarray:
    key = f"X_{basis.removeprefix('X_')}"
    if key not in adata.obsm:
        present = ", ".join(adata.obsm.keys()) or "none"
        raise VelofitKeyError(
            f"obsm[{key!r}] not found (obsm present: {present}); compute the embedding first, "
            "e.g. scanpy.tl.umap(adata) for basis='umap'"
        )
    x_emb = np.asarray(adata.obsm[key], dtype=np.float64)
    if x_emb.ndim != 2 or x_emb.shape[1] < 2:
        raise VelofitInputError(f"obsm[{key!r}] must have at least 2 columns, got shape {x_emb.shape}")
    return x_emb


def _decorate(axis, basis: str, title: str) -> None:
    name = basis.removeprefix("X_").upper()
    axis.set_xlabel(f"{name} 1")
    axis.set_ylabel(f"{name} 2")
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_title(title, fontsize=10)
