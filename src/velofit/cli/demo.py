"""``velofit demo``: the whole path on simulated data (or the pancreas data), with a report."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ._common import CliError, add_fit_options, configure_compile_cache, positive_int
from ._files import write_h5ad_atomic
from ._pipeline import fit_and_derive, preprocess

if TYPE_CHECKING:
    from anndata import AnnData


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand.

    Parameters
    ----------
    commands
        The subparsers of the ``velofit`` parser.
    """
    demo = commands.add_parser(
        "demo",
        help="run the whole pipeline on data velofit makes itself (or the pancreas data) and write a report",
        description=(
            "Run preprocessing (real data), the fit, velocities, the velocity graph and latent time, then "
            "write OUTDIR/demo.h5ad, OUTDIR/phase_portraits.png and OUTDIR/report.html. Data: simulated "
            "by velofit.datasets.simulate (with known truth, compared in a table), unless --pancreas is "
            "given or the project's shared pancreas file (../shared/data/pancreas_739.h5ad) is found. "
            "Needs no network unless --download is passed."
        ),
    )
    demo.add_argument("-o", "--outdir", type=Path, default=Path("velofit_demo"),
                      help="output folder, created if needed (default: ./velofit_demo)")
    demo.add_argument("--n-obs", type=positive_int, default=2000, help="simulated cells (default: 2000)")
    demo.add_argument("--n-vars", type=positive_int, default=100, help="simulated genes (default: 100)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the simulation (default: 0)")
    demo.add_argument("--pancreas", type=Path, metavar="PATH",
                      help="use this pancreas .h5ad (raw spliced/unspliced counts) instead of simulated data")
    demo.add_argument("--simulate", action="store_true",
                      help="use simulated data even if the shared pancreas file is present")
    demo.add_argument("--download", action="store_true",
                      help="download scVelo's pancreas data set (3,696 cells) if not cached; falls back to "
                           "simulated data when the download fails")
    add_fit_options(demo)
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and write its folder.

    Parameters
    ----------
    args
        The parsed ``demo`` options.

    Returns
    -------
    Exit status 0.
    """
    outdir: Path = args.outdir
    if outdir.exists() and not outdir.is_dir():
        raise CliError(f"{str(outdir)!r} exists and is not a folder; pick another -o OUTDIR")
    if args.pancreas is not None and not args.pancreas.is_file():
        raise CliError(f"--pancreas: file {str(args.pancreas)!r} not found")
    outdir.mkdir(parents=True, exist_ok=True)
    configure_compile_cache(args.no_compile_cache)

    import velofit as vf

    from .._report import write_atomic, write_report

    adata, kind = demo_data(args)
    print(f"velofit demo: {kind} data, {adata.n_obs} cells x {adata.n_vars} genes", file=sys.stderr, flush=True)
    start = time.perf_counter()
    if kind == "simulated":
        _simulated_graph(adata)  # the fit uses the simulator's Ms/Mu as they are
    else:
        preprocess(adata, argparse.Namespace(min_shared_counts=20, n_top_genes=2000, n_pcs=30, n_neighbors=30))
    fit_seconds = fit_and_derive(adata, args, var_names="all", umap=kind != "simulated")
    total = time.perf_counter() - start
    adata.uns["velofit_cli"] = {"command": "demo", "data": kind, "seconds": round(total, 3)}

    print(f"\n{kind} data: {int((adata.var['fit_status'] == 'ok').sum())} of {adata.n_vars} genes fitted; "
          f"recover_dynamics {fit_seconds:.1f} s, whole run {total:.1f} s")
    for label, value in demo_summary(adata):
        print(f"  {label:<52} {value}")

    h5ad, png, html_file = outdir / "demo.h5ad", outdir / "phase_portraits.png", outdir / "report.html"
    write_h5ad_atomic(adata, h5ad)
    genes = _top_genes(adata, 4)
    if genes:
        write_atomic(png, lambda tmp: vf.pl.phase_portrait(adata, genes).savefig(tmp, format="png", dpi=110))
    write_report(adata, html_file, source=f"velofit demo ({kind} data)")
    print(f"\nvelofit demo: wrote {h5ad}, {png if genes else '(no fitted gene: no phase portraits)'}, {html_file}")
    return 0


def demo_data(args: argparse.Namespace) -> tuple[AnnData, str]:
    """The demo's data: simulated, a given pancreas file, the download, or the shared copy.

    Parameters
    ----------
    args
        ``simulate``, ``pancreas``, ``download``, ``n_obs``, ``n_vars`` and ``seed``.

    Returns
    -------
    The data and its kind, ``"simulated"`` or ``"pancreas"``. A failed download, or no
    pancreas data at all without ``--simulate``, prints one line on stderr and falls back to
    simulated data.
    """
    import velofit as vf

    def simulated() -> tuple[AnnData, str]:
        return vf.datasets.simulate(args.n_obs, args.n_vars, seed=args.seed), "simulated"

    if args.simulate:
        return simulated()
    if args.pancreas is not None:
        return vf.datasets.pancreas(args.pancreas), "pancreas"
    if args.download:
        try:
            return vf.datasets.pancreas(), "pancreas"
        except OSError as error:
            print(f"velofit demo: pancreas download failed ({type(error).__name__}: {error}); "
                  f"using simulated data instead", file=sys.stderr)
            return simulated()
    shared = vf.datasets.shared_pancreas_path()
    if shared is not None:
        return vf.datasets.pancreas(shared), "pancreas"
    print("velofit demo: no local pancreas data (use --download or --pancreas PATH for the real data); "
          "using the built-in simulator", file=sys.stderr)
    return simulated()


def demo_summary(adata: AnnData) -> list[tuple[str, str]]:
    """Recovered-versus-true rows for simulated data, or latent-time order for the pancreas.

    Parameters
    ----------
    adata
        Fitted data; simulated data carry ``var["true_*"]`` and ``obs["true_t"]``.

    Returns
    -------
    ``(label, value)`` rows.
    """
    import numpy as np
    from scipy.stats import spearmanr

    var, rows = adata.var, []
    fitted = np.asarray(var["fit_status"] == "ok")
    if "true_gamma" in var.columns and fitted.any():
        v = var[fitted]

        def col(key: str) -> np.ndarray:
            return v[key].to_numpy(dtype=float)

        true_ratio = col("true_gamma") * col("true_scaling") / col("true_beta")
        fit_ratio = col("fit_gamma") / col("fit_beta")
        rows.append(("median relative error of gamma/beta", f"{np.median(np.abs(fit_ratio / true_ratio - 1)):.3f}"))
        # The clock's unit is not identifiable: match each gene's fitted clock to the true one
        # (least squares through 0), then compare alpha in observed units (alpha * scaling).
        t_fit = np.asarray(adata.layers["fit_t"])[:, fitted]
        t_true = adata.obs["true_t"].to_numpy(dtype=float)[:, None]
        clock = np.nansum(t_fit * t_true, axis=0) / np.sum(t_true**2)
        alpha = col("fit_alpha") * col("fit_scaling") * clock
        true_alpha = col("true_alpha") * col("true_scaling")
        rows.append(("median relative error of alpha (clock matched)", f"{np.median(np.abs(alpha / true_alpha - 1)):.3f}"))
        rho = [spearmanr(t_fit[:, g], t_true[:, 0])[0] for g in range(t_fit.shape[1])]
        rows.append(("median Spearman(fitted time of a gene, true time)", f"{np.nanmedian(rho):.3f}"))
        if "latent_time" in adata.obs.columns:
            rows.append(("Spearman(latent_time, true time)",
                         f"{spearmanr(adata.obs['latent_time'], adata.obs['true_t'])[0]:.3f}"))
    if "clusters" in adata.obs.columns and "latent_time" in adata.obs.columns:
        order = {"Ductal": 0, "Ngn3 low EP": 1, "Ngn3 high EP": 2, "Pre-endocrine": 3,
                 "Alpha": 4, "Beta": 4, "Delta": 4, "Epsilon": 4}
        stage = adata.obs["clusters"].astype(str).map(order)
        if stage.notna().all():
            rows.append(("Spearman(latent_time, known stage order)",
                         f"{spearmanr(adata.obs['latent_time'], stage)[0]:.3f}"))
    return rows


def _simulated_graph(adata: AnnData) -> None:
    """kNN graph and PCA of simulated moments (the fit used the simulator's Ms/Mu as they are)."""
    import anndata
    import numpy as np
    import scanpy as sc

    view = anndata.AnnData(np.log1p(np.asarray(adata.layers["Ms"], dtype=np.float32)))
    sc.pp.pca(view, n_comps=max(2, min(30, adata.n_obs - 1, adata.n_vars - 1)))
    adata.obsm["X_pca"] = view.obsm["X_pca"]
    # Gaussian-kernel connectivities: no numba compilation (about half a minute) for a demo.
    sc.pp.neighbors(adata, n_neighbors=min(30, adata.n_obs - 1), use_rep="X_pca", method="gauss")


def _top_genes(adata: AnnData, n: int) -> list[str]:
    var = adata.var
    fitted = var[var["fit_status"] == "ok"]
    return list(fitted.sort_values("fit_likelihood", ascending=False).index[:n])
