"""How many genes one chunk of the per-gene fit may hold: a memory budget, checked, not hoped for.

One chunk of ``width`` genes on ``n_cells`` cells needs

- the buffers of its compiled program (:mod:`velofit.core.programs`: the EM on at most
  ``config.n_jacobian_cells`` cells, and the final time assignment in blocks of as many
  cells), by XLA's own accounting of the executable (arguments, outputs and temporaries):
  about 56 float64 arrays of ``n_sample x width`` on CPU, whatever ``n_cells``;
- NumPy arrays on the host while the chunk is read, initialised and written back
  (:data:`HOST_ARRAYS` float64 arrays of ``n_cells x width``, measured with ``tracemalloc``
  in ``tests/test_scale.py``).

:func:`default_chunk_size` turns a budget into a width with a conservative model of both;
:func:`plan_width` then compiles the EM for that width (the compilation the fit needs anyway,
cached by JAX) and reads XLA's accounting: if the chunk would exceed the budget it narrows the
chunk, and if even two genes exceed it, it raises. So a chunk's working set never exceeds
the budget, whatever changes in the EM's code.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from .._validation import VelofitInputError
from .hard_em import EMConfig
from .programs import fit_program, program_rows

#: EM settings used when none are given.
DEFAULT_CONFIG = EMConfig()
#: Default memory budget of one chunk's working set, in bytes (2 GiB).
DEFAULT_MEMORY_BYTES = 2 * 1024**3
#: float64 arrays of ``n_sample x width`` the compiled program holds, with its arguments (model;
#: XLA's accounting: 43 at 1,024 x 64 and x 256 before the M-step's projected step, 57 with it).
XLA_ARRAYS = 60
#: float64 arrays of ``n_cells x width`` held on the host by one chunk (model; see module doc).
HOST_ARRAYS = 14
#: Every chunk holds at least this many genes (a ``(n_cells, 1)`` chunk rounds differently).
MIN_WIDTH = 2


def bytes_per_gene(n_cells: int, config: EMConfig = DEFAULT_CONFIG) -> int:
    """Modelled bytes one gene adds to a chunk's working set.

    Parameters
    ----------
    n_cells
        Number of cells.
    config
        EM settings (the M-step's cell subset, the loss trace, and the grid of the time
        prior's penalty: the program's argument and its copy, zeroed in the EM's iterations).

    Returns
    -------
    Bytes per gene (float64 throughout).
    """
    n_sample = min(n_cells, config.n_jacobian_cells)
    per_grid = 2 * (2 * config.n_grid)
    return 8 * (HOST_ARRAYS * n_cells + XLA_ARRAYS * n_sample + 4 * (config.max_iter + 1) + per_grid + 256)


def default_chunk_size(n_cells: int, memory_bytes: int = DEFAULT_MEMORY_BYTES, config: EMConfig = DEFAULT_CONFIG) -> int:
    """Genes per chunk so that one chunk's working set stays within ``memory_bytes`` (model).

    Parameters
    ----------
    n_cells
        Number of cells.
    memory_bytes
        Memory budget of one chunk.
    config
        EM settings.

    Returns
    -------
    A chunk width of at least 1 gene (:func:`plan_width` then checks it against XLA).
    """
    return max(1, int(memory_bytes // bytes_per_gene(max(n_cells, 1), config)))


def chunk_footprint(n_cells: int, width: int, config: EMConfig, device: jax.Device | None = None) -> int:
    """Bytes one chunk needs: XLA's accounting of the compiled EM plus the host arrays.

    Compiles the chunk's program (:mod:`velofit.core.programs`; memoised, so the fit that
    follows does not compile again).

    Parameters
    ----------
    n_cells, width
        Chunk shape.
    config
        EM settings (static arguments of the compiled EM).
    device
        Device to compile for (default: JAX's default device).

    Returns
    -------
    Bytes; the model of :func:`bytes_per_gene` where XLA gives no accounting.
    """
    host = 8 * HOST_ARRAYS * n_cells * width
    program = fit_program(program_rows(n_cells, config), width, config, device or jax.devices()[0])
    try:
        stats = program.memory_analysis()
        xla = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    except (AttributeError, NotImplementedError, TypeError):  # a backend without accounting
        return bytes_per_gene(n_cells, config) * width
    return int(xla + host)


def effective_budget(memory_budget: int | None, chunk_size: int | None) -> int | None:
    """The budget a fit checks: ``memory_budget``, else :data:`DEFAULT_MEMORY_BYTES` unless
    ``chunk_size`` is given (then ``None``: unchecked).

    Parameters
    ----------
    memory_budget
        Bytes, or ``None``.
    chunk_size
        Requested width, or ``None``.

    Returns
    -------
    Bytes, or ``None``.
    """
    if memory_budget is not None or chunk_size is not None:
        return memory_budget
    return DEFAULT_MEMORY_BYTES


def model_width(
    n_cells: int,
    n_genes: int,
    config: EMConfig,
    *,
    chunk_size: int | None,
    memory_budget: int | None,
    max_width: int | None = None,
) -> int:
    """The width :func:`plan_width` starts from: ``chunk_size``, or the model's width for the
    budget (:func:`default_chunk_size`), before XLA's accounting is checked (nothing compiled).

    Parameters
    ----------
    n_cells, n_genes, config, chunk_size, memory_budget, max_width
        As for :func:`plan_width`.

    Returns
    -------
    Width of at least :data:`MIN_WIDTH` (at most ``n_genes`` unless that is smaller).
    """
    budget = effective_budget(memory_budget, chunk_size)
    wanted = chunk_size if chunk_size is not None else default_chunk_size(n_cells, budget, config)
    if chunk_size is None and max_width is not None:
        wanted = min(wanted, max_width)
    return max(MIN_WIDTH, min(wanted, n_genes))


def plan_width(
    n_cells: int,
    n_genes: int,
    config: EMConfig,
    *,
    chunk_size: int | None,
    memory_budget: int | None,
    footprint: Callable[[int, int], int],
    max_width: int | None = None,
) -> int:
    """Genes per chunk: ``chunk_size``, or the widest chunk that fits ``memory_budget``.

    Starts from :func:`model_width` and checks it with ``footprint`` (narrowing it, or
    raising, where the chunk would exceed the budget).

    Parameters
    ----------
    n_cells, n_genes
        Data shape.
    config
        EM settings.
    chunk_size
        Requested width (``None``: from the budget).
    memory_budget
        Bytes one chunk may use (``None``: :data:`DEFAULT_MEMORY_BYTES` when ``chunk_size``
        is ``None``, unchecked otherwise).
    footprint
        ``footprint(n_cells, width) -> bytes``, e.g. :func:`chunk_footprint` on the target
        device.
    max_width
        Upper bound of the default width (ignored when ``chunk_size`` is given).

    Returns
    -------
    Width of every chunk (at least :data:`MIN_WIDTH`; chunks are padded to it).
    """
    budget = effective_budget(memory_budget, chunk_size)
    width = model_width(n_cells, n_genes, config, chunk_size=chunk_size, memory_budget=memory_budget,
                        max_width=max_width)
    if budget is None:
        return width
    for _ in range(4):
        need = footprint(n_cells, width)
        if need <= budget:
            return width
        if chunk_size is not None:
            raise VelofitInputError(
                f"chunk_size={chunk_size} needs about {_fmt(need)} per chunk on {n_cells} cells, over "
                f"memory_budget={_fmt(budget)}; lower chunk_size, raise memory_budget, or pass only one of them"
            )
        if width == MIN_WIDTH:
            break
        width = max(MIN_WIDTH, int(width * budget / need))
    raise VelofitInputError(
        f"memory_budget={_fmt(budget)} is below what a chunk of {MIN_WIDTH} genes needs on {n_cells} cells "
        f"(about {_fmt(footprint(n_cells, MIN_WIDTH))}); raise memory_budget"
    )


def _fmt(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} GiB"


_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_memory_budget(value: object) -> int | None:
    """Check a ``memory_budget`` argument and return it in bytes.

    Parameters
    ----------
    value
        ``None``, a positive number of bytes, or a string such as ``"2GB"`` or ``"512 MiB"``
        (``kB``/``MB``/``GB``/``TB`` are powers of 1000, ``KiB``/``MiB``/``GiB``/``TiB`` of 1024).

    Returns
    -------
    Bytes, or ``None``.
    """
    import numbers
    import re

    from .._validation import VelofitTypeError

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise VelofitTypeError(
            f"memory_budget must be a number of bytes, a string such as '2GB', or None, got {value!r} "
            f"of type {type(value).__name__}"
        )
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise VelofitInputError(
                f"memory_budget {value!r} is not a size; write e.g. '2GB', '512MiB' or a number of bytes"
            )
        number = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        number = float(value)
    if not number >= 1 or number == float("inf"):
        raise VelofitInputError(f"memory_budget must be a positive, finite number of bytes, got {value!r}")
    return int(number)
