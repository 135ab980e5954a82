"""``recover_dynamics``: the per-gene dynamical model on an AnnData, with scVelo's output keys."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
from anndata import AnnData
from tqdm.auto import tqdm

from .. import __version__
from .._heap import release_free_memory
from .._io import column_index, layer_readers
from .._validation import (
    VelofitInputError,
    check_adata,
    check_bool,
    check_fit_options,
    check_key,
    resolve_var_names,
)
from ..core.backends import LOCAL_CPU_WORKERS, check_backend, check_device
from ..core.fit import GeneFit, fit_columns
from ..core.hard_em import EMConfig
from ..core.initialize import MIN_CELLS
from ..core.memory import parse_memory_budget

#: Values per block of :func:`write_time_layers` (float64 temporaries of 4 MB).
_TIME_BLOCK_VALUES = 2**19
#: Data type of the time layers ``fit_t``, ``fit_tau``, ``fit_tau_`` (see :func:`write_time_layers`).
LAYER_DTYPE = np.dtype(np.float32)
#: Total time span that every gene's clock is rescaled to (scVelo's ``t_max`` default).
DEFAULT_T_MAX = 20.0
#: ``velocity_genes`` keeps genes with ``fit_likelihood`` above this.
DEFAULT_MIN_LIKELIHOOD = 0.5


def recover_dynamics(
    adata: AnnData,
    *,
    time: str = "gene",
    em: str = "hard",
    prior: str = "learned",
    var_names: str | Sequence[str] | np.ndarray | None = None,
    spliced_layer: str = "Ms",
    unspliced_layer: str = "Mu",
    max_iter: int = 20,
    n_explicit: int = 0,
    tol: float = 1e-3,
    t_max: float = DEFAULT_T_MAX,
    chunk_size: int | None = None,
    memory_budget: int | str | None = None,
    backend: str = "local",
    client: Any = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Fit the dynamical model of RNA velocity to every selected gene, all genes at once.

    Per gene: transcription rate ``alpha``, splicing ``beta``, degradation ``gamma``,
    switching time ``t_``, unspliced ``scaling`` and a time per cell, by the two-stage hard
    EM of MODEL.md section 4 (explicit E-steps, then exact ones; Levenberg-Marquardt M-steps),
    batched over genes with JAX.

    Inputs that do not fit in memory: ``Ms``/``Mu`` are read one chunk of gene columns at a
    time, whatever holds them: NumPy or SciPy arrays, Dask arrays (dense or sparse chunks),
    ``h5py`` datasets or anndata's on-disk sparse datasets; the fit is bitwise the same.
    ``anndata.read_h5ad(path, backed="r")`` keeps only ``X`` on disk (anndata 0.12 loads the
    layers); to keep the layers on disk too, open them lazily, e.g.
    ``adata.layers["Ms"] = anndata.experimental.read_elem_lazy(h5py.File(path)["layers/Ms"])``.
    The outputs (``fit_t`` etc.) are written into ``adata`` in memory.

    Deliberate differences from scVelo's ``recover_dynamics``: no hidden gamma/beta penalty;
    exact time assignment is refined beyond the grid; every gene's loss is non-increasing and
    its trace is returned; genes that cannot be fitted are flagged in ``fit_status`` instead of
    raising or leaving NaN in fitted genes; ``fit_likelihood`` is defined on the cells the gene
    was fitted on and lies in ``(0, 1]`` (see Returns); the KDE bimodality test of the
    initialisation is not run.

    Parameters
    ----------
    adata
        Annotated data with spliced and unspliced moments (see :func:`velofit.pp.moments`).
    time
        ``"gene"``: every gene its own clock (this function's per-gene EM). ``"shared"``: one
        clock for all genes, fitted by :func:`velofit.tl.recover_dynamics_shared` with its
        defaults after the per-gene fit. The per-gene options (``max_iter``, ``n_explicit``,
        ``tol``, ``chunk_size``, ``memory_budget``, ``backend``, ``client``, ``device``) are
        then an error unless left at their defaults: call ``recover_dynamics_shared`` for the
        shared fit's own settings.
    em
        ``"hard"`` or ``"soft"`` (posterior over a time grid, MODEL.md section 5; needs
        ``time="shared"``).
    prior
        Time prior, ``"learned"`` or ``"uniform"``: of the shared-time fit, or, per gene, of
        every cell's ``fit_t``. With ``"uniform"`` it is the nearest point of the gene's curve
        (as scVelo's projection); with ``"learned"`` it is the nearest point of the branch of
        the curve chosen by the cell's posterior under the gene's learned distribution of
        cells over time (:mod:`velofit.core.time_prior`), which settles the cells the nearest
        point places by chance (near the origin the start of induction and the end of
        repression meet). The parameters are the hard EM's either way (only their time
        units follow the clock's span, ``t_max``). On scVelo's simulator, 2,000 cells x 200
        genes, the median per-gene Spearman of ``fit_t`` with the true time was 0.887 with
        ``"learned"``, 0.865 with ``"uniform"`` and 0.873 for scVelo at noise level 1
        (0.989, 0.975, 0.986 at 0.3; ``benchmarks/noise_sweep.py``), at a few percent of
        the fit's time.
    var_names
        Genes to fit: ``None``/``"all"`` (default), a boolean ``var`` column name, a list of
        names or a boolean mask.
    spliced_layer, unspliced_layer
        Layers holding the spliced and unspliced moments.
    max_iter
        Total EM iterations.
    n_explicit
        Leading iterations that use the explicit (closed-form) time assignment; the rest use
        exact assignment. The default ``0`` (exact throughout) was the most accurate against
        known truth and no slower (``benchmarks/CLAIMS.md``).
    tol
        Relative loss decrease below which a gene has converged. ``1e-3`` gave the same
        accuracy against known truth as ``1e-4`` with 30% fewer iterations (scVelo's
        simulator, 5,000 cells x 1,000 genes: gamma/beta error 0.062 vs 0.063).
    t_max
        Each gene's clock is rescaled so that its cells span ``[0, t_max]`` (as scVelo's
        ``align_dynamics``); rates are divided by the same factor.
    chunk_size
        Genes per compiled chunk (padded to at least 2); default: the widest chunk whose
        working set fits ``memory_budget``. Results do not depend on it (beyond the last bits).
    memory_budget
        Memory one chunk of genes may use, in bytes or as a string (``"2GB"``, ``"512MiB"``);
        default 2 GiB when ``chunk_size`` is ``None``. It bounds the fit's working set: the
        compiled EM's buffers (XLA's own accounting is checked before the fit, and a chunk is
        narrowed until it fits; an error if even 2 genes do not) and the chunk's host arrays.
        The rest of the peak is the input as the user holds it (velofit reads one chunk of
        columns at a time and never copies a whole layer) and the outputs (``fit_t``,
        ``fit_tau``, ``fit_tau_``: three float32 ``n_obs x n_vars`` layers, the first of
        which holds the times while the fit runs, plus a boolean ``n_obs x n_genes`` mask).
        With ``backend="dask"``
        it applies to each chunk on a worker thread; with ``backend="local"`` on a multi-core
        CPU, the EM pass runs two chunks at once (in threads) when both fit in it together.
    backend
        ``"local"``: chunks run one after another in this process (JAX uses every core).
        ``"dask"``: chunks are submitted to an existing ``dask.distributed`` cluster (``client``,
        or the default client); needs ``pip install 'velofit[dask]'``. Same results, bitwise,
        when the workers run the same JAX on the same kind of CPU.
    client
        A ``distributed.Client`` for ``backend="dask"`` (default: ``distributed.get_client()``).
    device
        JAX device of the EM: ``"auto"`` (a GPU when JAX sees one, else the CPU), ``"cpu"``
        or ``"gpu"`` (an error if JAX sees none). The EM runs in float64 on every device (the
        time assignment and the M-step's step acceptance need it; on a GPU float64 is slower
        than float32 but the fit stays the same model). A GPU sums in another order than the
        CPU, so its fit is not bitwise the CPU's: measured on an H200 (2,000 simulated cells,
        8 genes, ``max_iter=5``), ``fit_alpha`` differed by at most 9e-4 relative.
    seed
        Seed of the random subset of cells used for M-step directions on large data.
    progress
        Show a progress bar over genes.
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy if ``copy=True``. Written (scVelo's keys, ``nan`` for genes not
    fitted):

    ``var``: ``fit_alpha``, ``fit_beta`` (splicing rate in observed-unspliced units, as
    scVelo), ``fit_gamma``, ``fit_t_``, ``fit_scaling``, ``fit_std_u``, ``fit_std_s``,
    ``fit_likelihood`` (``exp(-mean_i ||r_i||^2 / 2)`` over the fitted cells, residuals in
    units of the gene's standard deviations), ``fit_loglik`` (mean Gaussian log-likelihood
    per cell with the maximum-likelihood variance), ``fit_u0``, ``fit_s0`` (0),
    ``fit_alignment_scaling``, ``fit_converged``, ``fit_n_iter``, ``fit_status`` (``"ok"`` or
    the reason), ``velocity_genes``.
    ``layers`` (float32, unlike scVelo's float64: 7 significant digits, half the memory):
    ``fit_t`` (time on the gene's clock), ``fit_tau`` (time spent in induction,
    ``min(t, t_)``), ``fit_tau_`` (time spent in repression, ``max(t - t_, 0)``).
    ``varm["loss"]``: loss per iteration. ``uns["recover_dynamics"]``: the parameters used,
    the summed loss per iteration and the velofit version.
    """
    if time not in ("gene", "shared"):
        raise VelofitInputError(f"time must be 'gene' or 'shared', got {time!r}")
    if em not in ("hard", "soft"):
        raise VelofitInputError(f"em must be 'hard' or 'soft', got {em!r}")
    if prior not in ("learned", "uniform"):
        raise VelofitInputError(f"prior must be 'learned' or 'uniform', got {prior!r}")
    if time == "shared":
        from ._shared import recover_dynamics_shared  # imports this module: load on use

        per_gene_only = {"max_iter": max_iter, "n_explicit": n_explicit, "tol": tol, "chunk_size": chunk_size,
                         "memory_budget": memory_budget, "backend": backend, "client": client, "device": device}
        defaults = inspect.signature(recover_dynamics).parameters
        ignored = [name for name, value in per_gene_only.items()
                   if value is not defaults[name].default and value != defaults[name].default]
        if ignored:
            raise VelofitInputError(
                f"recover_dynamics(time='shared') does not use {', '.join(ignored)} (options of the per-gene "
                f"fit); call velofit.tl.recover_dynamics_shared for the shared fit's own settings "
                f"(max_iter, tol, n_grid, subsample, refine_iter), or time='gene'"
            )

        return recover_dynamics_shared(
            adata, em=em, prior=prior, var_names=var_names, spliced_layer=spliced_layer,
            unspliced_layer=unspliced_layer, t_max=t_max, seed=seed, progress=progress, copy=copy,
        )
    if em == "soft":
        raise VelofitInputError("em='soft' fits a posterior over one shared clock: pass time='shared' with it")
    adata = check_adata(adata, min_obs=MIN_CELLS, what="recover_dynamics")
    check_fit_options(
        max_iter=max_iter, n_explicit=n_explicit, tol=tol, t_max=t_max, chunk_size=chunk_size, seed=seed
    )
    check_key("spliced_layer", spliced_layer)
    check_key("unspliced_layer", unspliced_layer)
    check_bool("progress", progress)
    check_bool("copy", copy)
    if copy and adata.isbacked:
        raise VelofitInputError(
            "copy=True cannot copy an AnnData opened in backed mode; pass copy=False (the outputs are "
            "written in memory, the file is not changed) or load it with adata.to_memory()"
        )
    memory_budget = parse_memory_budget(memory_budget)
    check_backend(backend, client)
    check_device(device)
    genes = resolve_var_names(adata, var_names)
    read_ms, read_mu = layer_readers(adata, (spliced_layer, unspliced_layer), genes)

    config = EMConfig(max_iter=max_iter, n_explicit=n_explicit, tol=tol, time_prior=prior == "learned")
    # The times are stored as float32 (as the layers they become): the fit's largest array.
    times = np.empty((adata.n_obs, genes.size), dtype=LAYER_DTYPE)
    with tqdm(total=genes.size, unit="gene", disable=not progress, desc="recover_dynamics") as bar:
        fit = fit_columns(
            lambda cols: (read_mu(cols), read_ms(cols)), adata.n_obs, genes.size, config, chunk_size=chunk_size,
            memory_budget=memory_budget, seed=seed, progress=bar.update, backend=backend, client=client,
            device=device, times_out=times,
        )
    del times
    release_free_memory()  # the fit's freed chunks, before the outputs are allocated

    out = adata.copy() if copy else adata
    _write_fit(out, genes, fit, t_max)
    out.uns["recover_dynamics"] = {
        "spliced_layer": spliced_layer,
        "unspliced_layer": unspliced_layer,
        "max_iter": max_iter,
        "n_explicit": n_explicit,
        "tol": tol,
        "t_max": t_max,
        "prior": prior,
        "seed": seed,
        "n_fitted": int(fit.fitted.sum()),
        "loss_per_iteration": np.nansum(fit.trace[:, fit.fitted], axis=1),
        "use_raw": False,  # read by scVelo's velocity functions
        "fit_connected_states": False,
        "velofit_version": __version__,
    }
    return out if copy else None


def _write_fit(adata: AnnData, genes: np.ndarray, fit: GeneFit, t_max: float) -> None:
    n_vars = adata.n_vars
    fitted = fit.fitted
    span = np.where(fitted, fit.span, 0.0)
    align = np.where(fitted & (span > 0), t_max / np.where(span > 0, span, 1.0), np.nan)

    def full(values, fill=np.nan, dtype=float):
        column = np.full(n_vars, fill, dtype=dtype)
        column[genes] = values
        return column

    n = np.maximum(fit.n_cells, 1)
    mean_sq = fit.loss / n
    var_mle = np.maximum(mean_sq / 2.0, 1e-300)
    columns = {
        "fit_alpha": fit.alpha / align,
        "fit_beta": fit.beta / fit.scaling / align,
        "fit_gamma": fit.gamma / align,
        "fit_t_": fit.t_ * align,
        "fit_scaling": fit.scaling,
        "fit_std_u": np.where(fitted, fit.std_u, np.nan),
        "fit_std_s": np.where(fitted, fit.std_s, np.nan),
        "fit_likelihood": np.maximum(np.exp(-0.5 * mean_sq), np.finfo(float).tiny),
        "fit_loglik": -np.log(2 * np.pi * var_mle) - 1.0,
        "fit_u0": np.where(fitted, 0.0, np.nan),
        "fit_s0": np.where(fitted, 0.0, np.nan),
        "fit_alignment_scaling": align,
    }
    for key, values in columns.items():
        adata.var[key] = full(values)
    adata.var["fit_converged"] = full(fit.converged & fitted, False, bool)
    adata.var["fit_n_iter"] = full(fit.n_iter, 0, np.int64)
    adata.var["fit_status"] = full(fit.status, "not selected", object)
    adata.var["velocity_genes"] = select_velocity_genes(adata, DEFAULT_MIN_LIKELIHOOD)

    write_time_layers(
        adata, genes, lambda rows: np.where(fitted, fit.t[rows], np.nan) * align, fit.t_ * align, reuse=fit.t
    )
    loss = np.full((n_vars, fit.trace.shape[0]), np.nan)
    loss[genes] = fit.trace.T
    adata.varm["loss"] = loss


def write_time_layers(
    adata: AnnData,
    genes: np.ndarray,
    times: Callable[[slice], np.ndarray],
    switch: np.ndarray,
    reuse: np.ndarray | None = None,
) -> None:
    """Write the layers ``fit_t``, ``fit_tau`` and ``fit_tau_`` as float32, block by block of cells.

    Float32 holds a time to 7 significant digits, far below any fit's uncertainty, and halves
    the three largest outputs of an atlas-sized fit (scVelo writes float64). Each value is
    computed in float64 and rounded once. Blocks of :data:`_TIME_BLOCK_VALUES` values keep
    the float64 temporaries in the CPU cache, and run in two threads (blocks of whole columns
    made each temporary a fresh 67 MB allocation at 50,000 cells: the layers of 50,000 x 1,000
    genes took 1.5-1.7 s, now 0.4-0.45 s on 2 cores).

    Parameters
    ----------
    adata
        Data written to (genes not in ``genes`` get ``nan``).
    genes
        Positions of the fitted genes' columns.
    times
        ``times(rows)``: the ``(len(rows), len(genes))`` ``fit_t`` of the cells ``rows`` (a
        slice) on the genes ``genes`` (``nan`` where not fitted).
    switch
        ``(len(genes),)`` switching time of every gene, in the units of ``fit_t``.
    reuse
        Optional float32 C-contiguous ``(n_obs, n_vars)`` array that may become ``fit_t``
        (overwritten; used only when ``genes`` are all genes in order, so that no other
        full-size copy of the times exists). ``times`` may read it: block ``rows`` is read
        before it is written.
    """
    for key in ("fit_t", "fit_tau", "fit_tau_"):  # an earlier fit's layers: free them first
        if key in adata.layers:
            del adata.layers[key]
    whole = genes.size == adata.n_vars and np.array_equal(genes, np.arange(adata.n_vars))
    usable = reuse is not None and reuse.shape == adata.shape and reuse.dtype == LAYER_DTYPE
    # Where every column is written, nothing needs filling first (filling 3 x 200 MB with
    # nan took ~0.5 s at 50,000 x 1,000).
    new = np.empty if whole else partial(np.full, fill_value=np.nan)
    fit_t = reuse if whole and usable and reuse.flags.c_contiguous else new(adata.shape, dtype=LAYER_DTYPE)
    tau, tau_ = (new(adata.shape, dtype=LAYER_DTYPE) for _ in range(2))
    cols = column_index(genes)  # a slice where consecutive: no element-wise scatter
    block = max(1, _TIME_BLOCK_VALUES // max(genes.size, 1))

    def write(start: int) -> None:
        rows = slice(start, start + block)
        t = np.array(times(rows), dtype=np.float64)
        fit_t[rows, cols] = t
        tau[rows, cols] = np.minimum(t, switch)
        tau_[rows, cols] = np.maximum(np.subtract(t, switch, out=t), 0.0, out=t)

    # NumPy releases the GIL in these loops: blocks are written on every core.
    with ThreadPoolExecutor(min(os.cpu_count() or 1, LOCAL_CPU_WORKERS)) as pool:
        list(pool.map(write, range(0, adata.n_obs, block)))
    adata.layers["fit_t"], adata.layers["fit_tau"], adata.layers["fit_tau_"] = fit_t, tau, tau_


def select_velocity_genes(adata: AnnData, min_likelihood: float) -> np.ndarray:
    """Genes whose fit is trustworthy enough for velocities, by scVelo's rules.

    Parameters
    ----------
    adata
        Data after :func:`recover_dynamics`.
    min_likelihood
        Smallest ``fit_likelihood`` kept.

    Returns
    -------
    Boolean ``(n_vars,)``: fitted, ``fit_likelihood > min_likelihood`` and ``fit_scaling``
    inside scVelo's bounds (``[min(p10, 0.03), max(p90, 3)]`` of the fitted genes).
    """
    var = adata.var
    fitted = np.asarray(var["fit_status"] == "ok")
    scaling = var["fit_scaling"].to_numpy(dtype=float)
    keep = fitted & (var["fit_likelihood"].to_numpy(dtype=float) > min_likelihood)
    if fitted.any():
        lb, ub = np.nanpercentile(scaling[fitted], [10, 90])
        keep &= (scaling > min(lb, 0.03)) & (scaling < max(ub, 3.0))
    return keep
