"""Scaling of recover_dynamics: time and peak memory against cells and genes, velofit vs scVelo vs scvelo-rs.

Sizes: a sweep over cells at a fixed number of genes (``--cells`` x ``--cells-genes``), a sweep
over genes at a fixed number of cells (``--genes-cells`` x ``--genes``) and the issue's target
size (``--target``), run smallest first. Data: ``scvelo.datasets.simulation`` as in
``bench_recover_dynamics.py`` (per-gene log-normal rates passed as lists of length ``n_vars``,
switches as a list; ``Ms = spliced``, ``Mu = unspliced``, float64). scVelo's simulation
misbehaves when ``n_obs == n_vars``: such a size is simulated with one gene more, which is
dropped before any fit (said in the output).

Tools (``--tools``), each fit in a fresh Python process on the same h5ad file:

- ``velofit``: ``velofit.tl.recover_dynamics(adata, progress=False)`` on the layers in memory
  (first call in the process: JAX compilation included);
- ``velofit-lazy``: the same with the layers left on disk (``anndata.experimental.read_elem_lazy``
  Dask arrays, streamed chunk by chunk): its peak memory is the fit's own;
- ``scvelo-1`` / ``scvelo-2``: ``scvelo.tl.recover_dynamics(adata, var_names="all", n_jobs=1|2,
  fit_connected_states=False, show_progress_bar=False)``;
- ``scvelo-rs``: ``scvelo_rs.recover_dynamics`` with the same arguments (the PyPI package
  ``scvelo-rs``, a Rust port of scVelo; Rayon threads). If it is not installed, that is
  printed and written in the results, and it is not run.

Every fit is killed after ``--cap`` seconds (default 15 minutes) and reported as such; a tool
is then not run at sizes at least as large in both cells and genes, and, unless
``--no-predict-skip``, not at sizes where linear growth from its largest finished run predicts
more than twice the cap. Both are written in the table as "not run" with the reason; nothing
is extrapolated.

Peak memory: the worker's ``VmHWM`` (peak RSS, imports and data loading included) and, with
psutil, the peak of the summed RSS of the worker and its child processes (scVelo's
``n_jobs=2`` runs loky worker processes), sampled every 0.1 s; the larger is reported.

Writes a log-log PNG (``--png``) and the ``## Scaling`` section of ``--out`` (replaced if
present). ``--quick`` runs a tiny smoke test (writes ``## Scaling (quick smoke run)`` and
``scaling_quick.png``).

Usage::

    python benchmarks/scaling.py                # the full run (hours: scVelo up to the cap)
    python benchmarks/scaling.py --quick        # smoke test, a few minutes
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_recover_dynamics as brd  # shared helpers: simulate, machine, versions, write_section

REPO = HERE.parent
ALL_TOOLS = ("velofit", "velofit-lazy", "scvelo-1", "scvelo-2", "scvelo-rs")
LABELS = {
    "velofit": "velofit",
    "velofit-lazy": "velofit, layers on disk",
    "scvelo-1": "scVelo n_jobs=1",
    "scvelo-2": "scVelo n_jobs=2",
    "scvelo-rs": "scvelo-rs",
}


# --------------------------------------------------------------------------------------------
# worker: one fit in a fresh process
# --------------------------------------------------------------------------------------------


class TreePeak:
    """Peak summed RSS of this process and its children, sampled in a thread (needs psutil)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.peak = 0
        self._stop = threading.Event()
        try:
            import psutil
        except ImportError:
            self._thread = None
            return
        me = psutil.Process()

        def sample() -> None:
            while not self._stop.is_set():
                total = 0
                try:
                    for proc in [me, *me.children(recursive=True)]:
                        try:
                            total += proc.memory_info().rss
                        except (psutil.NoSuchProcess, psutil.AccessDenied):
                            pass
                except psutil.Error:
                    pass
                self.peak = max(self.peak, total)
                self._stop.wait(interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> float | None:
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        return self.peak / 1024**2


def _worker(args) -> None:
    warnings.filterwarnings("ignore")
    tree = TreePeak()
    import anndata as ad

    tool = args.worker
    if tool.startswith("velofit"):
        import velofit.tl as vtl
    elif tool == "scvelo-rs":
        import scvelo_rs
    else:
        import scvelo as scv

        scv.settings.verbosity = 0
    files = []
    if tool == "velofit-lazy":
        import h5py
        from anndata.experimental import read_elem_lazy

        f = h5py.File(args.input, "r")
        files.append(f)
        adata = ad.AnnData(obs=ad.io.read_elem(f["obs"]), var=ad.io.read_elem(f["var"]),
                           layers={k: read_elem_lazy(f[f"layers/{k}"]) for k in ("Ms", "Mu")})
    else:
        adata = ad.read_h5ad(args.input)
    t0, c0 = time.perf_counter(), time.process_time()
    if tool.startswith("velofit"):
        vtl.recover_dynamics(adata, progress=False)
    elif tool == "scvelo-rs":
        scvelo_rs.recover_dynamics(adata, var_names="all", fit_connected_states=False, show_progress_bar=False)
    else:
        scv.tl.recover_dynamics(adata, var_names="all", n_jobs=int(tool[-1]), fit_connected_states=False,
                                show_progress_bar=False)
    if tool.startswith("scvelo-"):
        try:  # join joblib's loky workers so that their CPU time is counted with the children's
            from joblib.externals.loky import get_reusable_executor

            get_reusable_executor().shutdown(wait=True)
        except Exception as err:  # noqa: BLE001 (no loky pool: nothing to join)
            print(f"note: loky workers not joined ({err}); their CPU time is not counted", file=sys.stderr)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    children_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    tree_peak = tree.stop()
    alpha = adata.var["fit_alpha"].to_numpy(dtype=float)
    Path(args.result).write_text(json.dumps({
        "wall_s": wall,
        "cpu_s": cpu + children_cpu.ru_utime + children_cpu.ru_stime,
        "vmhwm_mb": brd._proc_status_mb("VmHWM"),
        "tree_peak_mb": tree_peak,
        "n_fitted": int(np.isfinite(alpha).sum()),
        "n_genes": int(adata.n_vars),
    }))
    for f in files:
        f.close()


def _make_data(args) -> None:
    """Simulate one size and write the h5ad (a fresh process: the parent stays small)."""
    warnings.filterwarnings("ignore")
    n_obs, n_vars = args.n_obs, args.n_vars
    extra = int(n_obs == n_vars)
    adata = brd.simulate(n_obs, n_vars + extra, seed=0)
    if extra:
        adata = adata[:, :n_vars].copy()
    brd._slim(adata).write_h5ad(args.output)


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def run_tool(tool: str, data: Path, tmp: Path, cap: float) -> dict:
    result = tmp / f"{tool}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, "--input", str(data),
           "--result", str(result)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cap, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-1500:]
        print(f"    {tool} failed (rc={proc.returncode}):\n{tail}", flush=True)
        return {"status": "failed", "error": tail.strip().splitlines()[-1] if tail.strip() else "?"}
    out = json.loads(result.read_text())
    peaks = [p for p in (out["vmhwm_mb"], out["tree_peak_mb"]) if p is not None]
    out["peak_mb"] = max(peaks) if peaks else float("nan")
    out["status"] = "ok"
    return out


def skip_reason(tool: str, size: tuple[int, int], done: dict, cap: float, predict: bool) -> str | None:
    cells, genes = size
    for (c, g), res in done.items():
        if res.get("status") == "timeout" and cells >= c and genes >= g:
            return f"not run: over the {cap:.0f} s cap at {c}x{g}"
    if predict:
        finished = [(c * g, res["wall_s"], (c, g)) for (c, g), res in done.items()
                    if res.get("status") == "ok" and cells >= c and genes >= g]
        if finished:
            work, wall, (c, g) = max(finished)
            predicted = wall * cells * genes / work
            if predicted > 2 * cap:
                return f"not run: {wall:.0f} s at {c}x{g}, linear growth predicts {predicted:.0f} s > 2x cap"
    return None


def sizes_of(args) -> list[tuple[int, int]]:
    sizes = {(c, args.cells_genes) for c in args.cells} | {(args.genes_cells, g) for g in args.genes}
    sizes |= set(args.target)
    return sorted(sizes, key=lambda s: (s[0] * s[1], s))


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of log(time) on log(size) (1 = linear growth)."""
    if len(points) < 2:
        return float("nan")
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


def _cell(res: dict | None, key: str = "wall_s") -> str:
    if res is None:
        return "—"
    if res["status"] == "ok":
        fitted = "" if res["n_fitted"] == res["n_genes"] else f", {res['n_fitted']} of {res['n_genes']} genes fitted"
        return f"{res['wall_s']:.3g} ({res['cpu_s']:.3g}) / {res['peak_mb']:.0f}{fitted}"
    if res["status"] == "timeout":
        return "over the cap"
    if res["status"] == "failed":
        return f"failed: {res['error'][:60]}"
    return res["status"]


def report(results: dict, tools: list[str], sizes, args, notes: list[str]) -> str:
    head = ("| cells | genes | Ms+Mu float64 MB | "
            + " | ".join(f"{LABELS[t]}: s (CPU s) / peak MB" for t in tools)
            + " | scVelo n_jobs=1 / velofit | scvelo-rs / velofit | velofit peak / input |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for size in sizes:
        row = results.get(size, {})
        cells, genes = size
        input_mb = 2 * 8 * cells * genes / 1024**2
        vf, sc, rs = row.get("velofit"), row.get("scvelo-1"), row.get("scvelo-rs")

        def ratio(other, vf=vf):
            if vf and other and vf["status"] == other["status"] == "ok":
                return f"{other['wall_s'] / vf['wall_s']:.3g}"
            return "—"

        peak_ratio = f"{vf['peak_mb'] / input_mb:.2g}" if vf and vf["status"] == "ok" else "—"
        lines.append(f"| {cells} | {genes} | {input_mb:.3g} | " + " | ".join(_cell(row.get(t)) for t in tools)
                     + f" | {ratio(sc)} | {ratio(rs)} | {peak_ratio} |")
    growth = []
    for tool in tools:
        by_cells = [(c, results[(c, g)][tool]["wall_s"]) for (c, g) in sizes
                    if g == args.cells_genes and results.get((c, g), {}).get(tool, {}).get("status") == "ok"]
        by_genes = [(g, results[(c, g)][tool]["wall_s"]) for (c, g) in sizes
                    if c == args.genes_cells and results.get((c, g), {}).get(tool, {}).get("status") == "ok"]
        growth.append(f"{LABELS[tool]} {slope(by_cells):.2f} in cells, {slope(by_genes):.2f} in genes")
    text = "\n".join(lines) + "\n\n"
    text += ("Growth exponents (least-squares slope of log time on log size over the finished runs of each "
             "sweep; 1 = linear): " + "; ".join(growth) + ".\n\n")
    text += ("Each cell: wall seconds, (CPU seconds of the process and its children), / peak MB (the larger of "
             "`VmHWM` and the sampled RSS of the process tree; imports and data loading included). Every fit "
             "runs in a fresh process; velofit's time includes JAX compilation. Ratios are wall-time ratios "
             "at the same size. CPU seconds include the joined child processes (scVelo's loky workers). "
             "*Ms+Mu float64 MB* is the size of the two input layers in memory. At small sizes velofit's time is mostly compilation, so growth exponents are only "
             "meaningful over the full sweep.\n")
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return text


def plot(results: dict, tools: list[str], sizes, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    sweeps = (("cells", lambda s: s[1] == args.cells_genes, 0, f"genes = {args.cells_genes}"),
              ("genes", lambda s: s[0] == args.genes_cells, 1, f"cells = {args.genes_cells}"))
    for name, keep, axis, fixed in sweeps:
        for row, (key, ylabel) in enumerate((("wall_s", "wall time (s)"), ("peak_mb", "peak memory (MB)"))):
            ax = axes[row, axis]
            for tool in tools:
                pts = [(s[axis], results[s][tool][key]) for s in sizes
                       if keep(s) and results.get(s, {}).get(tool, {}).get("status") == "ok"]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=LABELS[tool])
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(f"{name} ({fixed})")
            ax.set_ylabel(ylabel)
            if row == 0:
                ax.axhline(args.cap, color="grey", ls=":", lw=1)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("recover_dynamics scaling (fits over the cap are not plotted)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--cells", type=parse_ints, default=parse_ints("1000,3000,10000,30000,100000"))
    parser.add_argument("--cells-genes", type=int, default=1000, help="genes of the cell sweep")
    parser.add_argument("--genes", type=parse_ints, default=parse_ints("100,300,1000,2000"))
    parser.add_argument("--genes-cells", type=int, default=10000, help="cells of the gene sweep")
    parser.add_argument("--target", type=brd.parse_sizes, default=brd.parse_sizes("50000x1000"),
                        help="extra sizes CELLSxGENES ('' for none)")
    parser.add_argument("--tools", default=",".join(ALL_TOOLS), help=f"comma-separated, from {ALL_TOOLS}")
    parser.add_argument("--cap", type=float, default=900.0, help="seconds after which a fit is killed")
    parser.add_argument("--no-predict-skip", action="store_true",
                        help="run every size below a timeout, even where linear growth predicts > 2x cap")
    parser.add_argument("--out", type=Path, default=brd.DEFAULT_OUT)
    parser.add_argument("--png", type=Path, default=None, help="default: benchmarks/scaling.png")
    parser.add_argument("--worker", choices=ALL_TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--make-data", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n-obs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--n-vars", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    if args.make_data:
        return _make_data(args)
    if args.quick:
        args.cells, args.cells_genes, args.genes, args.genes_cells, args.target = [300, 600], 20, [40], 300, []
        args.cap = min(args.cap, 300.0)
    title = "Scaling (quick smoke run)" if args.quick else "Scaling"
    png = args.png or HERE / ("scaling_quick.png" if args.quick else "scaling.png")
    command = "python " + shlex.join([os.path.relpath(Path(__file__).resolve(), REPO), *sys.argv[1:]])

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = sorted(set(tools) - set(ALL_TOOLS))
    if unknown:
        parser.error(f"unknown tools {unknown}; choose from {ALL_TOOLS}")
    notes = []
    if "scvelo-rs" in tools and importlib.util.find_spec("scvelo_rs") is None:
        msg = "scvelo-rs is not installed here (`pip install scvelo-rs`, PyPI package `scvelo-rs`): not run"
        print(msg, flush=True)
        notes.append(msg)
        tools.remove("scvelo-rs")
    elif "scvelo-rs" in tools:
        from importlib.metadata import version

        notes.append(f"scvelo-rs {version('scvelo-rs')} (`scvelo_rs.recover_dynamics`, Rayon threads: every CPU).")
    sizes = sizes_of(args)
    if any(c == g for c, g in sizes):
        notes.append("sizes with cells == genes were simulated with one gene more, dropped before the fits "
                     "(scVelo's simulation misbehaves when n_obs == n_vars).")
    results: dict = {}
    done: dict = {t: {} for t in tools}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="velofit_scaling_") as tmpdir:
        tmp = Path(tmpdir)
        for size in sizes:
            cells, genes = size
            runnable = {t: skip_reason(t, size, done[t], args.cap, not args.no_predict_skip) for t in tools}
            results[size] = {t: {"status": r} for t, r in runnable.items() if r}
            if all(runnable.values()):
                continue
            data = tmp / f"sim_{cells}x{genes}.h5ad"
            print(f"{cells} cells x {genes} genes: simulating ...", flush=True)
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--make-data", "--n-obs", str(cells),
                            "--n-vars", str(genes), "--output", str(data)], check=True)
            for tool in tools:
                if runnable[tool]:
                    print(f"  {tool}: {runnable[tool]}", flush=True)
                    continue
                print(f"  {tool} ...", end=" ", flush=True)
                res = run_tool(tool, data, tmp, args.cap)
                results[size][tool] = done[tool][size] = res
                print(_cell(res), flush=True)
            data.unlink()
    m, v = brd.machine_info(), brd.versions()
    context = (
        f"- machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram']} RAM; JAX devices: {_jax_devices()}\n"
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + "\n"
        f"- velofit source: {brd.velofit_source()}\n"
        f"- command: `{command}`; cap {args.cap:.0f} s per fit\n"
        f"- finished: {time.strftime('%Y-%m-%d %H:%M')}; 1-min load average before / after: "
        f"{load_before:.1f} / {os.getloadavg()[0]:.1f}\n"
        f"- figure: `{os.path.relpath(png, args.out.parent)}`\n"
    )
    body = context + "\n" + report(results, tools, sizes, args, notes)
    plot(results, tools, sizes, args, png)
    print(f"\n## {title}\n\n{body}")
    brd.write_section(args.out, title, body)
    print(f"written to {args.out} and {png}")
    return None


def _jax_devices() -> str:
    import jax

    return ", ".join(sorted({f"{d.platform}:{d.device_kind}" for d in jax.devices()}))


if __name__ == "__main__":
    main()
