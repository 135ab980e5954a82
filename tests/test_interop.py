"""Our output read by the rest of the ecosystem: CellRank's VelocityKernel and velocyto's ``.loom``.

scVelo's ``velocity_graph``, ``velocity_embedding`` and ``velocity_embedding_stream`` on our
output are tested in ``test_embedding.py``; a ``.loom`` written by anndata through the CLI in
``test_cli.py``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import ModuleType

import anndata
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

import velofit as vf
from velofit.cli import read_input

N_OBS, N_VARS = 300, 20  # the shapes of the other test files: compiled EM code comes from the cache


@pytest.fixture(scope="module")
def fitted() -> anndata.AnnData:
    """Simulated cells fitted by velofit, with a scanpy kNN graph (as after ``velofit fit``)."""
    adata = vf.datasets.simulate(N_OBS, N_VARS, seed=0)
    vf.tl.recover_dynamics(adata, max_iter=5, n_explicit=3, progress=False)
    vf.tl.velocity(adata)
    adata.obsm["X_pca"] = sc.pp.pca(np.log1p(np.asarray(adata.layers["Ms"])), n_comps=10)
    # Gaussian-kernel connectivities: no numba compilation of UMAP's graph.
    sc.pp.neighbors(adata, n_neighbors=15, use_rep="X_pca", method="gauss")
    return adata


@pytest.fixture
def cellrank(monkeypatch) -> ModuleType:
    """CellRank, with numpy's ``assert_array_equal`` accepting the keywords CellRank 2.0 passes.

    CellRank 2.0.7 (the last release for Python 3.11) calls
    ``np.testing.assert_array_equal(x=..., y=...)``; numpy 2.4 renamed those parameters to
    ``actual`` and ``desired``, so the kernel raises ``TypeError`` before reading any data.
    The wrapper only renames the keywords; every computation is CellRank's.
    """
    module = pytest.importorskip(
        "cellrank",
        reason="cellrank is not installed: it is not in the test extra, as every release needs "
               "pygam (scipy < 1.17) and pygpcca (jinja2 == 3.0.3); see README.md, 'Interoperability'",
    )
    original = np.testing.assert_array_equal
    if "x" not in inspect.signature(original).parameters:

        def assert_array_equal(*args, x=None, y=None, **kwargs) -> None:
            original(*((x, y) if x is not None else ()), *args, **kwargs)

        monkeypatch.setattr(np.testing, "assert_array_equal", assert_array_equal)
    return module


@pytest.mark.slow  # CellRank estimates its softmax scale and compiles its kernels: ~20 s
def test_cellrank_velocity_kernel_reads_our_output(fitted, cellrank):
    adata = fitted.copy()
    kernel = cellrank.kernels.VelocityKernel(adata)
    kernel.compute_transition_matrix(show_progress_bar=False)
    transition = sp.csr_matrix(kernel.transition_matrix)
    assert transition.shape == (N_OBS, N_OBS)
    assert np.all(np.isfinite(transition.data)) and np.all(transition.data >= 0)
    np.testing.assert_allclose(np.asarray(transition.sum(axis=1)).ravel(), 1.0, atol=1e-10)
    # Transitions stay on the kNN graph and, on average, lead forward in the true time.
    assert (transition.astype(bool) > fitted.obsp["connectivities"].astype(bool)).nnz == 0
    true_t = adata.obs["true_t"].to_numpy(dtype=np.float64)
    assert np.mean(transition @ true_t > true_t) > 0.7


def _write_velocyto_loom(path: Path, counts: dict[str, np.ndarray], genes: list[str], cells: list[str]) -> None:
    """A ``.loom`` in velocyto's layout: genes x cells, main matrix = spliced, rows ``Gene``, columns ``CellID``."""
    import loompy

    layers = {"": counts["spliced"].T, **{name: value.T for name, value in counts.items()}}
    loompy.create(str(path), layers, row_attrs={"Gene": np.array(genes), "Accession": np.array(
        [f"ENSMUSG{i:011d}" for i in range(len(genes))])}, col_attrs={"CellID": np.array(cells)})


def test_velocyto_loom_reads_through_anndata(tmp_path):
    rng = np.random.default_rng(0)
    shape = (30, 4)
    counts = {key: rng.poisson(3.0, shape).astype(np.int64) for key in ("spliced", "unspliced", "ambiguous")}
    genes = ["Pyy", "Sst", "Pyy", "Ghrl"]  # velocyto keeps duplicated gene symbols
    cells = [f"sample1:{'ACGT' * 3}{i:04d}x" for i in range(shape[0])]
    path = tmp_path / "sample1.loom"
    _write_velocyto_loom(path, counts, genes, cells)

    adata = read_input(path)
    assert list(adata.obs_names) == cells
    assert list(adata.var_names) == ["Pyy", "Sst", "Pyy-1", "Ghrl"]  # made unique, order kept
    assert adata.var["Accession"].iloc[3] == "ENSMUSG00000000003"
    for key, value in counts.items():
        np.testing.assert_array_equal(sp.csr_matrix(adata.layers[key]).toarray(), value)
