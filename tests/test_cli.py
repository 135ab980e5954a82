"""The ``velofit`` command line: in-process through ``main`` and as a real subprocess."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pytest

import velofit as vf
from velofit._report import SECTIONS, write_atomic
from velofit.cli import build_parser, main
from velofit.cli.demo import demo_data as _demo_data

ROOT = Path(__file__).resolve().parents[1]
PANCREAS = ROOT.parent / "shared" / "data" / "pancreas_739.h5ad"
# Compiled code is shared with the CLI subprocesses through JAX_COMPILATION_CACHE_DIR (conftest.py).
FAST = ["--max-iter", "5", "--n-explicit", "3", "--no-progress"]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("input") / "sim.h5ad"
    vf.datasets.simulate(300, 20, seed=0).write_h5ad(path)
    return path


@pytest.fixture
def workdir(tmp_path, simulated) -> Path:
    shutil.copy(simulated, tmp_path / "in.h5ad")
    return tmp_path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(captured) -> str:
    """The single ``velofit: error:`` line, last on stderr (progress lines may precede it)."""
    lines = captured.err.strip().splitlines()
    errors = [line for line in lines if line.startswith("velofit: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], captured.err
    assert "Traceback" not in captured.err
    return errors[0]


def test_help_documents_every_option(capsys):
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"demo", "fit", "report", "simulate"}
    for name, sub in commands.choices.items():
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        for action in sub._actions:
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
            for option in action.option_strings:
                assert option in text, f"{option} missing from 'velofit {name} --help'"
    assert main([]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "-o", "x.h5ad", "--n-obs", "0"])
    assert exit_info.value.code == 2
    assert "expected an integer >= 1, got '0'" in capsys.readouterr().err


def test_simulate_command(tmp_path, capsys):
    out = tmp_path / "sim.h5ad"
    assert main(["simulate", "-o", str(out), "--n-obs", "40", "--n-vars", "3", "--seed", "2"]) == 0
    adata = anndata.read_h5ad(out)
    assert adata.shape == (40, 3) and "true_alpha" in adata.var.columns
    assert main(["simulate", "-o", str(out), "--n-obs", "40", "--n-vars", "3"]) == 2
    assert "--overwrite" in one_error_line(capsys.readouterr())


def test_fit_writes_output_and_leaves_input_intact(workdir, capsys):
    source, out = workdir / "in.h5ad", workdir / "out.h5ad"
    before = digest(source)
    assert main(["fit", str(source), "-o", str(out), *FAST]) == 0
    assert digest(source) == before
    assert sorted(p.name for p in workdir.iterdir()) == ["in.h5ad", "out.h5ad"]  # no temporary left
    adata = anndata.read_h5ad(out)
    assert {"fit_alpha", "fit_beta", "fit_gamma", "fit_likelihood", "velocity_genes"} <= set(adata.var.columns)
    assert {"velocity", "fit_t"} <= set(adata.layers.keys())
    assert adata.uns["velofit_cli"]["command"] == "fit"
    assert adata.uns["recover_dynamics"]["max_iter"] == 5
    assert "wrote" in capsys.readouterr().out


def test_fit_refuses_existing_output_without_overwrite(workdir, capsys):
    source, out = workdir / "in.h5ad", workdir / "out.h5ad"
    out.write_bytes(b"precious")
    assert main(["fit", str(source), "-o", str(out), *FAST]) == 2
    assert "--overwrite" in one_error_line(capsys.readouterr())
    assert out.read_bytes() == b"precious"
    assert main(["fit", str(source), "-o", str(out), "--overwrite", *FAST]) == 0
    assert "fit_alpha" in anndata.read_h5ad(out).var.columns


def test_fit_never_overwrites_the_input_unless_in_place(workdir, capsys):
    source = workdir / "in.h5ad"
    before = digest(source)
    assert main(["fit", str(source), "-o", str(source), "--overwrite", *FAST]) == 2
    assert "--in-place" in one_error_line(capsys.readouterr())
    assert digest(source) == before
    assert main(["fit", str(source), "--in-place", *FAST]) == 0
    assert "fit_alpha" in anndata.read_h5ad(source).var.columns
    assert sorted(p.name for p in workdir.iterdir()) == ["in.h5ad"]


def test_fit_reads_loom(workdir):
    adata = anndata.read_h5ad(workdir / "in.h5ad")
    loom = workdir / "in.loom"
    adata.write_loom(loom)
    assert main(["fit", str(loom), "-o", str(workdir / "out.h5ad"), *FAST]) == 0
    assert anndata.read_h5ad(workdir / "out.h5ad").n_obs == adata.n_obs


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-o", "out.h5ad", "--max-iter", "2", "--n-explicit", "3"], "n_explicit"),  # from recover_dynamics
        (["-o", "missing_folder/out.h5ad"], "does not exist"),
        (["-o", "out.txt"], "must end with .h5ad"),
        ([], "no output given"),
    ],
)
def test_fit_errors_are_one_line_exit_2(workdir, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(workdir)
    assert main(["fit", "in.h5ad", *extra, "--no-progress"]) == 2
    assert message in one_error_line(capsys.readouterr())
    assert sorted(p.name for p in workdir.iterdir()) == ["in.h5ad"]


def test_fit_without_moments_or_counts_says_so(workdir, capsys):
    adata = anndata.read_h5ad(workdir / "in.h5ad")
    for key in ("Ms", "Mu", "spliced", "unspliced"):
        del adata.layers[key]
    adata.write_h5ad(workdir / "bare.h5ad")
    assert main(["fit", str(workdir / "bare.h5ad"), "-o", str(workdir / "out.h5ad")]) == 2
    assert "spliced" in one_error_line(capsys.readouterr())
    assert main(["fit", str(workdir / "nothing.h5ad"), "-o", str(workdir / "out.h5ad")]) == 2
    assert "not found" in one_error_line(capsys.readouterr())


def test_report_has_every_section_and_inline_images(workdir, capsys):
    out = workdir / "out.h5ad"
    assert main(["fit", str(out.with_name("in.h5ad")), "-o", str(out), *FAST]) == 0
    assert main(["report", str(out)]) == 0
    html = (workdir / "out.html").read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in html
    assert html.count('<img src="data:image/png;base64,') >= 2  # phase portraits, convergence
    assert "http://" not in html and "https://" not in html  # self-contained
    assert main(["report", str(out)]) == 2
    assert "--overwrite" in one_error_line(capsys.readouterr())
    assert main(["report", str(out), "-o", str(workdir / "r.html"), "--overwrite"]) == 0


def test_report_shows_latent_time_and_time_prior_widths(workdir):
    from velofit._report import build_report

    out = workdir / "out.h5ad"
    assert main(["fit", str(workdir / "in.h5ad"), "-o", str(out), *FAST]) == 0
    adata = anndata.read_h5ad(out)
    grid = np.linspace(0.0, 1.0, 11)
    posterior = np.exp(-0.5 * ((grid[None, :] - np.linspace(0, 1, adata.n_obs)[:, None]) / 0.1) ** 2)
    adata.obsm["latent_time_posterior"] = (posterior / posterior.sum(axis=1, keepdims=True)).astype(np.float32)
    adata.obs["latent_time"] = np.linspace(0.0, 1.0, adata.n_obs)
    adata.obs["latent_time_std"] = 0.1
    adata.obsm["X_umap"] = np.column_stack([adata.obs["latent_time"], np.zeros(adata.n_obs)])
    adata.uns["velofit"] = {"time_grid": grid, "prior": np.ones(11), "loglik": np.array([-5.0, -4.0]),
                            "latent_time_params": {"prior": "learned"}}
    html = build_report(adata)
    time_section = html.split('<section id="time-prior">')[1].split("</section>")[0]
    assert "prior standard deviation (width)" in time_section
    assert "posterior standard deviation per cell: median" in time_section
    assert 'alt="latent time on UMAP"' in html


def test_demo_writes_h5ad_portraits_and_report(tmp_path, capsys):
    outdir = tmp_path / "demo"
    assert main(["demo", "-o", str(outdir), "--simulate", "--n-obs", "300", "--n-vars", "20", *FAST]) == 0
    assert sorted(p.name for p in outdir.iterdir()) == ["demo.h5ad", "phase_portraits.png", "report.html"]
    assert (outdir / "phase_portraits.png").read_bytes().startswith(b"\x89PNG")
    html = (outdir / "report.html").read_text()
    assert all(f'id="{s}"' in html for s in SECTIONS)
    assert 'alt="velocity stream on pca"' in html  # the demo builds a kNN graph and projects on PCA
    out = capsys.readouterr().out
    for row in ("gamma/beta", "alpha", "Spearman"):
        assert row in out
    error = float(re.search(r"relative error of gamma/beta\s+([0-9.]+)", out).group(1))
    assert error < 0.5
    adata = anndata.read_h5ad(outdir / "demo.h5ad")
    assert "velocity_pca" in adata.obsm and "velocity_graph" in adata.uns


def test_demo_data_choice_offline(monkeypatch, capsys):
    def unavailable(*args, **kwargs):
        raise vf.datasets.DatasetUnavailableError("no network")

    monkeypatch.setattr(vf.datasets, "pancreas", unavailable)
    monkeypatch.setattr(vf.datasets, "shared_pancreas_path", lambda: None)
    args = argparse.Namespace(simulate=False, pancreas=None, download=True, n_obs=30, n_vars=2, seed=0)
    adata, kind = _demo_data(args)
    assert kind == "simulated" and adata.shape == (30, 2)
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "download failed" in notice[0]
    args.download = False
    assert _demo_data(args)[1] == "simulated"  # default: no network access attempted
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "no local pancreas data" in notice[0] and "--download" in notice[0]


def test_write_atomic_leaves_nothing_on_interrupt(tmp_path):
    target = tmp_path / "out.h5ad"

    def interrupted(name: str) -> None:
        Path(name).write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, interrupted)
    assert list(tmp_path.iterdir()) == []


def run_module(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "velofit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def test_python_m_velofit_fit_subprocess(workdir):
    proc = run_module("fit", str(workdir / "in.h5ad"), "-o", str(workdir / "out.h5ad"), *FAST)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert "wrote" in stdout
    assert "fit_alpha" in anndata.read_h5ad(workdir / "out.h5ad").var.columns


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_fit_leaves_no_partial_output(workdir, sig, code):
    source, out = workdir / "in.h5ad", workdir / "out.h5ad"
    big = vf.datasets.simulate(300, 20, seed=0)
    big.write_h5ad(source)  # same shapes as the other tests: compiled code comes from the cache
    before = digest(source)
    proc = run_module("fit", str(source), "-o", str(out), *FAST)
    seen = []
    for line in proc.stderr:  # the CLI prints this line just before the fit starts
        seen.append(line)
        if line.startswith("velofit: fitting"):
            break
    assert seen and seen[-1].startswith("velofit: fitting"), "".join(seen)
    proc.send_signal(sig)  # fitting, velocities and writing all take far longer than this
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == code, stderr
    assert "no partial output file was left" in stderr and "Traceback" not in stderr
    assert not out.exists()
    assert sorted(p.name for p in workdir.iterdir()) == ["in.h5ad"]  # no temporary file either
    assert digest(source) == before


@pytest.mark.slow
@pytest.mark.skipif(not PANCREAS.is_file(), reason=f"shared pancreas data not found at {PANCREAS}")
def test_pancreas_end_to_end(tmp_path, capsys):
    out, report = tmp_path / "pancreas.h5ad", tmp_path / "pancreas.html"
    before = digest(PANCREAS)
    # Fewer genes and iterations than a real analysis: this checks the path, not the fit.
    assert main(["fit", str(PANCREAS), "-o", str(out), "--umap", "--n-top-genes", "300", *FAST]) == 0
    assert digest(PANCREAS) == before
    adata = anndata.read_h5ad(out)
    assert adata.n_obs == 739 and adata.n_vars <= 300
    assert (adata.var["fit_status"] == "ok").sum() > 100
    assert {"X_umap", "velocity_umap"} <= set(adata.obsm.keys())
    assert np.isfinite(adata.obsm["velocity_umap"]).all()
    assert main(["report", str(out), "-o", str(report)]) == 0
    html = report.read_text()
    assert all(f'id="{s}"' in html for s in SECTIONS)
    assert 'alt="velocity stream on umap"' in html
