"""``model_loglik``: one goodness-of-fit definition for velofit's and scVelo's fits."""

from __future__ import annotations

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from velofit.core.kinetics import KineticParams, trajectory
from velofit.tl._evaluate import model_loglik

N_CELLS = 400
PARAMS = {  # per gene: alpha, beta (scaled units), gamma, t_, scaling
    "fit_alpha": np.array([5.0, 3.0, 8.0, 4.0]),
    "fit_beta_scaled": np.array([0.5, 0.8, 0.3, 0.4]),
    "fit_gamma": np.array([0.3, 0.2, 0.3, 0.6]),
    "fit_t_": np.array([10.0, 6.0, 14.0, 9.0]),
    "fit_scaling": np.array([1.0, 2.0, 0.5, 1.5]),
}


def _model(t, p):
    with jax.enable_x64(True):
        params = KineticParams(
            *(jnp.asarray(p[k], jnp.float64) for k in ("fit_alpha", "fit_beta_scaled", "fit_gamma", "fit_t_", "fit_scaling"))
        )
        u, s = trajectory(jnp.asarray(t, jnp.float64), params)
    return np.asarray(u) * p["fit_scaling"][None, :], np.asarray(s)


def _fitted_adata(noise: float = 0.0, seed: int = 0) -> ad.AnnData:
    """Data generated from PARAMS at known times, with the truth written as the fit."""
    rng = np.random.default_rng(seed)
    n_genes = PARAMS["fit_alpha"].size
    t = np.tile(np.sort(rng.uniform(0.05, 20.0, N_CELLS))[:, None], (1, n_genes))
    mu, ms = _model(t, PARAMS)
    if noise:
        mu = np.clip(mu + noise * mu.std(0) * rng.standard_normal(mu.shape), 0, None)
        ms = np.clip(ms + noise * ms.std(0) * rng.standard_normal(ms.shape), 0, None)
    adata = ad.AnnData(
        var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(N_CELLS)]),
        layers={"Ms": ms, "Mu": mu, "fit_t": t},
    )
    for key in ("fit_alpha", "fit_gamma", "fit_t_", "fit_scaling"):
        adata.var[key] = PARAMS[key]
    adata.var["fit_beta"] = PARAMS["fit_beta_scaled"] / PARAMS["fit_scaling"]  # stored like scVelo/velofit
    adata.var["fit_status"] = "ok"
    return adata


def test_perfect_fit_scores_much_higher_than_perturbed_fits():
    adata = _fitted_adata(noise=0.0)
    perfect = model_loglik(adata)
    assert isinstance(perfect, pd.Series) and perfect.name == "model_loglik"
    assert list(perfect.index) == list(adata.var_names)
    assert np.all(perfect > 20)  # residuals are rounding errors

    noisy = _fitted_adata(noise=0.05)
    good = model_loglik(noisy)
    for key, factor in [("fit_gamma", 1.5), ("fit_t_", 0.7), ("fit_alpha", 1.3)]:
        bad = noisy.copy()
        bad.var[key] = bad.var[key] * factor
        worse = model_loglik(bad)
        assert np.all(good > worse + 0.5), (key, good.values, worse.values)
    shifted = noisy.copy()
    shifted.layers["fit_t"] = shifted.layers["fit_t"] * 1.2
    assert np.all(good > model_loglik(shifted) + 0.5)
    assert np.all(perfect > good + 5)


def test_matches_the_gaussian_definition_on_noisy_data():
    adata = _fitted_adata(noise=0.1, seed=3)
    got = model_loglik(adata).to_numpy()
    mu, ms = adata.layers["Mu"], adata.layers["Ms"]
    u_model, s_model = _model(adata.layers["fit_t"], PARAMS)
    for j in range(adata.n_vars):
        use = (mu[:, j] > 0) & (ms[:, j] > 0)
        r_u = (u_model[use, j] - mu[use, j]) / mu[use, j].std()
        r_s = (s_model[use, j] - ms[use, j]) / ms[use, j].std()
        var = np.mean(r_u**2 + r_s**2) / 2
        np.testing.assert_allclose(got[j], -np.log(2 * np.pi * var) - 1, rtol=1e-10)


def test_invariant_to_time_alignment_and_data_scale():
    adata = _fitted_adata(noise=0.05)
    base = model_loglik(adata)
    aligned = adata.copy()
    c = 2.5  # scVelo's align_dynamics: times times c, rates divided by c
    aligned.layers["fit_t"] = aligned.layers["fit_t"] * c
    aligned.var["fit_t_"] = aligned.var["fit_t_"] * c
    for key in ("fit_alpha", "fit_beta", "fit_gamma"):
        aligned.var[key] = aligned.var[key] / c
    np.testing.assert_allclose(model_loglik(aligned), base, rtol=1e-9)
    scaled = adata.copy()  # data and alpha times 10: same standardised residuals
    scaled.layers["Ms"] = scaled.layers["Ms"] * 10
    scaled.layers["Mu"] = scaled.layers["Mu"] * 10
    scaled.var["fit_alpha"] = scaled.var["fit_alpha"] * 10
    np.testing.assert_allclose(model_loglik(scaled), base, rtol=1e-9)


def test_basal_offsets_are_added_like_scvelo():
    adata = _fitted_adata(noise=0.05)
    adata.layers["Mu"] = adata.layers["Mu"] + 0.01  # every cell usable in both, so the same cells count
    adata.layers["Ms"] = adata.layers["Ms"] + 0.01
    base = model_loglik(adata)
    shifted = adata.copy()
    shifted.layers["Mu"] = shifted.layers["Mu"] + 0.7
    shifted.layers["Ms"] = shifted.layers["Ms"] + 1.3
    shifted.var["fit_u0"] = 0.7
    shifted.var["fit_s0"] = 1.3
    np.testing.assert_allclose(model_loglik(shifted), base, rtol=1e-9)


def test_nan_for_genes_not_fitted():
    adata = _fitted_adata(noise=0.05)
    adata.var["fit_status"] = ["ok", "not selected", "ok", "ok"]
    for key in ("fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling"):
        adata.var.loc["g1", key] = np.nan  # as velofit writes unfitted genes
    adata.var.loc["g2", "fit_gamma"] = np.nan  # 'ok' but a non-finite parameter
    adata.layers["fit_t"][:, 3] = np.nan  # no time assigned
    out = model_loglik(adata)
    assert np.isfinite(out["g0"])
    assert out[["g1", "g2", "g3"]].isna().all()

    scvelo_style = _fitted_adata(noise=0.05)  # no fit_status column: unfitted = nan parameters
    del scvelo_style.var["fit_status"]
    scvelo_style.var.loc["g0", ["fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling"]] = np.nan
    out = model_loglik(scvelo_style)
    assert np.isnan(out["g0"]) and out[["g1", "g2", "g3"]].notna().all()


def test_nan_for_genes_without_usable_cells():
    adata = _fitted_adata(noise=0.05)
    adata.layers["Mu"][:, 1] = 0.0  # no cell with Mu > 0 and Ms > 0
    out = model_loglik(adata)
    assert np.isnan(out["g1"]) and out.drop("g1").notna().all()


@pytest.mark.parametrize("key", ["fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling"])
def test_missing_var_key_raises_key_error(key):
    adata = _fitted_adata()
    del adata.var[key]
    with pytest.raises(KeyError, match=key):
        model_loglik(adata)


def test_missing_layers_raise_key_error():
    adata = _fitted_adata()
    del adata.layers["fit_t"]
    with pytest.raises(KeyError, match="fit_t"):
        model_loglik(adata)
    adata = _fitted_adata()
    with pytest.raises(KeyError, match="spliced_moments"):
        model_loglik(adata, spliced_layer="spliced_moments")
    del adata.layers["Mu"]
    with pytest.raises(KeyError, match="Mu"):
        model_loglik(adata)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")
def test_reads_scvelo_fits_as_scvelo_evaluates_them():
    """On a scVelo fit, the model evaluated here equals scVelo's own ``compute_dynamics``."""
    scv = pytest.importorskip("scvelo")
    from scvelo.plotting.simulation import compute_dynamics

    adata = scv.datasets.simulation(
        n_obs=300, n_vars=3, alpha=[5.0, 3.0, 7.0], beta=[0.5, 0.9, 0.3], gamma=[0.3, 0.2, 0.5],
        switches=[0.5, 0.6, 0.8], t_max=20, noise_level=1, random_seed=0,
    )
    adata.layers["Ms"] = adata.layers["spliced"].copy()
    adata.layers["Mu"] = adata.layers["unspliced"].copy()
    scv.settings.verbosity = 0
    scv.tl.recover_dynamics(adata, var_names="all", n_jobs=1, fit_connected_states=False, show_progress_bar=False)
    got = model_loglik(adata)
    assert got.notna().all()
    for j in range(adata.n_vars):
        _, ut, st = compute_dynamics(adata, j, key="fit", sort=False)
        mu, ms = adata.layers["Mu"][:, j], adata.layers["Ms"][:, j]
        use = (mu > 0) & (ms > 0)
        var = np.mean(((ut - mu)[use] / mu[use].std()) ** 2 + ((st - ms)[use] / ms[use].std()) ** 2) / 2
        np.testing.assert_allclose(got.iloc[j], -np.log(2 * np.pi * var) - 1, rtol=1e-8)
