"""Atlas size on this machine: the per-gene fit and the shared-time soft EM at 100,000 x 2,000.

Targets (issue #4): per-gene hard EM in at most 10 minutes, shared-time soft EM in at most 20,
peak memory at most 3x the Ms/Mu input, on a 2-core, 24 GB machine.

Data: ``velofit.datasets.simulate`` (the package's own simulator, known truth), written with
only the layers ``Ms`` and ``Mu``, as float32 (how atlases are stored; velofit computes in float64 chunk by chunk).
Each fit runs in a fresh process, killed after ``--cap`` seconds; its wall time, the peak RSS
of the process (``VmHWM``, data loading included) and the RSS just before the fit are
recorded. The soft EM is run as the user would after the per-gene fit
(``recover_dynamics(time="shared", em="soft")``, which starts from a per-gene fit of its own).

Usage::

    python benchmarks/atlas.py                       # 100000 x 2000, writes RESULTS.md section
    python benchmarks/atlas.py --size 20000x500      # smaller
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_recover_dynamics as brd

MODES = {
    "per-gene": {},  # recover_dynamics defaults: hard EM, every gene its own clock
    "shared-soft": {"time": "shared", "em": "soft", "prior": "learned"},
}


def _worker(args) -> None:
    import anndata as ad

    import velofit as vf

    adata = ad.read_h5ad(args.input)
    rss = brd._proc_status_mb("VmRSS")
    t0 = time.perf_counter()
    vf.tl.recover_dynamics(adata, progress=False, **json.loads(args.kwargs))
    seconds = time.perf_counter() - t0
    fitted = int((adata.var["fit_status"] == "ok").sum()) if "fit_status" in adata.var else -1
    Path(args.result).write_text(json.dumps({
        "seconds": seconds, "rss_before_mb": rss, "peak_mb": brd._proc_status_mb("VmHWM"), "fitted": fitted,
    }))


def _watch(proc, cap: float) -> float:
    """Wait for ``proc`` up to ``cap`` seconds; return its peak RSS in MB (``VmHWM``, read while it runs)."""
    peak = 0.0
    deadline = time.perf_counter() + cap
    while proc.poll() is None and time.perf_counter() < deadline:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = max(peak, int(status.split("VmHWM:")[1].split()[0]) / 1024.0)
        except (OSError, IndexError, ValueError):
            pass
        time.sleep(0.5)
    return peak


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=brd.parse_sizes, default=brd.parse_sizes("100000x2000"))
    parser.add_argument("--cap", type=float, default=1500.0, help="seconds after which a fit is killed")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated, from: per-gene (hard EM, every gene its clock), shared-soft "
                             "(shared time, soft EM, learned prior)")
    parser.add_argument("--out", type=Path, default=brd.DEFAULT_OUT)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return

    import anndata as ad
    import numpy as np

    import velofit as vf

    (n_obs, n_vars), = args.size
    rows = []
    with tempfile.TemporaryDirectory(prefix="velofit_atlas_") as tmpdir:
        tmp = Path(tmpdir)
        t0 = time.perf_counter()
        sim = vf.datasets.simulate(n_obs, n_vars, seed=0)
        adata = ad.AnnData(obs=sim.obs, var=sim.var, layers={
            layer: np.asarray(sim.layers[layer], dtype=np.float32) for layer in ("Ms", "Mu")})
        del sim
        input_mb = (adata.layers["Ms"].nbytes + adata.layers["Mu"].nbytes) / 1e6
        path = tmp / "atlas.h5ad"
        adata.write_h5ad(path)
        del adata
        print(f"simulated {n_obs} x {n_vars} in {time.perf_counter() - t0:.0f} s; Ms+Mu {input_mb:.0f} MB", flush=True)
        for name in args.modes.split(","):
            result = tmp / "result.json"
            result.unlink(missing_ok=True)
            cmd = [sys.executable, __file__, "--worker", "--input", str(path), "--kwargs", json.dumps(MODES[name]),
                   "--result", str(result)]
            start = time.perf_counter()
            errors = tmp / "stderr.txt"
            with open(errors, "w") as err:  # a file, not a pipe: a full pipe would stall the worker
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
                peak = _watch(proc, args.cap)
            if proc.returncode is None:  # still running at the cap
                proc.kill()
                proc.wait()
                outcome = None
                note = f"killed after {args.cap:.0f} s; its peak RSS until then {peak:.0f} MB ({peak / input_mb:.1f}x)"
            else:
                ok = proc.returncode == 0 and result.exists()
                outcome = json.loads(result.read_text()) if ok else None
                note = "" if ok else f"failed (rc {proc.returncode}): {errors.read_text().strip().splitlines()[-1:]}"
            wall = time.perf_counter() - start
            if outcome:
                rows.append(f"| {name} | {outcome['seconds']:.0f} | {outcome['peak_mb']:.0f} "
                            f"| {outcome['peak_mb'] / input_mb:.1f} | {outcome['rss_before_mb']:.0f} "
                            f"| {outcome['fitted']} / {n_vars} | |")
            else:
                rows.append(f"| {name} | > {wall:.0f} | — | — | — | — | {note} |")
            print(rows[-1], flush=True)

    m, v = brd.machine_info(), brd.versions()
    body = (
        f"- machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram']} RAM\n"
        f"- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + "\n"
        f"- velofit source: {brd.velofit_source()}\n"
        f"- command: `python benchmarks/atlas.py --size {n_obs}x{n_vars}`\n"
        f"- finished: {time.strftime('%Y-%m-%d %H:%M')}\n\n"
        f"Input: `velofit.datasets.simulate({n_obs}, {n_vars}, seed=0)`, Ms and Mu float32, {input_mb:.0f} MB "
        "together. Each fit in a fresh process (compilation included, compilation cache as the machine had it); "
        "peak MB is the process's peak RSS with the data loaded (RSS before the fit in its own column).\n\n"
        "| fit | s | peak MB | peak / input | RSS before fit MB | fitted genes | note |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    brd.write_section(args.out, f"Atlas size on this machine: {n_obs} cells x {n_vars} genes", body)
    print(body)


if __name__ == "__main__":
    main()
