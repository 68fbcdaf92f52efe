"""Sweeps: two checkpoints through Hydra's basic and submitit_local launchers, then one comparison page.

Slow tier (make test-slow): each sweep runs two jobs of five stages in fresh processes.
"""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from browser import console_errors, open_page
from conftest import REPO, tiny_overrides
from dissect.embedded_model import SmallCNN
from dissect.layout import RunLayout
from dissect.sweep import swept_run_dirs


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two seeded SmallCNN(num_classes=4, width=4) checkpoints: early.pt and late.pt."""
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = []
    for seed, name in ((1, "early"), (2, "late")):
        torch.manual_seed(seed)
        paths.append(folder / f"{name}.pt")
        torch.save(SmallCNN(num_classes=4, width=4).state_dict(), paths[-1])
    return paths


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_prep.synthetic_broden import generate

    return generate(tmp_path_factory.mktemp("sweep") / "broden", n_images=24, size=64, seed=9, workers=1)


def sweep(launcher: list[str], probe: Path, checkpoints: list[Path], results: Path) -> subprocess.CompletedProcess:
    """``python -m dissect -m`` over the two checkpoints, each run in results/<run name>."""
    overrides = [item for item in tiny_overrides(probe, results, checkpoints[0])
                 if not item.startswith(("model.checkpoint=", "out_dir="))]
    command = [sys.executable, "-m", "dissect", "-m", *launcher, *overrides,
               f"model.checkpoint={','.join(str(path) for path in checkpoints)}",
               f"out_dir={results}/${{run_name}}", f"hydra.sweep.dir={results / 'sweep'}",
               "dataset=default", f"dataset.root={probe}", "layers=[features.conv2,features.conv3]",
               "thresholds.quantile=0.02", "stages=[extract,thresholds,tally,audit,report]"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def check_sweep(results: Path, result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    expected = [results / "embedded-early-synthetic", results / "embedded-late-synthetic"]
    assert swept_run_dirs(results / "sweep") == [path.resolve() for path in expected]
    for run_dir in expected:
        assert RunLayout(run_dir).stamp("audit").is_file() and RunLayout(run_dir).report_index.is_file()
    page = results / "sweep" / "compare" / "index.html"
    assert f"open {page.resolve().as_uri()}" in result.stdout
    runs = pd.read_csv(results / "sweep" / "compare" / "runs.csv")
    assert list(runs["run"]) == ["embedded-early-synthetic", "embedded-late-synthetic"]
    dom, stderr = open_page(page)
    assert not console_errors(stderr), console_errors(stderr)
    for name in runs["run"]:
        assert name in dom


@pytest.mark.slow
def test_a_submitit_local_sweep_of_two_checkpoints_ends_with_a_comparison_page(probe, two_checkpoints, tmp_path):
    results = tmp_path / "results"
    check_sweep(results, sweep(["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"], probe,
                               two_checkpoints, results))
    assert len(list((results / "sweep" / ".submitit").glob("*/*_result.pkl"))) == 2  # two submitit jobs ran


@pytest.mark.slow
def test_a_basic_launcher_sweep_gives_the_same_runs(probe, two_checkpoints, tmp_path):
    results = tmp_path / "results"
    check_sweep(results, sweep([], probe, two_checkpoints, results))
