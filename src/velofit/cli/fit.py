"""``velofit fit``: fit the dynamical model to an ``.h5ad`` or ``.loom`` file."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ._common import CliError, add_fit_options, configure_compile_cache
from ._files import check_output, read_input, same_file, write_h5ad_atomic
from ._pipeline import add_preprocessing_options, fit_and_derive, has_true, preprocess


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``fit`` subcommand.

    Parameters
    ----------
    commands
        The subparsers of the ``velofit`` parser.
    """
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
    add_fit_options(fit)
    add_preprocessing_options(fit)
    fit.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Fit ``args.input`` and write the result.

    Parameters
    ----------
    args
        The parsed ``fit`` options.

    Returns
    -------
    Exit status 0.
    """
    source: Path = args.input
    if args.in_place:
        if source.suffix != ".h5ad":
            raise CliError(f"--in-place needs an .h5ad input, got {source.name!r}; write to -o OUT.h5ad instead")
        if args.output is not None and not same_file(args.output, source):
            raise CliError("--in-place writes into IN: omit -o or give IN itself")
        output = source
    else:
        if args.output is None:
            raise CliError("no output given: pass -o OUT.h5ad (or --in-place to write into IN)")
        if same_file(args.output, source):
            raise CliError(f"OUT is the input file {str(source)!r}; pass --in-place to write into it")
        output = check_output(args.output, overwrite=args.overwrite)
    configure_compile_cache(args.no_compile_cache)

    adata = read_input(source)
    start = time.perf_counter()
    if not {"Ms", "Mu"} <= set(adata.layers.keys()):
        preprocess(adata, args)
    var_names = args.var_names or ("highly_variable" if has_true(adata, "highly_variable") else "all")
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
