"""Velocity graph, embedding projection and per-cluster gene ranking (velofit.tl._embedding)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.neighbors import NearestNeighbors

import velofit as vf
from velofit._validation import VelofitKeyError
from velofit.tl._embedding import (
    cell_likelihood,
    rank_dynamical_genes,
    transition_matrix,
    velocity_embedding,
    velocity_graph,
)

# Compiled EM code is kept between test runs (the first run compiles, about a minute).

N_OBS, N_VARS, N_NEIGHBORS = 300, 20, 15


def knn_graph(adata, n_neighbors: int = N_NEIGHBORS) -> None:
    """Symmetric binary kNN graph on log1p(Ms) (sklearn, no numba compilation) in scanpy's keys."""
    x = np.log1p(np.asarray(adata.layers["Ms"]))
    distances = NearestNeighbors(n_neighbors=n_neighbors).fit(x).kneighbors_graph(mode="distance")
    connectivities = ((distances + distances.T) > 0).astype(np.float64)
    adata.obsp["distances"] = sp.csr_matrix(distances)
    adata.obsp["connectivities"] = sp.csr_matrix(connectivities)
    adata.uns["neighbors"] = {
        "connectivities_key": "connectivities",
        "distances_key": "distances",
        "params": {"n_neighbors": n_neighbors, "method": "umap"},
    }
    centred = x - x.mean(axis=0)
    adata.obsm["X_umap"] = np.linalg.svd(centred, full_matrices=False)[0][:, :2] * 10.0


@pytest.fixture(scope="module")
def fitted():
    adata = vf.datasets.simulate(N_OBS, N_VARS, seed=0)
    vf.tl.recover_dynamics(adata, max_iter=5, n_explicit=3, progress=False)
    vf.tl.velocity(adata)
    knn_graph(adata)
    return adata


@pytest.fixture
def adata(fitted):
    return fitted.copy()


def test_velocity_graph_keys_shapes_and_support(adata):
    velocity_graph(adata)
    graph, graph_neg = adata.uns["velocity_graph"], adata.uns["velocity_graph_neg"]
    for g in (graph, graph_neg):
        assert sp.isspmatrix_csr(g) or isinstance(g, sp.csr_array)
        assert g.shape == (N_OBS, N_OBS)
        assert np.all(g.diagonal() == 0)
    assert np.all(graph.data > 0) and np.all(graph.data <= 1)
    assert np.all(graph_neg.data < 0) and np.all(graph_neg.data >= -1)
    assert graph.multiply(graph_neg).nnz == 0  # disjoint supports
    support = (abs(graph) + abs(graph_neg)) > 0
    assert (support > (adata.obsp["connectivities"] != 0)).nnz == 0  # only kNN neighbours
    assert support.nnz > 0.8 * adata.obsp["connectivities"].nnz
    self_transition = adata.obs["velocity_self_transition"].to_numpy()
    assert self_transition.shape == (N_OBS,) and np.all((self_transition >= 0) & (self_transition <= 1))
    assert adata.uns["velocity_params"]["mode_neighbors"] == "connectivities"


def test_velocity_graph_matches_scvelo_cosines(adata):
    scv = pytest.importorskip("scvelo")
    reference = adata.copy()
    velocity_graph(adata)
    scv.settings.verbosity = 0
    # scVelo's neighbours: the directed kNN rows of obsp["distances"], a subset of ours (the
    # symmetrised graph); mode "connectivities" would recompute the graph with numba (~1 min).
    scv.tl.velocity_graph(reference, n_recurse_neighbors=1, mode_neighbors="distances",
                          show_progress_bar=False, n_jobs=1)
    ours = (adata.uns["velocity_graph"] + adata.uns["velocity_graph_neg"]).toarray()
    theirs = (reference.uns["velocity_graph"] + reference.uns["velocity_graph_neg"]).toarray()
    common = (ours != 0) & (theirs != 0)
    assert common.sum() > 0.95 * (theirs != 0).sum()
    np.testing.assert_allclose(ours[common], theirs[common], atol=1e-5)  # scVelo works in float32


def test_velocity_graph_copy_leaves_input(adata):
    out = velocity_graph(adata, copy=True)
    assert "velocity_graph" in out.uns and "velocity_graph" not in adata.uns


def test_velocity_graph_n_neighbors_caps_each_row(adata):
    velocity_graph(adata, n_neighbors=5)
    support = (abs(adata.uns["velocity_graph"]) + abs(adata.uns["velocity_graph_neg"])).tocsr()
    assert np.diff(support.indptr).max() <= 5


def test_velocity_graph_without_knn_graph_says_what_to_run(adata):
    del adata.obsp["connectivities"]
    with pytest.raises(KeyError, match=r"velofit\.pp\.moments"):
        velocity_graph(adata)


def test_velocity_graph_without_velocity_says_what_to_run(adata):
    del adata.layers["velocity"]
    with pytest.raises(VelofitKeyError, match=r"velofit\.tl\.velocity"):
        velocity_graph(adata)


def test_transition_matrix_rows_are_softmax_of_cosines(adata):
    velocity_graph(adata)
    t = transition_matrix(adata.uns["velocity_graph"], adata.uns["velocity_graph_neg"]).toarray()
    np.testing.assert_allclose(t.sum(axis=1), 1.0, rtol=1e-12)
    cos = (adata.uns["velocity_graph"] + adata.uns["velocity_graph_neg"]).toarray()
    i = int(np.argmax((cos != 0).sum(axis=1)))
    neighbours = np.flatnonzero(cos[i])
    ratio = t[i, neighbours] / np.exp(10.0 * cos[i, neighbours])
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-10)  # proportional to exp(10 cos)


def test_velocity_embedding_matches_scvelo_projection(adata):
    scv = pytest.importorskip("scvelo")
    velocity_embedding(adata, basis="umap")
    ours = adata.obsm["velocity_umap"]
    assert ours.shape == (N_OBS, 2) and np.all(np.isfinite(ours))
    assert "velocity_graph" in adata.uns  # computed on the way
    assert adata.uns["velocity_params"]["embeddings"] == ["umap"]
    reference = adata.copy()
    del reference.obsm["velocity_umap"]
    scv.settings.verbosity = 0
    scv.tl.velocity_embedding(reference, basis="umap", autoscale=False)
    np.testing.assert_allclose(ours, reference.obsm["velocity_umap"], atol=1e-10)


def test_velocity_embedding_points_forward_in_time(adata):
    velocity_embedding(adata, basis="umap")
    x, v = adata.obsm["X_umap"], adata.obsm["velocity_umap"]
    t = adata.obs["true_t"].to_numpy()
    # Direction of increasing true time around each cell, from its neighbours.
    conn = adata.obsp["connectivities"].tocsr()
    agree = []
    for i in range(adata.n_obs):
        j = conn.indices[conn.indptr[i] : conn.indptr[i + 1]]
        forward = ((t[j] - t[i])[:, None] * (x[j] - x[i])).sum(axis=0)
        if np.linalg.norm(forward) > 0 and np.linalg.norm(v[i]) > 0:
            agree.append(forward @ v[i] / np.linalg.norm(forward) / np.linalg.norm(v[i]))
    assert np.median(agree) > 0.5


def test_velocity_embedding_missing_basis(adata):
    with pytest.raises(KeyError, match="X_tsne"):
        velocity_embedding(adata, basis="tsne")


def test_scvelo_stream_plot_reads_our_output(adata, tmp_path):
    scv = pytest.importorskip("scvelo")
    import matplotlib

    matplotlib.use("Agg")
    velocity_embedding(adata, basis="umap")
    scv.settings.verbosity = 0
    scv.pl.velocity_embedding_stream(adata, basis="umap", show=False, save=False)


def test_rank_dynamical_genes_per_cluster(adata):
    adata.obs["clusters"] = pd.cut(adata.obs["true_t"], 3, labels=["early", "mid", "late"])
    rank_dynamical_genes(adata, n_genes=5)
    names = adata.uns["rank_dynamical_genes"]
    scores = adata.uns["rank_dynamical_genes_scores"]
    assert list(names.columns) == ["early", "mid", "late"] and names.shape == (5, 3)
    assert set(names.to_numpy().ravel()) <= set(adata.var_names)
    assert np.all(np.diff(scores.to_numpy(), axis=0) <= 0)  # best first
    # Recompute one score independently from the closed-form kinetics (all genes start at 0).
    gene = names["late"].iloc[0]
    g = adata.var_names.get_loc(gene)
    var = adata.var.iloc[g]
    alpha, beta = var["fit_alpha"], var["fit_beta"] * var["fit_scaling"]
    gamma, t_, scaling = var["fit_gamma"], var["fit_t_"], var["fit_scaling"]
    t = np.asarray(adata.layers["fit_t"][:, g])
    u = lambda tau, u0, a: u0 * np.exp(-beta * tau) + a / beta * (1 - np.exp(-beta * tau))

    def s(tau, u0, s0, a):
        c = (a - beta * u0) / (gamma - beta)
        return s0 * np.exp(-gamma * tau) + a / gamma * (1 - np.exp(-gamma * tau)) + c * (
            np.exp(-gamma * tau) - np.exp(-beta * tau))

    u_, s_ = u(t_, 0.0, alpha), s(t_, 0.0, 0.0, alpha)
    on = t < t_
    u_fit = np.where(on, u(t, 0.0, alpha), u(t - t_, u_, 0.0)) * scaling
    s_fit = np.where(on, s(t, 0.0, 0.0, alpha), s(t - t_, u_, s_, 0.0))
    r2 = ((adata.layers["Mu"][:, g] - u_fit) / var["fit_std_u"]) ** 2 + (
        (adata.layers["Ms"][:, g] - s_fit) / var["fit_std_s"]) ** 2
    late = np.asarray(adata.obs["clusters"] == "late")
    np.testing.assert_allclose(scores["late"].iloc[0], np.exp(-0.5 * r2[late]).mean(), rtol=1e-8)


def test_cell_likelihood_is_consistent_with_fit_likelihood(adata):
    genes = np.flatnonzero(adata.var["fit_status"] == "ok")
    likelihood = cell_likelihood(adata, genes)
    assert likelihood.shape == (N_OBS, genes.size)
    assert np.all((likelihood > 0) & (likelihood <= 1))


def test_rank_dynamical_genes_errors(adata):
    with pytest.raises(KeyError, match="groupby"):
        rank_dynamical_genes(adata, groupby="no_such_column")
    adata.obs["clusters"] = "one"
    with pytest.raises(ValueError, match="n_genes"):
        rank_dynamical_genes(adata, n_genes=0)
    out = rank_dynamical_genes(adata, n_genes=100, copy=True)
    assert out.uns["rank_dynamical_genes"].shape == (N_VARS, 1)  # capped at the fitted genes
    assert "rank_dynamical_genes" not in adata.uns
