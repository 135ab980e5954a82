"""Reading the input and writing outputs atomically (never a half-written file)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ._common import CliError

if TYPE_CHECKING:
    from anndata import AnnData


def read_input(path: Path) -> AnnData:
    """Read an ``.h5ad`` or ``.loom`` file into memory (the file is closed afterwards).

    Parameters
    ----------
    path
        Input file; a ``.loom`` is read with velocyto's conventions (anndata's defaults: cell
        ids from ``CellID``, gene names from ``Gene``).

    Returns
    -------
    The AnnData, with unique ``var_names``.
    """
    import anndata

    if not path.is_file():
        raise CliError(f"input file {str(path)!r} not found")
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


def write_h5ad_atomic(adata: AnnData, path: Path) -> None:
    """Write ``adata`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Parameters
    ----------
    adata
        Data to write.
    path
        Destination ``.h5ad``; replaced only once the new file is complete.
    """
    from .._report import write_atomic

    write_atomic(path, adata.write_h5ad)


def check_output(path: Path, *, overwrite: bool, suffix: str = ".h5ad") -> Path:
    """Check that ``path`` may be written, before any work is done.

    Parameters
    ----------
    path
        Output file.
    overwrite
        Whether an existing file may be replaced.
    suffix
        Required suffix.

    Returns
    -------
    ``path``.

    Raises
    ------
    CliError
        Wrong suffix, a folder, an existing file without ``overwrite``, or a missing folder.
    """
    if path.suffix != suffix:
        raise CliError(f"output {str(path)!r} must end with {suffix}")
    if path.is_dir():
        raise CliError(f"output {str(path)!r} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise CliError(f"output {str(path)!r} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise CliError(f"folder {str(path.parent)!r} of the output does not exist; create it first")
    return path


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (after resolving links and ``..``)."""
    return a.resolve() == b.resolve()


def missing_file(error: FileNotFoundError) -> str:
    """The one-line message for a missing file."""
    return str(error) if error.filename is None else f"file {str(error.filename)!r} not found"
