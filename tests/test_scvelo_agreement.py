"""velofit and scVelo fitted to the same moments agree in rank, and velofit is not less accurate.

Measured on a 2-core machine (scVelo 0.3.4, velofit 0.1.0 with ``recover_dynamics`` defaults
``max_iter=20, n_explicit=0``); the numbers the thresholds were set from are quoted next to each
assertion.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata
import numpy as np
import pytest
from scipy.stats import spearmanr

import velofit as vf
from velofit.tl._evaluate import model_loglik

scv = pytest.importorskip("scvelo")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning"),
]

PANCREAS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pancreas_739.h5ad"
N_PANCREAS_GENES = 150


def _simulate(n_obs: int, n_vars: int, seed: int = 0, noise_level: float = 1):
    """scVelo's simulation with per-gene log-normal rates (as benchmarks/bench_recover_dynamics.py)."""
    rng = np.random.default_rng(seed)
    adata = scv.datasets.simulation(
        n_obs=n_obs,
        n_vars=n_vars,
        alpha=list(5.0 * np.exp(0.5 * rng.standard_normal(n_vars))),
        beta=list(0.5 * np.exp(0.5 * rng.standard_normal(n_vars))),
        gamma=list(0.3 * np.exp(0.5 * rng.standard_normal(n_vars))),
        switches=list(rng.uniform(0.3, 0.9, n_vars)),
        t_max=20,
        noise_level=noise_level,
        random_seed=seed,
    )
    adata.layers["Ms"] = np.asarray(adata.layers["spliced"], dtype=float).copy()
    adata.layers["Mu"] = np.asarray(adata.layers["unspliced"], dtype=float).copy()
    return adata


def _fit_both(adata, var_names):
    """(velofit fit, scVelo fit) of the same genes on copies of ``adata``."""
    ours = vf.tl.recover_dynamics(adata, var_names=var_names, progress=False, copy=True)
    theirs = adata.copy()
    scv.settings.verbosity = 0
    scv.tl.recover_dynamics(
        theirs, var_names=var_names, n_jobs=1, fit_connected_states=False, show_progress_bar=False
    )
    return ours, theirs


def _fitted(fit) -> np.ndarray:
    ok = np.ones(fit.n_vars, dtype=bool)
    for key in ("fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling"):
        ok &= np.isfinite(fit.var[key].to_numpy(dtype=float))
    if "fit_status" in fit.var.columns:
        ok &= np.asarray(fit.var["fit_status"] == "ok")
    return ok


def _ratio(fit) -> np.ndarray:
    return fit.var["fit_gamma"].to_numpy(dtype=float) / fit.var["fit_beta"].to_numpy(dtype=float)


def _median_time_spearman(t_a, t_b, genes) -> float:
    rhos = []
    for j in np.flatnonzero(genes):
        ok = np.isfinite(t_a[:, j]) & np.isfinite(t_b[:, j])
        rhos.append(spearmanr(t_a[ok, j], t_b[ok, j]).statistic)
    return float(np.median(rhos))


# ------------------------------------------------------------------------------------------
# (a) scVelo's own simulation with known truth
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def simulated():
    adata = _simulate(1000, 40)
    ours, theirs = _fit_both(adata, "all")
    return adata, ours, theirs


def test_simulation_both_fit_every_gene_velofit_not_fewer(simulated):
    adata, ours, theirs = simulated
    n_ours, n_theirs = _fitted(ours).sum(), _fitted(theirs).sum()
    # measured: 40 / 40
    assert n_ours >= n_theirs
    assert n_ours == adata.n_vars


def test_simulation_gamma_over_beta_ranks_agree_with_each_other_and_the_truth(simulated):
    adata, ours, theirs = simulated
    both = _fitted(ours) & _fitted(theirs)
    truth = (adata.var["true_gamma"] / adata.var["true_beta"]).to_numpy(dtype=float)
    rho_tools = spearmanr(_ratio(ours)[both], _ratio(theirs)[both]).statistic
    rho_ours = spearmanr(_ratio(ours)[both], truth[both]).statistic
    rho_theirs = spearmanr(_ratio(theirs)[both], truth[both]).statistic
    # measured: tools 0.991, velofit vs truth 0.988, scVelo vs truth 0.991 (seed 1: 0.993, 0.985, 0.986)
    assert rho_tools > 0.8, rho_tools
    assert rho_ours > 0.8, rho_ours
    assert rho_theirs > 0.8, rho_theirs


def test_simulation_gamma_over_beta_error_not_worse_than_scvelo(simulated):
    adata, ours, theirs = simulated
    truth = (adata.var["true_gamma"] / adata.var["true_beta"]).to_numpy(dtype=float)
    err_ours = np.median(np.abs(_ratio(ours) - truth)[_fitted(ours)] / truth[_fitted(ours)])
    err_theirs = np.median(np.abs(_ratio(theirs) - truth)[_fitted(theirs)] / truth[_fitted(theirs)])
    # measured: velofit 0.052, scVelo 0.060 (seed 1: 0.052, 0.066); before the projected M-step
    # velofit 0.044 here but 0.061 vs 0.053 on benchmarks/RESULTS.md's 2,000 x 200
    assert err_ours <= err_theirs, (err_ours, err_theirs)


@pytest.fixture(scope="module")
def simulated_low_noise():
    adata = _simulate(1000, 40, noise_level=0.2)
    ours, theirs = _fit_both(adata, "all")
    return adata, ours, theirs


def test_simulation_at_low_noise_gamma_over_beta_error_well_below_scvelo(simulated_low_noise):
    """At noise level 0.2 the error is the optimiser's: scVelo's stays near its steady-state
    start (its gamma/beta penalty), velofit's projected M-steps reach the optimum."""
    adata, ours, theirs = simulated_low_noise
    truth = (adata.var["true_gamma"] / adata.var["true_beta"]).to_numpy(dtype=float)
    err_ours = np.median(np.abs(_ratio(ours) - truth)[_fitted(ours)] / truth[_fitted(ours)])
    err_theirs = np.median(np.abs(_ratio(theirs) - truth)[_fitted(theirs)] / truth[_fitted(theirs)])
    # measured: velofit 0.010, scVelo 0.036 (seed 1: 0.009, 0.033)
    assert err_ours < 0.4 * err_theirs, (err_ours, err_theirs)


def test_simulation_per_gene_times_agree(simulated):
    _, ours, theirs = simulated
    both = _fitted(ours) & _fitted(theirs)
    rho = _median_time_spearman(np.asarray(ours.layers["fit_t"]), np.asarray(theirs.layers["fit_t"]), both)
    # measured: 0.947 (seed 1: 0.940)
    assert rho > 0.8, rho


def test_simulation_velofit_fits_the_data_at_least_as_well(simulated):
    _, ours, theirs = simulated
    both = _fitted(ours) & _fitted(theirs)
    ll_ours = model_loglik(ours).to_numpy()[both]
    ll_theirs = model_loglik(theirs).to_numpy()[both]
    # measured: velofit 0.469, scVelo -0.001 (velofit higher on every gene)
    assert np.mean(ll_ours) >= np.mean(ll_theirs), (np.mean(ll_ours), np.mean(ll_theirs))


# ------------------------------------------------------------------------------------------
# (b) pancreas_739
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pancreas():
    if not PANCREAS.exists():
        pytest.skip(f"pancreas data not found at {PANCREAS} (the shared data folder is only on the project machine)")
    import scanpy as sc
    from scvelo.tools.velocity import Velocity

    adata = anndata.read_h5ad(PANCREAS)
    adata.X = adata.layers["spliced"].copy()
    scv.settings.verbosity = 0
    # scVelo 0.2's filter_and_normalize(min_shared_counts=20, n_top_genes=2000); scVelo 0.3.4 dropped
    # its gene selection and log steps, so they are done with scanpy (seurat dispersions as 0.2)
    scv.pp.filter_and_normalize(adata, min_shared_counts=20)
    hvg = sc.pp.highly_variable_genes(sc.pp.log1p(adata, copy=True), flavor="seurat", n_top_genes=2000, inplace=False)
    adata._inplace_subset_var(hvg["highly_variable"].to_numpy())
    sc.pp.log1p(adata)
    with warnings.catch_warnings():  # scVelo 0.3.4 deprecates its automatic PCA/neighbours
        warnings.simplefilter("ignore", DeprecationWarning)
        scv.pp.moments(adata, n_pcs=30, n_neighbors=30)
    # the genes scVelo's recover_dynamics(var_names="velocity_genes") would fit; the first 150
    velo = Velocity(adata, use_raw=False)
    velo.compute_deterministic(perc=[5, 95])
    genes = list(adata.var_names[velo._velocity_genes][:N_PANCREAS_GENES])
    assert len(genes) == N_PANCREAS_GENES
    ours, theirs = _fit_both(adata, genes)
    return adata, genes, ours, theirs


def test_pancreas_gamma_over_beta_ranks_agree(pancreas):
    _, genes, ours, theirs = pancreas
    both = _fitted(ours) & _fitted(theirs)
    assert both.sum() >= 0.9 * len(genes)  # measured: 150 / 150
    rho = spearmanr(_ratio(ours)[both], _ratio(theirs)[both]).statistic
    # measured: 0.9945 on these 150 genes (0.994 on the next 150); 0.9 leaves margin for
    # numerical drift while still catching a systematic disagreement
    assert rho > 0.9, rho


def test_pancreas_velofit_fits_the_data_at_least_as_well(pancreas):
    _, _, ours, theirs = pancreas
    both = _fitted(ours) & _fitted(theirs)
    ll_ours = model_loglik(ours).to_numpy()[both]
    ll_theirs = model_loglik(theirs).to_numpy()[both]
    # measured: velofit 0.020, scVelo -1.029 (velofit higher on all 150 genes)
    assert np.mean(ll_ours) >= np.mean(ll_theirs), (np.mean(ll_ours), np.mean(ll_theirs))
