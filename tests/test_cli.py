"""``python -m dissect``: every mistake a user can make is one line naming the key, exit code 2, no traceback."""

import importlib.util
import subprocess
import sys

import pytest
import torch

from conftest import REPO, tiny_overrides

#: (overrides after the tiny run's, text the error line must hold); the empty run directory is `out_dir`.
BAD_INPUTS = {
    "unknown stage": (["stages=[extract,talley]"], "stages=['extract', 'talley'] names unknown stage(s) ['talley']"),
    "unknown layer": (["layers=[features.conv9]"], "features.conv9"),  # with the valid names near it:
    "unknown layer, names nearby": (["layers=[features.conv9]"], "features.conv2"),
    "unknown model": (["model=resnet19"], "Could not find 'model/resnet19'"),
    "misspelled key": (["tally.iou_treshold=0.1"], "tally.iou_treshold"),
    "missing dataset root": (["dataset.root=/nonexistent/probe"], "dataset.root='/nonexistent/probe'"),
    "quantile out of range": (["thresholds.quantile=1.5"], "thresholds.quantile=1.5 is not allowed; it must be strictly"),
    "wrong type": (["tally.iou_threshold=high"], "tally.iou_threshold=high Value 'high' of type 'str' could not be"),
    "top-k of zero": (["topk.k=0"], "topk.k=0 is not allowed; it must be an integer >= 1"),
    "extract device": (["extract.device=cuda"], "extract.device='cuda'"),
    "attribute device": (["attribute.device=tpu"], "attribute.device='tpu'"),
    "occlusion stride": (["attribute.occlusion_stride=64"], "attribute.occlusion_stride=64 exceeds"),
    "visualise parameterisation": (["visualise.param=lucid"],
                                   "visualise.param='lucid' is not allowed; it must be one of fourier, pixel"),
    "explanations mask share": (["explanations.mask_share=1.5"],
                                "explanations.mask_share=1.5 is not allowed; it must be a share of the pixels"),
    "explanations compare run": (["explanations.compare_run=/nonexistent/run"],
                                 "explanations.compare_run='/nonexistent/run': /nonexistent/run/explanations/stamp"),
    "unknown cluster": (["cluster=lsf"], "Could not find 'cluster/lsf'"),
    "cluster key of another kind": (["+cluster.queue=gpu"],
                                    "cluster.queue is not a setting of cluster=local; its settings: kind, n_workers"),
    "slurm processes above cores": (["cluster=slurm", "cluster.cores=2", "cluster.processes=4"],
                                    "cluster.processes=4 is not allowed; it must be an integer in [1, cores=2]"),
    "cuda cluster without dask-cuda": (["cluster=cuda"], "pip install -e '.[cuda]'"),
    "no scheduler at the address": (["cluster=address", "cluster.address=tcp://127.0.0.1:9", "cluster.timeout_s=2"],
                                    "cluster.address='tcp://127.0.0.1:9': no dask scheduler answers there"),
    "tally on an empty run": (["stages=[tally]"], "run the extract stage first (stages=[extract])"),
    "report on an empty run": (["stages=[report]"], "run the extract stage first (stages=[extract])"),
}


#: The cases found only after the runner imported every stage (about 9 s each, mostly Captum, zennit and UMAP
#: imports) run in the slow tier, but for one; the settings checks behind them are also tested in process.
AFTER_STAGE_IMPORTS = {"unknown layer", "unknown layer, names nearby", "missing dataset root", "top-k of zero",
                       "extract device", "attribute device", "occlusion stride", "cluster key of another kind",
                       "slurm processes above cores", "cuda cluster without dask-cuda", "no scheduler at the address",
                       "visualise parameterisation", "explanations mask share", "explanations compare run"}


@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if case in AFTER_STAGE_IMPORTS else case
                                  for case in BAD_INPUTS])
def test_a_bad_input_is_one_line_with_exit_code_2(case, image_folder, tiny_checkpoint, tmp_path):
    if case == "extract device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if case == "cuda cluster without dask-cuda" and importlib.util.find_spec("dask_cuda") is not None:
        pytest.skip("dask-cuda is installed here")
    overrides, expected = BAD_INPUTS[case]
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "dissect", *tiny_overrides(image_folder, run_dir, tiny_checkpoint),
                             *overrides], cwd=REPO, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output and "Error executing job" not in output, output
    errors = [line for line in output.splitlines() if "[ERROR]" in line or line.startswith("configuration error")]
    assert len(errors) == 1 and expected in errors[0], output
    assert not (run_dir / "activations.zarr").exists(), "a mistake found before the run must not start it"
