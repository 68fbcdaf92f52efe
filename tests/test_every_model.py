"""Smoke test: every shipped model config runs ``stages=all`` with random weights and ends with a report.

Tiny generated images at 64 px keep it short; the pipeline runs in this
process, so that UMAP compiles once for all models. About 100 s on 2 cores
(slow tier: ``make test-slow``, which CI runs after ``make test``).
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from conftest import CONF_DIR
from data_prep.synthetic_broden import generate
from dissect.artifacts import read_json
from dissect.stages.attribute import METHODS
from dissect.layout import RunLayout
from dissect.pipeline import run_pipeline

MODELS = sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml"))
SIZE = 64
#: Settings that make every stage quick; the attribute stage still runs every method.
QUICK = ["model.weights=null", "model.checkpoint=null", f"model.input_size={SIZE}", "extract.batch_size=4",
         "extract.num_workers=0", "extract.chunk_mib=0.01", "topk.k=2", "attribute.top_units=1",
         "attribute.images_per_unit=1", "attribute.class_images=1", "attribute.ig_steps=2",
         "attribute.occlusion_window=32", "attribute.occlusion_stride=32", "attribute.lime_samples=4",
         "attribute.lime_segments=4", "attribute.randomisation_pairs=1", "attribute.randomisation_steps=1",
         "embed.pca_components=4", "embed.thumbnail_grid=3", "visualise.top_units=1", "visualise.steps=2",
         "visualise.classes=[0]", "visualise.fourier.size=32", "visualise.dream.images=1", "visualise.dream.octaves=2",
         "visualise.dream.steps=1", "visualise.viewer.images=1"]


def test_every_shipped_model_config_is_tested():
    assert MODELS == ["alexnet", "default", "densenet161", "googlenet", "resnet18", "resnet50", "vgg16"]


@pytest.fixture(scope="module")
def tiny_probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("probe") / "broden", n_images=8, size=SIZE, seed=11, workers=1)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_stages_all_end_with_a_report_and_maps_of_every_method(model, tiny_probe, compose_config, tmp_path):
    cfg = compose_config([f"model={model}", f"dataset.root={tiny_probe}", f"out_dir={tmp_path / model}", *QUICK])
    outputs = run_pipeline(cfg)
    assert outputs["report"].is_file() and outputs["report"].stat().st_size > 0
    layout = RunLayout(tmp_path / model)
    assert outputs["attribute"] == layout.attribute_dir
    summary = read_json(layout.attribute_json)
    assert sorted(summary["methods"]) == sorted(METHODS), "ReLU networks keep the guided methods"
    maps = zarr.open_group(layout.attribute_maps, mode="r")
    pairs = summary["pairs"]["unit"] + summary["pairs"]["class"]
    assert pairs >= 1
    for method in METHODS:
        values = maps[method][:]
        assert values.shape == (pairs, SIZE, SIZE), method
        assert np.isfinite(values).all(), method
    units = pd.read_csv(layout.visualise_units_csv)
    assert (units["kind"] == "class").sum() == 1 and (units["kind"] == "unit").sum() >= 1
    assert all((layout.root / image).is_file() for image in units["image"])
    assert np.isfinite(units["reached"]).all()
    report = outputs["report"].read_text(encoding="utf-8")
    assert "Representation map" in report and "Attribution" in report and "What units want to see" in report
