"""Command line: ``velofit demo | fit | report | simulate`` (``velofit COMMAND --help`` for each).

Outputs are written atomically (a temporary file in the destination's folder, then
``os.replace``), so an interrupted run (Ctrl-C, SIGTERM) leaves no partial file. Errors in the
input print one line ``velofit: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Exit status for bad input or arguments (as argparse).
EXIT_USAGE = 2
#: Exit status after SIGINT (128 + 2, the shell convention).
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A problem with the command's arguments or files, reported as one line (exit status 2)."""


class Terminated(SystemExit):
    """Raised by the SIGTERM handler so that cleanup in ``finally`` blocks runs."""


# ------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``velofit`` command.

    Returns
    -------
    An :class:`argparse.ArgumentParser` with the subcommands ``demo``, ``fit``, ``report`` and
    ``simulate``.
    """
    parser = argparse.ArgumentParser(
        prog="velofit",
        description="Fit the dynamical model of RNA velocity (scVelo-compatible output), fast.",
        epilog="Run 'velofit COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

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
    demo.add_argument("--n-obs", type=_positive_int, default=2000, help="simulated cells (default: 2000)")
    demo.add_argument("--n-vars", type=_positive_int, default=100, help="simulated genes (default: 100)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the simulation (default: 0)")
    demo.add_argument("--pancreas", type=Path, metavar="PATH",
                      help="use this pancreas .h5ad (raw spliced/unspliced counts) instead of simulated data")
    demo.add_argument("--simulate", action="store_true",
                      help="use simulated data even if the shared pancreas file is present")
    demo.add_argument("--download", action="store_true",
                      help="download scVelo's pancreas data set (3,696 cells) if not cached; falls back to "
                           "simulated data when the download fails")
    _add_fit_options(demo)

    fit = commands.add_parser(
        "fit",
        help="fit the dynamical model to an .h5ad or .loom file",
        description=(
            "Read IN (.h5ad, or .loom via anndata.read_loom); if layers Ms/Mu are absent, preprocess "
            "(velofit.pp.filter_and_normalize, velofit.pp.moments, needing raw layers spliced/unspliced); "
            "fit (velofit.tl.recover_dynamics), compute velocities, the velocity graph (when a kNN graph "
            "is present) and latent time; write OUT.h5ad atomically. The input file is never modified "
            "unless --in-place."
        ),
    )
    fit.add_argument("input", type=Path, metavar="IN", help="input .h5ad or .loom file")
    fit.add_argument("-o", "--output", type=Path, metavar="OUT",
                     help="output .h5ad file (required unless --in-place)")
    fit.add_argument("--mode", choices=["gene"], default="gene",
                     help="model: 'gene' fits each gene on its own clock (scVelo's dynamical model; default)")
    fit.add_argument("--var-names", choices=["all", "highly_variable"], default=None,
                     help="genes to fit (default: var['highly_variable'] when that column exists, else all)")
    fit.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    fit.add_argument("--in-place", action="store_true",
                     help="write the results back into IN (an .h5ad); -o must then be omitted or equal IN")
    fit.add_argument("--umap", action="store_true",
                     help="compute a UMAP (scanpy) when absent and project the velocities onto it")
    _add_fit_options(fit)
    _add_preprocessing_options(fit)

    report = commands.add_parser(
        "report",
        help="write a self-contained HTML report of a fitted .h5ad",
        description=(
            "Summary, top genes with phase portraits, latent time, velocity stream, time prior/posterior, "
            "convergence and run parameters, with figures embedded as PNG: one file, no other assets."
        ),
    )
    report.add_argument("input", type=Path, metavar="IN", help="fitted .h5ad (from 'velofit fit')")
    report.add_argument("-o", "--output", type=Path, metavar="HTML",
                        help="report file (default: IN with the suffix .html)")
    report.add_argument("--overwrite", action="store_true", help="replace the report if it exists")

    simulate = commands.add_parser(
        "simulate",
        help="write simulated data with known truth (velofit.datasets.simulate)",
        description="Simulate cells from the dynamical model and write them, with the true parameters, to OUT.",
    )
    simulate.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="output .h5ad file")
    simulate.add_argument("--n-obs", type=_positive_int, default=1000, help="cells (default: 1000)")
    simulate.add_argument("--n-vars", type=_positive_int, default=100, help="genes (default: 100)")
    simulate.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    simulate.add_argument("--noise", type=_non_negative_float, default=0.1,
                          help="noise of Ms/Mu relative to each gene's 99th percentile (default: 0.1)")
    simulate.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    demo.set_defaults(func=_run_demo)
    fit.set_defaults(func=_run_fit)
    report.set_defaults(func=_run_report)
    simulate.set_defaults(func=_run_simulate)
    return parser


def _bounded(kind: type, low: float, what: str):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value >= low:  # also rejects nan
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    convert.__name__ = what  # argparse names the type in its messages
    return convert


_positive_int = _bounded(int, 1, "an integer >= 1")
_non_negative_int = _bounded(int, 0, "an integer >= 0")
_at_least_two = _bounded(int, 2, "an integer >= 2")
_non_negative_float = _bounded(float, 0.0, "a number >= 0")


def _add_fit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-iter", type=_positive_int, default=None,
                        help="EM iterations per gene (default: that of velofit.tl.recover_dynamics)")
    parser.add_argument("--n-explicit", type=_non_negative_int, default=None,
                        help="leading iterations with the explicit (closed-form) time assignment, at most "
                             "--max-iter (default: that of velofit.tl.recover_dynamics)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not keep compiled code in $VELOFIT_CACHE/jax (default ~/.cache/velofit/jax); "
                             "the cache lets later runs skip about a minute of compilation")


def _add_preprocessing_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("preprocessing (only when layers Ms/Mu are absent)")
    group.add_argument("--min-shared-counts", type=_non_negative_int, default=20,
                       help="drop genes with fewer shared spliced+unspliced counts (default: 20)")
    group.add_argument("--n-top-genes", type=_positive_int, default=2000, help="highly variable genes kept (default: 2000)")
    group.add_argument("--n-pcs", type=_positive_int, default=30, help="principal components of the kNN graph (default: 30)")
    group.add_argument("--n-neighbors", type=_at_least_two, default=30, help="neighbours of the moments (default: 30)")


# --------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``velofit`` command line.

    Parameters
    ----------
    argv
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    Exit status: 0 on success, 2 for bad arguments or input (one ``velofit: error:`` line on
    stderr), 130 after SIGINT and 143 after SIGTERM (no partial output is left).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from ._validation import VelofitInputError, VelofitKeyError

    with _interruptible():
        try:
            return int(args.func(args) or 0)
        except (CliError, VelofitInputError, VelofitKeyError, FileNotFoundError) as error:
            message = str(error) if not isinstance(error, FileNotFoundError) else _missing_file(error)
            print(f"velofit: error: {message}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("velofit: interrupted; no partial output file was left", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Terminated as stop:
            print("velofit: terminated; no partial output file was left", file=sys.stderr)
            return int(stop.code)


@contextmanager
def _interruptible() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt and SIGTERM raises :class:`Terminated` (then restored)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Terminated(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGINT, on_sigint), (signal.SIGTERM, on_sigterm))}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- commands


def _run_simulate(args: argparse.Namespace) -> int:
    output = _check_output(args.output, overwrite=args.overwrite)
    import velofit as vf

    adata = vf.datasets.simulate(args.n_obs, args.n_vars, seed=args.seed, noise=args.noise)
    write_h5ad_atomic(adata, output)
    print(f"velofit: wrote {output} ({adata.n_obs} cells x {adata.n_vars} genes, seed {args.seed})")
    return 0


def _run_fit(args: argparse.Namespace) -> int:
    source: Path = args.input
    if not source.is_file():
        raise CliError(f"input file {str(source)!r} not found")
    if args.in_place:
        if source.suffix != ".h5ad":
            raise CliError(f"--in-place needs an .h5ad input, got {source.name!r}; write to -o OUT.h5ad instead")
        if args.output is not None and not _same_file(args.output, source):
            raise CliError("--in-place writes into IN: omit -o or give IN itself")
        output = source
    else:
        if args.output is None:
            raise CliError("no output given: pass -o OUT.h5ad (or --in-place to write into IN)")
        if _same_file(args.output, source):
            raise CliError(f"OUT is the input file {str(source)!r}; pass --in-place to write into it")
        output = _check_output(args.output, overwrite=args.overwrite)
    _enable_compile_cache(args.no_compile_cache)

    adata = read_input(source)
    start = time.perf_counter()
    if not {"Ms", "Mu"} <= set(adata.layers.keys()):
        _preprocess(adata, args)
    var_names = args.var_names or ("highly_variable" if _has_true(adata, "highly_variable") else "all")
    fit_and_derive(adata, args, var_names=var_names, umap=args.umap)
    adata.uns["velofit_cli"] = {
        "command": "fit",
        "input": str(source),
        "mode": args.mode,
        "var_names": var_names,
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_h5ad_atomic(adata, output)
    n_fit = int((adata.var["fit_status"] == "ok").sum())
    print(f"velofit: wrote {output}: {n_fit} of {adata.n_vars} genes fitted on {adata.n_obs} cells "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def _run_report(args: argparse.Namespace) -> int:
    source: Path = args.input
    if not source.is_file():
        raise CliError(f"input file {str(source)!r} not found")
    output = _check_output(args.output or source.with_suffix(".html"), overwrite=args.overwrite, suffix=".html")
    adata = read_input(source)
    from ._report import write_report

    write_report(adata, output, source=source.name)
    print(f"velofit: wrote {output}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    outdir: Path = args.outdir
    if outdir.exists() and not outdir.is_dir():
        raise CliError(f"{str(outdir)!r} exists and is not a folder; pick another -o OUTDIR")
    if args.pancreas is not None and not args.pancreas.is_file():
        raise CliError(f"--pancreas: file {str(args.pancreas)!r} not found")
    outdir.mkdir(parents=True, exist_ok=True)
    _enable_compile_cache(args.no_compile_cache)

    import velofit as vf

    from ._report import write_atomic, write_report

    adata, kind = _demo_data(args)
    print(f"velofit demo: {kind} data, {adata.n_obs} cells x {adata.n_vars} genes", file=sys.stderr, flush=True)
    start = time.perf_counter()
    if kind == "simulated":
        _simulated_graph(adata)  # the fit uses the simulator's Ms/Mu as they are
    else:
        _preprocess(adata, argparse.Namespace(min_shared_counts=20, n_top_genes=2000, n_pcs=30, n_neighbors=30))
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


# --------------------------------------------------------------------------- pipeline


def read_input(path: Path):
    """Read an ``.h5ad`` or ``.loom`` file into memory (the file is closed afterwards).

    Parameters
    ----------
    path
        Input file.

    Returns
    -------
    The AnnData, with unique ``var_names``.
    """
    import anndata

    try:
        if path.suffix == ".loom":
            read_loom = getattr(getattr(anndata, "io", None), "read_loom", None) or anndata.read_loom
            adata = read_loom(path)
        else:
            adata = anndata.read_h5ad(path)
    except (OSError, KeyError, ValueError) as error:
        raise CliError(f"cannot read {str(path)!r} as {'loom' if path.suffix == '.loom' else 'h5ad'}: {error}") from error
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    return adata


def fit_and_derive(adata, args: argparse.Namespace, *, var_names: str, umap: bool) -> float:
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

    n_genes = adata.n_vars if var_names == "all" else int(_has_true(adata, var_names, count=True))
    print(f"velofit: fitting {n_genes} genes x {adata.n_obs} cells", file=sys.stderr, flush=True)
    start = time.perf_counter()
    options = {key: getattr(args, key) for key in ("max_iter", "n_explicit") if getattr(args, key) is not None}
    vf.tl.recover_dynamics(adata, var_names=var_names, progress=not args.no_progress, **options)
    seconds = time.perf_counter() - start
    vf.tl.velocity(adata)
    _derive_graph(adata, umap=umap)
    if hasattr(vf.tl, "latent_time"):
        vf.tl.latent_time(adata)
    return seconds


def _derive_graph(adata, *, umap: bool) -> None:
    from .tl._embedding import velocity_embedding, velocity_graph

    if "connectivities" not in adata.obsp:
        return
    if not _has_true(adata, "velocity_genes"):
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


def _preprocess(adata, args: argparse.Namespace) -> None:
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


def _simulated_graph(adata) -> None:
    """kNN graph and PCA of simulated moments (the fit used the simulator's Ms/Mu as they are)."""
    import anndata
    import numpy as np
    import scanpy as sc

    view = anndata.AnnData(np.log1p(np.asarray(adata.layers["Ms"], dtype=np.float32)))
    sc.pp.pca(view, n_comps=max(2, min(30, adata.n_obs - 1, adata.n_vars - 1)))
    adata.obsm["X_pca"] = view.obsm["X_pca"]
    # Gaussian-kernel connectivities: no numba compilation (about half a minute) for a demo.
    sc.pp.neighbors(adata, n_neighbors=min(30, adata.n_obs - 1), use_rep="X_pca", method="gauss")


def _demo_data(args: argparse.Namespace):
    import velofit as vf

    def simulated():
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
    return simulated()


def demo_summary(adata) -> list[tuple[str, str]]:
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
        col = lambda key: v[key].to_numpy(dtype=float)  # noqa: E731
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


# --------------------------------------------------------------------------------- files


def write_h5ad_atomic(adata, path: Path) -> None:
    """Write ``adata`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Parameters
    ----------
    adata
        Data to write.
    path
        Destination ``.h5ad``; replaced only once the new file is complete.
    """
    from ._report import write_atomic

    write_atomic(path, adata.write_h5ad)


def _check_output(path: Path, *, overwrite: bool, suffix: str = ".h5ad") -> Path:
    if path.suffix != suffix:
        raise CliError(f"output {str(path)!r} must end with {suffix}")
    if path.is_dir():
        raise CliError(f"output {str(path)!r} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise CliError(f"output {str(path)!r} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise CliError(f"folder {str(path.parent)!r} of the output does not exist; create it first")
    return path


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _missing_file(error: FileNotFoundError) -> str:
    return str(error) if error.filename is None else f"file {str(error.filename)!r} not found"


def _enable_compile_cache(disabled: bool) -> None:
    """Keep JAX's compiled code on disk (the CLI owns its process; the library never does this)."""
    if disabled or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    directory = Path(os.environ.get("VELOFIT_CACHE") or Path.home() / ".cache" / "velofit") / "jax"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(directory))


def _has_true(adata, column: str, *, count: bool = False):
    import numpy as np

    if column not in adata.var.columns:
        return 0 if count else False
    values = np.asarray(adata.var[column], dtype=bool)
    return int(values.sum()) if count else bool(values.any())


def _top_genes(adata, n: int) -> list[str]:
    var = adata.var
    fitted = var[var["fit_status"] == "ok"]
    return list(fitted.sort_values("fit_likelihood", ascending=False).index[:n])


def _version() -> str:
    from . import __version__

    return __version__
