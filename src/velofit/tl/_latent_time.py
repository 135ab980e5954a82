"""``latent_time``: one time per cell from all genes, with its posterior and a learned prior."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from anndata import AnnData

from .. import __version__
from .._heap import release_free_memory
from .._io import LayerColumns, layer_readers
from .._validation import (
    VelofitInputError,
    VelofitKeyError,
    check_adata,
    check_bool,
    check_int,
    check_key,
)
from ..core import shared_time as st
from ..core import soft_em as se
from ..core.initialize import gene_statistics
from ..core.kinetics import KineticParams

#: Grid points of the shared clock.
DEFAULT_N_GRID = 200
#: Cells the EM iterates on when the data have more (see :func:`run_subsampled`).
DEFAULT_SUBSAMPLE = 20_000
#: EM iterations on all cells after a subsampled EM.
DEFAULT_REFINE_ITER = 10
#: Soft-EM iterations of ``latent_time`` after a per-gene fit.
DEFAULT_MAX_ITER = 50
#: Annealing iterations before the recorded EM; they start as broad as ~2 genes would make
#: the posterior (inverse temperature ``2 / n_genes``).
ANNEAL_STEPS = 10
#: Memory budget of one gene chunk of the shared-time passes, in bytes.
_CHUNK_BYTES = 256 * 1024**2
_FIT_COLUMNS = ("fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling", "fit_status")


def latent_time(
    adata: AnnData,
    *,
    root_key: str | tuple[str, Any] | None = None,
    root_cells: Sequence[int] | Sequence[str] | np.ndarray | None = None,
    n_grid: int = DEFAULT_N_GRID,
    prior: str = "learned",
    max_iter: int = DEFAULT_MAX_ITER,
    subsample: int | None = DEFAULT_SUBSAMPLE,
    refine_iter: int = DEFAULT_REFINE_ITER,
    seed: int = 0,
    spliced_layer: str | None = None,
    unspliced_layer: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Shared latent time of every cell, integrated over all fitted genes, with its posterior.

    After a per-gene fit (:func:`velofit.tl.recover_dynamics`), every gene's clock is mapped
    onto one shared clock ``t`` in ``[0, 1]`` by a per-gene affine map
    ``gene time = k_g (t - t0_g)`` estimated from the data (each gene's kinetic shape is kept):
    the maps are first searched against a median-of-genes clock (per cell, over the genes whose
    fit locates it: not near the gene's ``(0, 0)``, where its onset and late repression cannot
    be told apart; :func:`velofit.core.shared_time.clock_start`), the shared time is found by
    the multi-gene exact time of MODEL.md section 3, and then the maps, the per-gene noise and
    the time prior are refined by soft EM over a grid (MODEL.md section 5; only the maps move),
    after a few annealed iterations whose broad posteriors let cells cross gaps.
    After a shared fit (``recover_dynamics(adata, time="shared")``) the stored shared model is
    used as is. The posterior over the grid gives each cell's time (its mean, refined below the
    grid step) and spread (its standard deviation).

    Direction: every gene's clock runs forward (induction before repression, rates > 0), so
    the shared clock does too. Root cells, if given, override it: if they lie later than
    the average cell, the clock is reversed so that they get the earliest times.

    Parameters
    ----------
    adata
        Data after :func:`velofit.tl.recover_dynamics`.
    root_key
        ``(obs column, value)``: cells whose column equals the value are roots; or the name of
        a boolean ``obs`` column.
    root_cells
        Root cells as integer positions, ``obs_names`` or a boolean mask (overrides
        ``root_key``).
    n_grid
        Grid points of the clock (per-gene fits only; a shared fit keeps its grid).
    prior
        ``"learned"`` (Dirichlet-smoothed, estimated by EM) or ``"uniform"``.
    max_iter
        Soft-EM iterations (per-gene fits only).
    subsample, refine_iter
        With more cells than ``subsample``, the EM iterates on that many random cells, then
        up to ``refine_iter`` iterations on all cells (per-gene fits only; see
        :func:`velofit.tl.recover_dynamics_shared`). ``None``: all cells throughout.
    seed
        Seed of the cell subsets (the subsampled EM's and the initial clock maps').
    spliced_layer, unspliced_layer
        Moments; default the layers of the fit (``uns["recover_dynamics"]``), else ``Ms``/``Mu``.
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy if ``copy=True``. Written:

    ``obs["latent_time"]``: each cell's clock time, rescaled so that the cells span
    ``[0, 1]`` (the earliest cell 0, the latest 1, as scVelo's latent time; the clock's own
    origin and scale are not identified, so the cells may occupy only part of it). The clock
    time is the posterior mean, or, where the posterior is narrower than a grid step, the
    continuous best time within a step of it (see
    :func:`velofit.core.soft_em.posterior_spread`; after a hard shared fit: the refined best
    time). ``obs["latent_time_std"]``: posterior standard deviation in the same units (not
    below the Laplace width where the posterior is narrower than a grid step);
    ``obs["velofit_cell_noise"]``: the cell's noise factor;
    ``obsm["latent_time_posterior"]``: ``(n_obs, n_grid)`` float32 posterior over the grid;
    ``uns["velofit"]``: ``"time_grid"`` ``(n_grid,)`` the grid in latent-time units (it may
    extend beyond ``[0, 1]``), ``"prior"`` ``(n_grid,)`` prior weights, ``"loglik"``
    log-likelihood per EM iteration, ``"latent_time_params"`` (mode, prior, direction,
    number of genes, roots, and ``clock_range``: the clock times mapped to 0 and 1).
    """
    adata = check_adata(adata, what="latent_time")
    n_grid = check_int("n_grid", n_grid, minimum=3)
    max_iter = check_int("max_iter", max_iter, minimum=0)
    refine_iter = check_int("refine_iter", refine_iter, minimum=0)
    if subsample is not None:
        subsample = check_int("subsample", subsample, minimum=2)
    check_bool("copy", copy)
    if prior not in ("learned", "uniform"):
        raise VelofitInputError(f"prior must be 'learned' or 'uniform', got {prior!r}")
    roots = root_mask(adata, root_key=root_key, root_cells=root_cells)
    layers = _layers(adata, spliced_layer, unspliced_layer)
    out = adata.copy() if copy else adata
    shared = stored_shared_fit(out)
    if shared is not None:
        q, grid, log_pi, trace, clock, std, n_genes = _posterior_of_shared_fit(out, shared, layers)
        info = {"mode": "shared", "em": shared["em"], "prior": shared["prior_kind"]}
    else:
        genes = _fitted_genes(out)
        config = se.SoftEMConfig(mode="align", prior=prior, max_iter=max_iter, **annealing(genes.size))
        with jax.enable_x64(True):
            params, span, tau = gene_clocks(out, genes, layers)
            data = shared_data(out, genes, layers)
            grid = jnp.linspace(0.0, 1.0, n_grid)
            theta, var_u, var_s, _ = st.align_gene_fit(data, grid, params, span, tau, seed=seed)
            state, trace, _, _ = run_subsampled(
                data, grid, theta, var_u, var_s, config, subsample=subsample, refine_iter=refine_iter, seed=seed
            )
            clock, std = (np.asarray(a) for a in se.posterior_spread_jit(state, data, grid))
            q, log_pi, cell_noise = (np.asarray(a) for a in (state.q, state.log_pi, state.cell_scale))
            grid = np.asarray(grid)
            del data, state
            release_free_memory()  # the chunked copy of the data (see velofit._heap)
        out.obs["velofit_cell_noise"] = cell_noise
        n_genes = genes.size
        info = {"mode": "per_gene", "em": "soft", "prior": prior}
    write_latent_time(out, q, grid, np.exp(log_pi), trace, clock, std, roots, {**info, "n_genes": int(n_genes)})
    return out if copy else None


def root_mask(
    adata: AnnData,
    *,
    root_key: str | tuple[str, Any] | None = None,
    root_cells: Sequence[int] | Sequence[str] | np.ndarray | None = None,
) -> np.ndarray | None:
    """Boolean ``(n_obs,)`` mask of root cells, or ``None`` when none is given.

    Parameters
    ----------
    adata
        The data.
    root_key
        ``(obs column, value)`` or the name of a boolean ``obs`` column.
    root_cells
        Integer positions, ``obs_names`` or a boolean mask; takes precedence over ``root_key``.

    Returns
    -------
    The mask (at least one cell), or ``None``.
    """
    if root_cells is not None:
        arr = np.asarray(root_cells)
        if arr.dtype == bool:
            if arr.shape != (adata.n_obs,):
                raise VelofitInputError(f"boolean root_cells must have length n_obs={adata.n_obs}, got {arr.shape}")
            mask = arr.copy()
        elif np.issubdtype(arr.dtype, np.integer):
            if arr.size and (arr.min() < -adata.n_obs or arr.max() >= adata.n_obs):
                raise VelofitInputError(f"root_cells has positions outside [0, {adata.n_obs})")
            mask = np.zeros(adata.n_obs, bool)
            mask[arr] = True
        else:
            index = adata.obs_names.get_indexer(arr.astype(str).ravel())
            if np.any(index < 0):
                raise VelofitKeyError(f"root_cells names not in obs_names, e.g. {list(arr.ravel()[index < 0][:5])}")
            mask = np.zeros(adata.n_obs, bool)
            mask[index] = True
    elif root_key is not None:
        column, value = (root_key, True) if isinstance(root_key, str) else tuple(root_key)
        if column not in adata.obs.columns:
            raise VelofitKeyError(f"root_key column {column!r} not in adata.obs; pass an existing obs column")
        mask = np.asarray(adata.obs[column] == value, dtype=bool)
    else:
        return None
    if not mask.any():
        raise VelofitInputError("the root selection contains no cell; check root_key / root_cells")
    return mask


def write_latent_time(adata, q, grid, prior, trace, clock, std, roots, info: dict) -> None:
    """Orient the clock by the roots, rescale it to the cells' range and write the latent-time keys.

    Parameters
    ----------
    adata
        Target AnnData.
    q
        ``(n_obs, n_grid)`` posterior on the clock ``grid``.
    grid
        ``(n_grid,)`` clock times in ``[0, 1]``.
    prior
        ``(n_grid,)`` prior weights.
    trace
        Log-likelihood per iteration (``nan`` entries dropped).
    clock
        ``(n_obs,)`` point estimate of each cell's clock time.
    std
        ``(n_obs,)`` its posterior spread.
    roots
        Root mask or ``None``.
    info
        Extra entries of ``uns["velofit"]["latent_time_params"]``.
    """
    reverse = roots is not None and np.mean(clock[roots]) > np.mean(clock)
    if reverse:  # the grid is symmetric on [0, 1]: reversing it maps t to 1 - t
        prior, clock = np.asarray(prior)[::-1], 1.0 - clock
    # The clock's origin and scale are not identified (each gene's map absorbs them), so the
    # cells may occupy any part of [0, 1]: latent time is the clock rescaled to the cells'
    # range, as scVelo's is, and the spread and the displayed grid follow the same map.
    lo, hi = float(np.min(clock)), float(np.max(clock))
    span = hi - lo if hi > lo else 1.0
    posterior = np.empty(np.shape(q), np.float32)  # normalised block by block: no float64 copy
    step = max(1, 2**22 // max(posterior.shape[1], 1))
    for start in range(0, posterior.shape[0], step):
        block = np.asarray(q[start : start + step], np.float64)
        block = block / np.sum(block, axis=1, keepdims=True)
        posterior[start : start + step] = block[:, ::-1] if reverse else block
    adata.obs["latent_time"] = np.clip((clock - lo) / span, 0.0, 1.0)
    adata.obs["latent_time_std"] = np.asarray(std) / span
    adata.obsm["latent_time_posterior"] = posterior
    trace = np.asarray(trace, np.float64)
    store = dict(adata.uns.get("velofit", {}))
    store.update(
        time_grid=(np.asarray(grid, np.float64) - lo) / span,
        prior=np.asarray(prior, np.float64),
        loglik=trace[np.isfinite(trace)],
        latent_time_params={
            **info,
            "n_grid": int(np.size(grid)),
            "direction": "reversed (root cells)" if reverse else "forward",
            "clock_range": np.array([lo, hi]),
            "n_root_cells": 0 if roots is None else int(roots.sum()),
            "velofit_version": __version__,
        },
    )
    adata.uns["velofit"] = store


def uses_subset(n_cells: int, subsample: int | None) -> bool:
    """Whether :func:`run_subsampled` iterates on a subset of ``n_cells`` cells."""
    return subsample is not None and n_cells > subsample


def run_subsampled(data, grid, theta, var_u, var_s, config, *, subsample: int | None, refine_iter: int,
                   seed: int, progress=None):
    """The soft EM (:func:`velofit.core.soft_em.run`), iterated on a random subset of cells if large.

    With more cells than ``subsample``, the annealing and ``config.max_iter`` iterations run on
    ``subsample`` cells drawn at random (``seed``; same standardisation), then up to
    ``refine_iter`` iterations on all cells start from the subset's gene parameters and
    prior. The gene parameters and the prior are population quantities that a large random
    subset determines as well as all cells do, and an iteration's cost is proportional to
    the cells (measured: ``benchmarks/subsample.py``). Call under x64.

    Parameters
    ----------
    data, grid, theta, var_u, var_s, config
        As for :func:`velofit.core.soft_em.run`.
    subsample
        Most cells iterated on (``None``: all).
    refine_iter
        Most iterations on all cells after a subsampled EM.
    seed
        Seed of the subset.
    progress
        Called with ``1`` per annealing step and iteration.

    Returns
    -------
    ``(state, trace, cells, subset_trace)``: the final state and log-likelihood trace on all
    cells; the sorted subset and its trace (both ``None`` without a subset).
    """
    if not uses_subset(data.xu.shape[1], subsample):
        state, trace = se.run(data, grid, theta, var_u, var_s, config, progress=progress)
        return state, trace, None, None
    cells = np.sort(np.random.default_rng(seed).choice(data.xu.shape[1], subsample, replace=False))
    subset = st.subset_cells(data, cells)
    state, subset_trace = se.run(subset, grid, theta, var_u, var_s, config, progress=progress)
    del subset
    release_free_memory()
    refine = config._replace(anneal_steps=0, max_iter=refine_iter)
    state, trace = se.run(data, grid, state.theta, state.var_u, state.var_s, refine, log_pi=state.log_pi,
                          progress=progress)
    return state, trace, cells, subset_trace


def annealing(n_genes: int) -> dict:
    """Annealing settings of :class:`~velofit.core.soft_em.SoftEMConfig` for ``n_genes`` genes."""
    return {"anneal_steps": ANNEAL_STEPS if n_genes > 2 else 0, "anneal_start": min(1.0, 2.0 / max(n_genes, 1))}


def chunk_width(n_cells: int, n_genes: int) -> int:
    """Genes per chunk of the shared-time passes (about 256 MiB per chunk, little padding)."""
    width = max(16, _CHUNK_BYTES // (16 * 8 * max(n_cells, 1)))
    n_chunks = -(-n_genes // width)
    return max(1, -(-n_genes // n_chunks))


def gene_clocks(adata: AnnData, genes: np.ndarray, layers: tuple[str, str]):
    """What the shared clock takes from a per-gene fit: its parameters, spans and a first clock.

    One pass over chunks of genes reads their moments and per-gene times (``layers["fit_t"]``)
    and keeps each gene's span over its fitting cells and where its times locate the cells
    (:func:`velofit.core.shared_time.located_times`); the first clock is then read by blocks
    of cells (:func:`velofit.core.shared_time.clock_start`). No copy of a whole layer is made,
    so ``fit_t`` may be freed once this returns.

    Parameters
    ----------
    adata
        Data after a per-gene fit.
    genes
        Positions of the fitted genes.
    layers
        ``(spliced, unspliced)`` layer names (for the fitting cells).

    Returns
    -------
    ``(params, span, tau)``: ``(5, n)`` ``alpha, beta (scaled units), gamma, t_, scaling`` on
    the aligned clock of ``fit_t``, the ``(n,)`` spans and the ``(n_obs,)`` first clock (the
    inputs of :func:`velofit.core.shared_time.align_gene_fit`).
    """
    var = adata.var.iloc[genes]
    col = lambda key: var[key].to_numpy(dtype=np.float64)
    params = np.stack(
        [col("fit_alpha"), col("fit_beta") * col("fit_scaling"), col("fit_gamma"), col("fit_t_"), col("fit_scaling")]
    )
    std_u, std_s = col("fit_std_u"), col("fit_std_s")
    mu, ms = _moment_columns(adata, genes, layers)
    times = _RowBlocks(adata.layers["fit_t"], genes)
    span = np.empty(genes.size)
    located = np.empty(mu.shape, bool)
    width = chunk_width(*mu.shape)
    for start in range(0, genes.size, width):
        cols = slice(start, start + width)
        mu_c, ms_c, t_c = mu[:, cols], ms[:, cols], times.columns(cols)
        span[cols] = st.time_spans(t_c, _fitted_on(mu_c, ms_c))
        located[:, cols] = st.located_times(
            mu_c, ms_c, t_c, KineticParams(*params[:, cols]), std_u[cols], std_s[cols]
        )
    return params, span, st.clock_start(times, span, located)


def shared_data(adata: AnnData, genes: np.ndarray, layers: tuple[str, str]) -> st.SharedData:
    """The standardised moments of ``genes`` in gene chunks, as the shared clock takes them.

    The moments are read gene chunk by gene chunk (no copy of the whole layers) into
    :class:`~velofit.core.shared_time.SharedData`'s float32. Call under x64.

    Parameters
    ----------
    adata
        The data.
    genes
        Positions of the genes.
    layers
        ``(spliced, unspliced)`` layer names.

    Returns
    -------
    :class:`~velofit.core.shared_time.SharedData`.
    """
    mu, ms = _moment_columns(adata, genes, layers)
    return st.prepare_data(mu, ms, chunk_size=chunk_width(*mu.shape))


class FittingCells:
    """The cells each gene's per-gene fit uses, computed for the columns asked for.

    ``mask[:, cols]`` reads those genes' moments and returns
    :func:`velofit.core.initialize.gene_statistics`' weights ``> 0`` (both moments positive,
    ...), so a pass over gene chunks (e.g. :func:`velofit.core.shared_time.reweight`) never
    holds the whole ``n_obs x n_genes`` mask.

    Parameters
    ----------
    adata
        The data.
    genes
        Positions of the genes.
    layers
        ``(spliced, unspliced)`` layer names.
    """

    def __init__(self, adata: AnnData, genes: np.ndarray, layers: tuple[str, str]) -> None:
        self.mu, self.ms = _moment_columns(adata, genes, layers)
        self.shape = self.mu.shape

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        return _fitted_on(self.mu[key], self.ms[key])


def _fitted_on(mu: np.ndarray, ms: np.ndarray) -> np.ndarray:
    """The cells the per-gene fit uses for each of these columns (boolean, ``mu.shape``)."""
    return gene_statistics(mu, ms).weights > 0


def _moment_columns(adata: AnnData, genes: np.ndarray, layers: tuple[str, str]):
    """``(Mu, Ms)`` of ``genes`` as :class:`_GeneColumns` (read ``[:, cols]`` chunk by chunk)."""
    return tuple(_GeneColumns(reader) for reader in layer_readers(adata, (layers[1], layers[0]), genes))


class _GeneColumns:
    """A :class:`~velofit._io.LayerColumns` sliced as ``[:, cols]`` (how the chunked passes read).

    Parameters
    ----------
    reader
        Reader of the selected genes' columns of one layer.
    """

    def __init__(self, reader: LayerColumns) -> None:
        self.reader = reader
        self.shape = (reader.n_obs, reader.genes.size)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        if rows != slice(None):
            raise IndexError("only whole columns are read")
        return self.reader(np.arange(self.shape[1])[cols])


class _RowBlocks:
    """Some columns of a 2-D array, read by blocks of rows (``view[rows]``) without a full copy.

    Parameters
    ----------
    array
        ``(n_rows, n_cols)`` array.
    cols
        Positions of the columns.
    """

    def __init__(self, array, cols: np.ndarray) -> None:
        self.array, self.cols = array, cols
        self.shape = (array.shape[0], cols.size)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.asarray(self.array[rows])[:, self.cols]

    def columns(self, cols: slice) -> np.ndarray:
        """All rows of the columns ``self.cols[cols]``."""
        return np.asarray(self.array[:, self.cols[cols]])


def stored_shared_fit(adata: AnnData) -> dict | None:
    """The shared fit stored by ``recover_dynamics_shared``, if it still matches ``var``."""
    shared = adata.uns.get("velofit", {}).get("shared_fit")
    if shared is None:
        return None
    names = np.asarray(shared["genes"]).astype(str)
    if not np.all(np.isin(names, adata.var_names)) or "fit_alpha" not in adata.var.columns:
        return None
    current = adata.var.loc[names, "fit_alpha"].to_numpy(dtype=np.float64)
    stored = np.asarray(shared["fit_alpha"], np.float64)
    return shared if np.allclose(current, stored, rtol=1e-10, equal_nan=True) else None


def _posterior_of_shared_fit(adata: AnnData, shared: dict, layers: tuple[str, str]):
    genes = adata.var_names.get_indexer(np.asarray(shared["genes"]).astype(str))
    order = np.argsort(genes, kind="stable")  # the readers take columns in var order
    genes = genes[order]
    shared = {**shared, **{key: np.asarray(shared[key])[..., order] for key in ("theta", "var_u", "var_s", "std_u", "std_s")}}
    mu, ms = _moment_columns(adata, genes, layers)
    grid = np.asarray(shared["time_grid"], np.float64)
    n = genes.size
    with jax.enable_x64(True):
        data = st.prepare_data(mu, ms, std_u=shared["std_u"], std_s=shared["std_s"], chunk_size=chunk_width(*mu.shape))
        pad = data.std_u.shape[0] - n

        def padded(a, fill=None):
            a = np.asarray(a, np.float64)
            extra = np.repeat(a[..., :1], pad, axis=-1) if fill is None else np.full(a.shape[:-1] + (pad,), fill)
            return jnp.asarray(np.concatenate([a, extra], axis=-1))

        theta, var_u, var_s = padded(shared["theta"]), padded(shared["var_u"], 1.0), padded(shared["var_s"], 1.0)
        log_pi = np.log(np.asarray(shared["prior"], np.float64))
        noise = adata.obs["velofit_cell_noise"].to_numpy(np.float64) if "velofit_cell_noise" in adata.obs else np.ones(adata.n_obs)
        jgrid = jnp.asarray(grid)
        q, qd, loglik = se.e_step_jit(theta, var_u, var_s, jnp.asarray(log_pi), jnp.asarray(noise), data, jgrid, False)
        state = se.SoftEMState(theta, var_u, var_s, jnp.asarray(log_pi), jnp.asarray(noise), q, qd, loglik, None, None)
        clock, std = (np.asarray(a) for a in se.posterior_spread_jit(state, data, jgrid))
        if shared["em"] == "hard":
            clock = np.asarray(st.shared_times_jit(theta, var_u, var_s, data, jgrid)[0])
        del data, state
        release_free_memory()  # the chunked copy of the data (see velofit._heap)
    return np.asarray(q), grid, log_pi, np.asarray(shared["loglik"]), clock, std, n


def _fitted_genes(adata: AnnData) -> np.ndarray:
    missing = [k for k in _FIT_COLUMNS if k not in adata.var.columns]
    if missing or "fit_t" not in adata.layers:
        raise VelofitKeyError(
            f"no fitted dynamics found (missing {missing or ['layers/fit_t']}); "
            "run velofit.tl.recover_dynamics(adata) first"
        )
    genes = np.flatnonzero(np.asarray(adata.var["fit_status"] == "ok"))
    if genes.size == 0:
        raise VelofitInputError("no gene was fitted successfully (var['fit_status']); latent time needs fitted genes")
    return genes


def _layers(adata: AnnData, spliced_layer: str | None, unspliced_layer: str | None) -> tuple[str, str]:
    params = adata.uns.get("recover_dynamics", {})
    spliced = spliced_layer if spliced_layer is not None else params.get("spliced_layer", "Ms")
    unspliced = unspliced_layer if unspliced_layer is not None else params.get("unspliced_layer", "Mu")
    return check_key("spliced_layer", spliced), check_key("unspliced_layer", unspliced)
