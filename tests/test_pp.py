"""Tests of velofit.pp: scVelo's filtering, normalisation and moments, and the AnnData conventions.

Most moments tests store a neighbour graph first, so that scanpy's UMAP connectivities (whose
numba compilation takes tens of seconds) run only in the tests marked ``slow``.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from velofit.datasets import pancreas, shared_pancreas_path
from velofit.pp import filter_and_normalize, moments

SHARED_PANCREAS = shared_pancreas_path()
FORMATS = {
    "csr_int32": lambda m: sp.csr_matrix(m.astype(np.int32)),
    "csc_int64": lambda m: sp.csc_matrix(m.astype(np.int64)),
    "dense_int32": lambda m: m.astype(np.int32),
    "dense_float64": lambda m: m.astype(np.float64),
    "csr_float32": lambda m: sp.csr_matrix(m.astype(np.float32)),
}


def _counts(n_obs: int = 40, n_vars: int = 12, seed: int = 0, fmt: str = "csr_int32") -> ad.AnnData:
    """Poisson counts with gene- and cell-dependent means; the last gene is almost empty."""
    rng = np.random.default_rng(seed)
    size = rng.lognormal(0.0, 0.4, size=n_obs)[:, None]
    gene_mean = rng.lognormal(1.0, 0.8, size=n_vars)[None, :]
    spliced = rng.poisson(size * gene_mean)
    unspliced = rng.poisson(0.5 * size * gene_mean)
    spliced[:, -1] = 0
    spliced[0, -1] = 3
    unspliced[:, -1] = 0
    unspliced[0, -1] = 1
    convert = FORMATS[fmt]
    return ad.AnnData(
        X=convert(spliced),
        layers={"spliced": convert(spliced), "unspliced": convert(unspliced)},
    )


def _store_knn_graph(adata: ad.AnnData, n_neighbors: int, seed: int = 0) -> None:
    """Store a symmetric kNN graph (exact, on log counts) with random positive connectivities."""
    spliced = adata.layers["spliced"]
    x = np.log1p(spliced.toarray() if sp.issparse(spliced) else np.asarray(spliced, dtype=float))
    distances = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    nearest = np.argsort(distances, axis=1)[:, : n_neighbors - 1]
    rows = np.repeat(np.arange(adata.n_obs), n_neighbors - 1)
    knn = sp.csr_matrix((np.ones(rows.size), (rows, nearest.ravel())), shape=(adata.n_obs,) * 2)
    union = ((knn + knn.T) > 0).astype(float).tocsr()
    union.data = np.random.default_rng(seed).uniform(0.05, 1.0, size=union.nnz)
    adata.obsp["connectivities"] = union
    adata.obsp["distances"] = knn
    adata.uns["neighbors"] = {
        "params": {"n_neighbors": n_neighbors, "method": "umap"},
        "connectivities_key": "connectivities",
        "distances_key": "distances",
    }


def _manual_moments(adata: ad.AnnData, layer: str) -> np.ndarray:
    """Average of ``layer`` over each cell and its neighbours (connectivity > 0), cell by cell."""
    values = adata.layers[layer]
    values = values.toarray() if sp.issparse(values) else np.asarray(values, dtype=float)
    graph = sp.csr_matrix(adata.obsp["connectivities"])
    out = np.empty(values.shape)
    for i in range(adata.n_obs):
        row = graph[i]
        members = set(row.indices[row.data > 0]) | {i}
        out[i] = values[sorted(members)].mean(axis=0)
    return out


def _quiet(function, *args, **kwargs):
    """Call ``function`` with the expected raw-count / already-normalised warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return function(*args, **kwargs)


# ------------------------------------------------------------------ filter_and_normalize


def test_shared_counts_filter_follows_scvelo():
    spliced = np.array([[5, 0, 4], [5, 9, 0], [0, 9, 4], [5, 0, 4]])
    unspliced = np.array([[5, 9, 0], [5, 0, 4], [5, 9, 0], [0, 9, 0]])
    # shared counts (both > 0 in the cell): gene 0: 10 + 10 = 20, gene 1: 0, gene 2: 0
    adata = ad.AnnData(X=spliced.astype(np.float32), layers={"spliced": spliced, "unspliced": unspliced})
    adata.var_names = ["a", "b", "c"]
    kept = filter_and_normalize(adata, min_shared_counts=20, n_top_genes=None, copy=True)
    assert list(kept.var_names) == ["a"]
    kept = filter_and_normalize(adata, min_shared_counts=0, n_top_genes=None, copy=True)
    assert list(kept.var_names) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="no gene has at least min_shared_counts=21"):
        filter_and_normalize(adata, min_shared_counts=21, n_top_genes=None)


def test_normalization_uses_totals_before_filtering():
    adata = _counts()
    raw = {k: adata.layers[k].toarray().astype(float) for k in ("spliced", "unspliced")}
    filter_and_normalize(adata, min_shared_counts=10, n_top_genes=None, log=False)
    assert adata.n_vars == 11  # the almost empty gene is gone
    for key, counts in raw.items():
        initial = counts.sum(axis=1)
        np.testing.assert_allclose(adata.obs[f"initial_size_{key}"], initial)
        expected = counts[:, :11] * (np.median(initial) / initial)[:, None]
        np.testing.assert_allclose(adata.layers[key].toarray(), expected, rtol=1e-6)
        assert adata.layers[key].dtype == np.float32
    np.testing.assert_allclose(adata.X.toarray(), adata.layers["spliced"].toarray())


def test_log_transforms_x_only():
    adata = _counts()
    filter_and_normalize(adata, n_top_genes=None, min_shared_counts=None)
    np.testing.assert_allclose(np.expm1(adata.X.toarray()), adata.layers["spliced"].toarray(), rtol=1e-5)
    assert "log1p" in adata.uns
    record = adata.uns["velofit_pp"]["filter_and_normalize"]
    assert record["normalized_layers"] == ["X", "spliced", "unspliced"]


def test_highly_variable_genes_match_scanpy_on_normalised_spliced():
    adata = _counts(n_obs=60, n_vars=30, seed=4)
    reference = adata.copy()
    filter_and_normalize(adata, min_shared_counts=None, n_top_genes=8)
    assert adata.n_vars == 8
    assert adata.var["highly_variable"].all()
    for column in ("means", "dispersions", "dispersions_norm"):
        assert column in adata.var
    filter_and_normalize(reference, min_shared_counts=None, n_top_genes=None, log=False)
    logged = ad.AnnData(np.log1p(reference.layers["spliced"].toarray()))
    table = sc.pp.highly_variable_genes(logged, flavor="seurat", n_top_genes=8, inplace=False)
    norm = np.nan_to_num(table["dispersions_norm"].to_numpy(), nan=-np.inf)
    ours = norm[reference.var_names.get_indexer(adata.var_names)]
    np.testing.assert_allclose(adata.var["dispersions_norm"], ours)
    assert ours.min() >= np.sort(norm)[-8]
    assert set(adata.var_names) <= set(reference.var_names[table["highly_variable"].to_numpy()])


def test_filter_and_normalize_copy_leaves_the_input_untouched():
    adata = _counts()
    before = adata.copy()
    result = filter_and_normalize(adata, n_top_genes=5, copy=True)
    assert isinstance(result, ad.AnnData) and result is not adata
    assert adata.shape == before.shape
    for key in ("spliced", "unspliced"):
        assert (adata.layers[key] != before.layers[key]).nnz == 0
    assert (adata.X != before.X).nnz == 0
    assert not adata.uns and list(adata.obs.columns) == []
    assert result.uns["velofit_pp"]["filter_and_normalize"]["n_top_genes"] == 5


def test_filter_and_normalize_in_place_returns_none_and_records():
    adata = _counts()
    assert filter_and_normalize(adata, n_top_genes=5, min_shared_counts=15) is None
    record = adata.uns["velofit_pp"]["filter_and_normalize"]
    assert record["min_shared_counts"] == 15 and record["n_top_genes"] == 5 and record["log"] is True
    assert record["n_genes_kept"] == adata.n_vars == 5
    for column in ("initial_size", "initial_size_spliced", "initial_size_unspliced"):
        assert column in adata.obs


def test_already_normalised_layers_are_not_normalised_twice():
    adata = _counts()
    filter_and_normalize(adata, n_top_genes=None)
    spliced = adata.layers["spliced"].copy()
    with pytest.warns(UserWarning, match="normalised already"):
        filter_and_normalize(adata, n_top_genes=None)
    assert (adata.layers["spliced"] != spliced).nnz == 0


def test_missing_x_is_set_from_spliced():
    adata = _counts()
    adata.X = None
    filter_and_normalize(adata, n_top_genes=None, log=False)
    np.testing.assert_allclose(adata.X.toarray(), adata.layers["spliced"].toarray())


@pytest.mark.parametrize("function", [filter_and_normalize, moments])
@pytest.mark.parametrize("missing", ["spliced", "unspliced"])
def test_missing_layers_raise_a_helpful_key_error(function, missing):
    adata = _counts()
    del adata.layers[missing]
    with pytest.raises(KeyError, match=rf"'{missing}' not found \(layers present: '.*'\).*adata.layers"):
        function(adata)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"min_shared_counts": -1}, "min_shared_counts"), ({"n_top_genes": 0}, "n_top_genes")],
)
def test_filter_and_normalize_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        filter_and_normalize(_counts(), **kwargs)


# ------------------------------------------------------------------------------ moments


def test_moments_is_the_average_over_neighbours_and_self():
    adata = _counts(n_obs=30, n_vars=10)
    filter_and_normalize(adata, n_top_genes=None, min_shared_counts=None)
    _store_knn_graph(adata, n_neighbors=5)
    moments(adata, n_neighbors=5)
    for key, layer in (("Ms", "spliced"), ("Mu", "unspliced")):
        result = adata.layers[key]
        assert isinstance(result, np.ndarray) and result.dtype == np.float32 and result.shape == adata.shape
        np.testing.assert_allclose(result, _manual_moments(adata, layer), rtol=1e-6)
    record = adata.uns["velofit_pp"]["moments"]
    assert record["n_neighbors"] == 5 and record["computed_neighbors"] is False


def test_moments_uses_the_strongest_connectivities_of_a_larger_graph():
    adata = _counts(n_obs=30, n_vars=10)
    filter_and_normalize(adata, n_top_genes=None, min_shared_counts=None)
    _store_knn_graph(adata, n_neighbors=8)
    graph = adata.obsp["connectivities"].toarray()
    keep = min(4, int((graph > 0).sum(axis=1).min()))
    strongest = np.zeros_like(graph)
    for i, row in enumerate(graph):
        top = np.argsort(row)[::-1][:keep]
        strongest[i, top] = row[top]
    moments(adata, n_neighbors=4)
    reference = adata.copy()
    reference.obsp["connectivities"] = sp.csr_matrix(strongest)
    np.testing.assert_allclose(adata.layers["Ms"], _manual_moments(reference, "spliced"), rtol=1e-6)


def test_moments_copy_leaves_the_input_untouched():
    adata = _counts(n_obs=30)
    filter_and_normalize(adata, n_top_genes=None)
    _store_knn_graph(adata, n_neighbors=5)
    result = moments(adata, n_neighbors=5, copy=True)
    assert isinstance(result, ad.AnnData) and result is not adata
    assert "Ms" not in adata.layers and "Mu" not in adata.layers
    assert "moments" not in adata.uns["velofit_pp"]
    assert {"Ms", "Mu"} <= set(result.layers)
    assert moments(adata, n_neighbors=5) is None
    assert {"Ms", "Mu"} <= set(adata.layers)
    np.testing.assert_array_equal(adata.layers["Ms"], result.layers["Ms"])


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_layer_format_gives_the_same_moments(fmt):
    reference = _counts(n_obs=30, fmt="csr_int32")
    adata = _counts(n_obs=30, fmt=fmt)
    for data in (reference, adata):
        _store_knn_graph(data, n_neighbors=6)
        _quiet(moments, data, n_neighbors=6)
    # raw layers: averaged in float64 from the same integers, so identical
    np.testing.assert_array_equal(adata.layers["Ms"], reference.layers["Ms"])
    np.testing.assert_array_equal(adata.layers["Mu"], reference.layers["Mu"])
    for data in (reference, adata):
        filter_and_normalize(data, n_top_genes=None)
        moments(data, n_neighbors=6)
    # normalised layers: float32 for integer input, float64 for float64 input
    np.testing.assert_allclose(adata.layers["Ms"], reference.layers["Ms"], rtol=1e-5)
    np.testing.assert_allclose(adata.layers["Mu"], reference.layers["Mu"], rtol=1e-5)


def test_moments_warns_on_raw_counts():
    adata = _counts(n_obs=30)
    _store_knn_graph(adata, n_neighbors=5)
    with pytest.warns(UserWarning, match="look like raw counts"):
        moments(adata, n_neighbors=5)


def test_moments_needs_more_cells_than_neighbours():
    adata = _counts(n_obs=10)
    with pytest.raises(ValueError, match="at least 11 cells"):
        moments(adata, n_neighbors=10)


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"n_pcs": 0}, "n_pcs"), ({"n_neighbors": 1}, "n_neighbors")]
)
def test_moments_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        moments(_counts(), **kwargs)


@pytest.mark.slow
def test_moments_computes_pca_and_the_neighbour_graph():
    adata = _counts(n_obs=80, n_vars=60, seed=2)
    filter_and_normalize(adata, n_top_genes=55)
    moments(adata, n_pcs=10, n_neighbors=8)
    assert adata.obsm["X_pca"].shape == (80, 10)
    assert adata.uns["neighbors"]["params"]["n_neighbors"] == 8
    record = adata.uns["velofit_pp"]["moments"]
    assert record["computed_pca"] and record["computed_neighbors"] and record["use_rep"] == "X_pca"
    np.testing.assert_allclose(adata.layers["Ms"], _manual_moments(adata, "spliced"), rtol=1e-6)
    np.testing.assert_allclose(adata.layers["Mu"], _manual_moments(adata, "unspliced"), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(
    SHARED_PANCREAS is None,
    reason="../shared/data/pancreas_739.h5ad not found (it only exists in the project's workspace)",
)
def test_pancreas_739_matches_scvelo():
    scv = pytest.importorskip("scvelo")
    ours = pancreas(SHARED_PANCREAS)
    theirs = ours.copy()
    filter_and_normalize(ours, min_shared_counts=20, n_top_genes=None)
    moments(ours, n_pcs=30, n_neighbors=30)
    scv.pp.filter_and_normalize(theirs, min_shared_counts=20)
    sc.pp.log1p(theirs)
    # scVelo 0.3.4 deprecates its automatic PCA/neighbours, and its PCA call uses an argument
    # that scanpy deprecates; both warnings are expected here
    with pytest.warns((DeprecationWarning, FutureWarning)):
        scv.pp.moments(theirs, n_pcs=30, n_neighbors=30)
    assert list(ours.var_names) == list(theirs.var_names)
    np.testing.assert_allclose(ours.X.toarray(), theirs.X.toarray(), rtol=1e-5, atol=1e-6)
    for key in ("Ms", "Mu"):
        np.testing.assert_allclose(ours.layers[key], theirs.layers[key], rtol=1e-5, atol=1e-5)
    selected = pancreas(SHARED_PANCREAS)
    filter_and_normalize(selected, n_top_genes=2000)
    assert selected.n_vars == 2000
