"""What every subcommand shares: the error type, exit statuses, argument types and option groups."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

#: Exit status for bad input or arguments (as argparse).
EXIT_USAGE = 2
#: Exit status after SIGINT (128 + 2, the shell convention).
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A problem with the command's arguments or files, reported as one line (exit status 2)."""


class Terminated(SystemExit):
    """Raised by the SIGTERM handler so that cleanup in ``finally`` blocks runs."""


def _bounded(kind: type, low: float, what: str) -> Callable[[str], int | float]:
    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value >= low:  # also rejects nan
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    convert.__name__ = what  # argparse names the type in its messages
    return convert


positive_int = _bounded(int, 1, "an integer >= 1")
non_negative_int = _bounded(int, 0, "an integer >= 0")
at_least_two = _bounded(int, 2, "an integer >= 2")
non_negative_float = _bounded(float, 0.0, "a number >= 0")


def add_fit_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of the fit (``demo`` and ``fit``).

    Parameters
    ----------
    parser
        Subcommand parser, extended in place.
    """
    parser.add_argument("--max-iter", type=positive_int, default=None,
                        help="EM iterations per gene (default: that of velofit.tl.recover_dynamics)")
    parser.add_argument("--n-explicit", type=non_negative_int, default=None,
                        help="leading iterations with the explicit (closed-form) time assignment, at most "
                             "--max-iter (default: that of velofit.tl.recover_dynamics)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="neither read nor write compiled programs in $VELOFIT_CACHE_DIR (default "
                             "~/.cache/velofit/xla), which lets every later fit, here or in Python, skip "
                             "several seconds of compilation")


def configure_compile_cache(disabled: bool) -> None:
    """Honour ``--no-compile-cache`` (the CLI owns its process).

    The CLI uses the library's own disk cache of compiled programs
    (:mod:`velofit.core.compile_cache`), so that a CLI run (e.g. ``velofit demo`` after
    installing) fills the cache that later fits read, in Python as on the command line. (JAX's
    persistent cache, which the CLI switched on before, turned velofit's off, kept a second copy
    elsewhere and still traced the program on every run: the demo's fit 2.7 s on its second run
    against 1.1 s.)

    Parameters
    ----------
    disabled
        ``--no-compile-cache``: neither read nor write compiled programs on disk.
    """
    if disabled:
        from ..core.compile_cache import CACHE_ENV

        os.environ[CACHE_ENV] = "off"
