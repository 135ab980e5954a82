"""Benchmark velofit's ``recover_dynamics`` against scVelo's: time, peak memory and accuracy.

Every fit runs in a fresh subprocess (a helper mode of this script), so velofit's first call
includes JAX's compilation and each tool's peak RSS (the child's ``VmHWM``) is its own.

* Simulated data (``--sizes``): ``scvelo.datasets.simulation`` with per-gene log-normal rates
  (medians alpha 5, beta 0.5, gamma 0.3, log-sd 0.5), switching at a uniform 0.3-0.9 fraction
  of ``t_max = 20``, ``noise_level = 1``; ``Ms = spliced``, ``Mu = unspliced``. Accuracy against
  the truth: median relative error of ``gamma / beta`` and median per-gene Spearman
  correlation of ``fit_t`` with the true time.
* pancreas_739 (``--pancreas``): preprocessed as ``shared/data/README.md`` says; both tools fit
  the genes scVelo's default ``var_names="velocity_genes"`` selects, velofit also all genes.
* Both: the mean over genes of :func:`velofit.tl._evaluate.model_loglik`, one definition of
  the per-cell Gaussian log-likelihood applied to each tool's own parameters and times.

scVelo runs ``recover_dynamics(var_names=..., n_jobs=--scvelo-jobs, fit_connected_states=False,
show_progress_bar=False)``. With ``--scvelo-genes N`` it fits only the first ``N`` genes and
its time is extrapolated linearly to all genes (its cost is per gene and independent of the
other genes); its accuracy columns then describe those ``N`` genes.

Results are printed and a section per dataset is written (or replaced) in ``--out``.

Usage::

    python benchmarks/bench_recover_dynamics.py --sizes 2000x200
    python benchmarks/bench_recover_dynamics.py --sizes 5000x1000 --scvelo-genes 100 --no-pancreas
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PANCREAS = REPO.parent / "shared" / "data" / "pancreas_739.h5ad"
DEFAULT_OUT = REPO / "benchmarks" / "RESULTS.md"
FIT_VAR_KEYS = ("fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling", "fit_u0", "fit_s0", "fit_status")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def simulate(n_obs: int, n_vars: int, seed: int = 0, noise_level: float = 1):
    """scVelo's simulation with per-gene log-normal rates and uniform switching fractions."""
    import scvelo as scv

    rng = np.random.default_rng(seed)
    alpha = 5.0 * np.exp(0.5 * rng.standard_normal(n_vars))
    beta = 0.5 * np.exp(0.5 * rng.standard_normal(n_vars))
    gamma = 0.3 * np.exp(0.5 * rng.standard_normal(n_vars))
    switches = rng.uniform(0.3, 0.9, n_vars)
    adata = scv.datasets.simulation(
        n_obs=n_obs,
        n_vars=n_vars,
        alpha=list(alpha),
        beta=list(beta),
        gamma=list(gamma),
        switches=list(switches),
        t_max=20,
        noise_level=noise_level,
        random_seed=seed,
    )
    adata.layers["Ms"] = np.asarray(adata.layers["spliced"], dtype=float).copy()
    adata.layers["Mu"] = np.asarray(adata.layers["unspliced"], dtype=float).copy()
    return adata


def preprocess_pancreas(path: Path):
    """pancreas_739 preprocessed as shared/data/README.md; returns (adata, velocity genes).

    The README's ``scv.pp.filter_and_normalize(adata, min_shared_counts=20, n_top_genes=2000)``
    is scVelo 0.2's call; scVelo 0.3.4's ``filter_and_normalize`` only filters and normalises
    (``n_top_genes`` raises a TypeError), so the 0.2 steps are spelled out: filter and
    normalise with scVelo, keep the 2,000 genes of highest seurat-flavour dispersion of the
    normalised counts (scVelo 0.2's ``filter_genes_dispersion``), log1p ``X``.
    """
    import anndata
    import scanpy as sc
    import scvelo as scv
    from scvelo.tools.velocity import Velocity

    adata = anndata.read_h5ad(path)
    adata.X = adata.layers["spliced"].copy()
    scv.pp.filter_and_normalize(adata, min_shared_counts=20)
    hvg = sc.pp.highly_variable_genes(sc.pp.log1p(adata, copy=True), flavor="seurat", n_top_genes=2000,
                                      inplace=False)
    adata._inplace_subset_var(hvg["highly_variable"].to_numpy())
    sc.pp.log1p(adata)
    scv.pp.moments(adata, n_pcs=30, n_neighbors=30)
    # exactly what scVelo's recover_dynamics(var_names="velocity_genes") selects
    velo = Velocity(adata, use_raw=False)
    velo.compute_deterministic(perc=[5, 95])
    genes = np.asarray(adata.var_names[velo._velocity_genes])
    return adata, genes


def _slim(adata):
    """Only what the fits need (moments, truth columns), for the file handed to the workers."""
    import anndata as ad

    var = adata.var[[c for c in adata.var.columns if c.startswith("true_")]].copy()
    obs = adata.obs[[c for c in adata.obs.columns if c.startswith("true_")]].copy()
    layers = {k: np.asarray(adata.layers[k].toarray() if hasattr(adata.layers[k], "toarray") else adata.layers[k],
                            dtype=float) for k in ("Ms", "Mu")}
    return ad.AnnData(obs=obs, var=var, layers=layers, shape=adata.shape)


# --------------------------------------------------------------------------------------------
# workers (run in fresh processes)
# --------------------------------------------------------------------------------------------


def _proc_status_mb(field: str) -> float | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) / 1024.0 if m else None


def _peak_rss_mb() -> tuple[float, float]:
    """(this process's peak RSS, the largest reaped child's peak RSS) in MB.

    ``VmHWM`` (reset by ``exec``) is preferred to ``ru_maxrss``: on Linux a process started by
    ``fork`` + ``exec`` inherits in ``ru_maxrss`` the RSS its parent had at the fork.
    """
    own = _proc_status_mb("VmHWM")
    if own is None:
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return own, children


def _worker(args) -> None:
    warnings.filterwarnings("ignore")
    if args.cpus:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cpus]))
    import anndata as ad

    t0 = time.perf_counter()
    if args.worker == "velofit":
        import velofit.tl as vtl
    else:
        import scvelo as scv

        scv.settings.verbosity = 0
    import_s = time.perf_counter() - t0

    adata = ad.read_h5ad(args.input)
    var_names = None
    if args.var_names_file:
        var_names = [line.strip() for line in Path(args.var_names_file).read_text().splitlines() if line.strip()]
    rss_before = _proc_status_mb("VmRSS") or float("nan")
    times, cpu_times = [], []
    peak_first = None
    if args.worker == "velofit":
        for _ in range(args.repeat):
            work = None  # the previous call's copy is released before the next one
            work = adata.copy()
            t0, c0 = time.perf_counter(), time.process_time()
            vtl.recover_dynamics(work, var_names=var_names, progress=False)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            if peak_first is None:  # the peak through the first call, as for scVelo's single call
                peak_first = _peak_rss_mb()[0]
    else:
        work = adata.copy()
        t0, c0 = time.perf_counter(), time.process_time()
        scv.tl.recover_dynamics(
            work,
            var_names="all" if var_names is None else var_names,
            n_jobs=args.scvelo_jobs,
            fit_connected_states=False,
            show_progress_bar=False,
        )
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak_self, peak_children = _peak_rss_mb()
    if peak_first is not None:
        peak_self = peak_first

    out = ad.AnnData(
        obs=work.obs[[]].copy(),
        var=work.var[[k for k in FIT_VAR_KEYS if k in work.var.columns]].copy(),
        layers={"fit_t": np.asarray(work.layers["fit_t"], dtype=float)},
        shape=work.shape,
    )
    if "fit_status" in out.var:
        out.var["fit_status"] = out.var["fit_status"].astype(str)
    out.write_h5ad(args.output)
    Path(args.result).write_text(
        json.dumps(
            {
                "tool": args.worker,
                "import_s": import_s,
                "times_s": times,
                "cpu_s": cpu_times,
                "rss_before_fit_mb": rss_before,
                "peak_rss_mb": peak_self,
                "peak_rss_children_mb": peak_children,
                "n_genes_requested": adata.n_vars if var_names is None else len(var_names),
            }
        )
    )


@dataclass
class RunResult:
    tool: str
    times_s: list
    cpu_s: list
    import_s: float
    peak_mb: float
    peak_children_mb: float
    rss_before_mb: float
    n_requested: int
    fit: object = field(repr=False, default=None)  # AnnData with the fit_* keys


def run_worker(tool: str, data_path: Path, tmp: Path, *, var_names=None, repeat=1, scvelo_jobs=1, cpus=None, tag="",
               cache: Path | None = None):
    """Fit in a fresh process; returns timings, peak RSS and the fitted keys.

    ``cache`` is velofit's compilation cache folder for that process (``VELOFIT_CACHE_DIR``).
    """
    import anndata as ad

    stem = f"{tool}{tag}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, "--input", str(data_path),
           "--output", str(tmp / f"{stem}_fit.h5ad"), "--result", str(tmp / f"{stem}.json"),
           "--repeat", str(repeat), "--scvelo-jobs", str(scvelo_jobs)]
    if cpus:
        cmd += ["--cpus", str(cpus)]
    if var_names is not None:
        names_file = tmp / f"{stem}_genes.txt"
        names_file.write_text("\n".join(map(str, var_names)) + "\n")
        cmd += ["--var-names-file", str(names_file)]
    print(f"  running {tool} ({'all genes' if var_names is None else f'{len(var_names)} genes'}) ...", flush=True)
    env = dict(os.environ)
    if cache is not None:
        env["VELOFIT_CACHE_DIR"] = str(cache)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} worker failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    res = json.loads((tmp / f"{stem}.json").read_text())
    return RunResult(
        tool=tool,
        times_s=res["times_s"],
        cpu_s=res["cpu_s"],
        import_s=res["import_s"],
        peak_mb=res["peak_rss_mb"],
        peak_children_mb=res["peak_rss_children_mb"],
        rss_before_mb=res["rss_before_fit_mb"],
        n_requested=res["n_genes_requested"],
        fit=ad.read_h5ad(tmp / f"{stem}_fit.h5ad"),
    )


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def fitted_mask(fit) -> np.ndarray:
    """Genes a tool fitted: velofit's ``fit_status == 'ok'``; scVelo's finite rates."""
    var = fit.var
    ok = np.ones(fit.n_vars, dtype=bool)
    for key in ("fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling"):
        ok &= np.isfinite(var[key].to_numpy(dtype=float))
    if "fit_status" in var.columns:
        ok &= np.asarray(var["fit_status"] == "ok")
    return ok


def ratio_error(fit, truth_var, genes: np.ndarray) -> float:
    """Median |fit gamma/beta - true gamma/beta| / true over ``genes`` (a boolean mask)."""
    fit_r = fit.var["fit_gamma"].to_numpy(float) / fit.var["fit_beta"].to_numpy(float)
    true_r = truth_var["true_gamma"].to_numpy(float) / truth_var["true_beta"].to_numpy(float)
    return float(np.nanmedian(np.abs(fit_r[genes] - true_r[genes]) / true_r[genes])) if genes.any() else np.nan


def time_spearman(fit, true_t: np.ndarray, genes: np.ndarray) -> float:
    """Median over ``genes`` of Spearman(fit_t, true time) over cells with a finite fit_t."""
    from scipy.stats import spearmanr

    t = np.asarray(fit.layers["fit_t"], dtype=float)
    rhos = []
    for j in np.flatnonzero(genes):
        ok = np.isfinite(t[:, j])
        if ok.sum() > 2 and np.ptp(t[ok, j]) > 0:
            rhos.append(spearmanr(t[ok, j], true_t[ok]).statistic)
    return float(np.nanmedian(rhos)) if rhos else np.nan


def loglik(fit, data) -> np.ndarray:
    """Per-gene :func:`model_loglik` of a worker's fit on the data it was fitted on."""
    from velofit.tl._evaluate import model_loglik

    full = data.copy()
    for key in fit.var.columns:
        full.var[key] = fit.var[key].to_numpy()
    full.layers["fit_t"] = np.asarray(fit.layers["fit_t"])
    return model_loglik(full).to_numpy()


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------

HEADER = (
    "| data | genes | velofit first process s, empty compile cache: wall (CPU) "
    "| velofit new process s, cache filled: wall (CPU) | velofit warm s: wall (CPU) | scVelo s: wall (CPU) "
    "| scVelo / velofit: empty cache; cache filled (wall) | velofit peak MB "
    "| scVelo peak MB | fitted velofit / scVelo | rel. err. gamma/beta velofit / scVelo "
    "| Spearman(fit_t, true t) velofit / scVelo | mean model_loglik velofit / scVelo |"
)
SEP = "|" + "---|" * (HEADER.count("|") - 1)


def _f(x, fmt="{:.3g}"):
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else fmt.format(x)


def _wc(run: RunResult, i: int = 0, scale: float = 1.0) -> str:
    return f"{_f(run.times_s[i] * scale)} ({_f(run.cpu_s[i] * scale)})"


def _ratio(sc: RunResult, vf: RunResult, scale: float, vf_cached: RunResult | None = None) -> str:
    text = f"{_f(sc.times_s[0] * scale / vf.times_s[0])}"
    if vf_cached is not None:
        text += f"; {_f(sc.times_s[0] * scale / vf_cached.times_s[0])}"
    return text


def run_velofit_pair(data_path: Path, tmp: Path, *, tag: str, cpus=None, var_names=None):
    """velofit in a first process with an empty compilation cache (two calls: cold and warm),
    then in a second process that finds the cache the first one filled."""
    cache = tmp / f"xla_cache{tag}"
    shutil.rmtree(cache, ignore_errors=True)
    first = run_worker("velofit", data_path, tmp, var_names=var_names, repeat=2, cpus=cpus, tag=tag, cache=cache)
    again = run_worker("velofit", data_path, tmp, var_names=var_names, repeat=1, cpus=cpus, tag=tag + "_cached",
                       cache=cache)
    return first, again


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        ram = f"{int(m.group(1)) / 1024**2:.1f} GiB"
    except (OSError, AttributeError):
        pass
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": cpu, "ram": ram}


def versions() -> dict:
    import anndata
    import jax
    import scanpy
    import scvelo

    import velofit

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "numpy": np.__version__,
        "anndata": anndata.__version__,
        "scanpy": scanpy.__version__,
        "scvelo": scvelo.__version__,
        "velofit": velofit.__version__,
    }


def write_section(out: Path, title: str, body: str) -> None:
    """Replace the ``## title`` section of ``out`` (up to the next ``## ``), or append it."""
    text = out.read_text() if out.exists() else "# recover_dynamics benchmarks\n\nWritten by `benchmarks/bench_recover_dynamics.py`.\n"
    heading = f"## {title}"
    section = f"{heading}\n\n{body.rstrip()}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        text = text.rstrip() + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        text = "".join(lines[:start]) + section + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def velofit_source() -> str:
    """Git commit of the working tree (``+dirty`` if modified) and recover_dynamics' EM defaults."""
    import inspect

    from velofit.tl import recover_dynamics

    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    params = inspect.signature(recover_dynamics).parameters
    defaults = ", ".join(f"{k}={params[k].default}" for k in ("max_iter", "n_explicit") if k in params)
    return f"git {rev}; recover_dynamics defaults {defaults}"


def context_block(args, command: str, load: str, source: str) -> str:
    m, v = machine_info(), versions()
    cpus = f", workers pinned to {args.cpus} CPU(s)" if args.cpus else ""
    return (
        f"- machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram']} RAM{cpus}\n"
        f"- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + "\n"
        f"- velofit source (at the start of this dataset): {source}\n"
        f"- command: `{command}`\n"
        f"- finished: {time.strftime('%Y-%m-%d %H:%M')}\n"
        f"- 1-min load average before / after this dataset: {load}\n"
    )


NOTES = (
    "Notes: each fit runs in a fresh Python process. Times are wall-clock seconds with the process's "
    "CPU seconds (all threads) in parentheses; on a shared machine the CPU seconds are the steadier "
    "measure (see the load average above). *velofit first process* is its first "
    "`recover_dynamics` call in a process whose compilation cache folder (`VELOFIT_CACHE_DIR`) is empty, "
    "so XLA compiles everything, as on a machine's very first fit (`import` excluded: {imp}); "
    "*new process, cache filled* is the first call of a second fresh process, which loads the executables "
    "the first one wrote (`velofit.core.compile_cache`); *warm* is a second call in the first process. scVelo runs `recover_dynamics(n_jobs={jobs}, "
    "fit_connected_states=False)`. Peak MB is the worker process's peak RSS (`VmHWM`) through its first "
    "fit (imports and data loading included; RSS just before the fit: velofit {vb} MB, scVelo {sb} MB). velofit uses every CPU XLA sees; scVelo "
    "with n_jobs=1 uses one. *rel. err. gamma/beta*: median over fitted genes of |fit - true| / true "
    "(both tools write beta in observed-unspliced units, directly comparable to the truth). "
    "*Spearman*: median over fitted genes of the per-gene Spearman correlation of `fit_t` with the "
    "true time. *model_loglik*: `velofit.tl._evaluate.model_loglik` (mean per-cell Gaussian "
    "log-likelihood, MLE variance, residuals in units of the std of Mu/Ms over cells with both > 0, "
    "each tool's own parameters and times), mean over genes fitted by both tools."
)


# --------------------------------------------------------------------------------------------
# benchmarks
# --------------------------------------------------------------------------------------------


def bench_simulated(n_obs, n_vars, args, tmp: Path) -> tuple[str, str]:
    print(f"simulated {n_obs} x {n_vars}: generating ...", flush=True)
    data = _slim(simulate(n_obs, n_vars))
    path = tmp / f"sim_{n_obs}x{n_vars}.h5ad"
    data.write_h5ad(path)

    vf, vf_cached = run_velofit_pair(path, tmp, tag=f"_{n_obs}x{n_vars}", cpus=args.cpus)
    sc_genes = None
    if args.scvelo_genes and args.scvelo_genes < n_vars:
        sc_genes = list(data.var_names[: args.scvelo_genes])
    sc = run_worker("scvelo", path, tmp, var_names=sc_genes, scvelo_jobs=args.scvelo_jobs, cpus=args.cpus,
                    tag=f"_{n_obs}x{n_vars}")

    true_t = data.obs["true_t"].to_numpy(float)
    vf_ok, sc_ok = fitted_mask(vf.fit), fitted_mask(sc.fit)
    n_sc = len(sc_genes) if sc_genes is not None else n_vars
    scale = n_vars / n_sc
    sc_time_label = _wc(sc, 0, scale) + (f", extrapolated from {n_sc} genes: {sc.times_s[0]:.3g} s" if sc_genes else "")
    both = vf_ok & sc_ok
    ll_vf, ll_sc = loglik(vf.fit, data), loglik(sc.fit, data)
    subset = np.zeros(n_vars, bool)
    subset[:n_sc] = True
    row = (
        f"| simulated {n_obs} x {n_vars} | {n_vars} | {_wc(vf, 0)} | {_wc(vf_cached, 0)} | {_wc(vf, 1)} "
        f"| {sc_time_label} | {_ratio(sc, vf, scale, vf_cached)} | {vf.peak_mb:.0f} | {sc.peak_mb:.0f} "
        f"| {vf_ok.sum()} / {sc_ok.sum()}{' of ' + str(n_sc) if sc_genes else ''} "
        f"| {_f(ratio_error(vf.fit, data.var, vf_ok))} / {_f(ratio_error(sc.fit, data.var, sc_ok))} "
        f"| {_f(time_spearman(vf.fit, true_t, vf_ok))} / {_f(time_spearman(sc.fit, true_t, sc_ok))} "
        f"| {_f(np.nanmean(ll_vf[both]))} / {_f(np.nanmean(ll_sc[both]))} |"
    )
    extra = ""
    if sc_genes:
        extra = (
            f"\nscVelo fitted only the first {n_sc} genes (its time is extrapolated linearly to {n_vars}); "
            f"its accuracy columns and the log-likelihood are on those genes. velofit on the same {n_sc} genes: "
            f"rel. err. {_f(ratio_error(vf.fit, data.var, vf_ok & subset))}, "
            f"Spearman {_f(time_spearman(vf.fit, true_t, vf_ok & subset))}; "
            f"velofit mean model_loglik over all its fitted genes {_f(np.nanmean(ll_vf[vf_ok]))}.\n"
        )
    notes = NOTES.format(imp=f"{vf.import_s:.1f} s", jobs=args.scvelo_jobs, vb=f"{vf.rss_before_mb:.0f}",
                         sb=f"{sc.rss_before_mb:.0f}")
    if args.scvelo_jobs > 1:
        notes += f" scVelo's worker processes peaked at {sc.peak_children_mb:.0f} MB (reaped children only)."
    table = f"{HEADER}\n{SEP}\n{row}\n"
    return f"Simulated {n_obs} cells x {n_vars} genes", table + extra + "\n" + notes


def bench_pancreas(path: Path, args, tmp: Path) -> tuple[str, str]:
    from scipy.stats import spearmanr

    print(f"pancreas: preprocessing {path} ...", flush=True)
    adata, genes = preprocess_pancreas(path)
    data = _slim(adata)
    data_path = tmp / "pancreas.h5ad"
    data.write_h5ad(data_path)
    n_all = data.n_vars

    vf, vf_cached = run_velofit_pair(data_path, tmp, tag="_panc_vg", cpus=args.cpus, var_names=genes)
    vf_all, vf_all_cached = run_velofit_pair(data_path, tmp, tag="_panc_all", cpus=args.cpus)
    sc_genes = genes if not (args.scvelo_genes and args.scvelo_genes < genes.size) else genes[: args.scvelo_genes]
    sc = run_worker("scvelo", data_path, tmp, var_names=sc_genes, scvelo_jobs=args.scvelo_jobs, cpus=args.cpus,
                    tag="_panc")
    scale = genes.size / sc_genes.size
    sc_time_label = _wc(sc, 0, scale) + (
        f", extrapolated from {sc_genes.size} genes: {sc.times_s[0]:.3g} s" if sc_genes.size < genes.size else ""
    )

    vf_ok, vfa_ok, sc_ok = fitted_mask(vf.fit), fitted_mask(vf_all.fit), fitted_mask(sc.fit)
    both = vf_ok & sc_ok
    ll_vf, ll_vfa, ll_sc = loglik(vf.fit, data), loglik(vf_all.fit, data), loglik(sc.fit, data)
    r_vf = vf.fit.var["fit_gamma"].to_numpy(float) / vf.fit.var["fit_beta"].to_numpy(float)
    r_sc = sc.fit.var["fit_gamma"].to_numpy(float) / sc.fit.var["fit_beta"].to_numpy(float)
    rho_ratio = spearmanr(r_vf[both], r_sc[both]).statistic if both.sum() > 2 else np.nan
    t_vf, t_sc = np.asarray(vf.fit.layers["fit_t"]), np.asarray(sc.fit.layers["fit_t"])
    rho_t = []
    for j in np.flatnonzero(both):
        ok = np.isfinite(t_vf[:, j]) & np.isfinite(t_sc[:, j])
        if ok.sum() > 2:
            rho_t.append(spearmanr(t_vf[ok, j], t_sc[ok, j]).statistic)
    vf_better = np.nanmean((ll_vf >= ll_sc)[both]) if both.any() else np.nan

    rows = [
        (
            f"| pancreas_739, scVelo's velocity genes | {genes.size} | {_wc(vf, 0)} | {_wc(vf_cached, 0)} "
            f"| {_wc(vf, 1)} | {sc_time_label} | {_ratio(sc, vf, scale, vf_cached)} | {vf.peak_mb:.0f} "
            f"| {sc.peak_mb:.0f} "
            f"| {vf_ok.sum()} / {sc_ok.sum()}{' of ' + str(sc_genes.size) if sc_genes.size < genes.size else ''} "
            f"| — / — | — / — | {_f(np.nanmean(ll_vf[both]))} / {_f(np.nanmean(ll_sc[both]))} |"
        ),
        (
            f"| pancreas_739, all genes (velofit only) | {n_all} | {_wc(vf_all, 0)} | {_wc(vf_all_cached, 0)} "
            f"| {_wc(vf_all, 1)} | — | — | {vf_all.peak_mb:.0f} | — | {vfa_ok.sum()} / — | — / — | — / — "
            f"| {_f(np.nanmean(ll_vfa[vfa_ok]))} / — |"
        ),
    ]
    extra = (
        f"\nOn the {both.sum()} genes fitted by both: Spearman across genes of gamma/beta between the tools "
        f"{_f(rho_ratio)}; median per-gene Spearman(fit_t velofit, fit_t scVelo) {_f(float(np.nanmedian(rho_t)) if rho_t else np.nan)}; "
        f"velofit's model_loglik >= scVelo's on {_f(100 * vf_better, '{:.0f}')}% of them; median model_loglik "
        f"velofit {_f(np.nanmedian(ll_vf[both]))}, scVelo {_f(np.nanmedian(ll_sc[both]))}. The all-genes row's "
        f"model_loglik is the mean over all genes velofit fitted (not comparable with the first row). "
        f"Preprocessing: `X = layers['spliced']`, scVelo 0.2's `filter_and_normalize(min_shared_counts=20, "
        f"n_top_genes=2000)` spelled out with scVelo 0.3.4 and scanpy (0.3.4 dropped `n_top_genes`): "
        f"`scv.pp.filter_and_normalize(min_shared_counts=20)`, the 2,000 genes of highest seurat dispersion "
        f"(`sc.pp.highly_variable_genes` on log1p X), `sc.pp.log1p`; then `scv.pp.moments(n_pcs=30, "
        f"n_neighbors=30)` ({n_all} genes, {data.n_obs} cells). The velocity genes are computed as "
        f"scVelo's default `var_names='velocity_genes'` does and passed to both tools.\n"
    )
    notes = NOTES.format(imp=f"{vf.import_s:.1f} s", jobs=args.scvelo_jobs, vb=f"{vf.rss_before_mb:.0f}",
                         sb=f"{sc.rss_before_mb:.0f}")
    notes = notes.replace(" *rel. err. gamma/beta*", " No ground truth here. *rel. err. gamma/beta*")
    table = f"{HEADER}\n{SEP}\n" + "\n".join(rows) + "\n"
    return "pancreas_739", table + extra + "\n" + notes


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"(\d+)x(\d+)", item)
        if not m:
            raise argparse.ArgumentTypeError(f"size {item!r} is not CELLSxGENES, e.g. 2000x200")
        sizes.append((int(m.group(1)), int(m.group(2))))
    return sizes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("2000x200,5000x1000"),
                        help="simulated sizes CELLSxGENES, comma-separated ('' for none)")
    parser.add_argument("--pancreas", type=Path, default=DEFAULT_PANCREAS, help="pancreas_739.h5ad")
    parser.add_argument("--no-pancreas", action="store_true", help="skip the pancreas benchmark")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file to write sections to")
    parser.add_argument("--scvelo-jobs", type=int, default=1, help="n_jobs of scVelo")
    parser.add_argument("--scvelo-genes", type=int, default=None,
                        help="fit scVelo on the first N genes only and extrapolate its time linearly")
    parser.add_argument("--cpus", type=int, default=None, help="pin every worker to the first N CPUs")
    # helper mode: one fit in this (fresh) process
    parser.add_argument("--worker", choices=["velofit", "scvelo"], help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--var-names-file", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        _worker(args)
        return

    warnings.filterwarnings("ignore")
    command = "python " + shlex.join([os.path.relpath(Path(__file__).resolve(), REPO), *sys.argv[1:]])
    with tempfile.TemporaryDirectory(prefix="velofit_bench_") as tmpdir:
        tmp = Path(tmpdir)
        jobs = [lambda n_obs=n_obs, n_vars=n_vars: bench_simulated(n_obs, n_vars, args, tmp)
                for n_obs, n_vars in args.sizes]
        if not args.no_pancreas:
            if args.pancreas.exists():
                jobs.append(lambda: bench_pancreas(args.pancreas, args, tmp))
            else:
                print(f"note: {args.pancreas} not found; skipping the pancreas benchmark")
        sections = []
        for job in jobs:
            before, source = os.getloadavg()[0], velofit_source()
            title, body = job()
            load = f"{before:.1f} / {os.getloadavg()[0]:.1f}"
            sections.append((title, context_block(args, command, load, source) + "\n" + body))
    for title, body in sections:
        print(f"\n## {title}\n\n{body}")
        write_section(args.out, title, body)
    if sections:
        print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
