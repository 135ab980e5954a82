"""Is ``latent_time_std`` calibrated? Coverage of the true time on simulated data.

The shared-time soft EM (``recover_dynamics(time="shared", em="soft")``) on the package's
simulator (independent Gaussian noise per cell and gene, known time). The clock is defined up
to a monotone map of the true time, so each cell's error is its latent time minus an isotonic
regression of latent time on the true time (which absorbs a little of the error: the coverage
printed is slightly optimistic). Calibrated spreads give a median ``|z|`` of 0.67 and 95% of
cells with ``|z| < 2``.

Usage::

    python benchmarks/calibration.py            # prints a markdown table
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import spearmanr
from sklearn.isotonic import IsotonicRegression

import velofit as vf


def main() -> None:
    warnings.filterwarnings("ignore")
    print("| seed | noise | Spearman(latent time, true) | median std | median abs error | median abs z (0.67) "
          "| cells with abs z < 2 (0.95) |")
    print("|---|---|---|---|---|---|---|")
    for seed in (0, 1):
        for noise in (0.1, 0.3):
            adata = vf.datasets.simulate(1000, 100, seed=seed, noise=noise)
            vf.tl.recover_dynamics(adata, time="shared", em="soft", progress=False)
            true_t = adata.obs["true_t"].to_numpy()
            clock = adata.obs["latent_time"].to_numpy()
            std = adata.obs["latent_time_std"].to_numpy()
            error = clock - IsotonicRegression().fit(true_t, clock).predict(true_t)
            z = np.abs(error) / std
            print(f"| {seed} | {noise} | {spearmanr(true_t, clock)[0]:.3f} | {np.median(std):.4f} "
                  f"| {np.median(np.abs(error)):.4f} | {np.median(z):.2f} | {np.mean(z < 2):.2f} |", flush=True)


if __name__ == "__main__":
    main()
