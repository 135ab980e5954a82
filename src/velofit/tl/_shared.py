"""``recover_dynamics_shared``: the dynamical model with one clock for all genes (soft or hard EM)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from anndata import AnnData
from tqdm.auto import tqdm

from .. import __version__
from .._heap import release_free_memory
from .._validation import (
    VelofitInputError,
    check_adata,
    check_bool,
    check_int,
    check_number,
)
from ..core import shared_time as st
from ..core import soft_em as se
from ._latent_time import (
    DEFAULT_N_GRID,
    DEFAULT_REFINE_ITER,
    DEFAULT_SUBSAMPLE,
    FittingCells,
    _fitted_genes,
    _layers,
    annealing,
    gene_clocks,
    run_subsampled,
    shared_data,
    uses_subset,
    write_latent_time,
)
from ._recover_dynamics import (
    DEFAULT_MIN_LIKELIHOOD,
    DEFAULT_T_MAX,
    recover_dynamics,
    select_velocity_genes,
    write_time_layers,
)

#: EM iterations of the shared fit.
DEFAULT_SHARED_MAX_ITER = 100


def recover_dynamics_shared(
    adata: AnnData,
    *,
    em: str = "soft",
    prior: str = "learned",
    var_names: str | Sequence[str] | np.ndarray | None = None,
    spliced_layer: str = "Ms",
    unspliced_layer: str = "Mu",
    n_grid: int = DEFAULT_N_GRID,
    max_iter: int = DEFAULT_SHARED_MAX_ITER,
    tol: float = 1e-8,
    t_max: float = DEFAULT_T_MAX,
    per_gene_fit: bool = True,
    subsample: int | None = DEFAULT_SUBSAMPLE,
    refine_iter: int = DEFAULT_REFINE_ITER,
    seed: int = 0,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Fit the dynamical model with one time per cell shared by all genes.

    Every gene keeps its own kinetics (``alpha, beta, gamma``, switch) and gets an onset
    ``t0`` on a shared clock ``t`` in ``[0, 1]`` (see :mod:`velofit.core.shared_time`). The
    per-gene fit of :func:`recover_dynamics` initialises it (its clocks are mapped onto the
    shared one), a few annealed EM iterations (broad posteriors) follow; then ``em="soft"``
    runs the soft EM over a time grid of MODEL.md section 5
    (posterior over time per cell, per-gene noise, per-cell noise factor, and a learned or
    uniform time prior), ``em="hard"`` its classification variant (each cell at its best grid
    time, refined by the multi-gene exact time of section 3). The log-likelihood never
    decreases over the iterations; its trace is stored.

    Parameters
    ----------
    adata
        Annotated data with spliced and unspliced moments.
    em
        ``"soft"`` or ``"hard"``.
    prior
        ``"learned"`` or ``"uniform"`` time prior.
    var_names
        Genes to fit (as :func:`recover_dynamics`).
    spliced_layer, unspliced_layer
        Layers holding the moments.
    n_grid
        Grid points of the shared clock.
    max_iter
        Most EM iterations.
    tol
        Stop once an iteration raises the log-likelihood by less than ``tol`` (relative).
    t_max
        Length the shared clock is written in (``fit_t`` spans ``[0, t_max]``, rates are per
        unit of that time), as :func:`recover_dynamics`.
    per_gene_fit
        Run :func:`recover_dynamics` first (``False``: reuse the per-gene fit in ``adata``).
        Its time layers are freed once read (the shared fit writes its own at the end), so
        if the shared fit fails, ``adata`` holds the per-gene fit without ``fit_t``.
    subsample
        With more cells than this, the annealing and the ``max_iter`` EM iterations run on
        this many cells drawn at random (``seed``), and ``refine_iter`` iterations on all
        cells follow, starting from the subset's gene parameters and prior: the gene
        parameters and the prior are population quantities that a large random subset
        determines, and an iteration costs time in proportion to the cells (at 100,000
        cells x 2,000 genes, ~17 s). ``None``: every iteration on all cells.
    refine_iter
        Most EM iterations on all cells after a subsampled EM (they also stop at ``tol``).
    seed
        Seed of the per-gene fit and of the cell subsets (the initial clock maps', the EM's).
    progress
        Show progress bars (with an estimated time left) over the per-gene fit's genes and
        the shared EM's iterations (an upper bound: the EM stops early once converged).
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy if ``copy=True``. Written: every key of :func:`recover_dynamics`
    with the shared fit's values (``var``: ``fit_alpha``, ``fit_beta``, ``fit_gamma``,
    ``fit_t_`` (induction length), ``fit_scaling``, ``fit_likelihood``, ``fit_loglik``,
    ``fit_alignment_scaling`` (``= t_max``), ``velocity_genes``; ``layers``: ``fit_t``
    ``= t_max * max(t - t0, 0)``, ``fit_tau``, ``fit_tau_``; ``t`` is the cell's time on the
    model's clock, ``clock_range[0] + (clock_range[1] - clock_range[0]) * latent_time`` with
    ``uns["velofit"]["latent_time_params"]["clock_range"]``), plus ``var["fit_t0"]`` (onset
    on that clock, in units of ``t_max``), ``var["fit_sigma_u"]``, ``var["fit_sigma_s"]`` (noise standard
    deviations in units of ``fit_std_u``/``fit_std_s``), every key of :func:`latent_time`,
    and ``uns["velofit"]["shared_fit"]`` (the model, for :func:`latent_time`).
    """
    adata = check_adata(adata, what="recover_dynamics_shared")
    if em not in ("soft", "hard"):
        raise VelofitInputError(f"em must be 'soft' or 'hard', got {em!r}")
    if prior not in ("learned", "uniform"):
        raise VelofitInputError(f"prior must be 'learned' or 'uniform', got {prior!r}")
    n_grid = check_int("n_grid", n_grid, minimum=3)
    max_iter = check_int("max_iter", max_iter, minimum=0)
    refine_iter = check_int("refine_iter", refine_iter, minimum=0)
    if subsample is not None:
        subsample = check_int("subsample", subsample, minimum=2)
    check_number("tol", tol, minimum=0.0)
    check_number("t_max", t_max, minimum=0.0, strict=True)
    check_bool("per_gene_fit", per_gene_fit)
    check_bool("copy", copy)
    out = adata.copy() if copy else adata
    if per_gene_fit:
        recover_dynamics(
            out, var_names=var_names, spliced_layer=spliced_layer, unspliced_layer=unspliced_layer,
            t_max=t_max, seed=seed, progress=progress,
        )
    out.uns.get("velofit", {}).pop("shared_fit", None)
    layers = _layers(out, spliced_layer, unspliced_layer)
    genes = _fitted_genes(out)
    config = se.SoftEMConfig(
        mode="full", prior=prior, hard=em == "hard", max_iter=max_iter, tol=tol, **annealing(genes.size)
    )
    # The per-gene time layers this call wrote are replaced by the shared fit's at the end;
    # freeing them as soon as they are read keeps three n_obs x n_genes arrays out of the EM.
    if per_gene_fit:
        for key in ("fit_tau", "fit_tau_"):
            out.layers.pop(key, None)
    with jax.enable_x64(True):
        params, span, tau = gene_clocks(out, genes, layers)
        if per_gene_fit:  # read: freed before the chunked copy of the data is made
            out.layers.pop("fit_t", None)
        release_free_memory()
        data = shared_data(out, genes, layers)
        grid = jnp.linspace(0.0, 1.0, n_grid)
        theta, var_u, var_s, _ = st.align_gene_fit(data, grid, params, span, tau, seed=seed)
        n_steps = config.anneal_steps + max_iter + (refine_iter if uses_subset(out.n_obs, subsample) else 0)
        with tqdm(total=n_steps, unit="iter", disable=not progress, desc="shared-time EM") as bar:
            state, trace, cells, subset_trace = run_subsampled(
                data, grid, theta, var_u, var_s, config, subsample=subsample, refine_iter=refine_iter, seed=seed,
                progress=bar.update,
            )
        if em == "hard":  # the soft posterior at the fitted model, and the refined best times
            q, qd, loglik = se.e_step_jit(
                state.theta, state.var_u, state.var_s, state.log_pi, state.cell_scale, data, grid, False
            )
            state = state._replace(q=q, qd=qd, loglik=loglik)
        clock, std = se.posterior_spread_jit(state, data, grid)
        if em == "hard":
            clock = st.shared_times_jit(state.theta, state.var_u, state.var_s, data, grid)[0]
        # Residual variances over each gene's fitting cells (the per-gene fit's definition).
        fit_data = st.reweight(data, FittingCells(out, genes, layers))
        fit_var_u, fit_var_s = st.residual_variances_jit(state.theta, clock, fit_data, floor=0.0)
        n = genes.size
        result = {
            "theta": np.asarray(state.theta)[:, :n],
            "var_u": np.asarray(state.var_u)[:n],
            "var_s": np.asarray(state.var_s)[:n],
            "std_u": np.asarray(data.std_u)[:n],
            "std_s": np.asarray(data.std_s)[:n],
            "mean_sq": np.asarray(fit_var_u + fit_var_s)[:n],
        }
        q, clock, std, grid = np.asarray(state.q), np.asarray(clock), np.asarray(std), np.asarray(grid)
        log_pi, cell_noise = np.asarray(state.log_pi), np.asarray(state.cell_scale)
        # The chunked copy of the data goes before the n_obs x n_genes outputs are written.
        del data, fit_data, state
        release_free_memory()
    out.obs["velofit_cell_noise"] = cell_noise
    info = {"mode": "shared", "em": em, "prior": prior, "n_genes": int(genes.size)}
    write_latent_time(out, q, grid, np.exp(log_pi), trace, clock, std, None, info)
    del q  # the float64 posterior goes before the n_obs x n_genes time layers are allocated
    release_free_memory()
    _write_shared_fit(out, genes, result, clock, t_max)
    out.uns["velofit"]["shared_fit"] = {
        "genes": np.asarray(out.var_names[genes]).astype(str),
        "theta": result["theta"],
        "var_u": result["var_u"],
        "var_s": result["var_s"],
        "std_u": result["std_u"],
        "std_s": result["std_s"],
        "prior": np.exp(log_pi),
        "time_grid": grid,
        "loglik": trace[np.isfinite(trace)],
        "em": em,
        "prior_kind": prior,
        "fit_alpha": out.var["fit_alpha"].to_numpy(np.float64)[genes],
    }
    if cells is not None:  # the EM's iterations on the subset, before those on all cells
        out.uns["velofit"]["shared_fit"]["subset_cells"] = cells
        out.uns["velofit"]["shared_fit"]["subset_loglik"] = subset_trace[np.isfinite(subset_trace)]
    params = dict(out.uns.get("recover_dynamics", {}))
    params.update(time="shared", em=em, prior=prior, n_grid=n_grid, shared_max_iter=max_iter,
                  shared_tol=tol, subsample=-1 if subsample is None else subsample, refine_iter=refine_iter,
                  velofit_version=__version__)
    out.uns["recover_dynamics"] = params
    return out if copy else None


def _write_shared_fit(adata: AnnData, genes: np.ndarray, result: dict, clock: np.ndarray, t_max: float) -> None:
    """Write the shared fit in :func:`recover_dynamics`'s keys (rates per unit of ``t_max``)."""
    theta = result["theta"]
    alpha, beta, gamma, d, scaling = np.exp(theta[:5])
    t0 = theta[5]
    columns = {
        "fit_alpha": alpha / t_max,
        "fit_beta": beta / scaling / t_max,
        "fit_gamma": gamma / t_max,
        "fit_t_": d * t_max,
        "fit_scaling": scaling,
        "fit_t0": t0 * t_max,
        "fit_sigma_u": np.sqrt(result["var_u"]),
        "fit_sigma_s": np.sqrt(result["var_s"]),
        "fit_likelihood": np.exp(-0.5 * result["mean_sq"]),
        "fit_loglik": -np.log(2 * np.pi * np.maximum(result["mean_sq"] / 2.0, 1e-300)) - 1.0,
        "fit_alignment_scaling": np.full(genes.size, t_max),
    }
    for key, values in columns.items():
        column = np.full(adata.n_vars, np.nan)
        if key in adata.var.columns and key not in ("fit_t0", "fit_sigma_u", "fit_sigma_s"):
            column = adata.var[key].to_numpy(np.float64).copy()
        column[genes] = values
        adata.var[key] = column
    adata.var["velocity_genes"] = select_velocity_genes(adata, DEFAULT_MIN_LIKELIHOOD)
    write_time_layers(
        adata, genes, lambda rows: t_max * np.maximum(clock[rows, None] - t0[None, :], 0.0), d * t_max
    )
