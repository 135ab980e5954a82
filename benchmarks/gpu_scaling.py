"""Time velofit's per-gene fit on a GPU at atlas sizes (run on a machine with a CUDA JAX).

Data are simulated with JAX from MODEL.md's kinetics (per-gene log-normal rates, uniform
time, 10% multiplicative Gaussian noise), stored on the host as float32 and read chunk by
chunk through :func:`velofit.core.fit.fit_columns`, as a backed or Dask input would be. Every
size runs in this process; the first fit on each device includes its compilation.
``--agreement`` first fits one small dataset on ``--device`` and on the CPU and prints how far
the two fits differ; ``--cpu-sizes`` times CPU fits on the same machine for a like-for-like ratio.

    python benchmarks/gpu_scaling.py --agreement --sizes 100000x2000,1000000x2000 --cpu-sizes 100000x2000
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def simulate(n_cells: int, n_genes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy float32 ``(Mu, Ms)`` of the two-state kinetics, generated with JAX gene block by gene block.

    Runs on JAX's default device (on a GPU, 1,000,000 x 2,000 takes seconds where NumPy on
    one host core took minutes) and returns host arrays.
    """
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    alpha = np.exp(rng.normal(np.log(5), 0.5, n_genes))
    beta = np.exp(rng.normal(np.log(0.5), 0.5, n_genes))
    gamma = np.exp(rng.normal(np.log(0.3), 0.5, n_genes))
    switch = rng.uniform(3, 9, n_genes)
    key = jax.random.PRNGKey(seed)
    t = jax.random.uniform(key, (n_cells, 1), jnp.float32, 0, 20)

    @jax.jit
    def block(a, b, c, ts, key):
        tau = jnp.minimum(t, ts)
        u = a / b * (1 - jnp.exp(-b * tau))
        d = jnp.where(jnp.abs(c - b) < 1e-6, 1e-6, c - b)
        s = a / c * (1 - jnp.exp(-c * tau)) + a / d * (jnp.exp(-c * tau) - jnp.exp(-b * tau))
        rep = jnp.maximum(t - ts, 0)
        u_rep = u * jnp.exp(-b * rep)
        s_rep = s * jnp.exp(-c * rep) + b * u / d * (jnp.exp(-c * rep) - jnp.exp(-b * rep))
        noise = jax.random.normal(key, (2, *u_rep.shape), jnp.float32)
        return jnp.maximum(u_rep * (1 + 0.1 * noise[0]), 0), jnp.maximum(s_rep * (1 + 0.1 * noise[1]), 0)

    mu = np.empty((n_cells, n_genes), np.float32)
    ms = np.empty((n_cells, n_genes), np.float32)
    width = 256
    for start in range(0, n_genes, width):
        g = slice(start, min(start + width, n_genes))
        pad = width - (g.stop - g.start)  # one compiled block shape
        rates = [np.pad(x[g], (0, pad), constant_values=1.0).astype(np.float32) for x in (alpha, beta, gamma, switch)]
        u, s = block(*rates, jax.random.fold_in(key, start))
        mu[:, g] = np.asarray(u)[:, : g.stop - g.start]
        ms[:, g] = np.asarray(s)[:, : g.stop - g.start]
    return mu, ms


def agreement(device: str, n_cells: int = 3000, n_genes: int = 256) -> str:
    """Fit the same data on ``device`` and on the CPU; how far the fits differ (``reproducibility.compare``)."""
    from reproducibility import compare

    from velofit.core.fit import fit_genes

    mu, ms = (x.astype(np.float64) for x in simulate(n_cells, n_genes, seed=2))
    fits = {d: fit_genes(mu, ms, device=d, progress=None) for d in (device, "cpu")}
    return compare(fits[device], fits["cpu"], f"{device} vs cpu on {n_cells} x {n_genes}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000x2000,1000000x2000")
    parser.add_argument("--memory-budget", default="40GB")
    parser.add_argument("--device", default="gpu")
    parser.add_argument("--cpu-sizes", default="", help="also fit these sizes with device='cpu' (same machine)")
    parser.add_argument("--agreement", action="store_true", help="first compare a small fit on --device and the CPU")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import jax

    from velofit.core.fit import fit_columns

    device = jax.devices()[0]
    lines = [
        (f"- device: {getattr(device, 'device_kind', device.platform)} ({device.platform}); host: "
         f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"),
        f"- versions: python {platform.python_version()}, jax {jax.__version__}, numpy {np.__version__}",
        f"- command: `python {' '.join(['benchmarks/gpu_scaling.py', *(argv or sys.argv[1:])])}`",
        "",
        "| device | cells x genes | simulate s | fit s | of which reading chunks s | genes fitted | median n_iter |",
        "|---|---|---|---|---|---|---|",
    ]
    if args.agreement:
        line = agreement(args.device)
        print(line, flush=True)
        lines.insert(3, f"- agreement: {line}")
    jobs = [(size, args.device) for size in args.sizes.split(",") if size]
    jobs += [(size, "cpu") for size in args.cpu_sizes.split(",") if size]
    data: dict[str, tuple] = {}
    for size, where in jobs:
        n_cells, n_genes = (int(x) for x in size.split("x"))
        if size not in data:
            data.clear()  # one size's data at a time
            t0 = time.perf_counter()
            data[size] = (*simulate(n_cells, n_genes), time.perf_counter() - t0)
            print(f"{size}: simulated in {data[size][2]:.1f} s", flush=True)
        mu, ms, t_sim = data[size]

        reading = [0.0]

        def read(cols, mu=mu, ms=ms, reading=reading):
            t0 = time.perf_counter()
            out = mu[:, cols].astype(np.float64), ms[:, cols].astype(np.float64)
            reading[0] += time.perf_counter() - t0
            return out

        t0 = time.perf_counter()
        fit = fit_columns(read, n_cells, n_genes, device=where, memory_budget=args.memory_budget)
        t_fit = time.perf_counter() - t0
        ok = fit.status == "ok"
        row = (f"| {where} | {n_cells} x {n_genes} | {t_sim:.1f} | {t_fit:.1f} | {reading[0]:.1f} | {ok.sum()} / {n_genes} | "
               f"{np.median(fit.n_iter[ok]):.0f} |")
        print(row, flush=True)
        lines.append(row)
        del mu, ms, fit
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
