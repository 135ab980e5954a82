"""The hard EM of every fittable gene on the iterated cells, in rounds that regroup unfinished genes.

A jitted chunk of genes iterates until its slowest gene has finished, so with genes packed
once, every chunk costs about ``max_iter`` iterations although most genes converge in far
fewer (median 7-10 of 20 on scVelo's simulator). Here the EM runs a few iterations at a
time (:data:`~velofit.core.programs.ADVANCE_STEPS`); after each round the genes that have
not finished are packed again into full chunks, grouped by their schedule (iterations done,
stage), so the work follows the number of iterations each gene needs.

Every gene's iterations depend only on its own data (per-gene reductions, no cross-gene
arithmetic), so regrouping gives the same result as one chunk per gene, up to the last bits
that a gene's column position in a chunk may change (``tests/test_determinism.py``). (The one
cross-gene rule, the switch from the explicit to the exact stage once every gene of a
chunk has converged, applies only with ``n_explicit > 0``.)

The pool holds, on the host, the iterated cells' moments of every fittable gene and the EM
carry: about ``4 * 8 * n_sample`` bytes per gene (16 MB per 500 genes at 1,024 cells).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import numpy as np

from .._io import column_index, padded_columns
from .hard_em import EMCarry, EMConfig, EMState
from .mstep import GeneData
from .programs import fit_program, no_penalty


@dataclass
class EMPool:
    """Inputs and EM carry of every fittable gene (columns), on the iterated cells (rows).

    Attributes
    ----------
    mu, ms, weights
        ``(n_sample, n_genes)`` moments and 0/1 weights of the iterated cells.
    std_u, std_s
        ``(n_genes,)`` residual scales.
    theta
        ``(5, n_genes)`` log-parameters (initial ones until the first round).
    t
        ``(n_sample, n_genes)`` times of the iterated cells.
    loss, damping
        ``(n_genes,)``.
    converged, done, started
        ``(n_genes,)`` booleans: converged in the current stage; fit final; first round run.
    n_iter, it, n_exact_done
        ``(n_genes,)`` integers: iterations updating the gene; iterations of its schedule;
        exact iterations of its schedule.
    exact
        ``(n_genes,)`` whether the gene's schedule is in the exact stage.
    trace
        ``(max_iter + 1, n_genes)`` loss per iteration.
    """

    mu: np.ndarray
    ms: np.ndarray
    weights: np.ndarray
    std_u: np.ndarray
    std_s: np.ndarray
    theta: np.ndarray
    t: np.ndarray
    loss: np.ndarray
    damping: np.ndarray
    converged: np.ndarray
    done: np.ndarray
    started: np.ndarray
    n_iter: np.ndarray
    it: np.ndarray
    n_exact_done: np.ndarray
    exact: np.ndarray
    trace: np.ndarray

    @classmethod
    def create(cls, mu, ms, weights, std_u, std_s, theta0, max_iter: int) -> EMPool:
        """A pool of genes that have not started.

        Parameters
        ----------
        mu, ms, weights
            ``(n_sample, n_genes)`` float64 moments and weights of the iterated cells.
        std_u, std_s
            ``(n_genes,)`` residual scales.
        theta0
            ``(5, n_genes)`` initial log-parameters.
        max_iter
            EM iterations (length of the trace is ``max_iter + 1``).

        Returns
        -------
        :class:`EMPool`.
        """
        n_sample, n_genes = mu.shape
        zeros = np.zeros(n_genes, np.int64)
        return cls(
            mu=mu, ms=ms, weights=weights, std_u=std_u, std_s=std_s, theta=theta0,
            t=np.zeros((n_sample, n_genes)), loss=np.zeros(n_genes), damping=np.zeros((2, n_genes)),
            converged=np.zeros(n_genes, bool), done=np.zeros(n_genes, bool), started=np.zeros(n_genes, bool),
            n_iter=zeros.copy(), it=zeros.copy(), n_exact_done=zeros.copy(), exact=np.zeros(n_genes, bool),
            trace=np.full((max_iter + 1, n_genes), np.nan),
        )

    def rounds(self, width: int) -> list[np.ndarray]:
        """The chunks of the next round: unfinished genes grouped by schedule, ``width`` at a time.

        Parameters
        ----------
        width
            Genes per chunk.

        Returns
        -------
        Lists of gene positions (sorted within a chunk); empty when every gene is done.
        """
        todo = np.flatnonzero(~self.done)
        keys = np.stack([self.started[todo], self.it[todo], self.exact[todo], self.n_exact_done[todo]])
        chunks = []
        for key in np.unique(keys, axis=1).T:
            group = todo[np.all(keys == key[:, None], axis=0)]
            chunks.extend(group[i : i + width] for i in range(0, group.size, width))
        return chunks

    def read(self, cols: np.ndarray, width: int) -> tuple:
        """Inputs of one chunk's task, padded to ``width`` genes by repeating the first.

        Parameters
        ----------
        cols
            Gene positions.
        width
            Compiled chunk width.

        Returns
        -------
        The positional arguments of :func:`em_round`.
        """
        first = cols[0]
        schedule = np.array([self.it[first], self.exact[first], self.n_exact_done[first], self.started[first]])
        names = ("mu", "ms", "weights", "std_u", "std_s", "theta", "t", "loss", "damping", "converged", "n_iter",
                 "trace")
        return (*(padded_columns(getattr(self, name), cols, width) for name in names), schedule)

    def store(self, cols: np.ndarray, result: dict[str, Any]) -> None:
        """Write one chunk's :func:`em_round` result back (its first ``len(cols)`` genes).

        Parameters
        ----------
        cols
            Gene positions.
        result
            Output of :func:`em_round`.
        """
        k = cols.size
        for name in ("theta", "t", "damping", "trace"):
            getattr(self, name)[:, column_index(cols)] = result[name][:, :k]
        for name in ("loss", "converged", "n_iter", "done"):
            getattr(self, name)[cols] = result[name][:k]
        self.it[cols], self.exact[cols], self.n_exact_done[cols] = result["schedule"]
        self.started[cols] = True


def em_round(mu, ms, weights, std_u, std_s, theta, t, loss, damping, converged, n_iter, trace, schedule, *,
             config: EMConfig, device: str | jax.Device) -> dict[str, Any]:
    """One round of one chunk: the first E-step if the genes have not started, then up to
    :data:`~velofit.core.programs.ADVANCE_STEPS` iterations (a pure function; runs on a Dask
    worker too).

    Parameters
    ----------
    mu, ms, weights, std_u, std_s
        The chunk's iterated data.
    theta, t, loss, damping, converged, n_iter, trace
        The chunk's EM carry (``t``, ``loss``, ``damping`` unused before the start).
    schedule
        ``(it, exact, n_exact_done, started)`` shared by the chunk's genes.
    config
        EM settings.
    device
        Device (or its name, resolved here).

    Returns
    -------
    Dict of the new carry arrays, ``done`` and ``schedule`` ``(it, exact, n_exact_done)``.
    """
    if isinstance(device, str):
        from .backends import resolve_device

        device = resolve_device(device)
    n_sample, width = mu.shape
    it, exact, n_exact_done, started = (int(x) for x in schedule)
    f64 = partial(np.asarray, dtype=np.float64)
    # Before the start the carry's arrays are placeholders of the right shapes.
    state = EMState(f64(theta), f64(t), f64(loss), f64(damping), np.asarray(converged, bool),
                    np.asarray(n_iter, np.int32))
    carry = EMCarry(np.int32(it), np.bool_(exact), np.int32(n_exact_done), state, f64(trace))
    data = GeneData(f64(mu), f64(ms), f64(weights), f64(std_u), f64(std_s), np.arange(n_sample, dtype=np.int64))
    with jax.enable_x64(True), jax.default_device(device):
        # One device_put of host arrays: jnp.asarray would compile a small program per shape.
        carry, data, penalty, begin, final = jax.device_put(
            (carry, data, no_penalty(width, config), np.bool_(not started), np.bool_(False)), device
        )
        program = fit_program(n_sample, width, config, device)
        carry, done = program(carry, data, carry.state.theta, penalty, begin, final)
        st = carry.state
        return {
            "theta": np.asarray(st.theta), "t": np.asarray(st.t), "loss": np.asarray(st.loss),
            "damping": np.asarray(st.damping), "converged": np.asarray(st.converged),
            "n_iter": np.asarray(st.n_iter, dtype=np.int64), "trace": np.asarray(carry.trace),
            "done": np.asarray(done), "schedule": (int(carry.it), bool(carry.exact), int(carry.n_exact_done)),
        }


def run_pool(pool: EMPool, width: int, config: EMConfig, device: str,
             map_chunks: Callable[..., None]) -> None:
    """Run the EM of every gene of ``pool`` to its end, in rounds (in place).

    Parameters
    ----------
    pool
        The genes.
    width
        Genes per chunk.
    config
        EM settings.
    device
        ``"auto"``, ``"cpu"`` or ``"gpu"``.
    map_chunks
        ``map_chunks(task, chunks, read, store)`` (see :func:`velofit.core.backends.map_chunks`).
    """
    task = partial(em_round, config=config, device=device)
    while chunks := pool.rounds(width):
        map_chunks(task, chunks, lambda cols: pool.read(cols, width), pool.store)
