"""Input checks shared by the AnnData front door: clear errors that name the problem and the fix."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from anndata import AnnData


class VelofitInputError(ValueError):
    """Input data that velofit cannot fit, with a message saying how to fix it."""


class VelofitKeyError(KeyError):
    """A layer, column or key that velofit needs is missing from the AnnData."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


def check_adata(adata: object) -> AnnData:
    """Check that ``adata`` is a non-empty AnnData.

    Parameters
    ----------
    adata
        Object passed by the user.

    Returns
    -------
    The same object, typed.
    """
    if not isinstance(adata, AnnData):
        raise TypeError(f"expected an AnnData, got {type(adata).__name__}; load data with anndata.read_h5ad")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise VelofitInputError(
            f"the AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes); nothing to fit"
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
            mask = np.asarray(adata.var[var_names], dtype=bool)
            if not mask.any():
                raise VelofitInputError(f"var column {var_names!r} selects no gene")
            return np.flatnonzero(mask)
        var_names = [var_names]
    arr = np.asarray(var_names)
    if arr.dtype == bool:
        if arr.shape != (adata.n_vars,):
            raise VelofitInputError(f"boolean var_names must have length n_vars={adata.n_vars}, got {arr.shape}")
        idx = np.flatnonzero(arr)
    else:
        index = adata.var_names.get_indexer(arr.astype(str))
        missing = arr[index < 0]
        if missing.size:
            raise VelofitKeyError(
                f"{missing.size} gene(s) not in adata.var_names, e.g. {list(missing[:5])}"
            )
        idx = np.unique(index)
    if idx.size == 0:
        raise VelofitInputError("var_names selects no gene")
    return idx


def dense_layer(adata: AnnData, layer: str, genes: np.ndarray) -> np.ndarray:
    """A layer's columns as a validated dense float64 array (the AnnData is not modified).

    Parameters
    ----------
    adata
        The data.
    layer
        Layer name.
    genes
        Column indices.

    Returns
    -------
    ``(n_obs, len(genes))`` float64 array, finite and non-negative.
    """
    if layer not in adata.layers:
        present = ", ".join(sorted(adata.layers.keys())) or "none"
        raise VelofitKeyError(
            f"layer {layer!r} not found (layers present: {present}); run velofit.pp.moments(adata) "
            f"to compute 'Ms'/'Mu', or pass spliced_layer=/unspliced_layer= naming your layers"
        )
    matrix = adata.layers[layer]
    if matrix.shape != adata.shape:
        raise VelofitInputError(f"layer {layer!r} has shape {matrix.shape}, expected {adata.shape}")
    dtype = matrix.dtype
    if not (np.issubdtype(dtype, np.number) or dtype == bool) or np.issubdtype(dtype, np.complexfloating):
        raise VelofitInputError(f"layer {layer!r} has non-numeric dtype {dtype}; expected counts or moments")
    sub = matrix[:, genes]
    values = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
    values = np.array(values, dtype=np.float64)  # always a copy: never a view of user data
    if not np.all(np.isfinite(values)):
        bad = np.flatnonzero(~np.all(np.isfinite(values), axis=0))
        raise VelofitInputError(
            f"layer {layer!r} contains NaN or inf in {bad.size} gene(s), e.g. "
            f"{list(adata.var_names[genes[bad[:5]]])}; remove or impute them first"
        )
    if np.any(values < 0):
        bad = np.flatnonzero(np.any(values < 0, axis=0))
        raise VelofitInputError(
            f"layer {layer!r} has negative values in {bad.size} gene(s), e.g. "
            f"{list(adata.var_names[genes[bad[:5]]])}; velofit needs counts or moments (>= 0)"
        )
    return values
