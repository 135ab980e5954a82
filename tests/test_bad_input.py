"""Malformed input to the public functions: the exact error type and a message naming the fix.

Every case of :data:`CASES` runs against a fresh AnnData and also checks that the failed call
left the AnnData untouched. The valid-but-awkward inputs (genes that cannot be fitted, views,
input immutability) are tested at the end. Fits use ``max_iter=3, n_explicit=1`` and 40
cells with 3-gene chunks, shapes shared with the other robustness test files so that the
jitted EM compiles as few times as possible.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from _reference import poisson_counts
from anndata import AnnData

from velofit import tl
from velofit._validation import (
    VelofitInputError,
    VelofitKeyError,
    VelofitTypeError,
    check_moments,
)
from velofit.core import EMConfig, fit_genes
from velofit.core.fit import STATUS_CONSTANT, STATUS_FEW_CELLS, STATUS_OK

FIT = {"max_iter": 3, "n_explicit": 1, "progress": False}
GENES = ["g0", "g1", "g2"]


def simulate(n_obs: int = 40, n_vars: int = 3, seed: int = 0) -> AnnData:
    """Poisson counts around the model's trajectory: integer ``Ms``/``Mu`` layers."""
    mu, ms, rng = poisson_counts(n_obs, n_vars, seed)
    adata = AnnData(X=ms.astype(np.float32), layers={"Ms": ms, "Mu": mu})
    adata.var_names = [f"g{i}" for i in range(n_vars)]
    adata.obs_names = [f"c{i}" for i in range(n_obs)]
    adata.obs["cluster"] = pd.Categorical(rng.choice(["a", "b"], n_obs))
    adata.var["hv"] = np.array([True, False, True][:n_vars] + [True] * max(0, n_vars - 3))
    return adata


def fake_fitted(adata: AnnData) -> AnnData:
    """An AnnData with velofit's output keys filled by hand (no fit, no compilation)."""
    n = adata.n_vars
    for key, value in {"fit_alpha": 2.0, "fit_beta": 1.0, "fit_gamma": 0.5, "fit_t_": 5.0, "fit_scaling": 1.0,
                       "fit_likelihood": 0.9}.items():
        adata.var[key] = np.full(n, value)
    adata.var["fit_status"] = np.full(n, STATUS_OK, dtype=object)
    adata.layers["fit_t"] = np.tile(np.linspace(0, 10, adata.n_obs)[:, None], (1, n))
    return adata


def snapshot(adata: AnnData) -> dict:
    """Deep copies of every array and table of ``adata`` (for bitwise comparison)."""
    return {
        "X": copy.deepcopy(adata.X),
        "layers": {k: copy.deepcopy(v) for k, v in adata.layers.items()},
        "obs": adata.obs.copy(deep=True),
        "var": adata.var.copy(deep=True),
        "obsm": {k: copy.deepcopy(v) for k, v in adata.obsm.items()},
        "varm": {k: copy.deepcopy(v) for k, v in adata.varm.items()},
        "uns_keys": sorted(adata.uns.keys()),
        "shape": adata.shape,
    }


def _same_array(a, b) -> bool:
    if sp.issparse(a) or sp.issparse(b):
        if not (sp.issparse(a) and sp.issparse(b)) or a.format != b.format or a.dtype != b.dtype:
            return False
        return (
            np.array_equal(a.indptr, b.indptr)
            and np.array_equal(a.indices, b.indices)
            and np.array_equal(a.data, b.data, equal_nan=a.dtype.kind in "fc")
        )
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind in "fc":
        return a.tobytes() == b.tobytes()  # bitwise, NaN included
    return np.array_equal(a, b)


def assert_unchanged(adata: AnnData, before: dict, *, allow_new_keys: bool) -> None:
    """Every pre-existing array/column of ``adata`` is bitwise as in ``before``."""
    after = snapshot(adata)
    assert after["shape"] == before["shape"]
    if before["X"] is None:
        assert adata.X is None
    else:
        assert _same_array(adata.X, before["X"]), "X was modified"
    for group in ("layers", "obsm", "varm"):
        for key, value in before[group].items():
            assert key in after[group], f"{group}[{key!r}] was removed"
            assert _same_array(after[group][key], value), f"{group}[{key!r}] was modified"
        if not allow_new_keys:
            assert sorted(after[group]) == sorted(before[group]), f"{group} gained keys"
    for group in ("obs", "var"):
        old, new = before[group], after[group]
        assert list(new.index) == list(old.index)
        for column in old.columns:
            assert column in new.columns, f"{group}[{column!r}] was removed"
            pd.testing.assert_series_equal(new[column], old[column], check_exact=True)
        if not allow_new_keys:
            assert list(new.columns) == list(old.columns), f"{group} gained columns"
    if not allow_new_keys:
        assert after["uns_keys"] == before["uns_keys"], "uns gained keys"


# --------------------------------------------------------------------------- the table


def _drop_layer(name):
    def edit(a):
        del a.layers[name]
        return a

    return edit


def _set_layer(name, fn):
    def edit(a):
        a.layers[name] = fn(np.asarray(a.layers[name], dtype=float))
        return a

    return edit


def _nan_at(x):
    x = x.copy()
    x[3, 1] = np.nan
    return x


def _inf_at(x):
    x = x.copy()
    x[0, 2] = np.inf
    return x


def _neg_inf_at(x):
    x = x.copy()
    x[5, 0] = -np.inf
    return x


def _negative_at(x):
    x = x.copy()
    x[7, 1] = -1.0
    return x


def _csr_nan(x):
    m = sp.csr_matrix(x + 1.0)
    m.data[4] = np.nan
    return m


def _csc_negative(x):
    m = sp.csc_matrix(x + 1.0)
    m.data[-1] = -0.5
    return m


def _var_column(name, values):
    def edit(a):
        a.var[name] = values
        return a

    return edit


def _duplicate_names(a):
    a.var_names = ["g0", "g0", "g2"]
    return a


def _clear_layers(a):
    for key in list(a.layers.keys()):
        del a.layers[key]
    return a


def _without(adata, column):
    del adata.var[column]
    return adata


def _tamper(adata):
    adata.var.loc["g1", "fit_gamma"] = np.nan
    return adata


def _tamper_t(adata):
    adata.layers["fit_t"][4, 2] = np.inf
    return adata


def _rd(**kwargs):
    return lambda a: tl.recover_dynamics(a, **{**FIT, **kwargs})


def _vel(**kwargs):
    return lambda a: tl.velocity(a, **kwargs)


def _fitted(*edits):
    def edit(a):
        a = fake_fitted(a)
        for e in edits:
            a = e(a)
        return a

    return edit


_same = None  # no edit of the AnnData
#: (id, edit of the AnnData or a replacement object, call, error type, message regex)
CASES = [
    # ---- the AnnData itself
    ("not_anndata", lambda a: a.layers["Ms"], _rd(), VelofitTypeError, r"expected an AnnData, got ndarray"),
    ("dataframe", lambda a: a.to_df(), _rd(), VelofitTypeError, r"expected an AnnData, got DataFrame"),
    ("no_cells", lambda a: a[:0].copy(), _rd(), VelofitInputError, r"AnnData is empty \(0 cells x 3 genes\)"),
    ("no_genes", lambda a: a[:, :0].copy(), _rd(), VelofitInputError, r"AnnData is empty \(40 cells x 0 genes\)"),
    ("one_cell", lambda a: a[:1].copy(), _rd(), VelofitInputError, r"needs at least 3 cells, got 1 cell"),
    ("two_cells", lambda a: a[:2].copy(), _rd(), VelofitInputError, r"needs at least 3 cells, got 2 cell"),
    # ---- layers
    ("missing_Ms", _drop_layer("Ms"), _rd(), VelofitKeyError,
     r"layer 'Ms' not found \(layers present: Mu\); run velofit.pp.moments"),
    ("missing_Mu", _drop_layer("Mu"), _rd(), VelofitKeyError, r"layer 'Mu' not found \(layers present: Ms\)"),
    ("no_layers", _clear_layers, _rd(), VelofitKeyError, r"layer 'Ms' not found \(layers present: none\)"),
    ("unknown_layer_name", _same, _rd(spliced_layer="spliced"), VelofitKeyError,
     r"layer 'spliced' not found \(layers present: Ms, Mu\).*spliced_layer="),
    ("layer_name_not_str", _same, _rd(unspliced_layer=1), VelofitTypeError, r"unspliced_layer must be a string"),
    ("layer_name_empty", _same, _rd(spliced_layer=""), VelofitInputError, r"spliced_layer must be a non-empty"),
    ("nan", _set_layer("Ms", _nan_at), _rd(), VelofitInputError,
     r"layer 'Ms' contains NaN or inf in 1 gene\(s\), e.g. \['g1'\]; remove or impute"),
    ("inf", _set_layer("Mu", _inf_at), _rd(), VelofitInputError,
     r"layer 'Mu' contains NaN or inf in 1 gene\(s\), e.g. \['g2'\]"),
    ("minus_inf", _set_layer("Ms", _neg_inf_at), _rd(), VelofitInputError, r"layer 'Ms' contains NaN or inf .*'g0'"),
    ("nan_csr", _set_layer("Mu", _csr_nan), _rd(), VelofitInputError, r"layer 'Mu' contains NaN or inf in 1 gene"),
    ("negative", _set_layer("Mu", _negative_at), _rd(), VelofitInputError,
     r"layer 'Mu' has negative values in 1 gene\(s\), e.g. \['g1'\]; velofit needs counts or moments \(>= 0\)"),
    ("negative_csc", _set_layer("Ms", _csc_negative), _rd(), VelofitInputError, r"layer 'Ms' has negative values"),
    ("string_dtype", _set_layer("Ms", lambda x: x.astype(str)), _rd(), VelofitInputError,
     r"layer 'Ms' has non-numeric dtype <U\d+; expected counts or moments \(convert with .astype\(float\)\)"),
    ("object_dtype", _set_layer("Mu", lambda x: x.astype(object)), _rd(), VelofitInputError,
     r"layer 'Mu' has non-numeric dtype object"),
    ("complex_dtype", _set_layer("Ms", lambda x: x.astype(complex)), _rd(), VelofitInputError,
     r"layer 'Ms' has non-numeric dtype complex128"),
    # ---- gene selection
    ("unknown_gene", _same, _rd(var_names=["g0", "nope"]), VelofitKeyError,
     r"1 gene\(s\) not in adata.var_names, e.g. \['nope'\]; check the spelling"),
    ("unknown_gene_str", _same, _rd(var_names="nope"), VelofitKeyError,
     r"var_names='nope' is neither a var column nor a gene in adata.var_names; var columns are \['hv'\]"),
    ("empty_gene_list", _same, _rd(var_names=[]), VelofitInputError, r"var_names selects no gene"),
    ("all_false_mask", _same, _rd(var_names=np.zeros(3, bool)), VelofitInputError, r"var_names selects no gene"),
    ("mask_wrong_length", _same, _rd(var_names=np.ones(4, bool)), VelofitInputError,
     r"boolean var_names must have length n_vars=3, got shape \(4,\)"),
    ("mask_2d", _same, _rd(var_names=np.ones((3, 1), bool)), VelofitInputError,
     r"var_names must be one-dimensional, got shape \(3, 1\)"),
    ("column_selects_none", _var_column("hv", np.zeros(3, bool)), _rd(var_names="hv"), VelofitInputError,
     r"var column 'hv' selects no gene"),
    ("column_not_bool", _var_column("hv", ["x", "y", "z"]), _rd(var_names="hv"), VelofitInputError,
     r"var column 'hv' \(dtype object\) is not a boolean column without missing values"),
    ("column_with_missing", _var_column("hv", pd.array([True, None, False], dtype="boolean")), _rd(var_names="hv"),
     VelofitInputError, r"var column 'hv' \(dtype boolean\) is not a boolean column without missing values"),
    ("integer_positions", _same, _rd(var_names=[0, 1]), VelofitTypeError,
     r"var_names must be gene names \(strings\) or a boolean mask.*adata.var_names\[positions\]"),
    ("var_names_int", _same, _rd(var_names=5), VelofitTypeError, r"var_names must be None, 'all'"),
    ("duplicate_var_names", _duplicate_names, _rd(var_names=["g0"]), VelofitInputError,
     r"adata.var_names are not unique.*var_names_make_unique"),
    # ---- options
    ("bad_time", _same, _rd(time="cell"), VelofitInputError, r"time must be 'gene' or 'shared', got 'cell'"),
    ("bad_em", _same, _rd(em="fuzzy"), VelofitInputError, r"em must be 'hard' or 'soft', got 'fuzzy'"),
    ("soft_without_shared", _same, _rd(em="soft"), VelofitInputError, r"em='soft' .* pass time='shared'"),
    ("shared_with_per_gene_options", _same, _rd(time="shared", chunk_size=2), VelofitInputError,
     (r"time='shared'\) does not use max_iter, n_explicit, chunk_size \(options of the per-gene fit\); "
      r"call velofit.tl.recover_dynamics_shared")),
    ("max_iter_0", _same, _rd(max_iter=0, n_explicit=0), VelofitInputError, r"max_iter must be an integer >= 1, got 0"),
    ("max_iter_negative", _same, _rd(max_iter=-2, n_explicit=0), VelofitInputError, r"max_iter must be an integer >= 1"),
    ("max_iter_float", _same, _rd(max_iter=2.5), VelofitTypeError, r"max_iter must be an integer, got 2.5 of type float"),
    ("max_iter_bool", _same, _rd(max_iter=True), VelofitTypeError, r"max_iter must be an integer, got True of type bool"),
    ("max_iter_str", _same, _rd(max_iter="10"), VelofitTypeError, r"max_iter must be an integer, got '10'"),
    ("n_explicit_gt_max_iter", _same, _rd(max_iter=3, n_explicit=4), VelofitInputError,
     r"n_explicit must be an integer in \[0, max_iter=3\], got 4; lower n_explicit or raise max_iter"),
    ("n_explicit_negative", _same, _rd(n_explicit=-1), VelofitInputError, r"n_explicit must be an integer in \[0, "),
    ("n_explicit_float", _same, _rd(n_explicit=1.0), VelofitTypeError, r"n_explicit must be an integer, got 1.0"),
    ("tol_negative", _same, _rd(tol=-1e-3), VelofitInputError, r"tol must be a number >= 0.0, got -0.001"),
    ("tol_nan", _same, _rd(tol=float("nan")), VelofitInputError, r"tol must be a finite number, got nan"),
    ("tol_str", _same, _rd(tol="0.1"), VelofitTypeError, r"tol must be a number, got '0.1' of type str"),
    ("t_max_zero", _same, _rd(t_max=0), VelofitInputError, r"t_max must be a number > 0.0, got 0"),
    ("t_max_negative", _same, _rd(t_max=-20.0), VelofitInputError, r"t_max must be a number > 0.0, got -20.0"),
    ("t_max_inf", _same, _rd(t_max=np.inf), VelofitInputError, r"t_max must be a finite number, got inf"),
    ("t_max_none", _same, _rd(t_max=None), VelofitTypeError, r"t_max must be a number, got None"),
    ("chunk_size_0", _same, _rd(chunk_size=0), VelofitInputError, r"chunk_size must be a positive integer or None, got 0"),
    ("chunk_size_negative", _same, _rd(chunk_size=-4), VelofitInputError, r"chunk_size must be a positive integer"),
    ("chunk_size_float", _same, _rd(chunk_size=2.0), VelofitTypeError,
     r"chunk_size must be a positive integer or None, got 2.0 of type float"),
    ("seed_negative", _same, _rd(seed=-1), VelofitInputError, r"seed must be an integer >= 0, got -1"),
    ("seed_str", _same, _rd(seed="a"), VelofitTypeError, r"seed must be an integer, got 'a'"),
    ("copy_str", _same, _rd(copy="yes"), VelofitTypeError, r"copy must be True or False, got 'yes'"),
    ("progress_none", _same, _rd(progress=None), VelofitTypeError, r"progress must be True or False, got None"),
    # ---- velocity
    ("velocity_not_anndata", lambda a: None, _vel(), VelofitTypeError,
     r"expected an AnnData, got NoneType"),
    ("velocity_empty", lambda a: a[:0].copy(), _vel(), VelofitInputError, r"AnnData is empty"),
    ("velocity_not_fitted", _same, _vel(), VelofitKeyError,
     r"no fitted dynamics found \(missing \['fit_alpha'.*run velofit.tl.recover_dynamics\(adata\) first"),
    ("velocity_no_fit_t", _fitted(_drop_layer("fit_t")), _vel(), VelofitKeyError,
     r"no fitted dynamics found \(missing \['layers/fit_t'\]\)"),
    ("velocity_no_likelihood", _fitted(lambda a: _without(a, "fit_likelihood")), _vel(), VelofitKeyError,
     r"missing \['fit_likelihood'\]"),
    ("velocity_vkey_empty", _fitted(), _vel(vkey=""), VelofitInputError, r"vkey must be a non-empty string"),
    ("velocity_vkey_int", _fitted(), _vel(vkey=3), VelofitTypeError, r"vkey must be a string naming a key, got 3"),
    ("velocity_min_likelihood_above_1", _fitted(), _vel(min_likelihood=1.5), VelofitInputError,
     r"min_likelihood must be a number <= 1.0, got 1.5"),
    ("velocity_min_likelihood_negative", _fitted(), _vel(min_likelihood=-0.1), VelofitInputError,
     r"min_likelihood must be a number >= 0.0"),
    ("velocity_min_likelihood_nan", _fitted(), _vel(min_likelihood=float("nan")), VelofitInputError,
     r"min_likelihood must be a finite number"),
    ("velocity_copy_int", _fitted(), _vel(copy=1), VelofitTypeError, r"copy must be True or False, got 1"),
    ("velocity_tampered_params", _fitted(_tamper), _vel(), VelofitInputError,
     r"1 gene\(s\) marked fit_status == 'ok' have non-finite or non-positive .*\['g1'\]; rerun"),
    ("velocity_tampered_times", _fitted(_tamper_t), _vel(), VelofitInputError,
     r"marked fit_status == 'ok' have .*non-finite layers\['fit_t'\], e.g. \['g2'\]"),
]


def test_table_is_large_enough():
    assert len(CASES) >= 25
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize(("edit", "call", "error", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises(edit, call, error, match):
    adata = simulate()
    target = adata if edit is None else edit(adata)
    before = snapshot(target) if isinstance(target, AnnData) else None
    with pytest.raises(error, match=match) as info:
        call(target)
    # every error is a ValueError or a KeyError, and a velofit one
    assert isinstance(info.value, (VelofitInputError, VelofitKeyError))
    assert isinstance(info.value, (ValueError, KeyError))
    if before is not None:  # a failed call leaves the AnnData as it was
        assert_unchanged(target, before, allow_new_keys=False)


def test_type_errors_are_also_type_errors():
    with pytest.raises(TypeError):
        tl.recover_dynamics(simulate(), max_iter=2.5)
    with pytest.raises(ValueError):
        tl.recover_dynamics(simulate(), max_iter=2.5)


def test_failed_call_leaves_adata_untouched():
    adata = simulate()
    adata.layers["Mu"] = _nan_at(np.asarray(adata.layers["Mu"], dtype=float))
    before = snapshot(adata)
    with pytest.raises(VelofitInputError):
        tl.recover_dynamics(adata, **FIT)
    assert_unchanged(adata, before, allow_new_keys=False)


# --------------------------------------------------------------------------- the core entry point

_ZEROS = np.zeros((40, 1))
_COUNTS = np.arange(80, dtype=float).reshape(40, 2) % 7 + 1.0
CORE_CASES = [
    ("shape_mismatch", lambda: fit_genes(_COUNTS, _COUNTS[:, :1], EMConfig(3, 1), chunk_size=1), VelofitInputError,
     r"mu and ms must have the same shape \(cells x genes\), got \(40, 2\) and \(40, 1\)"),
    ("rows_mismatch", lambda: fit_genes(_COUNTS[:30], _COUNTS, EMConfig(3, 1), chunk_size=1), VelofitInputError,
     r"mu and ms must have the same shape"),
    ("one_dimensional", lambda: fit_genes(_COUNTS[:, 0], _COUNTS[:, 0], EMConfig(3, 1)), VelofitInputError,
     r"mu must be 2-D \(cells x genes\), got shape \(40,\)"),
    ("nan", lambda: fit_genes(np.where(_COUNTS > 5, np.nan, _COUNTS), _COUNTS, EMConfig(3, 1), chunk_size=1),
     VelofitInputError, r"mu contains NaN or inf"),
    ("negative", lambda: fit_genes(_COUNTS - 3.0, _COUNTS, EMConfig(3, 1), chunk_size=1), VelofitInputError,
     r"mu has negative values"),
    ("max_iter_0", lambda: fit_genes(_ZEROS, _ZEROS, EMConfig(max_iter=0, n_explicit=0)), VelofitInputError,
     r"max_iter must be an integer >= 1"),
    ("chunk_size_0", lambda: fit_genes(_ZEROS, _ZEROS, EMConfig(3, 1), chunk_size=0), VelofitInputError,
     r"chunk_size must be a positive integer"),
]


@pytest.mark.parametrize(("call", "error", "match"), [c[1:] for c in CORE_CASES], ids=[c[0] for c in CORE_CASES])
def test_core_fit_genes_validates(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_check_moments_helper():
    """The validator proposed for fit_genes (lives in _validation, usable by core)."""
    mu, ms = check_moments(_COUNTS.astype(np.int32), sp.csr_matrix(_COUNTS))
    assert mu.dtype == ms.dtype == np.float64 and np.array_equal(mu, ms)
    with pytest.raises(VelofitInputError, match="same shape"):
        check_moments(_COUNTS, _COUNTS[:, :1])
    with pytest.raises(VelofitInputError, match=r"mu must be 2-D"):
        check_moments(_COUNTS[:, 0], _COUNTS[:, 0])
    with pytest.raises(VelofitInputError, match="NaN or inf"):
        check_moments(np.where(_COUNTS > 5, np.nan, _COUNTS), _COUNTS)
    with pytest.raises(VelofitInputError, match="negative"):
        check_moments(_COUNTS, -_COUNTS)
    with pytest.raises(VelofitInputError, match="non-numeric"):
        check_moments(_COUNTS.astype(str), _COUNTS)


# --------------------------------------------------------------------------- awkward but valid input


def _fitted_columns(adata):
    return [c for c in adata.var.columns if c.startswith("fit_") and adata.var[c].dtype.kind == "f"]


def assert_flags_consistent(adata: AnnData) -> None:
    """ok genes: every fit_* value and fit layer column finite; other genes: NaN and not velocity genes."""
    ok = np.asarray(adata.var["fit_status"] == STATUS_OK)
    for column in _fitted_columns(adata):
        values = adata.var[column].to_numpy(dtype=float)
        assert np.all(np.isfinite(values[ok])), column
        assert np.all(np.isnan(values[~ok])), column
    for key in ("fit_t", "fit_tau", "fit_tau_"):
        layer = np.asarray(adata.layers[key])
        assert np.all(np.isfinite(layer[:, ok])), key
        assert np.all(np.isnan(layer[:, ~ok])), key
    assert not np.any(adata.var["velocity_genes"].to_numpy()[~ok])
    assert np.all(np.isfinite(adata.varm["loss"][ok, 0]))


def test_unfittable_genes_are_flagged_and_do_not_affect_others():
    good = simulate(n_vars=3, seed=4)
    ms, mu = (np.asarray(good.layers[k], dtype=float) for k in ("Ms", "Mu"))
    n = good.n_obs
    zeros = np.zeros(n)
    outlier_s, outlier_u = zeros.copy(), zeros.copy()
    outlier_s[5], outlier_u[5] = 100.0, 50.0
    spike_s, spike_u = np.ones(n), np.full(n, 2.0)
    spike_s[9], spike_u[9] = 1000.0, 900.0
    bad = {  # name: (Ms, Mu, expected status)
        "all_zero": (zeros, zeros, STATUS_FEW_CELLS),
        "constant": (np.full(n, 3.0), np.full(n, 2.0), STATUS_CONSTANT),
        "no_unspliced": (ms[:, 0], zeros, STATUS_FEW_CELLS),
        "constant_unspliced": (ms[:, 1], np.full(n, 1.5), STATUS_CONSTANT),
        "one_cell": (outlier_s, outlier_u, STATUS_FEW_CELLS),
        "constant_with_outlier": (spike_s, spike_u, STATUS_CONSTANT),
    }
    order = ["all_zero", "g0", "constant", "no_unspliced", "g1", "constant_unspliced", "g2", "one_cell",
             "constant_with_outlier"]
    cols_s, cols_u = [], []
    for name in order:
        if name in bad:
            cols_s.append(bad[name][0])
            cols_u.append(bad[name][1])
        else:
            i = int(name[1])
            cols_s.append(ms[:, i])
            cols_u.append(mu[:, i])
    mixed = AnnData(np.stack(cols_s, 1), layers={"Ms": np.stack(cols_s, 1), "Mu": np.stack(cols_u, 1)})
    mixed.var_names = order
    tl.recover_dynamics(mixed, chunk_size=3, **FIT)
    tl.recover_dynamics(good, chunk_size=3, **FIT)
    status = mixed.var["fit_status"]
    for name, (_, _, expected) in bad.items():
        assert status[name] == expected, (name, status[name])
        assert not mixed.var.loc[name, "velocity_genes"]
        assert np.isnan(mixed.var.loc[name, "fit_alpha"])
    assert list(status[GENES]) == [STATUS_OK] * 3
    assert_flags_consistent(mixed)
    # the good genes are fitted exactly as without the bad ones (same chunk width)
    for column in ("fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling", "fit_likelihood"):
        np.testing.assert_array_equal(mixed.var.loc[GENES, column].to_numpy(), good.var[column].to_numpy())
    np.testing.assert_array_equal(mixed[:, GENES].layers["fit_t"], good.layers["fit_t"])
    tl.velocity(mixed)
    ok = np.asarray(status == STATUS_OK)
    assert np.all(np.isfinite(mixed.layers["velocity"][:, ok]))
    assert np.all(np.isnan(mixed.layers["velocity"][:, ~ok]))


def test_input_never_modified_except_added_keys():
    adata = simulate()
    adata.layers["Ms"] = sp.csr_matrix(adata.layers["Ms"])
    adata.obsm["X_umap"] = np.random.default_rng(0).normal(size=(adata.n_obs, 2))
    adata.uns["note"] = "kept"
    before = snapshot(adata)
    assert tl.recover_dynamics(adata, **FIT) is None
    assert tl.velocity(adata) is None
    assert_unchanged(adata, before, allow_new_keys=True)
    assert {"fit_alpha", "fit_status", "velocity_genes"} <= set(adata.var.columns)
    assert {"fit_t", "velocity", "velocity_u"} <= set(adata.layers.keys())


def test_copy_true_adds_no_key():
    adata = simulate()
    before = snapshot(adata)
    out = tl.recover_dynamics(adata, copy=True, **FIT)
    assert_unchanged(adata, before, allow_new_keys=False)
    vel = tl.velocity(out, copy=True)
    assert "velocity" not in out.layers and "velocity" in vel.layers
    assert_unchanged(adata, before, allow_new_keys=False)


def test_view_input_leaves_parent_untouched():
    parent = simulate(n_vars=4, seed=2)
    before = snapshot(parent)
    view = parent[:, :3]
    with pytest.warns(Warning):  # anndata: "initializing view as actual"
        tl.recover_dynamics(view, **FIT)
    assert "fit_alpha" in view.var.columns
    assert_unchanged(parent, before, allow_new_keys=False)


def test_gene_selection_forms_agree():
    adata = simulate(n_vars=3)
    idx = {
        "list": ["g2", "g0"],
        "mask": np.array([True, False, True]),
        "column": "hv",
        "index": pd.Index(["g0", "g2"]),
        "series": pd.Series(["g0", "g2"]),
    }
    from velofit._validation import resolve_var_names

    for name, var_names in idx.items():
        np.testing.assert_array_equal(resolve_var_names(adata, var_names), [0, 2], err_msg=name)
    np.testing.assert_array_equal(resolve_var_names(adata, "g1"), [1])
    np.testing.assert_array_equal(resolve_var_names(adata, "all"), [0, 1, 2])
