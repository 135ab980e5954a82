"""Scale: memory budget, streamed inputs (Dask, h5py, on-disk sparse, backed mode), the Dask
backend on a LocalCluster, devices, and the options' input checks.

Every fit compares bitwise with the in-memory fit of the same data (60 cells x 6 genes,
``max_iter=3, n_explicit=1``). Two compiled shapes: chunks of 6 genes (the default) and of
3 genes (``chunk_size=3``).
"""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
import time
import tracemalloc

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from test_determinism import _bitwise, max_abs_diff, simulate

from velofit import tl
from velofit._validation import VelofitInputError, VelofitTypeError
from velofit.core import memory
from velofit.core.backends import resolve_device
from velofit.core.fit import fit_chunk
from velofit.core.hard_em import EMConfig

FIT = {"max_iter": 3, "n_explicit": 1, "progress": False}
CONFIG = EMConfig(max_iter=3, n_explicit=1)
N_OBS, N_VARS = 60, 6


def fit(adata: ad.AnnData, *, inplace: bool = False, **kwargs) -> ad.AnnData:
    """The fitted copy (``inplace``: fit ``adata`` itself; h5py layers cannot be copied)."""
    out = tl.recover_dynamics(adata, copy=not inplace, **{**FIT, **kwargs})
    return adata if inplace else out


def outputs(adata: ad.AnnData) -> dict[str, np.ndarray]:
    out = {f"var/{c}": adata.var[c].to_numpy() for c in adata.var.columns if c.startswith("fit_")}
    out.update({f"layers/{k}": np.asarray(adata.layers[k]) for k in ("fit_t", "fit_tau", "fit_tau_")})
    out["varm/loss"] = np.asarray(adata.varm["loss"])
    return out


def assert_same(a: ad.AnnData, b: ad.AnnData) -> None:
    x, y = outputs(a), outputs(b)
    assert x.keys() == y.keys()
    for key in x:
        assert _bitwise(x[key], y[key]), f"{key} differs: max abs diff {max_abs_diff(x[key], y[key])}"


def assert_same_to_rounding(a: ad.AnnData, b: ad.AnnData, rtol: float = 1e-10) -> None:
    """Equal to the last bits: what a gene's column position in a chunk may change (the
    projected M-step's curve evaluations; ``tests/test_determinism.py``)."""
    x, y = outputs(a), outputs(b)
    assert x.keys() == y.keys()
    for key in x:
        if x[key].dtype.kind == "f":
            scale = np.nanmax(np.abs(y[key]), initial=0.0)
            np.testing.assert_allclose(x[key], y[key], rtol=rtol, atol=rtol * scale, err_msg=key)
        else:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture(scope="module")
def data() -> ad.AnnData:
    adata = simulate(n_obs=N_OBS, n_vars=N_VARS, seed=5)
    for key in ("Ms", "Mu"):
        adata.layers[key] = np.asarray(adata.layers[key], dtype=np.float64)
    return adata


@pytest.fixture(scope="module")
def reference(data) -> ad.AnnData:
    return fit(data)


@pytest.fixture(scope="module")
def reference3(data) -> ad.AnnData:
    return fit(data, chunk_size=3)


# --------------------------------------------------------------------------- memory budget


def test_chunk_width_does_not_change_results(reference, reference3):
    assert_same_to_rounding(reference, reference3)


def test_chunks_run_at_once_in_threads_give_the_same_fit(data, reference3, monkeypatch):
    """Local chunks in threads (two at once on a CPU) or one after another: bitwise the same."""
    import velofit.core.fit as fit_module

    monkeypatch.setattr(fit_module, "LOCAL_CPU_WORKERS", 1)
    one_at_a_time = fit(data, chunk_size=3)
    monkeypatch.setattr(fit_module, "LOCAL_CPU_WORKERS", 3)
    assert_same_to_rounding(reference3, one_at_a_time)
    assert_same_to_rounding(one_at_a_time, fit(data, chunk_size=2))


def test_blocks_of_cells_timed_in_threads_give_the_same_fit(data, monkeypatch):
    """The last pass times blocks of cells in threads or one after another: bitwise the same."""
    import velofit.core.fit as fit_module

    monkeypatch.setattr(fit_module, "program_rows", lambda n_cells, config: min(n_cells, 16))  # 60 cells: 4 blocks
    mu, ms = (np.asarray(data.layers[k]) for k in ("Mu", "Ms"))
    kwargs = {"width": N_VARS, "sample": np.arange(N_OBS), "config": CONFIG}
    one, three = (fit_chunk(mu, ms, threads=k, **kwargs) for k in (1, 3))
    assert one.ok.size == N_VARS
    for name in ("theta", "t", "loss", "span", "status"):
        assert _bitwise(getattr(one, name), getattr(three, name)), name


def test_local_map_in_threads_stores_in_order_and_raises():
    from velofit.core.backends import map_chunks

    chunks = [np.array([i]) for i in range(7)]
    stored = []

    def task(x):
        time.sleep(0.01 * (7 - x))  # later chunks finish first
        return x * 10

    map_chunks(task, chunks, lambda cols: (int(cols[0]),), lambda cols, r: stored.append((int(cols[0]), r)),
               workers=3)
    assert stored == [(i, 10 * i) for i in range(7)]

    def failing(x):
        if x == 4:
            raise RuntimeError("chunk 4 failed")
        return x

    with pytest.raises(RuntimeError, match="chunk 4 failed"):
        map_chunks(failing, chunks, lambda cols: (int(cols[0]),), lambda cols, r: None, workers=2)


def test_local_map_runs_chunks_one_at_a_time_when_asked():
    """Chunks read while ``one_at_a_time()`` is true run alone; later ones up to ``workers`` at once."""
    import threading

    from velofit.core.backends import map_chunks

    chunks = [np.array([i]) for i in range(8)]
    lock, running, peaks, stored = threading.Lock(), [0], {}, []

    def task(x):
        with lock:
            running[0] += 1
            peaks[x] = running[0]
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return x

    reads = []

    def read(cols):
        reads.append(int(cols[0]))
        return (int(cols[0]),)

    map_chunks(task, chunks, read, lambda cols, r: stored.append(r), workers=3,
               one_at_a_time=lambda: len(reads) < 4)
    assert stored == list(range(8))
    assert max(peaks[x] for x in range(4)) == 1  # read while one at a time was asked
    assert max(peaks.values()) >= 2  # then several at once


def test_model_covers_xla_accounting():
    """XLA's own accounting of the compiled EM stays within the model used for the default."""
    for width in (3, 6):
        need = memory.chunk_footprint(N_OBS, width, CONFIG)
        assert need <= memory.bytes_per_gene(N_OBS, CONFIG) * width


def test_host_arrays_within_model(data):
    """NumPy memory of one chunk (tracemalloc; XLA's buffers are not NumPy's) stays in the model.

    The cells are repeated 20 times so that the arrays that grow with the cells, which the
    model is about, dominate the few fixed-size ones.
    """
    mu = np.asfortranarray(np.tile(data.layers["Mu"], (20, 1)), dtype=np.float64)
    ms = np.asfortranarray(np.tile(data.layers["Ms"], (20, 1)), dtype=np.float64)
    n_cells = mu.shape[0]
    sample = np.arange(0, n_cells, 2)
    fit_chunk(mu, ms, width=N_VARS, sample=sample, config=CONFIG)  # compile outside the trace
    tracemalloc.start()
    try:
        fit_chunk(mu, ms, width=N_VARS, sample=sample, config=CONFIG)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 8 * memory.HOST_ARRAYS * n_cells * N_VARS


def test_first_pass_holds_few_copies_of_a_chunk(data):
    """The first pass (statistics, percentiles, initial parameters) of one chunk holds at most
    four float64 copies of the chunk at once on top of its input (2.7 here; 5.5 before its
    percentiles partitioned in place and the initialisation stopped copying the fittable
    columns). On a multi-core CPU two chunks run this pass at once, so this is the memory
    that the threads double (issue #4: peak at most 3x the input at atlas size)."""
    from velofit.core.fit import prepare_chunk

    mu = np.asfortranarray(np.tile(data.layers["Mu"], (500, 1)), dtype=np.float64)
    ms = np.asfortranarray(np.tile(data.layers["Ms"], (500, 1)), dtype=np.float64)
    n_cells = mu.shape[0]
    sample = np.arange(0, n_cells, 500)
    prepare_chunk(mu, ms, sample=sample)
    tracemalloc.start()
    try:
        prep = prepare_chunk(mu, ms, sample=sample)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert prep.ok.size == N_VARS
    assert peak <= 4 * mu.nbytes


def test_time_layers_are_float32_rounding_of_the_fit(data, reference):
    """The written layers are the float64 fit's times in float32 (half the memory).

    The fit stores float32 times and the layer rescales them: two roundings, so up to 2 ulp
    of the time (``fit_tau_ = t - t_`` keeps that absolute error, on a clock of length 20).
    """
    from velofit.core.fit import fit_genes

    genefit = fit_genes(data.layers["Mu"], data.layers["Ms"], CONFIG)
    align = reference.var["fit_alignment_scaling"].to_numpy()
    switch = reference.var["fit_t_"].to_numpy()
    expected = np.where(genefit.fitted, genefit.t, np.nan) * align
    for key, values in {"fit_t": expected, "fit_tau": np.minimum(expected, switch),
                        "fit_tau_": np.maximum(expected - switch, 0.0)}.items():
        layer = reference.layers[key]
        assert layer.dtype == np.float32 and layer.shape == data.shape
        np.testing.assert_array_equal(np.isnan(layer), np.isnan(values), err_msg=key)
        np.testing.assert_allclose(layer, values, rtol=2.5e-7, atol=2 * float(np.spacing(np.float32(20))), err_msg=key)


def test_time_layers_written_in_blocks_of_cells_are_the_same(data, reference, monkeypatch):
    """Blocks of a few cells (written in threads) give the same layers as one block, for all
    genes (the fit's times array reused as fit_t) and for a subset of non-consecutive genes."""
    import velofit.tl._recover_dynamics as rd

    names = list(data.var_names[[5, 1, 3]])
    one_block = fit(data, var_names=names)
    monkeypatch.setattr(rd, "_TIME_BLOCK_VALUES", 13)  # 2 cells per block for 6 genes, 4 for 3
    for expected, out in ((reference, fit(data)), (one_block, fit(data, var_names=names))):
        for key in ("fit_t", "fit_tau", "fit_tau_"):
            assert _bitwise(expected.layers[key], out.layers[key]), key
    assert np.isnan(one_block.layers["fit_t"][:, [0, 2, 4]]).all()


def test_time_layers_of_a_gene_subset(data, reference):
    """Genes not fitted get nan columns; the fitted ones equal the fit of all genes."""
    names = list(data.var_names[[4, 1]])
    out = fit(data, var_names=names)
    for key in ("fit_t", "fit_tau", "fit_tau_"):
        layer = out.layers[key]
        assert layer.dtype == np.float32
        assert np.all(np.isnan(layer[:, [0, 2, 3, 5]]))
        assert np.isfinite(layer[:, [1, 4]]).all()


def test_budget_sets_chunk_and_results_are_identical(data, reference):
    budget = memory.bytes_per_gene(N_OBS, CONFIG) * 3 + 100
    assert memory.default_chunk_size(N_OBS, budget, CONFIG) == 3
    assert_same_to_rounding(reference, fit(data, memory_budget=budget))


def test_plan_narrows_until_the_chunk_fits():
    calls = []

    def footprint(n_cells, width):
        calls.append(width)
        return 1000 * width

    width = memory.plan_width(100, 50, CONFIG, chunk_size=None, memory_budget=10**12, footprint=footprint)
    assert width == 50
    width = memory.plan_width(10**6, 50, CONFIG, chunk_size=None, memory_budget=25_000, footprint=footprint)
    assert width <= 25 and 1000 * width <= 25_000


def test_model_width_is_where_the_plan_starts():
    """plan_width checks model_width's width first (what the first pass runs with meanwhile)."""
    calls = []

    def footprint(n_cells, width):
        calls.append(width)
        return 0

    for kwargs in ({"chunk_size": None, "memory_budget": None, "max_width": 4},
                   {"chunk_size": None, "memory_budget": memory.bytes_per_gene(10**5, CONFIG) * 7, "max_width": None},
                   {"chunk_size": 5, "memory_budget": 10**12, "max_width": 2}):
        calls.clear()
        width = memory.plan_width(10**5, 50, CONFIG, footprint=footprint, **kwargs)
        assert calls == [width] == [memory.model_width(10**5, 50, CONFIG, **kwargs)]
    assert memory.model_width(10**5, 50, CONFIG, chunk_size=None, memory_budget=None, max_width=4) == 4
    assert memory.effective_budget(None, None) == memory.DEFAULT_MEMORY_BYTES
    assert memory.effective_budget(None, 3) is None


def test_first_pass_runs_while_the_program_compiles():
    """The first pass runs with the model's width while the plan compiles; it is stopped and
    run again with the planned width when the plan differs, and the plan's error is raised."""
    import threading

    from velofit.core.fit import _first_pass_while_compiling

    def make_pass(log, wait=None, finished=None):
        def first_pass(width, read, one_at_a_time=None):
            log.append(width)
            for k in range(50):
                read(k)
                if wait is not None and k == 0:
                    wait.wait(5)  # the plan finishes while the pass is running
                time.sleep(0.002)
            if finished is not None:
                finished.set()  # the plan finishes after the pass
            return f"pass at {width}"
        return first_pass

    log = []
    assert _first_pass_while_compiling(lambda: 8, 8, make_pass(log), lambda k: k) == (8, "pass at 8")
    assert log == [8]

    log, reads, done = [], [], threading.Event()

    def narrower():
        done.set()
        return 3

    width, result = _first_pass_while_compiling(narrower, 8, make_pass(log, done), reads.append)
    assert (width, result, log) == (3, "pass at 3", [8, 3])
    assert len(reads) < 100  # the pass at 8 stopped early: only the pass at 3 read every chunk

    log, finished = [], threading.Event()

    def late():
        finished.wait(5)
        return 3

    assert _first_pass_while_compiling(late, 8, make_pass(log, finished=finished), lambda k: k) == (3, "pass at 3")
    assert log == [8, 3]

    def failing():
        raise VelofitInputError("raise memory_budget")

    with pytest.raises(VelofitInputError, match="raise memory_budget"):
        _first_pass_while_compiling(failing, 8, make_pass([]), lambda k: k)


def test_fit_is_the_same_when_the_accounting_narrows_the_chunk(data, reference, monkeypatch):
    """XLA's accounting (here: patched) refusing the model's width of 6 genes: the first pass
    runs with the planned width of 2, and the fit is the same (to the last bits: other widths)."""
    import velofit.core.fit as fit_module

    widths = []
    prepare = fit_module.prepare_chunk

    def recording(mu, ms, **kwargs):
        widths.append(mu.shape[1])
        return prepare(mu, ms, **kwargs)

    monkeypatch.setattr(fit_module, "prepare_chunk", recording)
    monkeypatch.setattr(fit_module, "_local_footprint",
                        lambda config, device, n_cells, width: 10**15 if width > 2 else 0)
    out = fit(data)
    # (The pass at 6 genes stops at its first chunk read after the plan is known: maybe before any.)
    assert widths[-3:] == [2, 2, 2] and set(widths) <= {2, N_VARS}
    assert_same_to_rounding(reference, out)


def test_budget_below_two_genes_raises():
    with pytest.raises(VelofitInputError, match="raise memory_budget"):
        memory.plan_width(100, 50, CONFIG, chunk_size=None, memory_budget=10, footprint=lambda n, w: 1000 * w)


def test_chunk_size_over_budget_raises():
    with pytest.raises(VelofitInputError, match="lower chunk_size, raise memory_budget"):
        memory.plan_width(100, 50, CONFIG, chunk_size=20, memory_budget=5000, footprint=lambda n, w: 1000 * w)


@pytest.mark.parametrize(("text", "expected"), [("2GB", 2 * 10**9), ("512 MiB", 512 * 1024**2), ("1e6", 10**6),
                                                (4096, 4096), (None, None)])
def test_parse_memory_budget(text, expected):
    assert memory.parse_memory_budget(text) == expected


# --------------------------------------------------------------------------- streamed inputs


def test_reads_only_the_chunk_columns(h5ad_path, data, reference3, monkeypatch):
    """An h5py layer is read in blocks holding only the current chunk's columns.

    Each chunk is read twice: for its initialisation and iterated cells, and for the final
    time assignment of every cell (the EM in between regroups genes across chunks).
    """
    reads = []
    original = h5py.Dataset.__getitem__

    def recording(self, key):
        reads.append((self.name, key))
        return original(self, key)

    with h5py.File(h5ad_path, "r") as f:
        adata = ad.AnnData(obs=data.obs.copy(), var=data.var.copy(),
                           layers={"Ms": f["layers/Ms"], "Mu": f["layers/Mu"]})
        monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
        out = fit(adata, chunk_size=3, inplace=True)
        monkeypatch.undo()
    assert_same(reference3, out)
    for name in ("/layers/Ms", "/layers/Mu"):
        cols = [key[1] for n, key in reads if n == name]
        assert [(c.start, c.stop) for c in cols] == [(0, 3), (3, 6)] * 2


def test_dask_array_layers(data, reference):
    da = pytest.importorskip("dask.array")
    adata = data.copy()
    adata.layers["Ms"] = da.from_array(np.asarray(data.layers["Ms"]), chunks=(20, 2))
    adata.layers["Mu"] = da.from_array(sp.csr_matrix(data.layers["Mu"]), chunks=(25, 6), asarray=False)
    assert_same(reference, fit(adata))
    assert isinstance(adata.layers["Ms"], da.Array)  # the input is left as it was


@pytest.fixture(scope="module")
def h5ad_path(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("scale") / "data.h5ad"
    disk = data.copy()
    disk.layers["Mu_csr"] = sp.csr_matrix(data.layers["Mu"])
    disk.layers["Ms_csc"] = sp.csc_matrix(data.layers["Ms"])
    disk.write_h5ad(path)
    return path


def test_backed_mode(h5ad_path, reference):
    adata = ad.read_h5ad(h5ad_path, backed="r")
    try:
        with pytest.raises(VelofitInputError, match="backed mode"):
            tl.recover_dynamics(adata, copy=True, **FIT)
        assert_same(reference, fit(adata, inplace=True))
    finally:
        adata.file.close()


def test_on_disk_layers(h5ad_path, data, reference):
    """h5py datasets, on-disk CSR and CSC and lazily read layers, all streamed from the file."""
    from anndata.experimental import read_elem_lazy

    with h5py.File(h5ad_path, "r") as f:
        for ms, mu in (
            (f["layers/Ms"], f["layers/Mu"]),
            (ad.io.sparse_dataset(f["layers/Ms_csc"]), ad.io.sparse_dataset(f["layers/Mu_csr"])),
            (read_elem_lazy(f["layers/Ms"]), read_elem_lazy(f["layers/Mu_csr"])),
        ):
            adata = ad.AnnData(obs=data.obs.copy(), var=data.var.copy(), layers={"Ms": ms, "Mu": mu})
            assert_same(reference, fit(adata, inplace=True))


def test_latent_time_is_the_same_from_on_disk_layers(h5ad_path, data, reference):
    """latent_time reads the moments again: from h5py datasets, bitwise as from memory."""
    expected = reference.copy()
    tl.latent_time(expected)
    with h5py.File(h5ad_path, "r") as f:
        adata = ad.AnnData(obs=data.obs.copy(), var=data.var.copy(), layers={"Ms": f["layers/Ms"], "Mu": f["layers/Mu"]})
        fit(adata, inplace=True)
        tl.latent_time(adata)
    for key in ("latent_time", "latent_time_std"):
        assert _bitwise(expected.obs[key].to_numpy(), adata.obs[key].to_numpy()), key


def test_bad_values_in_a_later_chunk_raise(data):
    adata = data.copy()
    values = np.asarray(data.layers["Mu"]).copy()
    values[3, 4] = np.nan
    adata.layers["Mu"] = values
    with pytest.raises(VelofitInputError, match=r"layer 'Mu' contains NaN or inf in 1 gene\(s\), e.g. \['g4'\]"):
        fit(adata, chunk_size=3)
    assert "fit_t" not in adata.layers  # nothing written


# --------------------------------------------------------------------------- Dask backend


def test_dask_backend_matches_local(data, reference3):
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        explicit = fit(data, chunk_size=3, backend="dask", client=client)
        default = fit(data, chunk_size=3, backend="dask")  # the default client
        for _ in range(100):  # the chunks' inputs are released (asynchronously)
            held = sum(len(v) for v in client.run(lambda dask_worker: list(dask_worker.data)).values())
            if held == 0:
                break
            time.sleep(0.1)
    assert_same(reference3, explicit)
    assert_same(reference3, default)
    assert held == 0


def test_dask_backend_without_client_raises(data):
    pytest.importorskip("distributed")
    with pytest.raises(VelofitInputError, match="found no dask.distributed Client"):
        fit(data, backend="dask")


# --------------------------------------------------------------------------- devices


def test_cpu_device_matches_auto(data, reference):
    if resolve_device("auto").platform != "cpu":
        pytest.skip("auto picks a GPU here")
    assert_same(reference, fit(data, device="cpu"))


def test_gpu_without_gpu_raises(data):
    if resolve_device("auto").platform != "cpu":
        pytest.skip("a GPU is present")
    with pytest.raises(VelofitInputError, match="device='gpu' but JAX sees no GPU"):
        fit(data, device="gpu")


# --------------------------------------------------------------------------- bad arguments

BAD = [
    ({"memory_budget": -1}, VelofitInputError, "memory_budget must be a positive, finite number of bytes"),
    ({"memory_budget": "lots"}, VelofitInputError, "memory_budget 'lots' is not a size"),
    ({"memory_budget": [1]}, VelofitTypeError, "memory_budget must be a number of bytes"),
    ({"memory_budget": True}, VelofitTypeError, "memory_budget must be a number of bytes"),
    ({"memory_budget": 100}, VelofitInputError, "is below what a chunk of 2 genes needs"),
    ({"chunk_size": 6, "memory_budget": 1000}, VelofitInputError, "lower chunk_size, raise memory_budget"),
    ({"backend": "spark"}, VelofitInputError, r"backend must be one of \('local', 'dask'\), got 'spark'"),
    ({"backend": 1}, VelofitTypeError, "backend must be a string"),
    ({"client": object()}, VelofitInputError, "client= is only used with backend='dask'"),
    ({"backend": "dask", "client": object()}, VelofitTypeError, "client must be a dask.distributed Client"),
    ({"device": "tpu"}, VelofitInputError, r"device must be one of \('auto', 'cpu', 'gpu'\), got 'tpu'"),
    ({"device": None}, VelofitTypeError, "device must be a string"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD, ids=[str(b[0]) for b in BAD])
def test_bad_scale_arguments(data, kwargs, error, match):
    if kwargs.get("backend") == "dask":
        pytest.importorskip("distributed")
    adata = data.copy()
    before = set(adata.layers.keys())
    with pytest.raises(error, match=match):
        tl.recover_dynamics(adata, **{**FIT, **kwargs})
    assert set(adata.layers.keys()) == before


def test_aligned_host_arrays_are_used_in_place_by_jax():
    """The shared fit's chunked data must not be copied (a copy briefly took 3x its size)."""
    import gc

    import jax

    from velofit._host import ALIGNMENT, aligned_empty, to_device

    for dtype, value in ((np.float32, 1.5), (np.bool_, True)):
        host = aligned_empty((3, 1001, 7), dtype)
        assert host.ctypes.data % ALIGNMENT == 0 and host.flags.c_contiguous
        host[...] = value
        pointer = host.ctypes.data
        device = to_device(host)
        if jax.default_backend() == "cpu":
            assert device.unsafe_buffer_pointer() == pointer  # no copy
        del host
        gc.collect()
        np.testing.assert_array_equal(np.asarray(device), value)  # JAX keeps the memory alive


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_threads_of_a_fit_share_few_malloc_arenas(tmp_path):
    """velofit caps glibc's malloc arenas before JAX starts its threads (velofit._heap): a
    fresh process that fits on several threads ends with at most MAX_ARENAS heaps (glibc's
    default gave 16 on 2 cores), so freed memory is not kept resident per thread."""
    script = textwrap.dedent(f"""
        import ctypes, numpy as np
        from velofit._heap import MAX_ARENAS
        from velofit.core.fit import fit_genes
        rng = np.random.default_rng(0)
        x = rng.random((3000, 20)) + 0.1
        fit_genes(x, 1.1 * x + rng.random((3000, 20)))
        libc = ctypes.CDLL("libc.so.6")
        libc.fopen.restype = ctypes.c_void_p
        f = libc.fopen({str(tmp_path / "info.xml")!r}.encode(), b"w")
        libc.malloc_info(0, ctypes.c_void_p(f))
        libc.fclose(ctypes.c_void_p(f))
        print(MAX_ARENAS, open({str(tmp_path / "info.xml")!r}).read().count("<heap nr="))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    allowed, heaps = (int(v) for v in out.stdout.split()[-2:])
    assert 1 <= heaps <= allowed
