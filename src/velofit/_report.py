"""Self-contained HTML report of a fit: tables plus figures embedded as base64 PNG."""

from __future__ import annotations

import base64
import html
import io
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from anndata import AnnData
from matplotlib.figure import Figure

from . import __version__

#: Section ids, in page order.
SECTIONS = ("summary", "top-genes", "latent-time", "velocity-stream", "time-prior", "convergence", "parameters")
_TITLES = {
    "summary": "Summary",
    "top-genes": "Top genes by fit likelihood",
    "latent-time": "Latent time",
    "velocity-stream": "Velocity stream",
    "time-prior": "Time prior and posterior",
    "convergence": "Convergence",
    "parameters": "Run parameters",
}
_PACKAGES = ("velofit", "jax", "numpy", "scipy", "anndata", "scanpy", "matplotlib")
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } img { max-width: 100%; } .note { color: #777; font-style: italic; }
nav a { margin-right: 1em; }
"""


def build_report(adata: AnnData, *, source: str | None = None, n_genes: int = 8) -> str:
    """HTML text of the report on a fitted AnnData.

    Parameters
    ----------
    adata
        Data after :func:`velofit.tl.recover_dynamics` (other results are shown when present:
        velocities, latent time, the velocity embedding, ``uns["velofit"]``).
    source
        Name of the file the data came from, shown in the summary.
    n_genes
        Number of top genes shown with phase portraits.

    Returns
    -------
    A complete HTML document whose sections have the ids in :data:`SECTIONS`; figures are
    ``<img src="data:image/png;base64,...">``, so the file needs nothing else to display.
    """
    from . import pl

    builders: dict[str, Callable[[], str]] = {
        "summary": lambda: _summary(adata, source),
        "top-genes": lambda: _top_genes(adata, n_genes, pl),
        "latent-time": lambda: _latent_time(adata, pl),
        "velocity-stream": lambda: _stream(adata, pl),
        "time-prior": lambda: _time_prior(adata, pl),
        "convergence": lambda: _convergence(adata, pl),
        "parameters": lambda: _parameters(adata),
    }
    parts = []
    for key in SECTIONS:
        try:
            body = builders[key]()
        except Exception as error:  # noqa: BLE001 - a report shows what it can; the failure is visible in the page
            warnings.warn(f"report section {key!r} failed: {error}", RuntimeWarning, stacklevel=2)
            body = _note(f"this section could not be drawn: {type(error).__name__}: {error}")
        parts.append(f'<section id="{key}">\n<h2>{_TITLES[key]}</h2>\n{body}\n</section>')
    nav = " ".join(f'<a href="#{key}">{_TITLES[key]}</a>' for key in SECTIONS)
    title = f"velofit report{f' - {source}' if source else ''}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<nav>{nav}</nav>\n" + "\n".join(parts) + "\n</body>\n</html>\n"
    )


def write_report(adata: AnnData, path: str | os.PathLike[str], *, source: str | None = None) -> Path:
    """Write :func:`build_report` to ``path`` atomically (temporary file, then rename).

    Parameters
    ----------
    adata
        Fitted data.
    path
        Destination ``.html`` file.
    source
        Name of the input file, shown in the summary.

    Returns
    -------
    The path written.
    """
    path = Path(path)
    text = build_report(adata, source=source)
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def write_atomic(path: str | os.PathLike[str], write: Callable[[str], Any]) -> None:
    """Create ``path`` all at once: ``write`` fills a temporary file beside it, then it is renamed.

    An exception or signal during ``write`` (KeyboardInterrupt, SystemExit included) removes
    the temporary file and leaves ``path`` as it was.

    Parameters
    ----------
    path
        Destination file.
    write
        Called with the temporary file's name; must write the complete content there.
    """
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600; give the permissions of a new file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def figure_to_html(fig: Figure, *, alt: str = "", dpi: int = 90) -> str:
    """An ``<img>`` tag with the figure as an inline base64 PNG.

    Parameters
    ----------
    fig
        The figure.
    alt
        Alternative text.
    dpi
        Resolution.

    Returns
    -------
    ``<img src="data:image/png;base64,..." alt="...">``.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


# ------------------------------------------------------------------------------ sections


def _summary(adata: AnnData, source: str | None) -> str:
    var = adata.var
    rows: list[tuple[str, Any]] = []
    if source:
        rows.append(("input", source))
    rows += [("cells", adata.n_obs), ("genes", adata.n_vars)]
    if "fit_status" in var.columns:
        rows.append(("genes fitted", int((var["fit_status"] == "ok").sum())))
        failed = var["fit_status"][(var["fit_status"] != "ok") & (var["fit_status"] != "not selected")]
        for reason, count in failed.astype(str).value_counts().items():
            rows.append((f"not fitted: {reason}", int(count)))
    for key in ("velocity_genes", "fit_converged"):
        if key in var.columns:
            rows.append((key.replace("_", " "), int(np.asarray(var[key], dtype=bool).sum())))
    settings = adata.uns.get("recover_dynamics")
    if settings is not None:
        used = {k: v for k, v in settings.items() if k not in ("loss_per_iteration", "velofit_version")}
        rows.append(("recover_dynamics parameters", ", ".join(f"{k}={_short(v)}" for k, v in used.items())))
        rows.append(("fitted with velofit", settings.get("velofit_version", "unknown")))
    rows.append(("report made", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")))
    versions = ", ".join(f"{name} {_version(name)}" for name in _PACKAGES)
    rows.append(("versions (report)", versions))
    body = _table(rows)
    if settings is None:
        body += _note("no fit found: run `velofit fit` (velofit.tl.recover_dynamics) first")
    return body


def _top_genes(adata: AnnData, n_genes: int, pl) -> str:
    var = adata.var
    if "fit_likelihood" not in var.columns or "fit_status" not in var.columns:
        return _note("no fit found: run velofit.tl.recover_dynamics first")
    fitted = var[var["fit_status"] == "ok"]
    if fitted.empty:
        return _note("no gene was fitted")
    top = fitted.sort_values("fit_likelihood", ascending=False).head(n_genes)
    columns = [c for c in ("fit_likelihood", "fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling",
                           "fit_n_iter", "fit_converged") if c in top.columns]
    header = "<tr><th>gene</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
    body = "".join(
        f"<tr><td>{html.escape(str(name))}</td>" + "".join(f"<td>{_short(row[c])}</td>" for c in columns) + "</tr>"
        for name, row in top.iterrows()
    )
    fig = pl.phase_portrait(adata, list(top.index), ncols=4)
    return f"<table>{header}{body}</table>\n" + figure_to_html(fig, alt="phase portraits of the top genes")


def _latent_time(adata: AnnData, pl) -> str:
    if "latent_time" not in adata.obs.columns:
        return _note("no obs['latent_time']: run velofit.tl.latent_time(adata)")
    basis = next((b for b in ("umap", "tsne", "pca") if f"X_{b}" in adata.obsm), None)
    if basis is not None:
        return figure_to_html(pl.latent_time(adata, basis=basis), alt=f"latent time on {basis.upper()}")
    return figure_to_html(_histogram(adata.obs["latent_time"].to_numpy(dtype=float)), alt="latent time histogram")


def _stream(adata: AnnData, pl) -> str:
    basis = next((b for b in ("umap", "tsne", "pca") if f"X_{b}" in adata.obsm), None)
    if basis is None:
        return _note("no embedding (obsm['X_umap']); compute one, e.g. with `velofit fit --umap`")
    has_projection = f"velocity_{basis}" in adata.obsm
    has_inputs = "velocity" in adata.layers and ("velocity_graph" in adata.uns or "connectivities" in adata.obsp)
    if not (has_projection or has_inputs):
        return _note(f"no velocities on the embedding: run velofit.tl.velocity and velofit.tl.velocity_embedding(basis={basis!r})")
    return figure_to_html(pl.velocity_embedding_stream(adata, basis=basis), alt=f"velocity stream on {basis}")


def _time_prior(adata: AnnData, pl) -> str:
    info = adata.uns.get("velofit")
    if not isinstance(info, Mapping):
        return _note("no uns['velofit'] (written by velofit.tl.latent_time): nothing to show")
    rows: list[tuple[str, Any]] = []
    if "time_grid" in info and "prior" in info:
        grid = np.asarray(info["time_grid"], dtype=np.float64)
        weights = np.asarray(info["prior"], dtype=np.float64)
        weights = weights / weights.sum()
        mean = float((grid * weights).sum())
        width = float(np.sqrt((weights * (grid - mean) ** 2).sum()))
        uniform = float(np.ptp(grid)) / np.sqrt(12.0)
        rows += [("prior mean (shared clock)", mean), ("prior standard deviation (width)", width),
                 ("prior width / width of a uniform prior", width / uniform if uniform > 0 else np.nan)]
    if "latent_time_std" in adata.obs.columns:
        spread = adata.obs["latent_time_std"].to_numpy(dtype=np.float64)
        p10, p50, p90 = np.nanpercentile(spread, [10, 50, 90])
        rows += [("posterior standard deviation per cell: median", p50),
                 ("posterior standard deviation per cell: 10th / 90th percentile", f"{p10:.4g} / {p90:.4g}")]
    if "loglik" in info:
        trace = np.asarray(info["loglik"], dtype=np.float64)
        if trace.size:
            rows += [("EM iterations", trace.size), ("final log-likelihood", float(trace[-1]))]
    params = info.get("latent_time_params")
    parts = [_table(rows)]
    if isinstance(params, Mapping):
        parts.append("<h3>latent_time_params</h3>" + _table(_flatten(params)))
    for name in ("time_prior", "posterior", "loglik"):
        plot = getattr(pl, name, None)
        if plot is not None:
            parts.append(figure_to_html(plot(adata), alt=name.replace("_", " ")))
    return "\n".join(p for p in parts if p) or _note("uns['velofit'] holds nothing to summarise")


def _convergence(adata: AnnData, pl) -> str:
    if "loss" not in adata.varm:
        return _note("no varm['loss']: run velofit.tl.recover_dynamics first")
    var = adata.var
    rows = []
    if "fit_converged" in var.columns and "fit_status" in var.columns:
        fitted = var["fit_status"] == "ok"
        rows.append(("converged (of fitted)", f"{int(var['fit_converged'][fitted].sum())} / {int(fitted.sum())}"))
        rows.append(("median iterations", _short(float(np.median(var["fit_n_iter"][fitted])) if fitted.any() else np.nan)))
    return _table(rows) + figure_to_html(pl.loss_trace(adata), alt="loss per EM iteration")


def _parameters(adata: AnnData) -> str:
    parts = []
    for key in ("velofit_cli", "recover_dynamics", "velocity_params", "velofit_pp", "velofit", "latent_time_params",
                "rank_dynamical_genes_params", "simulate"):
        value = adata.uns.get(key)
        if isinstance(value, Mapping):
            parts.append(f"<h3>uns['{html.escape(key)}']</h3>" + _table(_flatten(value)))
    return "\n".join(parts) or _note("no recorded parameters in uns")


# ------------------------------------------------------------------------------- helpers


def _histogram(values: np.ndarray) -> Figure:
    fig = Figure(figsize=(4.6, 3.2), layout="constrained")
    axis = fig.subplots()
    axis.hist(values[np.isfinite(values)], bins=40, color="tab:blue")
    axis.set_xlabel("latent time")
    axis.set_ylabel("cells")
    axis.set_title("latent time (no embedding in obsm)", fontsize=10)
    return fig


def _flatten(mapping: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += _flatten(value, f"{name}.")
        else:
            rows.append((name, value))
    return rows


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_short(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>" if rows else ""


def _short(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    if isinstance(value, np.ndarray) and value.ndim >= 1:
        if value.size <= 8:
            return "[" + ", ".join(_short(v) for v in value.tolist()) + "]"
        return f"array of shape {value.shape}"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"{type(value).__name__} of {len(value)}"
    return str(value)


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _version(package: str) -> str:
    if package == "velofit":
        return __version__
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
