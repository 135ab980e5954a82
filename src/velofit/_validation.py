"""Input checks shared by the AnnData front door: clear errors that name the problem and the fix.

Every error raised here is a :class:`VelofitInputError` (a :class:`ValueError`) or a
:class:`VelofitKeyError` (a :class:`KeyError`); arguments of the wrong type raise
:class:`VelofitTypeError`, which is both a :class:`VelofitInputError` and a :class:`TypeError`.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData


class VelofitInputError(ValueError):
    """Input data that velofit cannot fit, with a message saying how to fix it."""


class VelofitTypeError(VelofitInputError, TypeError):
    """An argument of the wrong type (also a :class:`TypeError`, so either ``except`` catches it)."""


class VelofitKeyError(KeyError):
    """A layer, column or key that velofit needs is missing from the AnnData."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------- scalar options


def _is_int(value: object) -> bool:
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> bool:
    return isinstance(value, (numbers.Real, np.floating, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: object, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer option (``bool`` is rejected), optionally bounded.

    Parameters
    ----------
    name
        Argument name, for the message.
    value
        Value passed by the user.
    minimum, maximum
        Inclusive bounds (``None``: unbounded).

    Returns
    -------
    ``int(value)``.
    """
    if not _is_int(value):
        raise VelofitTypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise VelofitInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise VelofitInputError(f"{name} must be an integer <= {maximum}, got {value!r}")
    return int(value)


def check_number(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict: bool = False,
) -> float:
    """A finite real option (``bool`` is rejected), optionally bounded.

    Parameters
    ----------
    name
        Argument name, for the message.
    value
        Value passed by the user.
    minimum, maximum
        Bounds (``None``: unbounded); inclusive unless ``strict`` (then ``minimum`` is excluded).
    strict
        Require ``value > minimum`` instead of ``>=``.

    Returns
    -------
    ``float(value)``.
    """
    if not _is_real(value):
        raise VelofitTypeError(f"{name} must be a number, got {value!r} of type {type(value).__name__}")
    number = float(value)
    if not np.isfinite(number):
        raise VelofitInputError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (number <= minimum if strict else number < minimum):
        raise VelofitInputError(f"{name} must be a number {'>' if strict else '>='} {minimum}, got {value!r}")
    if maximum is not None and number > maximum:
        raise VelofitInputError(f"{name} must be a number <= {maximum}, got {value!r}")
    return number


def check_bool(name: str, value: object) -> bool:
    """A boolean flag (``True``/``False``; NumPy booleans accepted).

    Parameters
    ----------
    name
        Argument name, for the message.
    value
        Value passed by the user.

    Returns
    -------
    ``bool(value)``.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise VelofitTypeError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}")
    return bool(value)


def check_key(name: str, value: object) -> str:
    """A non-empty string naming a layer or key.

    Parameters
    ----------
    name
        Argument name, for the message.
    value
        Value passed by the user.

    Returns
    -------
    ``value``.
    """
    if not isinstance(value, str):
        raise VelofitTypeError(f"{name} must be a string naming a key, got {value!r} of type {type(value).__name__}")
    if not value:
        raise VelofitInputError(f"{name} must be a non-empty string")
    return value


def check_fit_options(
    *,
    max_iter: object,
    n_explicit: object,
    tol: object,
    t_max: object = 1.0,
    chunk_size: object = None,
    seed: object = 0,
) -> None:
    """Check the options of :func:`velofit.tl.recover_dynamics` (and of the core fit).

    Parameters
    ----------
    max_iter
        Positive integer.
    n_explicit
        Integer in ``[0, max_iter]``.
    tol
        Finite number ``>= 0``.
    t_max
        Finite number ``> 0``.
    chunk_size
        Positive integer or ``None``.
    seed
        Integer ``>= 0`` (a NumPy seed).
    """
    check_int("max_iter", max_iter, minimum=1)
    if not _is_int(n_explicit):
        raise VelofitTypeError(f"n_explicit must be an integer, got {n_explicit!r} of type {type(n_explicit).__name__}")
    if not 0 <= n_explicit <= max_iter:
        raise VelofitInputError(
            f"n_explicit must be an integer in [0, max_iter={max_iter}], got {n_explicit!r}; "
            "lower n_explicit or raise max_iter"
        )
    check_number("tol", tol, minimum=0.0)
    check_number("t_max", t_max, minimum=0.0, strict=True)
    if chunk_size is not None:
        if not _is_int(chunk_size):
            raise VelofitTypeError(
                f"chunk_size must be a positive integer or None, got {chunk_size!r} of type {type(chunk_size).__name__}"
            )
        if chunk_size < 1:
            raise VelofitInputError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    check_int("seed", seed, minimum=0)


# --------------------------------------------------------------------------- AnnData


def check_adata(adata: object, *, min_obs: int = 1, what: str = "velofit") -> AnnData:
    """Check that ``adata`` is a non-empty AnnData.

    Parameters
    ----------
    adata
        Object passed by the user.
    min_obs
        Fewest cells accepted.
    what
        Name of the calling function, for the message.

    Returns
    -------
    The same object, typed.
    """
    if not isinstance(adata, AnnData):
        raise VelofitTypeError(
            f"expected an AnnData, got {type(adata).__name__}; load data with anndata.read_h5ad "
            "or wrap arrays with anndata.AnnData(X, layers={...})"
        )
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise VelofitInputError(
            f"the AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes); nothing to fit"
        )
    if adata.n_obs < min_obs:
        raise VelofitInputError(
            f"{what} needs at least {min_obs} cells, got {adata.n_obs} cell(s); "
            "a gene's dynamics cannot be fitted from fewer cells"
        )
    return adata


def resolve_var_names(adata: AnnData, var_names: str | Sequence[str] | np.ndarray | None) -> np.ndarray:
    """Indices of the genes to use.

    Parameters
    ----------
    adata
        The data.
    var_names
        ``None`` or ``"all"`` for every gene, the name of a boolean ``var`` column (e.g.
        ``"highly_variable"``), a list of gene names, or a boolean mask of length ``n_vars``.

    Returns
    -------
    Sorted integer indices into ``adata.var_names``.
    """
    if var_names is None or (isinstance(var_names, str) and var_names == "all"):
        return np.arange(adata.n_vars)
    if isinstance(var_names, str):
        if var_names in adata.var.columns:
            column = adata.var[var_names]
            if not pd.api.types.is_bool_dtype(column) or column.isna().any():
                raise VelofitInputError(
                    f"var column {var_names!r} (dtype {column.dtype}) is not a boolean column without missing "
                    "values; pass a boolean column (e.g. 'highly_variable'), a list of gene names or a boolean mask"
                )
            mask = np.asarray(column, dtype=bool)
            if not mask.any():
                raise VelofitInputError(f"var column {var_names!r} selects no gene; select at least one gene")
            return np.flatnonzero(mask)
        if var_names not in adata.var_names:
            raise VelofitKeyError(
                f"var_names={var_names!r} is neither a var column nor a gene in adata.var_names; "
                f"var columns are {list(adata.var.columns)[:10]}"
            )
        var_names = [var_names]
    if isinstance(var_names, (pd.Series, pd.Index)):
        var_names = var_names.to_numpy()
    elif not isinstance(var_names, np.ndarray):
        if not isinstance(var_names, Iterable) or isinstance(var_names, (bytes, dict)):
            raise VelofitTypeError(
                f"var_names must be None, 'all', a var column name, a list of gene names or a boolean mask, "
                f"got {type(var_names).__name__}"
            )
        var_names = list(var_names)
    arr = np.asarray(var_names)
    if arr.ndim != 1:
        raise VelofitInputError(f"var_names must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == bool:
        if arr.shape != (adata.n_vars,):
            raise VelofitInputError(
                f"boolean var_names must have length n_vars={adata.n_vars}, got shape {arr.shape}"
            )
        idx = np.flatnonzero(arr)
    else:
        if arr.size and not (arr.dtype.kind in "US" or all(isinstance(x, str) for x in arr.tolist())):
            raise VelofitTypeError(
                f"var_names must be gene names (strings) or a boolean mask, got values of dtype {arr.dtype}; "
                "for positions use adata.var_names[positions]"
            )
        if not adata.var_names.is_unique:
            raise VelofitInputError(
                "adata.var_names are not unique, so gene names are ambiguous; run adata.var_names_make_unique()"
            )
        index = adata.var_names.get_indexer(arr.astype(str))
        missing = arr[index < 0]
        if missing.size:
            raise VelofitKeyError(
                f"{missing.size} gene(s) not in adata.var_names, e.g. {[str(x) for x in missing[:5]]}; "
                "check the spelling or subset var_names to genes present in adata.var_names"
            )
        idx = np.unique(index)
    if idx.size == 0:
        raise VelofitInputError("var_names selects no gene; select at least one gene")
    return idx


def _check_numeric_dtype(dtype: np.dtype, what: str) -> None:
    if not (np.issubdtype(dtype, np.number) or dtype == bool) or np.issubdtype(dtype, np.complexfloating):
        raise VelofitInputError(
            f"{what} has non-numeric dtype {dtype}; expected counts or moments "
            "(convert with .astype(float))"
        )


def _check_values(values: np.ndarray, what: str, names: Sequence[str]) -> None:
    finite = np.isfinite(values)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=0))
        raise VelofitInputError(
            f"{what} contains NaN or inf in {bad.size} gene(s), e.g. "
            f"{[str(names[i]) for i in bad[:5]]}; remove or impute them first"
        )
    negative = values < 0
    if negative.any():
        bad = np.flatnonzero(negative.any(axis=0))
        raise VelofitInputError(
            f"{what} has negative values in {bad.size} gene(s), e.g. "
            f"{[str(names[i]) for i in bad[:5]]}; velofit needs counts or moments (>= 0)"
        )


def moments_layer(adata: AnnData, layer: str):
    """The layer ``layer`` of ``adata``, checked to exist and to have the AnnData's shape.

    Parameters
    ----------
    adata
        Annotated data.
    layer
        Layer name (e.g. ``"Ms"``).

    Returns
    -------
    The layer as stored (dense, sparse, Dask or on-disk array; not copied).
    """
    check_key("layer", layer)
    if layer not in adata.layers:
        present = ", ".join(sorted(adata.layers.keys())) or "none"
        raise VelofitKeyError(
            f"layer {layer!r} not found (layers present: {present}); run velofit.pp.moments(adata) "
            f"to compute 'Ms'/'Mu', or pass spliced_layer=/unspliced_layer= naming your layers"
        )
    matrix = adata.layers[layer]
    if tuple(matrix.shape) != tuple(adata.shape):
        raise VelofitInputError(f"layer {layer!r} has shape {tuple(matrix.shape)}, expected {adata.shape}")
    return matrix


def dense_layer(adata: AnnData, layer: str, genes: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """A layer's columns as a validated dense float array (the AnnData is not modified).

    Parameters
    ----------
    adata
        The data.
    layer
        Layer name.
    genes
        Column indices.
    dtype
        Float type of the result (float32 halves the memory where that precision suffices).

    Returns
    -------
    ``(n_obs, len(genes))`` array of ``dtype``, finite and non-negative.
    """
    matrix = moments_layer(adata, layer)
    _check_numeric_dtype(np.dtype(matrix.dtype), f"layer {layer!r}")
    if sp.issparse(matrix) and matrix.format not in ("csr", "csc"):
        matrix = matrix.tocsc()
    sub = matrix[:, genes]
    values = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
    values = np.array(values, dtype=dtype)  # always a copy: never a view of user data
    _check_values(values, f"layer {layer!r}", list(adata.var_names[genes]))
    return values


def check_moments(mu: object, ms: object) -> tuple[np.ndarray, np.ndarray]:
    """Validate the unspliced and spliced arrays given to the core fit (no AnnData).

    Parameters
    ----------
    mu, ms
        ``(n_cells, n_genes)`` unspliced and spliced moments (dense arrays or SciPy sparse).

    Returns
    -------
    ``(mu, ms)`` as dense float64 arrays, finite and non-negative: the inputs themselves
    where they already are (the fit only reads them), else new arrays.
    """
    out = []
    for name, x in (("mu", mu), ("ms", ms)):
        if sp.issparse(x):
            x = x.toarray()
        try:
            arr = np.asarray(x)
        except Exception as err:  # ragged lists and other non-arrays
            raise VelofitTypeError(f"{name} must be a 2-D numeric array, got {type(x).__name__}") from err
        if arr.ndim != 2:
            raise VelofitInputError(
                f"{name} must be 2-D (cells x genes), got shape {arr.shape}; reshape a single gene with x[:, None]"
            )
        _check_numeric_dtype(arr.dtype, name)
        out.append(np.asarray(arr, dtype=np.float64))
    mu_arr, ms_arr = out
    if mu_arr.shape != ms_arr.shape:
        raise VelofitInputError(
            f"mu and ms must have the same shape (cells x genes), got {mu_arr.shape} and {ms_arr.shape}"
        )
    names = [str(i) for i in range(mu_arr.shape[1])]
    _check_values(mu_arr, "mu", names)
    _check_values(ms_arr, "ms", names)
    return mu_arr, ms_arr
