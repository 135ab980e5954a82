"""The analysis every command runs: preprocessing, the fit and what derives from it."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from ._common import CliError, at_least_two, non_negative_int, positive_int

if TYPE_CHECKING:
    from anndata import AnnData


def add_preprocessing_options(parser: argparse.ArgumentParser) -> None:
    """Add the preprocessing options (``fit``; the demo uses the defaults).

    Parameters
    ----------
    parser
        Subcommand parser, extended in place.
    """
    group = parser.add_argument_group("preprocessing (only when layers Ms/Mu are absent)")
    group.add_argument("--min-shared-counts", type=non_negative_int, default=20,
                       help="drop genes with fewer shared spliced+unspliced counts (default: 20)")
    group.add_argument("--n-top-genes", type=positive_int, default=2000, help="highly variable genes kept (default: 2000)")
    group.add_argument("--n-pcs", type=positive_int, default=30, help="principal components of the kNN graph (default: 30)")
    group.add_argument("--n-neighbors", type=at_least_two, default=30, help="neighbours of the moments (default: 30)")


def preprocess(adata: AnnData, args: argparse.Namespace) -> None:
    """Filter, normalise and compute moments (layers ``Ms``/``Mu``) from raw counts, in place.

    Parameters
    ----------
    adata
        Data with layers ``spliced`` and ``unspliced``.
    args
        ``min_shared_counts``, ``n_top_genes``, ``n_pcs`` and ``n_neighbors``.

    Raises
    ------
    CliError
        The raw layers are missing.
    """
    import velofit as vf

    missing = [key for key in ("spliced", "unspliced") if key not in adata.layers]
    if missing:
        present = ", ".join(adata.layers.keys()) or "none"
        raise CliError(
            f"the input has neither moments (layers Ms/Mu) nor raw counts (missing layers {missing}; "
            f"present: {present}); give a file with spliced/unspliced counts, e.g. from velocyto"
        )
    print("velofit: preprocessing (filter_and_normalize, moments)", file=sys.stderr, flush=True)
    vf.pp.filter_and_normalize(adata, min_shared_counts=args.min_shared_counts, n_top_genes=args.n_top_genes)
    vf.pp.moments(adata, n_pcs=args.n_pcs, n_neighbors=min(args.n_neighbors, adata.n_obs - 1))


def fit_and_derive(adata: AnnData, args: argparse.Namespace, *, var_names: str, umap: bool) -> float:
    """Fit, then velocities, the velocity graph, an embedding projection and latent time.

    Parameters
    ----------
    adata
        Data with layers ``Ms``/``Mu``; modified in place.
    args
        Parsed options (``max_iter`` and ``n_explicit``, ``None`` for the library's defaults;
        ``no_progress``).
    var_names
        Genes to fit (``"all"`` or a boolean ``var`` column).
    umap
        Compute a UMAP when absent (needs the kNN graph).

    Returns
    -------
    Seconds spent in :func:`velofit.tl.recover_dynamics`.
    """
    import velofit as vf

    n_genes = adata.n_vars if var_names == "all" else int(has_true(adata, var_names, count=True))
    print(f"velofit: fitting {n_genes} genes x {adata.n_obs} cells", file=sys.stderr, flush=True)
    start = time.perf_counter()
    options = {key: getattr(args, key) for key in ("max_iter", "n_explicit") if getattr(args, key) is not None}
    vf.tl.recover_dynamics(adata, var_names=var_names, progress=not args.no_progress, **options)
    seconds = time.perf_counter() - start
    vf.tl.velocity(adata)
    _derive_graph(adata, umap=umap)
    vf.tl.latent_time(adata)
    return seconds


def _derive_graph(adata: AnnData, *, umap: bool) -> None:
    from ..tl._embedding import velocity_embedding, velocity_graph

    if "connectivities" not in adata.obsp:
        return
    if not has_true(adata, "velocity_genes"):
        print("velofit: no velocity gene passed the likelihood threshold; skipping the velocity graph",
              file=sys.stderr)
        return
    velocity_graph(adata)
    if umap and "X_umap" not in adata.obsm:
        import scanpy as sc

        sc.tl.umap(adata, random_state=0)
    for basis in ("umap", "pca"):
        if f"X_{basis}" in adata.obsm:
            velocity_embedding(adata, basis=basis)


def has_true(adata: AnnData, column: str, *, count: bool = False) -> bool | int:
    """Whether the boolean ``var`` column exists and has a true entry (or, with ``count``, how many)."""
    import numpy as np

    if column not in adata.var.columns:
        return 0 if count else False
    values = np.asarray(adata.var[column], dtype=bool)
    return int(values.sum()) if count else bool(values.any())
