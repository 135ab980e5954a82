"""Make the README's example figures from the pancreas demo's output.

Run from the project's root::

    velofit demo --pancreas ../shared/data/pancreas_739.h5ad -o velofit_demo
    python docs/make_figures.py velofit_demo/demo.h5ad
"""

from __future__ import annotations

import sys
from pathlib import Path

import anndata
import matplotlib

import velofit as vf


def main(demo_h5ad: str) -> None:
    """Write ``docs/pancreas_velocity_stream.png`` and ``docs/pancreas_latent_time.png``.

    Parameters
    ----------
    demo_h5ad
        The ``demo.h5ad`` written by ``velofit demo`` on the pancreas data (with a UMAP).
    """
    matplotlib.use("Agg")
    adata = anndata.read_h5ad(demo_h5ad)
    docs = Path(__file__).resolve().parent
    vf.pl.velocity_embedding_stream(adata, basis="umap").savefig(
        docs / "pancreas_velocity_stream.png", dpi=100, bbox_inches="tight")
    vf.pl.latent_time(adata, basis="umap").savefig(docs / "pancreas_latent_time.png", dpi=100, bbox_inches="tight")


if __name__ == "__main__":
    main(sys.argv[1])
