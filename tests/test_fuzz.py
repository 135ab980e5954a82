"""Hypothesis fuzzing of ``recover_dynamics`` on random small AnnData and of the kinetics kernels.

``recover_dynamics``: cells drawn from {1, 2, 40} (below 3 cells is an error; the jitted EM is
compiled for one cell count only, so the effective number of usable cells per gene is
varied through dropout sparsity, 0 to 40), 1 to 6 genes of assorted kinds (kinetic,
all-zero, constant, no unspliced, one expressing cell, huge 1e8 and tiny 1e-8 scales,
beta == gamma, noise), integer/float32/float64 dtypes, dense/CSR/CSC layers, an optional
gene subset, and optionally one NaN, inf or negative entry placed at random. Either the
call raises the velofit error the input deserves, or every gene marked ``ok`` has finite,
positive parameters, finite times and a non-increasing loss, every other gene is NaN and
not a velocity gene, and the input AnnData is unchanged.

Kernels: ``phase_state``, ``trajectory`` and ``velocities`` (jitted, fixed shapes) in
float32 and float64 with rates 1e-6..1e3, times 0 or 1e-8..1e8, abundances 0 or 1e-8..1e8.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from _reference import model
from anndata import AnnData
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from velofit import tl
from velofit._validation import VelofitInputError, VelofitKeyError
from velofit.core.fit import (
    STATUS_CONSTANT,
    STATUS_FEW_CELLS,
    STATUS_NONFINITE,
    STATUS_OK,
)
from velofit.core.kinetics import KineticParams, phase_state, trajectory, velocities

MAX_ITER = 3
FIT = {"max_iter": MAX_ITER, "n_explicit": 1, "progress": False}
#: 40 cells most of the time (listed first: Hypothesis shrinks towards it); 1 and 2 must raise.
CELLS = (40, 40, 40, 40, 40, 1, 2)
KINDS = ("kinetic", "kinetic", "zeros", "constant", "no_unspliced", "one_cell", "huge", "tiny", "equal_rates", "noise")
STATUSES = {STATUS_OK, STATUS_FEW_CELLS, STATUS_CONSTANT, STATUS_NONFINITE, "not selected"}
#: Examples actually run by each fuzz test in this session (reported in the test output with -s).
RUNS = {"recover_dynamics": 0, "recover_dynamics_errors": 0, "kernels": 0}

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _gene(kind: str, n_obs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Spliced and unspliced values of one gene of the given kind (float64)."""
    zeros = np.zeros(n_obs)
    if kind == "zeros":
        return zeros, zeros
    if kind == "constant":
        return np.full(n_obs, rng.uniform(0.5, 5)), np.full(n_obs, rng.uniform(0.5, 5))
    if kind == "noise":
        return rng.exponential(3.0, n_obs), rng.exponential(2.0, n_obs)
    if kind == "one_cell":
        s, u = zeros.copy(), zeros.copy()
        i = rng.integers(n_obs)
        s[i], u[i] = rng.uniform(1, 100), rng.uniform(1, 100)
        return s, u
    beta = rng.uniform(0.3, 3)
    gamma = beta if kind == "equal_rates" else rng.uniform(0.1, 2)
    u, s = model(rng.uniform(0, 12, n_obs), rng.uniform(1, 8), beta, gamma, rng.uniform(2, 6))
    scale = {"huge": 1e8, "tiny": 1e-8}.get(kind, 10.0)
    s = s * scale * rng.lognormal(0, 0.1, n_obs)
    u = u * scale * rng.lognormal(0, 0.1, n_obs)
    if kind == "no_unspliced":
        u = zeros
    return s, u


@st.composite
def fuzz_inputs(draw):
    n_obs = draw(st.sampled_from(CELLS))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=6))
    n_vars = len(kinds)
    spec = {
        "n_obs": n_obs,
        "kinds": kinds,
        "dtype": draw(st.sampled_from(["int64", "int32", "float32", "float64"])),
        "format": draw(st.sampled_from(["dense", "csr", "csc"])),
        "density": draw(st.sampled_from([1.0, 0.8, 0.3, 0.08])),
        "subset": draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=n_vars, max_size=n_vars))),
        "corruption": draw(st.sampled_from([None] * 6 + ["nan", "inf", "negative"])),
        "corrupt_layer": draw(st.sampled_from(["Ms", "Mu"])),
        "corrupt_cell": draw(st.integers(0, n_obs - 1)),
        "corrupt_gene": draw(st.integers(0, n_vars - 1)),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }
    return spec


def build(spec: dict) -> AnnData:
    rng = np.random.default_rng(spec["seed"])
    n_obs = spec["n_obs"]
    cols = [_gene(kind, n_obs, rng) for kind in spec["kinds"]]
    layers = {"Ms": np.stack([c[0] for c in cols], 1), "Mu": np.stack([c[1] for c in cols], 1)}
    for key, values in layers.items():
        layers[key] = values * (rng.random(values.shape) < spec["density"])
    dtype = np.dtype(spec["dtype"])
    if spec["corruption"] is not None:
        x = layers[spec["corrupt_layer"]]
        x[spec["corrupt_cell"], spec["corrupt_gene"]] = {"nan": np.nan, "inf": np.inf, "negative": -1.0}[
            spec["corruption"]
        ]
        if spec["corruption"] != "negative":
            dtype = np.dtype(np.float64) if dtype.kind == "i" else dtype  # ints cannot hold NaN/inf
    for key, x in layers.items():
        if dtype.kind == "i":
            x = np.rint(np.clip(x, -1, np.iinfo(dtype).max // 2))
        x = x.astype(dtype if key == spec["corrupt_layer"] or spec["corruption"] is None else np.dtype(spec["dtype"]))
        if spec["format"] == "csr":
            x = sp.csr_matrix(x)
        elif spec["format"] == "csc":
            x = sp.csc_matrix(x)
        layers[key] = x
    adata = AnnData(X=None, layers=layers, shape=(n_obs, len(spec["kinds"])))
    adata.var_names = [f"{kind}{i}" for i, kind in enumerate(spec["kinds"])]
    return adata


def _snapshot(adata: AnnData) -> dict:
    out = {}
    for key, x in adata.layers.items():
        if sp.issparse(x):
            out[key] = (x.format, x.dtype, x.indptr.tobytes(), x.indices.tobytes(), x.data.tobytes())
        else:
            out[key] = (x.dtype, x.tobytes())
    return out


def check_fit(adata: AnnData, genes: np.ndarray) -> None:
    var = adata.var
    status = var["fit_status"].to_numpy()
    assert set(status) <= STATUSES, set(status)
    selected = np.zeros(adata.n_vars, bool)
    selected[genes] = True
    assert np.all((status == "not selected") == ~selected)
    ok = status == STATUS_OK
    positive = ("fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling", "fit_std_u", "fit_std_s",
                "fit_alignment_scaling")
    for column in var.columns:
        if not column.startswith("fit_") or var[column].dtype.kind != "f":
            continue
        values = var[column].to_numpy()
        assert np.all(np.isfinite(values[ok])), (column, values)
        assert np.all(np.isnan(values[~ok])), (column, values)
        if column in positive:
            assert np.all(values[ok] > 0), (column, values)
    likelihood = var["fit_likelihood"].to_numpy()[ok]
    assert np.all((likelihood >= 0) & (likelihood <= 1.0))  # exp(-x/2) may underflow to 0 on awful fits
    assert np.all(var["fit_n_iter"].to_numpy() <= MAX_ITER)
    for key in ("fit_t", "fit_tau", "fit_tau_"):
        layer = adata.layers[key]
        assert np.all(np.isfinite(layer[:, ok])), key
        assert np.all(layer[:, ok] >= 0), key
        assert np.all(np.isnan(layer[:, ~ok])), key
    assert not np.any(var["velocity_genes"].to_numpy()[~ok])
    trace = adata.varm["loss"][ok]
    assert np.all(np.isfinite(trace[:, 0]))
    steps = np.diff(trace, axis=1)
    tolerance = 1e-9 * np.abs(trace[:, :-1])
    assert np.all((steps <= tolerance) | np.isnan(steps)), ("loss increased", trace)
    assert np.isfinite(adata.uns["recover_dynamics"]["loss_per_iteration"]).all()


@FUZZ
@given(spec=fuzz_inputs())
def test_fuzz_recover_dynamics(spec):
    adata = build(spec)
    before = _snapshot(adata)
    subset = spec["subset"]
    var_names = None if subset is None else np.asarray(subset, dtype=bool)
    genes = np.arange(adata.n_vars) if var_names is None else np.flatnonzero(var_names)
    width = 1 if genes.size < 3 else 3  # two compiled chunk widths for the whole session
    expected = None
    if spec["n_obs"] < 3:
        expected = (VelofitInputError, "needs at least 3 cells")
    elif genes.size == 0:
        expected = (VelofitInputError, "selects no gene")
    elif spec["corruption"] is not None and spec["corrupt_gene"] in genes:
        message = "has negative values" if spec["corruption"] == "negative" else "contains NaN or inf"
        expected = (VelofitInputError, f"layer '{spec['corrupt_layer']}' {message}")
    RUNS["recover_dynamics"] += 1
    try:
        tl.recover_dynamics(adata, var_names=var_names, chunk_size=width, **FIT)
    except (VelofitInputError, VelofitKeyError) as err:
        RUNS["recover_dynamics_errors"] += 1
        assert expected is not None, f"unexpected error {err!r}"
        assert isinstance(err, expected[0]) and expected[1] in str(err), (expected, str(err))
        assert _snapshot(adata) == before
        assert "fit_status" not in adata.var.columns
        return
    assert expected is None, f"expected {expected}, got no error"
    after = _snapshot(adata)
    assert {key: after[key] for key in before} == before  # existing layers bitwise unchanged
    check_fit(adata, genes)


# --------------------------------------------------------------------------- kernels

N_POINTS = 8
_phase = jax.jit(phase_state)
_traj = jax.jit(trajectory)
_vel = jax.jit(velocities)


def _log_uniform(lo: float, hi: float, *, zero: bool):
    values = st.floats(lo, hi).map(lambda e: 10.0**e)
    return st.one_of(st.just(0.0), values) if zero else values


def _vector(strategy):
    return st.lists(strategy, min_size=N_POINTS, max_size=N_POINTS)


RATES = _vector(_log_uniform(-6, 3, zero=False))
TIMES = _vector(_log_uniform(-8, 8, zero=True))
COUNTS = _vector(_log_uniform(-8, 8, zero=True))


@FUZZ
@given(
    tau=TIMES, u0=COUNTS, s0=COUNTS, alpha=COUNTS, beta=RATES, gamma=RATES, equal=st.booleans(),
    t_=_vector(_log_uniform(-8, 8, zero=False)), scaling=_vector(_log_uniform(-3, 3, zero=False)),
    dtype=st.sampled_from(["float32", "float64"]),
)
def test_fuzz_kernels(tau, u0, s0, alpha, beta, gamma, equal, t_, scaling, dtype):
    RUNS["kernels"] += 1
    if equal:
        gamma = beta
    dt = np.dtype(dtype)
    a = {k: jnp.asarray(np.asarray(v, dtype=dt)) for k, v in
         {"tau": tau, "u0": u0, "s0": s0, "alpha": alpha, "beta": beta, "gamma": gamma, "t_": t_,
          "scaling": scaling}.items()}
    u, s = (np.asarray(x) for x in _phase(a["tau"], a["u0"], a["s0"], a["alpha"], a["beta"], a["gamma"]))
    assert u.dtype == dt and s.dtype == dt
    assert np.all(np.isfinite(u)) and np.all(np.isfinite(s)), (u, s)
    assert np.all(u >= 0)
    # s >= 0 up to rounding of the terms it is made of (float32 cancels visibly at small tau)
    f = lambda k: np.asarray(a[k], dtype=np.float64)
    size = f("s0") + (2 * f("alpha") + f("beta") * f("u0")) * f("tau")
    rel = 1e-5 if dt == np.float32 else 1e-12
    assert np.all(s >= -rel * size), (s, size)

    params = KineticParams(a["alpha"], a["beta"], a["gamma"], a["t_"], a["scaling"])
    outputs = [np.asarray(x) for x in (*_traj(a["tau"], params), *_vel(a["tau"], params))]
    for x in outputs:
        assert x.dtype == dt
        assert np.all(np.isfinite(x)), outputs
    assert np.all(outputs[0] >= 0)


def test_report_fuzz_counts(capsys):
    """Runs last in this file: prints how many fuzz examples ran (visible with ``pytest -s``)."""
    with capsys.disabled():
        print(f"\nvelofit fuzz examples run: {RUNS}")
