"""Velocity graph, projection onto an embedding and per-cluster gene ranking (scVelo's keys).

The graph and the projection follow scVelo's definitions (``scv.tl.velocity_graph``,
``scv.tl.transition_matrix``, ``scv.tl.velocity_embedding``) so that scVelo's plots and
CellRank can read what is written here, but the cosines are computed vectorised over chunks
of (cell, neighbour) pairs instead of one cell at a time, and the neighbours are the nonzero
entries of ``obsp["connectivities"]`` (no recursion to neighbours of neighbours).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._validation import (
    VelofitInputError,
    VelofitKeyError,
    check_adata,
    check_bool,
    check_int,
    check_key,
    dense_layer,
)
from ..core.kinetics import KineticParams, trajectory

#: Softmax temperature of the transition matrix (scVelo's ``scale``).
DEFAULT_SCALE = 10.0
#: Elements of a (pairs x genes) block held at once when computing cosines.
_BLOCK_ELEMENTS = 4_000_000
#: One compilation per shape instead of one per primitive (eager dispatch takes seconds).
_trajectory = jax.jit(trajectory)
_FIT_COLUMNS = ("fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling", "fit_status")


def velocity_graph(
    adata: AnnData,
    *,
    vkey: str = "velocity",
    xkey: str = "Ms",
    n_neighbors: int | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Cosine similarity between each cell's velocity and its displacements to its neighbours.

    For cell ``i`` and neighbour ``j``, ``cos(dx_ij - mean(dx_ij), v_i - mean(v_i))`` with
    ``dx_ij = x_j - x_i`` (means over genes, as scVelo's ``cosine_correlation``), on the
    velocity genes without ``nan``. Neighbours are the nonzero entries of
    ``obsp["connectivities"]`` (scanpy's kNN graph, made by :func:`velofit.pp.moments`).

    Parameters
    ----------
    adata
        Data after :func:`velofit.tl.velocity` and :func:`velofit.pp.moments`.
    vkey
        Velocity layer; genes are those of ``var[f"{vkey}_genes"]`` when present.
    xkey
        Layer of the expression the displacements are measured in (spliced moments).
    n_neighbors
        Keep only the ``n_neighbors`` strongest connectivities of each cell; ``None`` keeps
        all of them.
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy if ``copy=True``. Written:
    ``uns[f"{vkey}_graph"]`` (``(n_obs, n_obs)`` CSR, positive cosines),
    ``uns[f"{vkey}_graph_neg"]`` (CSR, negative cosines),
    ``obs[f"{vkey}_self_transition"]`` (scVelo's self-transition probability) and
    ``uns[f"{vkey}_params"]`` entries ``mode_neighbors``, ``n_recurse_neighbors``,
    ``n_neighbors``.
    """
    adata = check_adata(adata)
    check_key("vkey", vkey)
    check_key("xkey", xkey)
    check_bool("copy", copy)
    graph, graph_neg = _cosine_graph(adata, vkey=vkey, xkey=xkey, n_neighbors=n_neighbors)
    out = adata.copy() if copy else adata
    out.uns[f"{vkey}_graph"] = graph
    out.uns[f"{vkey}_graph_neg"] = graph_neg
    out.obs[f"{vkey}_self_transition"] = _self_probability(graph)
    params = dict(out.uns.get(f"{vkey}_params", {}))
    params.pop("embeddings", None)  # projections made from an older graph are stale
    params.update(mode_neighbors="connectivities", n_recurse_neighbors=1, n_neighbors=n_neighbors or 0)
    out.uns[f"{vkey}_params"] = params
    return out if copy else None


def velocity_embedding(
    adata: AnnData,
    *,
    basis: str = "umap",
    vkey: str = "velocity",
    copy: bool = False,
) -> AnnData | None:
    """Project velocities onto an embedding through the transition matrix of the velocity graph.

    As scVelo's ``velocity_embedding`` (its defaults, without ``autoscale``): transition
    weights ``sign(cos_ij) expm1(10 |cos_ij|)`` over each cell's neighbours plus scVelo's
    self-transition, rows normalised by their absolute sums (:func:`transition_matrix` with
    ``use_negative_cosines=True``; for positive cosines this is the softmax
    ``exp(10 cos_ij)``, less 1); then ``v_i = sum_j T_ij d_ij - mean_j(T_ij) sum_j d_ij``
    with ``d_ij`` the unit vector from cell ``i`` to neighbour ``j`` in the embedding: the
    expected displacement minus the one a uniform choice of neighbour would give.

    Parameters
    ----------
    adata
        Data with ``obsm[f"X_{basis}"]``; the velocity graph is computed first (and stored) if
        ``uns[f"{vkey}_graph"]`` is missing.
    basis
        Embedding name (``"umap"`` reads ``obsm["X_umap"]``).
    vkey
        Velocity key.
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy if ``copy=True``. Written: ``obsm[f"{vkey}_{basis}"]``
    (``(n_obs, n_dims)`` projected velocities) and ``basis`` appended to
    ``uns[f"{vkey}_params"]["embeddings"]``; also the velocity graph's keys (see
    :func:`velocity_graph`) when it had to be computed.
    """
    adata = check_adata(adata)
    basis = check_key("basis", basis).removeprefix("X_")
    check_key("vkey", vkey)
    check_bool("copy", copy)
    out = adata.copy() if copy else adata
    if f"{vkey}_graph" not in out.uns:
        velocity_graph(out, vkey=vkey)
    out.obsm[f"{vkey}_{basis}"] = project_embedding(out, basis=basis, vkey=vkey)
    params = dict(out.uns.get(f"{vkey}_params", {}))
    params["embeddings"] = sorted({*params.get("embeddings", []), basis})
    out.uns[f"{vkey}_params"] = params
    return out if copy else None


def rank_dynamical_genes(
    adata: AnnData,
    *,
    groupby: str = "clusters",
    n_genes: int = 100,
    copy: bool = False,
) -> AnnData | None:
    """Rank the fitted genes of each group by how well the fit explains the group's cells.

    Score of gene ``g`` in group ``k``: the mean over the group's cells of the per-cell
    likelihood ``exp(-||r_ig||^2 / 2)``, with ``r_ig`` the residual of cell ``i`` to the
    fitted trajectory at its fitted time, unspliced and spliced, in units of the gene's
    standard deviations (``fit_std_u``, ``fit_std_s``).

    Parameters
    ----------
    adata
        Data after :func:`velofit.tl.recover_dynamics`.
    groupby
        Categorical ``obs`` column defining the groups.
    n_genes
        Genes kept per group (at most the number of fitted genes).
    copy
        Return a modified copy instead of writing to ``adata``.

    Returns
    -------
    ``None``, or a copy if ``copy=True``. Written: ``uns["rank_dynamical_genes"]`` (DataFrame, one column of gene names
    per group, best first, ``n_genes`` rows), ``uns["rank_dynamical_genes_scores"]`` (the
    matching scores) and ``uns["rank_dynamical_genes_params"]`` (``groupby``, ``n_genes``).
    """
    adata = check_adata(adata)
    check_key("groupby", groupby)
    n_genes = check_int("n_genes", n_genes, minimum=1)
    check_bool("copy", copy)
    if groupby not in adata.obs.columns:
        raise VelofitKeyError(
            f"obs column {groupby!r} not found (columns: {', '.join(map(str, adata.obs.columns)) or 'none'}); "
            "pass groupby= naming a categorical column of cell groups"
        )
    genes = fitted_genes(adata)
    likelihood = cell_likelihood(adata, genes)
    groups = adata.obs[groupby].astype("category")
    n_keep = min(int(n_genes), genes.size)
    names, scores = {}, {}
    for group in groups.cat.categories:
        cells = np.asarray(groups == group)
        if not cells.any():
            continue
        mean = likelihood[cells].mean(axis=0)
        order = np.argsort(-mean, kind="stable")[:n_keep]
        names[str(group)] = np.asarray(adata.var_names[genes[order]], dtype=str)
        scores[str(group)] = mean[order]
    out = adata.copy() if copy else adata
    out.uns["rank_dynamical_genes"] = pd.DataFrame(names)
    out.uns["rank_dynamical_genes_scores"] = pd.DataFrame(scores)
    out.uns["rank_dynamical_genes_params"] = {"groupby": groupby, "n_genes": int(n_genes)}
    return out if copy else None


# ----------------------------------------------------------------------------- helpers


def fitted_genes(adata: AnnData) -> np.ndarray:
    """Indices of the genes fitted successfully; raises when there is no fit.

    Parameters
    ----------
    adata
        Data after :func:`velofit.tl.recover_dynamics`.

    Returns
    -------
    Integer indices into ``adata.var_names`` (may be empty).
    """
    missing = [k for k in _FIT_COLUMNS if k not in adata.var.columns]
    if missing or "fit_t" not in adata.layers:
        raise VelofitKeyError(
            f"no fitted dynamics found (missing {missing or ['layers/fit_t']}); "
            "run velofit.tl.recover_dynamics(adata) first"
        )
    return np.flatnonzero(np.asarray(adata.var["fit_status"] == "ok"))


def fitted_params(adata: AnnData, genes: np.ndarray) -> KineticParams:
    """Kinetic parameters of ``genes`` on the aligned clock of ``layers["fit_t"]`` (NumPy).

    Parameters
    ----------
    adata
        Data after :func:`velofit.tl.recover_dynamics`.
    genes
        Integer gene indices.

    Returns
    -------
    :class:`~velofit.core.kinetics.KineticParams` of ``(len(genes),)`` float64 arrays, with
    ``beta`` in scaled-unspliced units (``fit_beta * fit_scaling``).
    """
    var = adata.var.iloc[np.asarray(genes)]
    column = lambda key: var[key].to_numpy(dtype=np.float64)
    scaling = column("fit_scaling")
    return KineticParams(
        column("fit_alpha"), column("fit_beta") * scaling, column("fit_gamma"), column("fit_t_"), scaling
    )


def model_curve(t: np.ndarray, params: KineticParams) -> tuple[np.ndarray, np.ndarray]:
    """Fitted trajectory in observed units: ``(scaling * u(t), s(t))``.

    Parameters
    ----------
    t
        Times on the genes' clocks, shape broadcasting against the parameters, e.g.
        ``(n_times, n_genes)``.
    params
        Parameters from :func:`fitted_params`.

    Returns
    -------
    ``(u_observed, s)`` float64 arrays of the broadcast shape.
    """
    with jax.enable_x64(True):
        jparams = KineticParams(*(jnp.asarray(p, dtype=jnp.float64) for p in params))
        u, s = _trajectory(jnp.asarray(t, dtype=jnp.float64), jparams)
        return np.asarray(u) * np.asarray(params.scaling), np.asarray(s)


def cell_likelihood(adata: AnnData, genes: np.ndarray) -> np.ndarray:
    """Per-cell likelihood ``exp(-||r||^2 / 2)`` of each gene's fit (residuals in std units).

    Parameters
    ----------
    adata
        Data after :func:`velofit.tl.recover_dynamics`.
    genes
        Integer indices of fitted genes.

    Returns
    -------
    ``(n_obs, len(genes))`` float64 array in ``(0, 1]``.
    """
    settings = adata.uns.get("recover_dynamics", {})
    ms = dense_layer(adata, str(settings.get("spliced_layer", "Ms")), genes)
    mu = dense_layer(adata, str(settings.get("unspliced_layer", "Mu")), genes)
    t = np.asarray(adata.layers["fit_t"])[:, genes]
    u_fit, s_fit = model_curve(t, fitted_params(adata, genes))
    std_u = adata.var["fit_std_u"].to_numpy(dtype=np.float64)[genes]
    std_s = adata.var["fit_std_s"].to_numpy(dtype=np.float64)[genes]
    r2 = ((mu - u_fit) / std_u) ** 2 + ((ms - s_fit) / std_s) ** 2
    return np.exp(-0.5 * r2)


def _velocity_inputs(adata: AnnData, vkey: str, xkey: str) -> tuple[np.ndarray, np.ndarray]:
    if vkey not in adata.layers:
        raise VelofitKeyError(f"layer {vkey!r} not found; run velofit.tl.velocity(adata) first")
    velocity = np.asarray(adata.layers[vkey], dtype=np.float64)
    genes = np.ones(adata.n_vars, dtype=bool)
    if f"{vkey}_genes" in adata.var.columns:
        genes &= np.asarray(adata.var[f"{vkey}_genes"], dtype=bool)
    genes &= np.all(np.isfinite(velocity), axis=0)
    if not genes.any():
        raise VelofitInputError(
            f"no velocity gene with finite velocities in layer {vkey!r}; check the fit "
            "(var['fit_status'], var['fit_likelihood']) or lower velocity(min_likelihood=...)"
        )
    idx = np.flatnonzero(genes)
    return dense_layer(adata, xkey, idx), velocity[:, idx]


def _neighbour_pattern(adata: AnnData, n_neighbors: int | None) -> sp.csr_matrix:
    if "connectivities" not in adata.obsp:
        raise VelofitKeyError(
            "obsp['connectivities'] not found: the velocity graph needs the kNN graph; "
            "run velofit.pp.moments(adata) (or scanpy.pp.neighbors(adata)) first"
        )
    conn = sp.csr_matrix(adata.obsp["connectivities"], dtype=np.float64)
    conn.setdiag(0)
    conn.eliminate_zeros()
    if n_neighbors is not None:
        conn = _strongest_per_row(conn, check_int("n_neighbors", n_neighbors, minimum=1))
    conn.sort_indices()
    return conn


def _strongest_per_row(matrix: sp.csr_matrix, k: int) -> sp.csr_matrix:
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    order = np.lexsort((-matrix.data, rows))  # by row, strongest first
    rank = np.arange(order.size) - matrix.indptr[rows[order]]
    keep = order[rank < k]
    return sp.csr_matrix((matrix.data[keep], (rows[keep], matrix.indices[keep])), shape=matrix.shape)


def _cosine_graph(
    adata: AnnData, *, vkey: str, xkey: str = "Ms", n_neighbors: int | None = None
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Positive and negative parts of the cosine graph, without writing to ``adata``."""
    pattern = _neighbour_pattern(adata, n_neighbors)
    x, v = _velocity_inputs(adata, vkey, xkey)
    v = v - v.mean(axis=1, keepdims=True)
    v_norm = np.linalg.norm(v, axis=1)
    rows = np.repeat(np.arange(adata.n_obs), np.diff(pattern.indptr))
    cols = pattern.indices
    cosines = np.zeros(cols.size)
    step = max(1, _BLOCK_ELEMENTS // max(1, x.shape[1]))
    for start in range(0, cols.size, step):
        r, c = rows[start : start + step], cols[start : start + step]
        dx = x[c] - x[r]
        dx -= dx.mean(axis=1, keepdims=True)
        num = np.einsum("ij,ij->i", dx, v[r])
        den = np.linalg.norm(dx, axis=1) * v_norm[r]
        cosines[start : start + step] = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    cosines = np.clip(cosines, -1.0, 1.0)
    shape = (adata.n_obs, adata.n_obs)

    def part(mask):
        graph = sp.csr_matrix((cosines[mask], (rows[mask], cols[mask])), shape=shape)
        graph.sort_indices()
        return graph

    return part(cosines > 0), part(cosines < 0)


def _self_probability(graph: sp.csr_matrix) -> np.ndarray:
    confidence = graph.max(axis=1).toarray().ravel()
    return np.clip(np.percentile(confidence, 98) - confidence, 0.0, 1.0)


def transition_matrix(
    graph: sp.csr_matrix,
    graph_neg: sp.csr_matrix,
    *,
    scale: float = DEFAULT_SCALE,
    use_negative_cosines: bool = False,
) -> sp.csr_matrix:
    """Transition matrix of a velocity graph, as scVelo's ``transition_matrix``.

    Parameters
    ----------
    graph, graph_neg
        ``(n_obs, n_obs)`` positive and negative cosine parts (disjoint supports).
    scale
        Softmax temperature.
    use_negative_cosines
        ``False`` (scVelo's ``transition_matrix`` default): weight ``exp(scale * cos_ij)`` for
        every neighbour, a softmax. ``True`` (what scVelo's ``velocity_embedding`` uses): weight
        ``sign(cos) * expm1(scale * |cos|)``, so that neighbours against the velocity push the
        projection away from them; rows are then normalised by the sum of absolute weights.

    Returns
    -------
    ``(n_obs, n_obs)`` CSR with scVelo's self-transition ``p_self`` on the diagonal (weight
    ``exp(scale * p_self)``, or ``expm1`` with ``use_negative_cosines``), each row's absolute
    values summing to 1.
    """
    cos = (sp.csr_matrix(graph) + sp.csr_matrix(graph_neg)).tocsr()
    cos.setdiag(0)
    cos.eliminate_zeros()
    weights = cos.copy()
    self_scaled = scale * _self_probability(sp.csr_matrix(graph))
    if use_negative_cosines:
        weights.data = np.sign(weights.data) * np.expm1(scale * np.abs(weights.data))
        diagonal = np.expm1(self_scaled)
    else:
        weights.data = np.exp(scale * weights.data)
        diagonal = np.exp(self_scaled)
    weights = (weights + sp.diags(diagonal)).tocsr()
    totals = np.asarray(abs(weights).sum(axis=1)).ravel()
    return (sp.diags(1.0 / np.where(totals > 0, totals, 1.0)) @ weights).tocsr()


def project_embedding(adata: AnnData, *, basis: str = "umap", vkey: str = "velocity") -> np.ndarray:
    """Projected velocities (see :func:`velocity_embedding`) without writing to ``adata``.

    Parameters
    ----------
    adata
        Data with ``obsm[f"X_{basis}"]`` and a velocity layer; the velocity graph is read from
        ``uns`` or, when missing, computed (and not stored).
    basis
        Embedding name.
    vkey
        Velocity key.

    Returns
    -------
    ``(n_obs, n_dims)`` float64 array.
    """
    basis = basis.removeprefix("X_")
    key = f"X_{basis}"
    if key not in adata.obsm:
        present = ", ".join(adata.obsm.keys()) or "none"
        raise VelofitKeyError(
            f"obsm[{key!r}] not found (obsm present: {present}); compute the embedding first, "
            f"e.g. scanpy.tl.umap(adata) for basis='umap'"
        )
    x_emb = np.asarray(adata.obsm[key], dtype=np.float64)
    if f"{vkey}_graph" in adata.uns:
        graph = sp.csr_matrix(adata.uns[f"{vkey}_graph"])
        graph_neg = sp.csr_matrix(adata.uns.get(f"{vkey}_graph_neg", sp.csr_matrix(graph.shape)))
    else:
        graph, graph_neg = _cosine_graph(adata, vkey=vkey)
    t = transition_matrix(graph, graph_neg, use_negative_cosines=True)
    t.setdiag(0)
    t.eliminate_zeros()
    rows = np.repeat(np.arange(adata.n_obs), np.diff(t.indptr))
    d = x_emb[t.indices] - x_emb[rows]
    length = np.linalg.norm(d, axis=1, keepdims=True)
    d = np.divide(d, length, out=np.zeros_like(d), where=length > 0)
    counts = np.maximum(np.diff(t.indptr), 1)
    expected = np.zeros_like(x_emb)
    uniform = np.zeros_like(x_emb)
    np.add.at(expected, rows, t.data[:, None] * d)
    np.add.at(uniform, rows, d)
    mean_prob = np.asarray(t.sum(axis=1)).ravel() / counts
    return expected - mean_prob[:, None] * uniform
