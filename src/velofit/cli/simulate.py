"""``velofit simulate``: write simulated data with known truth."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import non_negative_float, positive_int
from ._files import check_output, write_h5ad_atomic


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``simulate`` subcommand.

    Parameters
    ----------
    commands
        The subparsers of the ``velofit`` parser.
    """
    simulate = commands.add_parser(
        "simulate",
        help="write simulated data with known truth (velofit.datasets.simulate)",
        description="Simulate cells from the dynamical model and write them, with the true parameters, to OUT.",
    )
    simulate.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="output .h5ad file")
    simulate.add_argument("--n-obs", type=positive_int, default=1000, help="cells (default: 1000)")
    simulate.add_argument("--n-vars", type=positive_int, default=100, help="genes (default: 100)")
    simulate.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    simulate.add_argument("--noise", type=non_negative_float, default=0.1,
                          help="noise of Ms/Mu relative to each gene's 99th percentile (default: 0.1)")
    simulate.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    simulate.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Simulate and write ``args.output``.

    Parameters
    ----------
    args
        The parsed ``simulate`` options.

    Returns
    -------
    Exit status 0.
    """
    output = check_output(args.output, overwrite=args.overwrite)
    import velofit as vf

    adata = vf.datasets.simulate(args.n_obs, args.n_vars, seed=args.seed, noise=args.noise)
    write_h5ad_atomic(adata, output)
    print(f"velofit: wrote {output} ({adata.n_obs} cells x {adata.n_vars} genes, seed {args.seed})")
    return 0
