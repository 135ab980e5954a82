"""Preprocessing as scVelo does it: gene filtering, normalisation and first-order moments."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData

from .._validation import VelofitInputError, VelofitKeyError, check_adata

#: Layers with the raw counts that both functions need.
COUNT_LAYERS = ("spliced", "unspliced")
#: Below this many genes, the neighbour graph is built on ``X`` instead of PCA (as in scVelo).
MIN_GENES_FOR_PCA = 50
#: Flavor of :func:`scanpy.pp.highly_variable_genes` (scVelo's default).
HVG_FLAVOR = "seurat"


def filter_and_normalize(
    adata: AnnData,
    *,
    min_shared_counts: int | None = 20,
    n_top_genes: int | None = 2000,
    log: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Filter genes, normalise counts per cell, keep highly variable genes, log-transform ``X``.

    Reproduces scVelo's ``filter_and_normalize(adata, min_shared_counts=..., n_top_genes=...)``
    (scVelo 0.2; scVelo 0.3 dropped the gene selection and log steps from that function), with
    scanpy underneath:

    1. Cell totals of ``X``, ``spliced`` and ``unspliced`` over all genes are stored (before
       filtering) as ``obs["initial_size"]``, ``obs["initial_size_spliced"]`` and
       ``obs["initial_size_unspliced"]``, unless already present.
    2. Genes with fewer than ``min_shared_counts`` shared counts are removed. A gene's shared
       count is ``sum_i (s_i + u_i)`` over the cells ``i`` where both its spliced ``s_i`` and
       unspliced ``u_i`` counts are non-zero.
    3. ``X``, ``spliced`` and ``unspliced`` are each divided by the cell's initial size and
       multiplied by the median initial size (cells with zero counts are left unchanged).
       Integer layers become float32. A layer holding non-integer values is taken to be
       normalised already and is left as is, with a warning.
    4. If ``n_top_genes`` is smaller than the number of genes left, the ``n_top_genes`` genes
       with the highest normalised dispersion of the normalised spliced counts are kept
       (:func:`scanpy.pp.highly_variable_genes`, flavor ``"seurat"``, 20 mean bins, on
       ``log1p`` of the normalised spliced counts, which gives scVelo's dispersions of the
       normalised counts). Exactly ``n_top_genes`` are kept: ties are broken by gene order.
    5. ``X`` becomes ``log1p(X)`` (:func:`scanpy.pp.log1p`) if ``log`` and ``uns["log1p"]`` is
       absent.

    If ``X`` is absent it is first set from ``spliced`` (as float32).

    Parameters
    ----------
    adata
        Annotated data, ``(n_obs, n_vars)``, with raw counts in ``layers["spliced"]`` and
        ``layers["unspliced"]`` (dense or sparse, integer or float).
    min_shared_counts
        Minimum shared count of a gene (step 2); ``None`` skips the filter.
    n_top_genes
        Number of highly variable genes to keep (step 4); ``None`` keeps all genes.
    log
        Whether to log-transform ``X`` (step 5).
    copy
        Return a processed copy and leave ``adata`` untouched, instead of processing in place.

    Returns
    -------
    ``None`` if ``copy=False``, else the processed copy. Either way the data are subset to the
    kept genes, ``X``/``layers["spliced"]``/``layers["unspliced"]`` are normalised, and
    written are

    - ``obs["initial_size"]``, ``obs["initial_size_spliced"]``, ``obs["initial_size_unspliced"]``:
      cell totals before filtering.
    - ``var["highly_variable"]``, ``var["means"]``, ``var["dispersions"]``,
      ``var["dispersions_norm"]``: only if genes were selected in step 4.
    - ``uns["log1p"]``: only if ``X`` was log-transformed.
    - ``uns["velofit_pp"]["filter_and_normalize"]``: the parameters, ``normalized_layers``
      (the layers step 3 normalised) and ``n_genes_kept``.

    Raises
    ------
    KeyError
        ``layers["spliced"]`` or ``layers["unspliced"]`` is missing.
    ValueError
        No gene has ``min_shared_counts`` shared counts, or a parameter is out of range.

    Examples
    --------
    >>> import velofit as vf
    >>> adata = vf.datasets.simulate(n_obs=200, n_vars=60)
    >>> vf.pp.filter_and_normalize(adata, n_top_genes=40)
    >>> adata.n_vars
    40
    """
    check_adata(adata)
    _check_count_layers(adata)
    if min_shared_counts is not None and min_shared_counts < 0:
        raise VelofitInputError(f"min_shared_counts must be >= 0 or None, got {min_shared_counts!r}")
    if n_top_genes is not None and n_top_genes < 1:
        raise VelofitInputError(f"n_top_genes must be >= 1 or None, got {n_top_genes!r}")
    adata = adata.copy() if copy else adata
    if adata.X is None:
        adata.X = _as_float(adata.layers["spliced"])

    for name in ("X", *COUNT_LAYERS):
        key = _initial_size_key(name)
        if key not in adata.obs:
            adata.obs[key] = _row_sums(adata.X if name == "X" else adata.layers[name])

    if min_shared_counts is not None:
        shared = _shared_counts(adata.layers["spliced"], adata.layers["unspliced"])
        keep = shared >= min_shared_counts
        if not keep.any():
            raise VelofitInputError(
                f"no gene has at least min_shared_counts={min_shared_counts} shared counts "
                f"(the largest is {shared.max():g}); lower min_shared_counts or pass None to skip the filter"
            )
        if not keep.all():
            adata._inplace_subset_var(keep)

    normalized = []
    for name in ("X", *COUNT_LAYERS):
        matrix = adata.X if name == "X" else adata.layers[name]
        if not _is_integral(matrix):
            warnings.warn(
                f"{name!r} holds non-integer values and is taken to be normalised already; it is "
                f"not normalised again (pass raw counts to normalise it)",
                UserWarning,
                stacklevel=2,
            )
            continue
        size = adata.obs[_initial_size_key(name)].to_numpy(dtype=np.float64)
        scaled = _scale_rows(matrix, _normalization_factors(size))
        if name == "X":
            adata.X = scaled
        else:
            adata.layers[name] = scaled
        normalized.append(name)

    if n_top_genes is not None and adata.n_vars > n_top_genes:
        _select_highly_variable(adata, n_top_genes)

    if log and "log1p" not in adata.uns:
        sc.pp.log1p(adata)

    _record(
        adata,
        "filter_and_normalize",
        {
            "min_shared_counts": min_shared_counts,
            "n_top_genes": n_top_genes,
            "log": log,
            "hvg_flavor": HVG_FLAVOR,
            "normalized_layers": normalized,
            "n_genes_kept": adata.n_vars,
        },
    )
    return adata if copy else None


def moments(
    adata: AnnData,
    *,
    n_pcs: int = 30,
    n_neighbors: int = 30,
    use_highly_variable: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """First-order moments ``Ms``/``Mu``: spliced/unspliced averaged over each cell's neighbours.

    Reproduces ``scvelo.pp.moments(adata, n_pcs=..., n_neighbors=...)``:

    1. If ``obsm["X_pca"]`` is absent and there are at least 50 genes, PCA of ``X`` with
       :func:`scanpy.pp.pca` (arpack, ``min(n_pcs, n_obs - 1, n_genes - 1)`` components, on
       ``var["highly_variable"]`` genes if ``use_highly_variable`` and that column exists).
    2. If there is no neighbour graph with at least ``n_neighbors`` neighbours, a kNN graph with
       :func:`scanpy.pp.neighbors` on the first ``n_pcs`` components of ``X_pca`` (on ``X``
       with fewer than 50 genes). A graph with more neighbours is kept, and each cell's
       ``n_neighbors`` strongest connectivities are used.
    3. ``W`` = the binary connectivity graph plus the cell itself, each row divided by its sum;
       ``Ms = W @ spliced``, ``Mu = W @ unspliced`` (computed in float64, stored as float32).

    The layers are averaged as they are: run :func:`filter_and_normalize` first (scVelo
    normalises raw counts here; velofit warns instead of changing the layers).

    Parameters
    ----------
    adata
        Annotated data, ``(n_obs, n_vars)``, with ``layers["spliced"]`` and
        ``layers["unspliced"]`` (dense or sparse, integer or float).
    n_pcs
        Number of principal components for the neighbour graph, ``>= 1``.
    n_neighbors
        Number of neighbours per cell (the cell included, as in scanpy), ``>= 2``; needs
        ``n_obs >= n_neighbors + 1``.
    use_highly_variable
        Whether PCA uses only the genes in ``var["highly_variable"]`` (if that column exists).
    copy
        Return a copy with the moments and leave ``adata`` untouched, instead of writing in place.

    Returns
    -------
    ``None`` if ``copy=False``, else the copy. Either way written are

    - ``layers["Ms"]``, ``layers["Mu"]``: dense float32 ``(n_obs, n_vars)`` moments.
    - ``obsm["X_pca"]``, ``varm["PCs"]``, ``uns["pca"]``: only if PCA was computed.
    - ``obsp["distances"]``, ``obsp["connectivities"]``, ``uns["neighbors"]``: only if the
      neighbour graph was computed.
    - ``uns["velofit_pp"]["moments"]``: the parameters, ``use_rep`` (``"X_pca"`` or ``"X"``),
      ``computed_pca`` and ``computed_neighbors``.

    Raises
    ------
    KeyError
        ``layers["spliced"]`` or ``layers["unspliced"]`` is missing.
    ValueError
        Fewer than ``n_neighbors + 1`` cells, or a parameter is out of range.

    Examples
    --------
    >>> import velofit as vf
    >>> adata = vf.datasets.simulate(n_obs=200, n_vars=60)
    >>> vf.pp.filter_and_normalize(adata)
    >>> vf.pp.moments(adata, n_neighbors=10)
    >>> adata.layers["Ms"].dtype
    dtype('float32')
    """
    check_adata(adata)
    _check_count_layers(adata)
    if n_pcs < 1:
        raise VelofitInputError(f"n_pcs must be >= 1, got {n_pcs!r}")
    if n_neighbors < 2:
        raise VelofitInputError(
            f"n_neighbors must be >= 2 (the cell itself counts as one), got {n_neighbors!r}"
        )
    if adata.n_obs < n_neighbors + 1:
        raise VelofitInputError(
            f"moments with n_neighbors={n_neighbors} need at least {n_neighbors + 1} cells, got "
            f"{adata.n_obs}; lower n_neighbors"
        )
    raw = [name for name in COUNT_LAYERS if _is_integral(adata.layers[name])]
    if raw:
        warnings.warn(
            f"layers {raw} look like raw counts (all values are integers); moments averages them "
            f"as they are. Run velofit.pp.filter_and_normalize(adata) first to normalise them",
            UserWarning,
            stacklevel=2,
        )
    adata = adata.copy() if copy else adata

    use_rep = "X" if adata.n_vars < MIN_GENES_FOR_PCA else "X_pca"
    computed_pca = use_rep == "X_pca" and "X_pca" not in adata.obsm
    if (use_rep == "X" or computed_pca) and adata.X is None:
        raise VelofitInputError(
            "adata.X is empty, so the neighbour graph cannot be computed; set it (e.g. adata.X = "
            "adata.layers['spliced']) or run velofit.pp.filter_and_normalize(adata) first"
        )
    if computed_pca:
        _pca(adata, n_pcs, use_highly_variable)
    n_pcs_used = min(n_pcs, adata.obsm["X_pca"].shape[1]) if use_rep == "X_pca" else None

    stored = adata.uns.get("neighbors", {}).get("params", {}).get("n_neighbors", 0)
    computed_neighbors = "connectivities" not in adata.obsp or stored < n_neighbors
    if computed_neighbors:
        sc.pp.neighbors(adata, n_neighbors=n_neighbors, n_pcs=n_pcs_used, use_rep=use_rep)
    weights = _averaging_weights(adata.obsp["connectivities"], n_neighbors if stored > n_neighbors else None)

    for name, key in (("spliced", "Ms"), ("unspliced", "Mu")):
        counts = sp.csr_matrix(adata.layers[name], dtype=np.float64)
        adata.layers[key] = (weights @ counts).toarray().astype(np.float32)

    _record(
        adata,
        "moments",
        {
            "n_pcs": n_pcs,
            "n_neighbors": n_neighbors,
            "use_highly_variable": use_highly_variable,
            "use_rep": use_rep,
            "computed_pca": computed_pca,
            "computed_neighbors": computed_neighbors,
        },
    )
    return adata if copy else None


def _averaging_weights(connectivities: Any, n_neighbors: int | None = None) -> sp.csr_matrix:
    """Row-stochastic averaging matrix of scVelo's moments from a connectivity graph.

    Parameters
    ----------
    connectivities
        ``(n_obs, n_obs)`` sparse or dense connectivities (e.g. ``obsp["connectivities"]``).
    n_neighbors
        If given, keep only each cell's ``min(n_neighbors, fewest neighbours of any cell)``
        largest connectivities first, as scVelo does for a graph built with more neighbours.

    Returns
    -------
    ``(n_obs, n_obs)`` float64 CSR matrix ``W``: ``W_ij = 1 / (k_i + 1)`` for ``j = i`` and
    each of the ``k_i`` neighbours ``j`` of cell ``i`` (connectivity ``> 0``), else ``0``.
    """
    graph = sp.csr_matrix(connectivities, dtype=np.float64)
    graph.eliminate_zeros()
    if n_neighbors is not None:
        graph = _strongest_per_row(graph, n_neighbors)
    adjacency = (graph > 0).astype(np.float64).tolil()
    adjacency.setdiag(1.0)
    adjacency = adjacency.tocsr()
    return sp.csr_matrix(sp.diags(1.0 / np.asarray(adjacency.sum(axis=1)).ravel()) @ adjacency)


def _strongest_per_row(graph: sp.csr_matrix, n_neighbors: int) -> sp.csr_matrix:
    """Keep each row's ``min(n_neighbors, smallest row count)`` largest entries (scVelo's rule)."""
    graph = graph.copy()
    counts = np.diff(graph.indptr)
    keep = min(int(counts.min()), n_neighbors)
    for row in np.flatnonzero(counts > keep):
        start, stop = graph.indptr[row], graph.indptr[row + 1]
        drop = start + np.argsort(graph.data[start:stop])[::-1][keep:]
        graph.data[drop] = 0.0
    graph.eliminate_zeros()
    return graph


def _pca(adata: AnnData, n_pcs: int, use_highly_variable: bool) -> None:
    """PCA of ``X`` into ``obsm["X_pca"]`` with scanpy, as scVelo calls it."""
    mask = "highly_variable" if use_highly_variable and "highly_variable" in adata.var else None
    n_genes = int(np.sum(adata.var[mask])) if mask is not None else adata.n_vars
    n_comps = min(n_pcs, adata.n_obs - 1, n_genes - 1)
    if n_comps < 1:
        raise VelofitInputError(
            f"PCA needs at least 2 cells and 2 genes, got {adata.n_obs} cells and {n_genes} genes"
        )
    sc.pp.pca(adata, n_comps=n_comps, svd_solver="arpack", mask_var=mask)


def _select_highly_variable(adata: AnnData, n_top_genes: int) -> None:
    """Subset ``adata`` to the ``n_top_genes`` most dispersed genes of the normalised spliced counts."""
    spliced = adata.layers["spliced"]
    logged = spliced.log1p() if sp.issparse(spliced) else np.log1p(spliced)
    table = sc.pp.highly_variable_genes(
        AnnData(X=logged, var=adata.var[[]]),
        flavor=HVG_FLAVOR,
        n_top_genes=n_top_genes,
        inplace=False,
    )
    # exactly n_top_genes, ties broken by gene order (scanpy keeps every gene tied at the cut)
    order = np.argsort(-np.nan_to_num(table["dispersions_norm"].to_numpy(), nan=-np.inf), kind="stable")
    selected = np.zeros(adata.n_vars, dtype=bool)
    selected[order[:n_top_genes]] = True
    for column in ("means", "dispersions", "dispersions_norm"):
        adata.var[column] = table[column].to_numpy()
    adata.var["highly_variable"] = selected
    adata._inplace_subset_var(selected)


def _check_count_layers(adata: AnnData) -> None:
    """Raise a KeyError naming the layers present if ``spliced`` or ``unspliced`` is missing."""
    missing = [name for name in COUNT_LAYERS if name not in adata.layers]
    if missing:
        present = ", ".join(repr(k) for k in adata.layers) or "none"
        raise VelofitKeyError(
            f"layer(s) {', '.join(map(repr, missing))} not found (layers present: {present}); store "
            f"raw spliced and unspliced counts in adata.layers['spliced'] and "
            f"adata.layers['unspliced'] (e.g. from velocyto, STARsolo Velocyto or kb-python)"
        )


def _initial_size_key(name: str) -> str:
    """The ``obs`` column with the cell totals of ``X`` or a layer before filtering (scVelo's)."""
    return "initial_size" if name == "X" else f"initial_size_{name}"


def _row_sums(matrix: Any) -> np.ndarray:
    """Per-row totals of a dense or sparse matrix as float64."""
    return np.asarray(matrix.sum(axis=1, dtype=np.float64)).ravel()


def _shared_counts(spliced: Any, unspliced: Any) -> np.ndarray:
    """Per gene: total spliced plus unspliced counts over the cells where both are non-zero."""
    s = sp.csr_matrix(spliced, dtype=np.float64)
    u = sp.csr_matrix(unspliced, dtype=np.float64)
    both = (s > 0).multiply(u > 0)
    return np.asarray(both.multiply(s).sum(axis=0) + both.multiply(u).sum(axis=0)).ravel()


def _is_integral(matrix: Any) -> bool:
    """Whether every stored value of a dense or sparse matrix is a whole number."""
    if np.issubdtype(matrix.dtype, np.integer) or matrix.dtype == bool:
        return True
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    return bool(np.all(np.mod(values, 1) == 0))


def _normalization_factors(size: np.ndarray) -> np.ndarray:
    """Per-cell factors ``median(size) / size``, with scVelo's guards against zeros."""
    target = np.median(size)
    target += target == 0
    relative = size / target
    relative += relative == 0
    return 1.0 / relative


def _as_float(matrix: Any) -> Any:
    """A float copy of a dense or sparse matrix: integers become float32, floats keep their dtype."""
    dtype = matrix.dtype if np.issubdtype(matrix.dtype, np.floating) else np.float32
    if sp.issparse(matrix):
        return matrix.astype(dtype, copy=True)
    return np.array(matrix, dtype=dtype)


def _scale_rows(matrix: Any, factors: np.ndarray) -> Any:
    """``diag(factors) @ matrix`` as a new float matrix of the same format (COO etc. become CSR)."""
    scaled = _as_float(matrix)
    if sp.issparse(scaled):
        if scaled.format == "csc":
            scaled.data *= factors[scaled.indices].astype(scaled.dtype)
            return scaled
        scaled = scaled.tocsr()
        scaled.data *= np.repeat(factors, np.diff(scaled.indptr)).astype(scaled.dtype)
        return scaled
    scaled *= factors[:, None].astype(scaled.dtype)
    return scaled


def _record(adata: AnnData, step: str, parameters: dict[str, Any]) -> None:
    """Write ``parameters`` to ``adata.uns["velofit_pp"][step]``."""
    record = dict(adata.uns.get("velofit_pp", {}))
    record[step] = parameters
    adata.uns["velofit_pp"] = record
