"""Soft EM over a time grid on the shared clock (MODEL.md sections 3 and 5).

Every test uses data of one shape (``N_OBS x N_VARS``, ``N_GRID`` grid points) so that the
jitted kernels compile once for the whole file (and for ``test_latent_time.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import beta as beta_dist
from scipy.stats import spearmanr

import velofit as vf
from velofit.core import shared_time as st
from velofit.core import soft_em as se
from velofit.core.kinetics import KineticParams, trajectory

N_OBS, N_VARS, N_GRID = 300, 20, 100
T_MAX = 20.0


def simulate(seed: int, time_density: str = "uniform", noise: float = 0.2):
    return vf.datasets.simulate(N_OBS, N_VARS, seed=seed, noise=noise, time_density=time_density, t_max=T_MAX)


def true_theta(adata) -> np.ndarray:
    """The simulator's parameters on the shared clock ``t = true_t / t_max`` (onsets 0)."""
    v = adata.var
    zeros = np.zeros(adata.n_vars)
    return np.stack([
        np.log(v["true_alpha"] * T_MAX), np.log(v["true_beta"] * T_MAX), np.log(v["true_gamma"] * T_MAX),
        np.log(v["true_t_"] / T_MAX), zeros, zeros,
    ])


def perturbed_start(adata, seed: int, scale: float = 0.15):
    """Data, grid and a start near (not at) the truth: log-rates and onsets perturbed."""
    rng = np.random.default_rng(seed)
    data = st.prepare_data(adata.layers["Mu"], adata.layers["Ms"])
    theta = true_theta(adata) + scale * rng.standard_normal((6, adata.n_vars)) * np.array([1, 1, 1, 1, 0, 0.2])[:, None]
    theta = jnp.asarray(theta)
    grid = jnp.linspace(0.0, 1.0, N_GRID)
    var_u, var_s = st.residual_variances_jit(theta, jnp.asarray(adata.obs["true_t"].to_numpy() / T_MAX), data)
    return data, grid, theta, var_u, var_s


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("variant", ["learned", "uniform", "hard"])
def test_loglik_never_decreases(seed, variant):
    adata = simulate(seed, time_density="early" if seed == 2 else "uniform")
    data, grid, theta, var_u, var_s = perturbed_start(adata, seed)
    config = se.SoftEMConfig(
        max_iter=15, tol=0.0, prior="uniform" if variant == "uniform" else "learned", hard=variant == "hard"
    )
    _, trace = se.run(data, grid, theta, var_u, var_s, config)
    assert np.all(np.isfinite(trace))
    steps = np.diff(trace)
    assert np.all(steps >= -1e-9 * np.abs(trace[1:])), steps.min()
    assert trace[-1] > trace[0]


def test_step_is_run():
    adata = simulate(3)
    data, grid, theta, var_u, var_s = perturbed_start(adata, 3)
    config = se.SoftEMConfig(max_iter=3, tol=0.0)
    state = se.init(data, grid, theta, var_u, var_s, config)
    lls = [float(state.loglik)]
    for _ in range(3):
        state = se.step(state, data, grid, config)
        lls.append(float(state.loglik))
    ran, trace = se.run(data, grid, theta, var_u, var_s, config)
    np.testing.assert_allclose(trace, lls, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(ran.theta), np.asarray(state.theta), rtol=1e-12)


def test_grid_distances_equal_direct_sum_and_do_not_depend_on_chunks():
    adata = simulate(4)
    mu, ms = adata.layers["Mu"], adata.layers["Ms"]
    theta = jnp.asarray(true_theta(adata))
    grid = jnp.linspace(0.0, 1.0, N_GRID)
    rng = np.random.default_rng(4)
    var_u, var_s = jnp.asarray(rng.uniform(0.1, 1, N_VARS)), jnp.asarray(rng.uniform(0.1, 1, N_VARS))
    whole = st.prepare_data(mu, ms)
    dist, _ = jax.jit(st.grid_distances)(theta, var_u, var_s, whole, grid)
    m_u, m_s = (np.asarray(m) for m in jax.jit(st.predict)(theta, grid[:, None], whole.std_u, whole.std_s))
    # The stored data: the standardised moments rounded once to float32 (DATA_DTYPE).
    xu, xs = (np.asarray(x[0], np.float64) for x in (whole.xu, whole.xs))
    np.testing.assert_allclose(xu, mu / np.asarray(whole.std_u), rtol=2**-24)
    np.testing.assert_allclose(xs, ms / np.asarray(whole.std_s), rtol=2**-24)
    direct = np.zeros((N_OBS, N_GRID))
    for g in range(N_VARS):  # the cells x grid x genes sum, one gene at a time
        direct += (xu[:, g, None] - m_u[None, :, g]) ** 2 / var_u[g] + (xs[:, g, None] - m_s[None, :, g]) ** 2 / var_s[g]
    np.testing.assert_allclose(np.asarray(dist), direct, rtol=1e-9, atol=1e-8)
    chunked = st.prepare_data(mu, ms, chunk_size=7)  # 3 chunks, 1 padding gene
    pad = lambda a, fill: jnp.concatenate([a, jnp.full(a.shape[:-1] + (1,), fill)], axis=-1)
    dist_c, _ = jax.jit(st.grid_distances)(pad(theta, 0.0), pad(var_u, 1.0), pad(var_s, 1.0), chunked, grid)
    np.testing.assert_allclose(np.asarray(dist_c), np.asarray(dist), rtol=1e-11, atol=1e-9)


def test_learned_prior_does_not_collapse_on_uniform_time():
    adata = simulate(5, time_density="uniform")
    data, grid, theta, var_u, var_s = perturbed_start(adata, 5)
    state, _ = se.run(data, grid, theta, var_u, var_s, se.SoftEMConfig(max_iter=40, tol=0.0))
    pi = np.exp(np.asarray(state.log_pi))
    assert pi.max() < 5.0 / N_GRID
    entropy = -np.sum(pi * np.log(pi))
    assert entropy > 0.95 * np.log(N_GRID)


def test_learned_prior_tracks_a_skewed_density_and_keeps_time_accuracy():
    adata = simulate(6, time_density="early")  # Beta(1, 3): 70% of cells in the first third
    true_t = adata.obs["true_t"].to_numpy() / T_MAX
    data, grid, theta, var_u, var_s = perturbed_start(adata, 6)
    fits = {}
    for prior in ("learned", "uniform"):
        config = se.SoftEMConfig(max_iter=40, tol=0.0, prior=prior)
        fits[prior] = se.run(data, grid, theta, var_u, var_s, config)[0]
    g = np.asarray(grid)
    truth = beta_dist(1, 3).pdf(np.clip(g, 1e-6, 1 - 1e-6))
    truth /= truth.sum()
    error = {k: np.abs(np.exp(np.asarray(s.log_pi)) - truth).sum() for k, s in fits.items()}
    assert error["learned"] < 0.5 * error["uniform"], error
    learned = np.exp(np.asarray(fits["learned"].log_pi))
    assert learned[g < 1 / 3].sum() > 0.55
    rho = {k: spearmanr(np.asarray(se.posterior_moments(s.q, grid)[0]), true_t)[0] for k, s in fits.items()}
    assert rho["learned"] >= rho["uniform"] - 2e-3, rho


def test_shared_time_beats_every_per_gene_time():
    adata = simulate(7, noise=0.3)
    true_t = adata.obs["true_t"].to_numpy()
    data = st.prepare_data(adata.layers["Mu"], adata.layers["Ms"])
    theta = jnp.asarray(true_theta(adata))
    grid = jnp.linspace(0.0, 1.0, N_GRID)
    var_u, var_s = st.residual_variances_jit(theta, jnp.asarray(true_t / T_MAX), data)
    shared, _ = st.shared_times_jit(theta, var_u, var_s, data, grid)
    # per-gene exact time with the same (true) parameters: each gene's nearest point on a
    # fine grid of its own curve
    fine = jnp.linspace(0.0, 1.0, 1001)
    m_u, m_s = (np.asarray(m) for m in jax.jit(st.predict)(theta, fine[:, None], data.std_u, data.std_s))
    xu, xs = np.asarray(data.xu[0]), np.asarray(data.xs[0])
    rho_genes = []
    for g in range(N_VARS):
        d = (xu[:, g, None] - m_u[None, :, g]) ** 2 + (xs[:, g, None] - m_s[None, :, g]) ** 2
        rho_genes.append(spearmanr(np.asarray(fine)[np.argmin(d, axis=1)], true_t)[0])
    rho_shared = spearmanr(np.asarray(shared), true_t)[0]
    assert rho_shared > max(rho_genes) + 0.01, (rho_shared, max(rho_genes))
    assert rho_shared > 0.98
    # the soft-EM posterior mean from a perturbed start is as good
    data, grid, theta0, var_u0, var_s0 = perturbed_start(adata, 7)
    state, _ = se.run(data, grid, theta0, var_u0, var_s0, se.SoftEMConfig(max_iter=30, tol=0.0))
    rho_soft = spearmanr(np.asarray(se.posterior_moments(state.q, grid)[0]), true_t)[0]
    assert rho_soft > max(rho_genes) + 0.01


def test_align_gene_fit_recovers_clock_from_per_gene_clocks():
    adata = simulate(8)
    true_t = adata.obs["true_t"].to_numpy()
    rng = np.random.default_rng(8)
    v = adata.var
    speed = np.exp(rng.uniform(-0.7, 0.7, N_VARS))  # each gene's own time unit
    params = np.stack([v["true_alpha"] / speed, v["true_beta"] / speed, v["true_gamma"] / speed,
                       v["true_t_"] * speed, v["true_scaling"]])
    t_gene = true_t[:, None] * speed[None, :] * np.exp(0.2 * rng.standard_normal((N_OBS, N_VARS)))
    data = st.prepare_data(adata.layers["Mu"], adata.layers["Ms"])
    grid = jnp.linspace(0.0, 1.0, N_GRID)
    span = st.time_spans(t_gene, np.ones((N_OBS, N_VARS), bool))
    theta, _, _, tau = st.align_gene_fit(data, grid, params, span, st.clock_start(t_gene, span))
    assert spearmanr(tau, true_t)[0] > 0.98
    speed_fit = np.exp(np.asarray(theta)[1]) / np.asarray(v["true_beta"])  # beta_clock / beta_true ~ t_max
    assert np.median(np.abs(np.log(speed_fit / T_MAX))) < np.log(1.5)


def test_located_times_leave_out_cells_near_the_onset():
    """Times at the onset, deep in repression (both near (0, 0)) or unknown do not locate a cell."""
    params = KineticParams(*(np.array([v, v]) for v in (2.0, 1.0, 0.5, 4.0, 1.0)))  # two equal genes
    t = np.array([[0.0, 0.0], [2.0, 3.0], [5.0, 6.0], [4.0 + 40.0, 4.0 + 60.0], [np.nan, 1.0]])
    with jax.enable_x64(True):
        u, s = (np.asarray(a) for a in trajectory(jnp.asarray(np.nan_to_num(t)), params))
    std = np.array([0.05, 0.05])
    located = st.located_times(u, s, t, params, std, std)
    assert located.tolist() == [[False, False], [True, True], [True, True], [False, False], [False, True]]
    # one residual variance of margin: a cell a little off the onset is not located either
    near = st.located_times(u[:1] + 0.5 * std, s[:1], t[:1], params, std, std)
    assert not near.any()


def test_clock_start_counts_only_the_genes_that_locate_a_cell():
    """Cells whose near-silent genes were put at the end of repression keep their place."""
    rng = np.random.default_rng(3)
    n_cells, n_genes = 50, 41
    r = np.sort(rng.uniform(0.05, 0.95, n_cells))  # true relative time
    t_gene = np.repeat(r[:, None], n_genes, axis=1)
    located = np.ones((n_cells, n_genes), bool)
    early = r < 0.3
    t_gene[np.ix_(early, np.arange(21))] = 1.0  # 21 of 41 genes: silent, fitted at the very end
    located[np.ix_(early, np.arange(21))] = False
    span = np.ones(n_genes)
    plain = st.clock_start(t_gene, span)
    assert spearmanr(plain, r)[0] < 0.5  # the early cells jump to the end
    tau = st.clock_start(t_gene, span, located)
    assert spearmanr(tau, r)[0] == pytest.approx(1.0)
    # a cell located by no gene takes the median of all its genes
    located[0] = False
    tau = st.clock_start(t_gene, span, located)
    assert tau[0] == pytest.approx(1.0)


def test_score_terms_equal_autodiff_of_each_gene():
    """``score_terms``: f'' and sum_g f_g'^2 of the cells' summed residuals, against jax.grad."""
    adata = simulate(6)
    mu, ms = adata.layers["Mu"], adata.layers["Ms"]
    theta = jnp.asarray(true_theta(adata))
    rng = np.random.default_rng(6)
    var_u, var_s = jnp.asarray(rng.uniform(0.1, 1, N_VARS)), jnp.asarray(rng.uniform(0.1, 1, N_VARS))
    data = st.prepare_data(mu, ms, chunk_size=7)  # 3 chunks, 1 padding gene
    pad = lambda a, fill: jnp.concatenate([a, jnp.full(a.shape[:-1] + (1,), fill)], axis=-1)
    t = jnp.asarray(np.clip(adata.obs["true_t"].to_numpy() / T_MAX + 0.01, 0.02, 0.98))
    h, s2 = jax.jit(st.score_terms)(t, pad(theta, 0.0), pad(var_u, 1.0), pad(var_s, 1.0), data)
    whole = st.prepare_data(mu, ms)
    xu, xs = (jnp.asarray(x[0], jnp.float64) for x in (whole.xu, whole.xs))  # the stored data

    def gene_losses(ti, i):  # (n_genes,) residual^2 of cell i at time ti
        m_u, m_s = st.predict(theta, ti, whole.std_u, whole.std_s)
        return (xu[i] - m_u) ** 2 / var_u + (xs[i] - m_s) ** 2 / var_s

    cells = np.arange(0, N_OBS, 37)
    for i in cells:
        grads = jax.jacfwd(gene_losses)(t[i], i)
        curv = jax.jacfwd(jax.jacfwd(lambda ti, i=i: jnp.sum(gene_losses(ti, i))))(t[i])
        np.testing.assert_allclose(float(s2[i]), float(jnp.sum(grads**2)), rtol=1e-8)
        np.testing.assert_allclose(float(h[i]), float(curv), rtol=1e-8, atol=1e-8)


def test_posterior_spread_covers_gene_disagreement():
    """The reported spread is never below the sandwich spread sqrt(sum_g f_g'^2) / f''."""
    adata = simulate(7)
    data, grid, theta, var_u, var_s = perturbed_start(adata, 7, scale=0.3)
    state, _ = se.run(data, grid, theta, var_u, var_s, se.SoftEMConfig(max_iter=5))
    mean, std = (np.asarray(a) for a in se.posterior_spread_jit(state, data, grid))
    h, s2 = (np.asarray(a) for a in st.score_terms(jnp.asarray(mean), state.theta, state.var_u, state.var_s, data))
    ok = h > 0
    assert ok.mean() > 0.5
    assert np.all(std[ok] >= np.sqrt(s2[ok]) / h[ok] * (1 - 1e-9))


def _moved_switch_start(adata, genes, switch=5.0):
    """True parameters, except that ``genes`` switch at clock time ``switch`` (beyond its end)."""
    theta = true_theta(adata)
    theta[3, genes] = np.log(switch)  # onsets are 0
    data = st.prepare_data(adata.layers["Mu"], adata.layers["Ms"])
    grid = jnp.linspace(0.0, 1.0, N_GRID)
    t = jnp.asarray(adata.obs["true_t"].to_numpy() / T_MAX)
    var_u, var_s = st.residual_variances_jit(jnp.asarray(true_theta(adata)), t, data)
    return data, grid, jnp.asarray(theta), var_u, var_s


def test_per_gene_weight_mask_equals_the_full_mask():
    """Data with every cell weighted store a per-gene mask; every pass must see the same data."""
    adata = simulate(9)
    mu, ms = adata.layers["Mu"], adata.layers["Ms"]
    compact = st.prepare_data(mu, ms, chunk_size=7)  # 7 does not divide the genes: padding
    full = st.prepare_data(mu, ms, weights=np.ones(mu.shape, bool), chunk_size=7)
    assert compact.w.shape[1] == 1 and full.w.shape[1] == N_OBS
    for field in ("xu", "xs", "std_u", "std_s", "n_gene", "n_cell", "log_jac"):
        np.testing.assert_array_equal(np.asarray(getattr(compact, field)), np.asarray(getattr(full, field)))
    grid = jnp.linspace(0.0, 1.0, N_GRID)
    theta = jnp.asarray(np.pad(true_theta(adata), ((0, 0), (0, compact.std_u.shape[0] - N_VARS)), mode="edge"))
    t = jnp.asarray(adata.obs["true_t"].to_numpy() / T_MAX)
    var_u, var_s = st.residual_variances_jit(theta, t, compact)
    np.testing.assert_array_equal(np.asarray(var_u), np.asarray(st.residual_variances_jit(theta, t, full)[0]))
    cells = np.arange(0, N_OBS, 3)
    for a, b in ((compact, full), (st.subset_cells(compact, cells), st.subset_cells(full, cells))):
        state_a = se.init(a, grid, theta, var_u, var_s, se.SoftEMConfig())
        state_b = se.init(b, grid, theta, var_u, var_s, se.SoftEMConfig())
        np.testing.assert_allclose(np.asarray(state_a.q), np.asarray(state_b.q), rtol=1e-12, atol=1e-15)
        stats_a, stats_b = (se.grid_statistics(x.q, x.cell_scale, d) for x, d in ((state_a, a), (state_b, b)))
        for x, y in zip(stats_a, stats_b):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12)
        times_a, times_b = st.shared_times_jit(theta, var_u, var_s, a, grid)[0], st.shared_times_jit(theta, var_u, var_s, b, grid)[0]
        np.testing.assert_array_equal(np.asarray(times_a), np.asarray(times_b))


def test_lm_does_not_move_a_switch_beyond_the_clock():
    """A switch past the clock's end leaves the loss flat in log d: LM must not take noise steps there."""
    adata = simulate(9)
    genes = np.arange(0, N_VARS, 4)
    data, grid, theta, var_u, var_s = _moved_switch_start(adata, genes)
    state = se.init(data, grid, theta, var_u, var_s, se.SoftEMConfig())
    stats = se.grid_statistics(state.q, state.cell_scale, data)
    lm = jax.jit(se.levenberg_marquardt, static_argnames="n_steps")
    damping = jnp.full(N_VARS, 1e-9)  # the smallest damping turns any noise into a capped step
    new, _, _, _ = lm(theta, damping, stats, var_u, var_s, data.std_u, data.std_s, grid, jnp.eye(6), n_steps=5)
    np.testing.assert_array_equal(np.asarray(new)[3, genes], np.asarray(theta)[3, genes])
    others = np.setdiff1d(np.arange(N_VARS), genes)
    assert np.any(np.asarray(new)[:, others] != np.asarray(theta)[:, others])  # the rest do move


def test_m_step_in_gene_batches_equals_the_m_step_on_all_genes():
    """The M-step runs in batches of genes (bounded memory); padding must not change any gene."""
    adata = simulate(9)
    data, grid, theta, var_u, var_s = _moved_switch_start(adata, np.arange(0, N_VARS, 4))
    state = se.init(data, grid, theta, var_u, var_s, se.SoftEMConfig())
    stats = se.grid_statistics(state.q, state.cell_scale, data)

    def lm(*args):
        return se.levenberg_marquardt(*args, grid, jnp.eye(6), 4, True)

    args = (theta, jnp.full(N_VARS, 1e-2), stats, var_u, var_s, data.std_u, data.std_s)
    whole = jax.jit(lm)(*args)
    for size in (3, 7, N_VARS):  # 3 and 7 leave a padded last batch
        batched = jax.jit(lambda *a, size=size: se.by_gene_batches(lm, a, size))(*args)
        for a, b in zip(whole, batched):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-10, atol=1e-12)
    assert np.any(np.asarray(whole[0]) != np.asarray(theta))  # the M-step moved something


def test_soft_em_brings_back_a_switch_from_beyond_the_clock():
    adata = simulate(9)
    genes = np.arange(0, N_VARS, 4)
    data, grid, theta, var_u, var_s = _moved_switch_start(adata, genes)
    true_switch = adata.var["true_t_"].to_numpy()[genes] / T_MAX
    assert np.all(true_switch < 0.9)
    for mode, back in (("full", True), ("align", False)):  # align keeps the kinetic shape
        state, trace = se.run(data, grid, theta, var_u, var_s, se.SoftEMConfig(max_iter=10, tol=0.0, mode=mode))
        th = np.asarray(state.theta)
        switch = th[5, genes] + np.exp(th[3, genes])
        if back:
            np.testing.assert_allclose(switch, true_switch, atol=0.05)
        else:
            assert np.all(switch > 1.0)
        assert np.all(np.diff(trace) >= -1e-9 * np.abs(trace[1:]))
