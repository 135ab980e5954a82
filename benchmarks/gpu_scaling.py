"""Time velofit's per-gene fit on a GPU at atlas sizes (run on a machine with a CUDA JAX).

Data are simulated on the host from MODEL.md's kinetics (per-gene log-normal rates, uniform
time, 10% multiplicative Gaussian noise), stored as float32 and read chunk by chunk through
:func:`velofit.core.fit.fit_columns`, as a backed or Dask input would be. Each size runs in
this process after a small warm-up fit, so the first size's time includes compilation.

    python benchmarks/gpu_scaling.py --sizes 100000x2000,1000000x2000 --out gpu.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np


def simulate(n_cells: int, n_genes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy float32 ``(Mu, Ms)`` of the two-state kinetics, generated gene block by block."""
    rng = np.random.default_rng(seed)
    alpha = np.exp(rng.normal(np.log(5), 0.5, n_genes))
    beta = np.exp(rng.normal(np.log(0.5), 0.5, n_genes))
    gamma = np.exp(rng.normal(np.log(0.3), 0.5, n_genes))
    switch = rng.uniform(3, 9, n_genes)
    t = rng.uniform(0, 20, n_cells).astype(np.float32)[:, None]
    mu = np.empty((n_cells, n_genes), np.float32)
    ms = np.empty((n_cells, n_genes), np.float32)
    for start in range(0, n_genes, 64):
        g = slice(start, min(start + 64, n_genes))
        a, b, c, ts = alpha[g], beta[g], gamma[g], switch[g]
        tau = np.minimum(t, ts)
        u = a / b * (1 - np.exp(-b * tau))
        d = np.where(np.abs(c - b) < 1e-6, 1e-6, c - b)
        s = a / c * (1 - np.exp(-c * tau)) + a / d * (np.exp(-c * tau) - np.exp(-b * tau))
        u_, s_ = u, s
        rep = np.maximum(t - ts, 0)
        u = u_ * np.exp(-b * rep)
        s = s_ * np.exp(-c * rep) + b * u_ / d * (np.exp(-c * rep) - np.exp(-b * rep))
        noise = rng.standard_normal((2, n_cells, g.stop - g.start), dtype=np.float32)
        mu[:, g] = np.maximum(u * (1 + 0.1 * noise[0]), 0)
        ms[:, g] = np.maximum(s * (1 + 0.1 * noise[1]), 0)
    return mu, ms


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000x2000,1000000x2000")
    parser.add_argument("--memory-budget", default="40GB")
    parser.add_argument("--device", default="gpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import jax

    from velofit.core.fit import fit_columns, fit_genes

    device = jax.devices()[0]
    lines = [
        f"- device: {getattr(device, 'device_kind', device.platform)} ({device.platform}); host: {platform.processor() or platform.machine()}",
        f"- versions: python {platform.python_version()}, jax {jax.__version__}, numpy {np.__version__}",
        f"- command: `python {' '.join(['benchmarks/gpu_scaling.py', *(argv or sys.argv[1:])])}`",
        "",
        "| cells x genes | simulate s | fit s | genes fitted | median n_iter |",
        "|---|---|---|---|---|",
    ]
    mu, ms = simulate(2000, 8, seed=1)
    t0 = time.perf_counter()
    fit_genes(mu.astype(np.float64), ms.astype(np.float64), device=args.device, progress=None)
    print(f"warm-up 2000x8: {time.perf_counter() - t0:.1f} s", flush=True)
    for size in args.sizes.split(","):
        n_cells, n_genes = (int(x) for x in size.split("x"))
        t0 = time.perf_counter()
        mu, ms = simulate(n_cells, n_genes)
        t_sim = time.perf_counter() - t0
        print(f"{size}: simulated in {t_sim:.1f} s", flush=True)

        def read(cols, mu=mu, ms=ms):
            return mu[:, cols].astype(np.float64), ms[:, cols].astype(np.float64)

        t0 = time.perf_counter()
        fit = fit_columns(read, n_cells, n_genes, device=args.device, memory_budget=args.memory_budget)
        t_fit = time.perf_counter() - t0
        ok = fit.status == "ok"
        row = f"| {n_cells} x {n_genes} | {t_sim:.1f} | {t_fit:.1f} | {ok.sum()} / {n_genes} | {np.median(fit.n_iter[ok]):.0f} |"
        print(row, flush=True)
        lines.append(row)
        del mu, ms, fit
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
