"""Command line: ``velofit demo | fit | report | simulate`` (``velofit COMMAND --help`` for each).

Outputs are written atomically (a temporary file in the destination's folder, then
``os.replace``), so an interrupted run (Ctrl-C, SIGTERM) leaves no partial file. Errors in the
input print one line ``velofit: error: ...`` and exit with status 2.

One module per subcommand (``add_parser`` and ``run``); ``_common`` holds the error type, exit
statuses and option types, ``_files`` reading and atomic writing, ``_pipeline`` the analysis.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from . import demo, fit, report, simulate
from ._common import EXIT_INTERRUPTED, EXIT_USAGE, CliError, Terminated
from ._files import missing_file, read_input, write_h5ad_atomic

__all__ = ["EXIT_INTERRUPTED", "EXIT_USAGE", "CliError", "build_parser", "main", "read_input", "write_h5ad_atomic"]


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
    for command in (demo, fit, report, simulate):
        command.add_parser(commands)
    return parser


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
    from .._validation import VelofitInputError, VelofitKeyError

    with _interruptible():
        try:
            return int(args.func(args) or 0)
        except (CliError, VelofitInputError, VelofitKeyError, FileNotFoundError) as error:
            message = str(error) if not isinstance(error, FileNotFoundError) else missing_file(error)
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


def _version() -> str:
    from .. import __version__

    return __version__
