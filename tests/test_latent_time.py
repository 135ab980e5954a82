"""``latent_time``, the shared fit and their figures, on simulated data with known time.

The per-gene fit is emulated (each gene on its own clock, parameters perturbed, per-gene
times by nearest point) so that these tests do not pay for compiling the per-gene EM; the
data have the shape of ``test_soft_em.py`` so that the shared-time kernels compile once.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib.figure import Figure
from scipy.stats import spearmanr

import velofit as vf
from velofit.core import shared_time as st
from velofit.pl._time import loglik, posterior, time_prior
from velofit.tl._latent_time import latent_time
from velofit.tl._shared import recover_dynamics_shared

N_OBS, N_VARS, N_GRID = 300, 20, 100
T_MAX = 20.0


def emulated_per_gene_fit(adata, seed: int) -> None:
    """Write the keys of ``recover_dynamics`` as a noisy per-gene fit would.

    Gene ``g`` runs on its own clock ``k_g * true_t`` (rates divided, switch multiplied by
    ``k_g``), with log-rates perturbed by 10%; its per-gene times are the nearest points of
    the perturbed curve (each gene alone, both species), as the per-gene E-step assigns them.
    """
    rng = np.random.default_rng(seed)
    v = adata.var
    k = np.exp(rng.uniform(-0.7, 0.7, adata.n_vars))
    jitter = lambda: np.exp(0.1 * rng.standard_normal(adata.n_vars))
    alpha, beta, gamma = v["true_alpha"] / k * jitter(), v["true_beta"] / k * jitter(), v["true_gamma"] / k * jitter()
    t_ = v["true_t_"] * k * jitter()
    theta = jnp.asarray(np.stack([np.log(alpha), np.log(beta), np.log(gamma), np.log(t_), np.zeros(adata.n_vars), np.zeros(adata.n_vars)]))
    mu, ms = adata.layers["Mu"], adata.layers["Ms"]
    data = st.prepare_data(mu, ms)
    span = 1.5 * float(np.max(t_)) * 2.0
    fine = jnp.linspace(0.0, span, 1001)
    m_u, m_s = (np.asarray(m) for m in jax.jit(st.predict)(theta, fine[:, None], data.std_u, data.std_s))
    xu, xs = np.asarray(data.xu[0]), np.asarray(data.xs[0])
    t_gene = np.empty(adata.shape)
    for g in range(adata.n_vars):
        d = (xu[:, g, None] - m_u[None, :, g]) ** 2 + (xs[:, g, None] - m_s[None, :, g]) ** 2
        t_gene[:, g] = np.asarray(fine)[np.argmin(d, axis=1)]
    adata.var["fit_alpha"], adata.var["fit_beta"], adata.var["fit_gamma"] = alpha, beta, gamma
    adata.var["fit_t_"], adata.var["fit_scaling"] = t_, 1.0
    adata.var["fit_std_u"], adata.var["fit_std_s"] = mu.std(0), ms.std(0)
    adata.var["fit_alignment_scaling"] = 1.0
    adata.var["fit_status"] = "ok"
    adata.layers["fit_t"] = t_gene


@pytest.fixture(scope="module")
def fitted():
    with jax.enable_x64(True):
        adata = vf.datasets.simulate(N_OBS, N_VARS, seed=11, noise=0.2, t_max=T_MAX)
        emulated_per_gene_fit(adata, 11)
    return adata


def test_latent_time_after_per_gene_fit_runs_forward_and_roots_reverse_it(fitted):
    adata = fitted.copy()
    true_t = adata.obs["true_t"].to_numpy()
    latent_time(adata, n_grid=N_GRID, max_iter=30)
    rho = spearmanr(adata.obs["latent_time"], true_t)[0]
    assert rho > 0.95
    # shared time beats the mean per-gene time
    per_gene = np.mean([spearmanr(adata.layers["fit_t"][:, g], true_t)[0] for g in range(N_VARS)])
    assert rho > per_gene
    params = adata.uns["velofit"]["latent_time_params"]
    assert params["mode"] == "per_gene" and params["direction"] == "forward"
    # outputs
    lt = adata.obs["latent_time"].to_numpy()
    assert np.all((lt >= 0) & (lt <= 1))
    q = adata.obsm["latent_time_posterior"]
    assert q.shape == (N_OBS, N_GRID) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-5)
    # latent time is the clock rescaled to the cells' range: the earliest cell 0, the latest 1
    assert lt.min() == 0.0 and lt.max() == 1.0
    lo, hi = adata.uns["velofit"]["latent_time_params"]["clock_range"]
    assert 0.0 <= lo < hi <= 1.0
    grid = adata.uns["velofit"]["time_grid"]  # in latent-time units
    np.testing.assert_allclose(lo + (hi - lo) * grid, np.linspace(0.0, 1.0, N_GRID), atol=1e-12)
    # the posterior mean, refined below the grid step where the posterior is narrower than one
    mean = q.astype(float) @ grid
    grid_std = np.sqrt(np.maximum(q.astype(float) @ grid**2 - mean**2, 0.0))
    spacing = grid[1] - grid[0]
    broad, sharp = grid_std > 1.01 * spacing, grid_std < 0.99 * spacing
    np.testing.assert_allclose(lt[broad], mean[broad], atol=1e-5)
    assert np.all(np.abs(lt[sharp] - mean[sharp]) <= spacing + 1e-6)
    assert sharp.sum() >= 10 and broad.sum() >= 10
    assert np.mean(np.abs(lt[sharp] - mean[sharp]) > 1e-3 * spacing) > 0.5  # moved off the grid's mean
    assert adata.uns["velofit"]["prior"].shape == (N_GRID,)
    trace = adata.uns["velofit"]["loglik"]
    assert np.all(np.diff(trace) >= -1e-9 * np.abs(trace[1:]))
    # the latest cells as roots reverse the clock
    late = np.argsort(true_t)[-15:]
    latent_time(adata, root_cells=late, n_grid=N_GRID, max_iter=30)
    assert spearmanr(adata.obs["latent_time"], true_t)[0] < -0.95
    assert adata.uns["velofit"]["latent_time_params"]["direction"] == "reversed (root cells)"
    # early roots (by an obs column) keep it
    adata.obs["stage"] = np.where(true_t < 2.0, "early", "later")
    latent_time(adata, root_key=("stage", "early"), n_grid=N_GRID, max_iter=30)
    assert spearmanr(adata.obs["latent_time"], true_t)[0] > 0.95


def test_latent_time_std_is_larger_for_ambiguous_cells(fitted):
    adata = fitted.copy()
    rng = np.random.default_rng(12)
    noisy = rng.choice(N_OBS, 30, replace=False)
    for layer in ("Mu", "Ms"):
        x = adata.layers[layer].copy()
        for g in range(N_VARS):  # each gene of a noisy cell taken from another random cell
            x[noisy, g] = x[rng.integers(0, N_OBS, noisy.size), g]
        adata.layers[layer] = x
    latent_time(adata, n_grid=N_GRID, max_iter=30)
    std = adata.obs["latent_time_std"].to_numpy()
    clean = np.setdiff1d(np.arange(N_OBS), noisy)
    assert np.median(std[noisy]) > 3.0 * np.median(std[clean])
    noise = adata.obs["velofit_cell_noise"].to_numpy()
    assert np.median(noise[noisy]) > 2.0 * np.median(noise[clean])


@pytest.mark.parametrize("em", ["soft", "hard"])
def test_shared_fit_and_latent_time_after_it(fitted, em):
    adata = fitted.copy()
    true_t = adata.obs["true_t"].to_numpy()
    recover_dynamics_shared(adata, em=em, per_gene_fit=False, n_grid=N_GRID, max_iter=30, progress=False)
    assert spearmanr(adata.obs["latent_time"], true_t)[0] > 0.98
    trace = adata.uns["velofit"]["loglik"]
    assert np.all(np.diff(trace) >= -1e-9 * np.abs(trace[1:]))
    assert adata.uns["recover_dynamics"]["time"] == "shared"
    for key in ("fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_t0", "fit_likelihood"):
        assert np.all(np.isfinite(adata.var[key]))
    # fit_t is the gene time on the shared clock: induction then repression
    t_gene = adata.layers["fit_t"]
    lo, hi = adata.uns["velofit"]["latent_time_params"]["clock_range"]  # latent time 0 and 1 on the clock
    clock = lo + (hi - lo) * adata.obs["latent_time"].to_numpy()
    expected = T_MAX * np.maximum(clock[:, None] - adata.var["fit_t0"].to_numpy() / T_MAX, 0)
    np.testing.assert_allclose(t_gene, expected, atol=1e-6 * T_MAX)
    before = adata.obs["latent_time"].to_numpy().copy()
    latent_time(adata)  # reuses the shared model
    assert adata.uns["velofit"]["latent_time_params"]["mode"] == "shared"
    np.testing.assert_allclose(adata.obs["latent_time"], before, atol=1e-8)
    # ... also after the user reorders the genes (the stored model is per gene name)
    shuffled = adata[:, np.random.default_rng(0).permutation(adata.n_vars)].copy()
    latent_time(shuffled)
    assert shuffled.uns["velofit"]["latent_time_params"]["mode"] == "shared"
    np.testing.assert_allclose(shuffled.obs["latent_time"], before, atol=1e-8)


def test_subsampled_shared_fit_matches_the_full_one_and_refines_on_all_cells(fitted):
    true_t = fitted.obs["true_t"].to_numpy()
    kwargs = {"per_gene_fit": False, "n_grid": N_GRID, "max_iter": 30, "progress": False}
    full = fitted.copy()
    recover_dynamics_shared(full, subsample=None, **kwargs)
    same = fitted.copy()
    recover_dynamics_shared(same, subsample=N_OBS, **kwargs)  # no more cells than the subset: no subset
    np.testing.assert_array_equal(same.obs["latent_time"], full.obs["latent_time"])
    assert "subset_cells" not in same.uns["velofit"]["shared_fit"]
    runs = []
    for _ in range(2):
        sub = fitted.copy()
        recover_dynamics_shared(sub, subsample=N_OBS // 2, refine_iter=10, seed=3, **kwargs)
        runs.append(sub)
    sub = runs[0]
    np.testing.assert_array_equal(runs[1].obs["latent_time"], sub.obs["latent_time"])  # deterministic
    fit = sub.uns["velofit"]["shared_fit"]
    cells = fit["subset_cells"]
    assert cells.size == N_OBS // 2 and np.all(np.diff(cells) > 0)
    for trace in (fit["subset_loglik"], fit["loglik"]):  # both phases never decrease
        assert np.all(np.diff(trace) >= -1e-9 * np.abs(trace[1:]))
    assert 2 <= fit["loglik"].size <= 11  # the refinement ran on all cells
    assert sub.uns["recover_dynamics"]["subsample"] == N_OBS // 2
    assert spearmanr(sub.obs["latent_time"], true_t)[0] > 0.98
    assert spearmanr(sub.obs["latent_time"], full.obs["latent_time"])[0] > 0.99
    rel = np.abs(np.log(sub.var["fit_gamma"] / sub.var["fit_beta"]) - np.log(full.var["fit_gamma"] / full.var["fit_beta"]))
    assert np.median(rel) < 0.05
    with pytest.raises(ValueError, match="subsample"):
        recover_dynamics_shared(fitted.copy(), subsample=1, **kwargs)


def test_latent_time_after_per_gene_fit_on_a_subset_of_cells(fitted):
    true_t = fitted.obs["true_t"].to_numpy()
    full, sub = fitted.copy(), fitted.copy()
    latent_time(full, n_grid=N_GRID, max_iter=20, subsample=None)
    latent_time(sub, n_grid=N_GRID, max_iter=20, subsample=N_OBS // 2, refine_iter=5, seed=1)
    trace = sub.uns["velofit"]["loglik"]
    assert 2 <= trace.size <= 6 and np.all(np.diff(trace) >= -1e-9 * np.abs(trace[1:]))
    assert spearmanr(sub.obs["latent_time"], true_t)[0] > 0.98
    assert spearmanr(sub.obs["latent_time"], full.obs["latent_time"])[0] > 0.99


def test_figures(fitted):
    adata = fitted.copy()
    latent_time(adata, n_grid=N_GRID, max_iter=5)
    assert isinstance(time_prior(adata), Figure)
    assert isinstance(posterior(adata), Figure)
    assert isinstance(posterior(adata, cells=[0, 5]), Figure)
    assert isinstance(loglik(adata), Figure)


def test_bad_input_names_the_fix(fitted):
    adata = fitted.copy()
    with pytest.raises(ValueError, match="prior"):
        latent_time(adata, prior="flat")
    with pytest.raises(KeyError, match="root_key"):
        latent_time(adata, root_key=("no_such_column", 1))
    with pytest.raises(ValueError, match="no cell"):
        latent_time(adata, root_cells=np.zeros(N_OBS, bool))
    bare = vf.datasets.simulate(20, 3, seed=0)
    with pytest.raises(KeyError, match="recover_dynamics"):
        latent_time(bare)


def test_recover_dynamics_with_time_shared_runs_the_shared_fit(fitted):
    """``recover_dynamics(time="shared")`` with the per-gene options at their defaults runs the shared fit."""
    adata = fitted.copy()
    vf.tl.recover_dynamics(adata, time="shared", em="hard", max_iter=20, device="auto", progress=False)
    params = adata.uns["recover_dynamics"]
    assert params["time"] == "shared" and params["em"] == "hard"
    assert spearmanr(adata.obs["latent_time"], adata.obs["true_t"])[0] > 0.95
