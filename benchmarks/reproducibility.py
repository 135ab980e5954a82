"""How far velofit's per-gene fit moves under rounding-level changes: of the input, or of the device.

Fits simulated data (``gpu_scaling.simulate``: MODEL.md's kinetics, 10% multiplicative noise)
with :func:`velofit.core.fit.fit_genes` defaults twice and prints, over genes, the largest
relative difference of the five parameters and the ratio of the losses:

- ``--perturb``: the second fit's input is multiplied by ``1 + 1e-13 * N(0, 1)`` (same device);
- ``--device gpu``: the second fit runs on the CPU, the first on the GPU (same input).

``--pancreas PATH`` fits pancreas_739's 2,000 genes (preprocessed as
``bench_recover_dynamics.py`` does) instead of simulated data.

A fit that amplifies rounding into different optima shows genes above 1e-3 here.

    python benchmarks/reproducibility.py --perturb
    python benchmarks/reproducibility.py --device gpu
    python benchmarks/reproducibility.py --perturb --pancreas ../shared/data/pancreas_739.h5ad
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_scaling import simulate

KEYS = ("alpha", "beta", "gamma", "t_", "scaling")


def compare(first, second, label: str) -> str:
    """One line: per-gene largest relative parameter difference and loss ratio of two fits."""
    ok = (first.status == "ok") & (second.status == "ok")
    diff = np.max([np.abs(getattr(first, k)[ok] / getattr(second, k)[ok] - 1) for k in KEYS], axis=0)
    loss = first.loss[ok] / second.loss[ok]
    return (f"{label}: genes ok {ok.sum()} / {ok.size}; per-gene largest relative parameter difference: "
            f"median {np.median(diff):.1e}, above 1e-6 / 1e-3 / 1e-1 in {(diff > 1e-6).sum()} / "
            f"{(diff > 1e-3).sum()} / {(diff > 1e-1).sum()} genes, largest {diff.max():.2e}; loss ratio: "
            f"min {loss.min():.4f}, median {np.median(loss):.6f}, max {loss.max():.4f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=3000)
    parser.add_argument("--genes", type=int, default=256)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="the first fit's device; with 'gpu' the second is the CPU")
    parser.add_argument("--perturb", action="store_true", help="perturb the second fit's input by 1e-13")
    parser.add_argument("--pancreas", type=Path, default=None, help="pancreas_739.h5ad instead of simulated data")
    args = parser.parse_args(argv)
    from velofit.core.fit import fit_genes

    if args.pancreas:
        from bench_recover_dynamics import preprocess_pancreas

        adata = preprocess_pancreas(args.pancreas)[0]
        mu, ms = (np.asarray(adata.layers[k].toarray() if hasattr(adata.layers[k], "toarray") else adata.layers[k],
                             dtype=np.float64) for k in ("Mu", "Ms"))
        data = f"pancreas_739 ({mu.shape[0]} x {mu.shape[1]})"
    else:
        mu, ms = (x.astype(np.float64) for x in simulate(args.cells, args.genes, seed=args.seed))
        data = f"{args.cells} x {args.genes}"
    first = fit_genes(mu, ms, device=args.device, progress=None)
    if args.perturb:
        rng = np.random.default_rng(5)
        mu = mu * (1 + 1e-13 * rng.standard_normal(mu.shape))
        ms = ms * (1 + 1e-13 * rng.standard_normal(ms.shape))
    second = fit_genes(mu, ms, device="cpu", progress=None)
    what = f"{args.device} vs cpu" + (", input perturbed by 1e-13" if args.perturb else "")
    print(compare(first, second, f"{what} on {data}"))


if __name__ == "__main__":
    main()
