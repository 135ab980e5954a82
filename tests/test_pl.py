"""Figures of velofit.pl: each returns a Figure with the expected panels and draws offscreen."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from sklearn.neighbors import NearestNeighbors

import velofit as vf
from velofit.pl._embedding import velocity_on_grid

N_OBS, N_VARS = 300, 20


@pytest.fixture(scope="module")
def fitted():
    adata = vf.datasets.simulate(N_OBS, N_VARS, seed=0)
    vf.tl.recover_dynamics(adata, max_iter=5, n_explicit=3, progress=False)
    vf.tl.velocity(adata)
    x = np.log1p(np.asarray(adata.layers["Ms"]))
    knn = NearestNeighbors(n_neighbors=15).fit(x).kneighbors_graph()
    adata.obsp["connectivities"] = sp.csr_matrix(((knn + knn.T) > 0).astype(float))
    adata.obsm["X_umap"] = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)[0][:, :2]
    adata.obs["clusters"] = pd.cut(adata.obs["true_t"], 3, labels=["early", "mid", "late"])
    adata.obs["latent_time"] = adata.obs["true_t"] / adata.obs["true_t"].max()
    return adata


@pytest.fixture
def adata(fitted):
    return fitted.copy()


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=40)
    return buffer.getvalue()


def test_phase_portrait_one_panel_per_gene(adata):
    genes = list(adata.var_names[:5])
    fig = vf.pl.phase_portrait(adata, genes, color="clusters", ncols=2)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 5  # the sixth grid cell is removed; categories need no colorbar
    assert [ax.get_title().split()[0] for ax in fig.axes] == genes
    assert png_bytes(fig).startswith(b"\x89PNG")


def test_phase_portrait_draws_curve_switch_and_steady_state(adata):
    fig = vf.pl.phase_portrait(adata, adata.var_names[0])
    assert len(fig.axes) == 2  # the panel and the colorbar of the fitted time (default colour)
    labels = {line.get_label() for line in fig.axes[0].get_lines()}
    assert {"induction", "repression", "steady state"} <= labels
    induction = next(line for line in fig.axes[0].get_lines() if line.get_label() == "induction")
    s_curve, u_curve = induction.get_data()
    var = adata.var.iloc[0]
    # The curve is in observed units: its end (the switch) is (s(t_), scaling * u(t_)).
    alpha, beta, gamma, t_ = var["fit_alpha"], var["fit_beta"] * var["fit_scaling"], var["fit_gamma"], var["fit_t_"]
    u_switch = alpha / beta * (1 - np.exp(-beta * t_))
    np.testing.assert_allclose(u_curve[-1], var["fit_scaling"] * u_switch, rtol=1e-8)
    steady = next(line for line in fig.axes[0].get_lines() if line.get_label() == "steady state")
    x, y = steady.get_data()
    np.testing.assert_allclose(y[-1] / x[-1], var["fit_gamma"] / var["fit_beta"], rtol=1e-10)
    assert np.isfinite(s_curve).all() and gamma > 0


def test_phase_portrait_into_given_axes_and_errors(adata):
    fig = Figure()
    ax = fig.subplots()
    out = vf.pl.phase_portrait(adata, adata.var_names[1], ax=ax, color="latent_time")
    assert out is fig
    with pytest.raises(ValueError, match="ax="):
        vf.pl.phase_portrait(adata, list(adata.var_names[:2]), ax=ax)
    with pytest.raises(KeyError, match="not in adata.var_names"):
        vf.pl.phase_portrait(adata, "no_such_gene")
    with pytest.raises(ValueError, match="pair of layer names"):
        vf.pl.phase_portrait(adata, adata.var_names[0], basis="umap")
    fig = vf.pl.phase_portrait(adata, adata.var_names[0], basis=("spliced", "unspliced"), color="clusters")
    assert fig.axes[0].get_xlabel() == "spliced" and not fig.axes[0].get_lines()  # no curve in other units
    with pytest.raises(KeyError, match="neither an obs column nor a layer"):
        vf.pl.phase_portrait(adata, adata.var_names[0], color="nope")


def test_phase_portrait_of_a_gene_without_fit(adata):
    adata.var["fit_status"] = adata.var["fit_status"].astype(object)
    adata.var.iloc[0, adata.var.columns.get_loc("fit_status")] = "constant unspliced or spliced"
    fig = vf.pl.phase_portrait(adata, adata.var_names[0], color="clusters")
    assert "not fitted" in fig.axes[0].get_title()
    assert not fig.axes[0].get_lines()


def test_phase_portrait_before_any_fit():
    raw = vf.datasets.simulate(50, 3, seed=1)
    fig = vf.pl.phase_portrait(raw, list(raw.var_names))
    assert len(fig.axes) == 3


def test_loss_trace_two_panels(adata):
    fig = vf.pl.loss_trace(adata)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    total = fig.axes[1].get_lines()[0].get_ydata()
    np.testing.assert_allclose(total, np.nansum(adata.varm["loss"], axis=0))
    fig = vf.pl.loss_trace(adata, genes=list(adata.var_names[:3]))
    assert "3 genes" in fig.axes[0].get_title()
    del adata.varm["loss"]
    with pytest.raises(KeyError, match="recover_dynamics"):
        vf.pl.loss_trace(adata)


def test_latent_time_on_embedding(adata):
    fig = vf.pl.latent_time(adata, basis="umap")
    assert isinstance(fig, Figure) and len(fig.axes) == 2  # scatter and colorbar
    with pytest.raises(KeyError, match="X_tsne"):
        vf.pl.latent_time(adata, basis="tsne")
    del adata.obs["latent_time"]
    with pytest.raises(KeyError, match="latent_time"):
        vf.pl.latent_time(adata)


def test_velocity_embedding_stream_draws_streamlines_without_writing(adata):
    before = (set(adata.obsm.keys()), set(adata.uns.keys()))
    fig = vf.pl.velocity_embedding_stream(adata, basis="umap")
    assert isinstance(fig, Figure) and len(fig.axes) == 1  # clusters: categorical, no colorbar
    assert any(isinstance(c, LineCollection) for c in fig.axes[0].collections)
    assert (set(adata.obsm.keys()), set(adata.uns.keys())) == before
    assert png_bytes(fig).startswith(b"\x89PNG")
    fig = vf.pl.velocity_embedding_stream(adata, basis="umap", color="latent_time")
    assert len(fig.axes) == 2


def test_velocity_on_grid_recovers_a_uniform_field():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(2000, 2))
    v = np.tile([1.0, -0.5], (2000, 1))
    gx, gy, u, w = velocity_on_grid(x, v)
    assert gx.shape == gy.shape == (50,) and u.shape == w.shape == (50, 50)
    finite = np.isfinite(u)
    assert finite.mean() > 0.5
    np.testing.assert_allclose(u[finite], 1.0)
    np.testing.assert_allclose(w[finite], -0.5)
    # Far from every cell the grid is blank.
    gx, gy, u, w = velocity_on_grid(np.vstack([x, [[10.0, 10.0]]]), np.vstack([v, [[1.0, -0.5]]]))
    assert np.isnan(u[25, 25])
