"""README.md: the quick start runs verbatim, and the page keeps its two set-up-and-run commands."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

README = Path(__file__).resolve().parents[1] / "README.md"


def code_blocks(section: str, language: str) -> list[str]:
    """The fenced ``language`` code blocks of the README section titled ``section``."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no '## {section}' section"
    return re.findall(rf"^```{language}\n(.*?)^```", match.group(1), flags=re.MULTILINE | re.DOTALL)


def test_quick_start_runs_verbatim(tmp_path, monkeypatch):
    blocks = code_blocks("Quick start", "python")
    assert blocks, "the quick start has no python code block"
    script = tmp_path / "quick_start.py"
    script.write_text(blocks[0])
    monkeypatch.chdir(tmp_path)  # the quick start saves a figure in the working folder
    adata = runpy.run_path(str(script), run_name="__main__")["adata"]
    assert (adata.var["fit_status"] == "ok").all()
    assert np.isfinite(adata.layers["velocity"]).all()
    assert spearmanr(adata.obs["latent_time"], adata.obs["true_t"])[0] > 0.9
    assert Path("phase_portraits.png").read_bytes().startswith(b"\x89PNG")


def test_two_commands_for_a_fresh_machine():
    commands = [block.strip() for block in code_blocks("Two commands", "bash")]
    assert commands == ["pip install -e . && velofit demo", "pip install -e '.[test]' && pytest"]


@pytest.mark.parametrize("name", ["pancreas_velocity_stream.png", "pancreas_latent_time.png"])
def test_example_figures_are_committed_and_small(name):
    figure = README.parent / "docs" / name
    assert figure.read_bytes().startswith(b"\x89PNG")
    assert figure.stat().st_size < 300_000
    assert f"docs/{name}" in README.read_text()
