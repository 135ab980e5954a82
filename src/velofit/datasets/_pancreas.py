"""``pancreas``: scVelo's endocrinogenesis (E15.5) data set, read from a path, a cache or the web."""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import anndata
import numpy as np
import scipy.sparse as sp

#: Public copy of the data set used in scVelo's tutorials.
PANCREAS_URL = (
    "https://github.com/theislab/scvelo_notebooks/raw/master/data/Pancreas/endocrinogenesis_day15.h5ad"
)
#: File name of the data set in the cache directory.
PANCREAS_FILENAME = "endocrinogenesis_day15.h5ad"
#: Environment variable that overrides the default cache directory.
CACHE_ENV = "VELOFIT_CACHE"
#: Location of the 739-cell subsample relative to the project root (see shared/data/README.md).
SHARED_PANCREAS = Path("..") / "shared" / "data" / "pancreas_739.h5ad"

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_DOWNLOAD_TIMEOUT_S = 60.0


class DatasetUnavailableError(OSError):
    """A data set could not be found locally nor downloaded."""


def pancreas(
    path: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
) -> anndata.AnnData:
    """Load the mouse pancreas endocrinogenesis data set (E15.5) of scVelo's tutorials.

    Bastidas-Ponce et al., Development 2019 (GEO GSE132188): 3,696 cells with raw spliced and
    unspliced counts. Looked up in this order:

    1. ``path``, if given (no download is attempted);
    2. ``endocrinogenesis_day15.h5ad`` in the cache directory;
    3. downloaded from :data:`PANCREAS_URL` into the cache directory (written to a temporary
       file there, then renamed, so an interrupted download never leaves a partial file).

    If the file's ``X`` is absent or empty, it is set from ``layers["spliced"]`` as float32
    (the shared 739-cell subsample, :func:`shared_pancreas_path`, is stored that way).

    Parameters
    ----------
    path
        An ``.h5ad`` file to read instead of the cached/downloaded data set, e.g.
        ``shared_pancreas_path()``.
    cache_dir
        Directory of the cache. Defaults to ``$VELOFIT_CACHE`` if set, else
        ``~/.cache/velofit``; created if needed.

    Returns
    -------
    The data set, with raw counts in ``layers["spliced"]``/``layers["unspliced"]``, ``X`` the
    spliced counts and the cell types in ``obs["clusters"]``.

    Raises
    ------
    FileNotFoundError
        ``path`` is given but does not exist.
    DatasetUnavailableError
        The file is not cached and cannot be downloaded (no network, server error, or the
        server did not return an HDF5 file).

    Examples
    --------
    >>> import velofit as vf
    >>> path = vf.datasets.shared_pancreas_path()
    >>> adata = vf.datasets.pancreas(path) if path is not None else vf.datasets.pancreas()
    """
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(
                f"no data file at {str(file)!r}; pass the path of an existing .h5ad file, or "
                f"path=None to use the cache/download"
            )
    else:
        directory = _cache_directory(cache_dir)
        file = directory / PANCREAS_FILENAME
        if not file.is_file():
            _download(PANCREAS_URL, file)
    adata = anndata.read_h5ad(file)
    _fill_x_from_spliced(adata)
    return adata


def shared_pancreas_path() -> Path | None:
    """Path of the project's shared 739-cell pancreas subsample, if present.

    Looks for ``../shared/data/pancreas_739.h5ad`` relative to the current working directory
    and then relative to the repository root (the nearest parent of this file that contains
    ``pyproject.toml``; only found for a source checkout).

    Returns
    -------
    The resolved path of the first candidate that exists, else ``None``.
    """
    roots = [Path.cwd()]
    repository = _repository_root()
    if repository is not None:
        roots.append(repository)
    for root in roots:
        candidate = root / SHARED_PANCREAS
        if candidate.is_file():
            return candidate.resolve()
    return None


def _repository_root() -> Path | None:
    """Nearest parent directory of this file that contains ``pyproject.toml``."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    return None


def _cache_directory(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The cache directory: the argument, else ``$VELOFIT_CACHE``, else ``~/.cache/velofit``."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "velofit"
    return Path(cache_dir).expanduser()


def _download(url: str, destination: Path) -> None:
    """Download ``url`` to ``destination`` atomically; raise DatasetUnavailableError on failure."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(
        dir=destination.parent, prefix=f".{destination.name}.", suffix=".part"
    )
    temporary = Path(temporary_name)
    try:
        with os.fdopen(handle, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                    shutil.copyfileobj(response, out)
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as error:
                raise DatasetUnavailableError(
                    f"could not download the pancreas data set from {url} ({error}); check the "
                    f"network connection, or download the file yourself and pass its path "
                    f"(pancreas(path=...)) or save it as {destination}"
                ) from error
        with temporary.open("rb") as written:
            signature = written.read(len(_HDF5_SIGNATURE))
        if signature != _HDF5_SIGNATURE:
            raise DatasetUnavailableError(
                f"the download from {url} is not an HDF5/.h5ad file (the server may have returned an "
                f"error page); download it yourself and pass its path (pancreas(path=...))"
            )
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)


def _fill_x_from_spliced(adata: anndata.AnnData) -> None:
    """Set ``X`` to the spliced counts as float32 when ``X`` is absent or holds no values."""
    if "spliced" not in adata.layers:
        return
    x = adata.X
    if x is None or (x.nnz if sp.issparse(x) else np.size(x)) == 0:
        spliced = adata.layers["spliced"]
        if sp.issparse(spliced):
            adata.X = spliced.astype(np.float32)
        else:
            adata.X = np.asarray(spliced, dtype=np.float32)
