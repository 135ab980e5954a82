"""Shared-time soft EM on a subset of cells vs on all cells: accuracy against the truth and time.

Data: ``velofit.datasets.simulate`` (known time and rates), float32 Ms/Mu. One per-gene fit is
shared by every run; each run is ``recover_dynamics_shared(per_gene_fit=False, subsample=...,
refine_iter=...)`` on a copy. Printed per run: seconds, EM iterations on all cells, the final
log-likelihood per observed value (on all cells), Spearman(latent time, true time) and the
median relative error of gamma/beta over genes.

Usage::

    python benchmarks/subsample.py --size 50000x300 --runs none 10000:10 10000:3
"""

from __future__ import annotations

import argparse
import time
import warnings


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="50000x300", help="cells x genes")
    parser.add_argument("--density", default="uniform", help="time density of the simulator")
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", nargs="+", default=["none", "10000:10", "10000:3"],
                        help="'none' (all cells) or SUBSAMPLE:REFINE_ITER")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    import anndata as ad
    import numpy as np
    from scipy.stats import spearmanr

    import velofit as vf

    n_obs, n_vars = (int(v) for v in args.size.split("x"))
    sim = vf.datasets.simulate(n_obs, n_vars, seed=args.seed, time_density=args.density, noise=args.noise)
    adata = ad.AnnData(obs=sim.obs, var=sim.var,
                       layers={k: np.asarray(sim.layers[k], np.float32) for k in ("Ms", "Mu")})
    vf.tl.recover_dynamics(adata, progress=False)
    truth = (sim.var["true_gamma"] / sim.var["true_beta"]).to_numpy()
    print("| EM | s | iterations on all cells | log-likelihood per value | Spearman(latent time, truth) "
          "| gamma/beta median rel. error |\n|---|---|---|---|---|---|")
    for run in args.runs:
        subsample, refine = (None, 0) if run == "none" else (int(v) for v in run.split(":"))
        fitted = adata.copy()
        start = time.perf_counter()
        vf.tl.recover_dynamics_shared(fitted, per_gene_fit=False, progress=False, subsample=subsample,
                                      refine_iter=refine)
        seconds = time.perf_counter() - start
        trace = fitted.uns["velofit"]["shared_fit"]["loglik"]
        ratio = (fitted.var["fit_gamma"] / fitted.var["fit_beta"]).to_numpy()
        ok = np.isfinite(ratio)
        error = np.median(np.abs(ratio[ok] - truth[ok]) / truth[ok])
        rho = spearmanr(fitted.obs["latent_time"], fitted.obs["true_t"]).statistic
        label = "all cells (`subsample=None`)" if subsample is None else f"{subsample:,} cells, then {refine} on all"
        print(f"| {label} | {seconds:.0f} | {trace.size - 1} | {trace[-1] / (n_obs * n_vars):.5f} | {rho:.5f} "
              f"| {error:.4f} |", flush=True)


if __name__ == "__main__":
    main()
