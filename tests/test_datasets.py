"""Tests of velofit.datasets: the simulator's truth and densities, and the pancreas loader."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp

from velofit.core.kinetics import KineticParams, trajectory
from velofit.datasets import (
    DatasetUnavailableError,
    _pancreas,
    pancreas,
    shared_pancreas_path,
    simulate,
)

SHARED_PANCREAS = shared_pancreas_path()
TRUTH_VAR = ["true_alpha", "true_beta", "true_gamma", "true_t_", "true_scaling"]


@pytest.fixture(scope="module")
def small() -> ad.AnnData:
    return simulate(n_obs=120, n_vars=15, seed=3)


def _assert_same_anndata(a: ad.AnnData, b: ad.AnnData) -> None:
    assert a.layers.keys() == b.layers.keys()
    for key in a.layers:
        left, right = a.layers[key], b.layers[key]
        if sp.issparse(left):
            left, right = left.toarray(), right.toarray()
        np.testing.assert_array_equal(left, right, err_msg=key)
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    assert a.obs.equals(b.obs)
    assert a.var.equals(b.var)


# ---------------------------------------------------------------------------- simulate


def test_simulate_writes_truth_and_layers(small):
    assert small.shape == (120, 15)
    assert "true_t" in small.obs
    for column in TRUTH_VAR:
        assert column in small.var
    np.testing.assert_array_equal(small.var["true_scaling"], 1.0)
    for key in ("Mu", "Ms", "true_u", "true_s"):
        layer = small.layers[key]
        assert isinstance(layer, np.ndarray) and layer.dtype == np.float64 and layer.shape == small.shape
    for key in ("unspliced", "spliced"):
        layer = small.layers[key]
        assert sp.issparse(layer) and layer.format == "csr" and layer.dtype == np.int32
    assert sp.issparse(small.X) and small.X.format == "csr" and small.X.dtype == np.float32
    np.testing.assert_array_equal(small.X.toarray(), small.layers["spliced"].toarray())
    assert small.uns["simulate"]["n_obs"] == 120
    assert small.uns["simulate"]["time_density"] == "uniform"
    assert small.uns["simulate"]["switch_range"] == [0.3, 0.9]


@pytest.mark.parametrize("shape", [(30, 30), (7, 40), (40, 1)])
def test_truth_is_the_kinetic_model_per_gene(shape):
    """Each gene's column equals the model evaluated for that gene alone (n_obs == n_vars too)."""
    adata = simulate(*shape, seed=1, noise=0.0)
    t = jnp.asarray(adata.obs["true_t"].to_numpy())
    one_gene = jax.jit(trajectory)
    for g in range(adata.n_vars):
        row = adata.var.iloc[g]
        u, s = one_gene(t, KineticParams(*(jnp.float64(row[c]) for c in TRUTH_VAR)))
        np.testing.assert_allclose(adata.layers["true_u"][:, g], np.asarray(u), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(adata.layers["true_s"][:, g], np.asarray(s), rtol=1e-12, atol=1e-12)


def test_same_seed_same_data_and_other_seed_differs(small):
    _assert_same_anndata(small, simulate(n_obs=120, n_vars=15, seed=3))
    other = simulate(n_obs=120, n_vars=15, seed=4)
    assert not np.array_equal(other.layers["Ms"], small.layers["Ms"])
    assert not np.array_equal(other.obs["true_t"], small.obs["true_t"])


def test_noise_zero_gives_the_truth():
    adata = simulate(n_obs=80, n_vars=12, noise=0.0, seed=2)
    np.testing.assert_array_equal(adata.layers["Mu"], adata.layers["true_u"])
    np.testing.assert_array_equal(adata.layers["Ms"], adata.layers["true_s"])


def test_noise_has_the_documented_scale():
    noise = 0.1
    adata = simulate(n_obs=3000, n_vars=6, noise=noise, seed=5)
    for observed, truth in (("Mu", "true_u"), ("Ms", "true_s")):
        true = adata.layers[truth]
        sd = noise * np.percentile(true, 99, axis=0)
        away_from_zero = true > 6 * sd  # clipping at 0 cannot act there
        residual = (adata.layers[observed] - true) / sd
        ratios = [residual[away_from_zero[:, g], g].std() for g in range(adata.n_vars)]
        np.testing.assert_allclose(ratios, 1.0, atol=0.15)
        assert np.all(adata.layers[observed] >= 0)


def test_rates_are_lognormal_with_the_given_medians():
    adata = simulate(n_obs=5, n_vars=4000, seed=0, alpha_mean=4.0, beta_mean=0.8, gamma_mean=0.2, rate_sd=0.5)
    for column, median in (("true_alpha", 4.0), ("true_beta", 0.8), ("true_gamma", 0.2)):
        logs = np.log(adata.var[column].to_numpy())
        assert abs(np.median(logs) - np.log(median)) < 0.05
        assert abs(logs.std() - 0.5) < 0.03
    t_ = adata.var["true_t_"].to_numpy()
    assert t_.min() >= 0.3 * 20.0 and t_.max() <= 0.9 * 20.0
    fixed = simulate(n_obs=5, n_vars=10, rate_sd=0.0, alpha_mean=2.0, switch_range=(0.5, 0.5))
    np.testing.assert_allclose(fixed.var["true_alpha"], 2.0)
    np.testing.assert_allclose(fixed.var["true_t_"], 10.0)


def test_time_densities_follow_their_documentation():
    n, t_max = 6000, 10.0
    x = {
        d: simulate(n_obs=n, n_vars=1, time_density=d, t_max=t_max, seed=7).obs["true_t"].to_numpy() / t_max
        for d in ("uniform", "early", "late", "bursts")
    }
    for values in x.values():
        assert values.min() >= 0.0 and values.max() <= 1.0
    assert abs(np.median(x["uniform"]) - 0.5) < 0.03
    assert abs(np.median(x["early"]) - (1 - 2 ** (-1 / 3))) < 0.02  # Beta(1, 3)
    assert abs(np.median(x["late"]) - 2 ** (-1 / 3)) < 0.02  # Beta(3, 1)
    assert np.median(x["early"]) < np.median(x["uniform"]) < np.median(x["late"])
    # bursts: two modes at 0.25 and 0.75 with sd 0.07, almost nothing in between
    bursts = x["bursts"]
    assert abs(np.mean(bursts < 0.5) - 0.5) < 0.03
    assert abs(np.median(bursts[bursts < 0.5]) - 0.25) < 0.01
    assert abs(np.median(bursts[bursts > 0.5]) - 0.75) < 0.01
    assert abs(bursts[bursts < 0.5].std() - 0.07) < 0.01
    assert np.mean(np.abs(bursts - 0.5) < 0.05) < 0.01


def test_steady_state_fraction_puts_cells_at_zero():
    adata = simulate(n_obs=200, n_vars=5, steady_state_fraction=0.25, noise=0.0, seed=1)
    at_zero = adata.obs["true_t"].to_numpy() == 0.0
    assert at_zero.sum() == 50
    np.testing.assert_array_equal(adata.layers["true_u"][at_zero], 0.0)
    np.testing.assert_array_equal(adata.layers["true_s"][at_zero], 0.0)


def test_simulate_does_not_change_the_global_jax_config():
    with jax.enable_x64(False):
        adata = simulate(n_obs=20, n_vars=3)
        assert not jax.config.jax_enable_x64
    assert adata.layers["true_u"].dtype == np.float64


def test_simulated_data_round_trip_through_h5ad(small, tmp_path):
    path = tmp_path / "sim.h5ad"
    small.write_h5ad(path)
    back = ad.read_h5ad(path)
    _assert_same_anndata(small, back)
    assert back.uns["simulate"]["seed"] == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_obs": 0}, "n_obs must be an integer >= 1"),
        ({"n_vars": 0}, "n_vars must be an integer >= 1"),
        ({"n_obs": 2.5}, "n_obs must be an integer"),
        ({"noise": -0.1}, "noise must be finite and >= 0"),
        ({"time_density": "middle"}, "'uniform', 'early', 'late', 'bursts'"),
        ({"t_max": 0.0}, "t_max must be"),
        ({"switch_range": (0.9, 0.3)}, "switch_range"),
        ({"switch_range": (0.0, 0.5)}, "switch_range"),
        ({"alpha_mean": 0.0}, "alpha_mean must be"),
        ({"gamma_mean": -1.0}, "gamma_mean must be"),
        ({"rate_sd": -0.5}, "rate_sd must be"),
        ({"steady_state_fraction": 1.0}, "steady_state_fraction"),
    ],
)
def test_simulate_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        simulate(**{"n_obs": 10, "n_vars": 2, **kwargs})


# ---------------------------------------------------------------------------- pancreas


def _counts_file(path: Path, *, with_x: bool) -> Path:
    """Write a small AnnData with count layers (and optionally no X) to ``path``."""
    rng = np.random.default_rng(0)
    spliced = sp.csr_matrix(rng.poisson(2.0, size=(6, 4)).astype(np.int32))
    unspliced = sp.csr_matrix(rng.poisson(1.0, size=(6, 4)).astype(np.int32))
    adata = ad.AnnData(
        X=spliced.astype(np.float32) * 2 if with_x else None,
        layers={"spliced": spliced, "unspliced": unspliced},
    )
    adata.write_h5ad(path)
    return path


@pytest.fixture
def no_network(monkeypatch):
    """Make any download attempt fail loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_pancreas_missing_path_raises(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match="no data file"):
        pancreas(tmp_path / "absent.h5ad")


def test_pancreas_reads_a_path_and_fills_empty_x(tmp_path, no_network):
    path = _counts_file(tmp_path / "counts.h5ad", with_x=False)
    adata = pancreas(path)
    assert sp.issparse(adata.X) and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), adata.layers["spliced"].toarray())


def test_pancreas_keeps_an_existing_x(tmp_path, no_network):
    path = _counts_file(tmp_path / "counts.h5ad", with_x=True)
    adata = pancreas(str(path))
    np.testing.assert_array_equal(adata.X.toarray(), 2 * adata.layers["spliced"].toarray())


def test_pancreas_reads_the_cache_without_downloading(tmp_path, monkeypatch, no_network):
    _counts_file(tmp_path / _pancreas.PANCREAS_FILENAME, with_x=True)
    assert pancreas(cache_dir=tmp_path).shape == (6, 4)
    monkeypatch.setenv(_pancreas.CACHE_ENV, str(tmp_path))
    assert pancreas().shape == (6, 4)


def test_pancreas_download_is_atomic_and_cached(tmp_path, monkeypatch):
    source = _counts_file(tmp_path / "source.h5ad", with_x=True)
    monkeypatch.setattr(_pancreas, "PANCREAS_URL", source.as_uri())  # file:// URL, no network
    cache = tmp_path / "cache"
    adata = pancreas(cache_dir=cache)
    assert adata.shape == (6, 4)
    assert sorted(p.name for p in cache.iterdir()) == [_pancreas.PANCREAS_FILENAME]


def test_pancreas_failed_download_raises_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(_pancreas, "PANCREAS_URL", (tmp_path / "missing.h5ad").as_uri())
    cache = tmp_path / "cache"
    with pytest.raises(DatasetUnavailableError, match="could not download") as info:
        pancreas(cache_dir=cache)
    assert isinstance(info.value, OSError)
    assert list(cache.iterdir()) == []


def test_pancreas_rejects_a_download_that_is_not_hdf5(tmp_path, monkeypatch):
    page = tmp_path / "error.html"
    page.write_text("<html>rate limited</html>")
    monkeypatch.setattr(_pancreas, "PANCREAS_URL", page.as_uri())
    cache = tmp_path / "cache"
    with pytest.raises(DatasetUnavailableError, match="not an HDF5"):
        pancreas(cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_shared_pancreas_path_looks_next_to_the_working_directory(tmp_path, monkeypatch):
    target = tmp_path / "shared" / "data" / "pancreas_739.h5ad"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"")
    work = tmp_path / "main"
    work.mkdir()
    monkeypatch.chdir(work)
    assert shared_pancreas_path() == target.resolve()


@pytest.mark.skipif(
    SHARED_PANCREAS is None,
    reason="../shared/data/pancreas_739.h5ad not found (it only exists in the project's workspace)",
)
def test_shared_pancreas_739_loads_with_x_from_spliced(no_network):
    adata = pancreas(SHARED_PANCREAS)
    assert adata.shape == (739, 2380)
    assert {"spliced", "unspliced"} <= set(adata.layers)
    assert "clusters" in adata.obs
    assert adata.X.dtype == np.float32
    assert (adata.X != adata.layers["spliced"]).nnz == 0
