"""The Hydra configuration and the stage runner."""

import pytest

from dissect.pipeline import STAGES, ConfigError, selected_stages


def test_every_model_config_composes(compose_config):
    for model, size, layers, out_dir in (
            ("alexnet", 227, ["features.11", "classifier.4"], "results/alexnet-synthetic"),
            ("resnet18", 224, ["layer4", "avgpool"], "results/resnet18-synthetic"),
            ("default", 224, ["features.relu3", "features.relu4", "classifier.fc1"],
             "results/embedded-model-synthetic")):  # its checkpoint, data/embedded_model/model.pt, names it
        cfg = compose_config([f"model={model}"])
        assert cfg.model.input_size == size
        assert list(cfg.layers) == layers
        assert cfg.out_dir == out_dir
    assert compose_config(["model=resnet18", "model.checkpoint=/ckpt/epoch_10.pth"]).out_dir == \
        "results/resnet18-epoch_10-synthetic"
    assert compose_config(["dataset=broden"]).dataset.kind == "broden"


def test_stage_selection_keeps_pipeline_order_and_rejects_unknown_names():
    assert selected_stages("all") == list(STAGES)
    assert selected_stages(["extract"]) == ["extract"]
    with pytest.raises(ConfigError, match="allowed: all, or a list of extract, thresholds, tally, compositional, topk, audit, embed, attribute, explanations, visualise, report"):
        selected_stages(["extract", "tally_typo"])
