"""``python -m velofit``: the command line (see :mod:`velofit.cli`)."""

from .cli import main

raise SystemExit(main())
