"""gamma/beta and time accuracy of velofit and scVelo across noise levels of scVelo's simulator.

At each ``--noise`` level: scVelo's ``datasets.simulation`` with per-gene log-normal rates (as
``bench_recover_dynamics.py``), both tools' ``recover_dynamics`` on ``Ms = spliced, Mu =
unspliced``, velofit also with the plain alternation (``EMConfig.move_times=False``: times held
in every M-step) and with every cell at its nearest point (``prior="uniform"``; the default,
``"learned"``, puts it at the nearest point of the branch its posterior under the gene's
learned time prior chooses, :mod:`velofit.core.time_prior`). Printed per fit: median
|gamma/beta error|, its median signed log error, median per-gene Spearman(fit_t, true t)
and, for velofit, the median of each gene's loss at the fit over its loss at the true
parameters (both with every cell at its nearest point).

Usage::

    python benchmarks/noise_sweep.py --noise 0.1,0.3,1 --cells 2000 --genes 200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_recover_dynamics import ratio_error, simulate, time_spearman


def truth_loss_ratio(fit, data) -> float:
    """Median over genes of loss(fit) / loss(true parameters), times at the nearest points."""
    import jax
    import jax.numpy as jnp

    from velofit.core.hard_em import EMConfig, e_step
    from velofit.core.initialize import gene_statistics
    from velofit.core.mstep import GeneData

    mu, ms = (np.asarray(data.layers[k], dtype=float) for k in ("Mu", "Ms"))
    stats = gene_statistics(mu, ms)
    var, v = data.var, fit.var
    true = np.stack([var.true_alpha, var.true_beta, var.true_gamma, var.true_t_, np.ones(data.n_vars)])
    fitted = np.stack([v.fit_alpha, v.fit_beta * v.fit_scaling, v.fit_gamma, v.fit_t_, v.fit_scaling])
    with jax.enable_x64(True):
        genes = GeneData(*(jnp.asarray(x) for x in (mu, ms, stats.weights.astype(float), stats.std_u, stats.std_s)),
                         jnp.arange(data.n_obs))
        loss = jax.jit(lambda theta: e_step(theta, None, genes, True, EMConfig())[1])
        ratio = np.asarray(loss(jnp.log(jnp.asarray(fitted, float)))) / np.asarray(loss(jnp.log(jnp.asarray(true, float))))
    return float(np.median(ratio))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise", default="0.1,0.3,1")
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--genes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import scvelo as scv

    import velofit as vf
    from velofit.core import hard_em

    scv.settings.verbosity = 0
    print("| noise level | fit | gamma/beta error | signed log error | Spearman(fit_t, true t) | loss / truth's |")
    print("|---|---|---|---|---|---|")
    for noise in (float(x) for x in args.noise.split(",")):
        data = simulate(args.cells, args.genes, args.seed, noise_level=noise)
        true_t = data.obs["true_t"].to_numpy(float)
        true_ratio = (data.var.true_gamma / data.var.true_beta).to_numpy()
        fits = {}
        for name, move in (("velofit", True), ("velofit, times held", False)):
            default = hard_em.EMConfig.__new__.__defaults__
            fields = hard_em.EMConfig._fields
            hard_em.EMConfig.__new__.__defaults__ = tuple(move if f == "move_times" else d for f, d in zip(fields, default))
            try:
                fits[name] = vf.tl.recover_dynamics(data, progress=False, copy=True)
            finally:
                hard_em.EMConfig.__new__.__defaults__ = default
        fits["velofit, nearest times (prior='uniform')"] = vf.tl.recover_dynamics(data, prior="uniform", progress=False,
                                                                                copy=True)
        theirs = data.copy()
        scv.tl.recover_dynamics(theirs, var_names="all", n_jobs=1, fit_connected_states=False, show_progress_bar=False)
        fits["scVelo"] = theirs
        for name, fit in fits.items():
            ratio = (fit.var.fit_gamma / fit.var.fit_beta).to_numpy()
            ok = np.isfinite(ratio)
            signed = np.median(np.log(ratio[ok] / true_ratio[ok]))
            vs_truth = f"{truth_loss_ratio(fit, data):.4f}" if name.startswith("velofit") else "—"
            print(f"| {noise:g} | {name} | {ratio_error(fit, data.var, ok):.4f} | {signed:+.4f} | "
                  f"{time_spearman(fit, true_t, ok):.4f} | {vs_truth} |", flush=True)


if __name__ == "__main__":
    main()
