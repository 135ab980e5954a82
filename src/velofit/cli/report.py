"""``velofit report``: a self-contained HTML report of a fitted ``.h5ad``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._files import check_output, read_input


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``report`` subcommand.

    Parameters
    ----------
    commands
        The subparsers of the ``velofit`` parser.
    """
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
    report.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the report of ``args.input``.

    Parameters
    ----------
    args
        The parsed ``report`` options.

    Returns
    -------
    Exit status 0.
    """
    source: Path = args.input
    output = check_output(args.output or source.with_suffix(".html"), overwrite=args.overwrite, suffix=".html")
    adata = read_input(source)
    from .._report import write_report

    write_report(adata, output, source=source.name)
    print(f"velofit: wrote {output}")
    return 0
