"""The stage contract: a changed setting re-runs exactly the stages it affects, and their outputs follow it."""

import logging
from pathlib import Path

import pandas as pd
import pytest

from data_prep.synthetic_broden import generate
from dissect.artifacts import read_json
from dissect.layout import RunLayout
from dissect.pipeline import run_pipeline

LAYER = "features.relu3"
STAGES = "stages=[extract,thresholds,tally,topk,attribute,report]"


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("probe") / "broden", n_images=24, size=64, seed=5, workers=1)


def overrides(probe: Path, run_dir: Path, checkpoint: Path) -> list[str]:
    return ["model=default", "model.module.num_classes=4", "+model.module.width=4", f"model.checkpoint={checkpoint}",
            "model.input_size=64", f"layers=[{LAYER}]", f"dataset.root={probe}", f"out_dir={run_dir}",
            "extract.batch_size=8", "extract.num_workers=0", "extract.chunk_mib=0.01", "topk.k=4",
            "tally.iou_threshold=0.0", "attribute.methods=[saliency]", "attribute.top_units=1",
            "attribute.images_per_unit=1", "attribute.class_images=1", "attribute.randomisation_pairs=0", STAGES]


def stamps(layout: RunLayout) -> dict[str, int]:
    """The modification time of every stage's stamp (a re-run stage writes a new one)."""
    paths = {"extract": layout.stamp("extract"), "thresholds": layout.stamp("thresholds", LAYER),
             "tally": layout.stamp("tally", LAYER), "topk": layout.stamp("topk", LAYER),
             "attribute": layout.stamp("attribute")}
    return {stage: path.stat().st_mtime_ns for stage, path in paths.items()}


def rerun(compose_config, base: list[str], change: list[str], layout: RunLayout) -> set[str]:
    """Run the pipeline again with ``change``; the stages whose stamp was rewritten."""
    before = stamps(layout)
    run_pipeline(compose_config(base + change))
    after = stamps(layout)
    return {stage for stage in before if after[stage] != before[stage]}


def test_changed_settings_rerun_exactly_the_affected_stages(probe, tiny_checkpoint, tmp_path, compose_config,
                                                              caplog):
    layout = RunLayout(tmp_path / "run")
    base = overrides(probe, layout.root, tiny_checkpoint)
    run_pipeline(compose_config(base))
    assert rerun(compose_config, base, [], layout) == set(), "the same settings skip every stage"

    with caplog.at_level(logging.INFO):
        # the attribute stage explains units on their top-k images: new top-k outputs re-run it
        assert rerun(compose_config, base, ["topk.k=2"], layout) == {"topk", "attribute"}
    assert f"topk of {LAYER}: changed: k; running again" in caplog.text
    table = pd.read_csv(layout.topk_csv(LAYER))
    assert sorted(table["rank"].unique()) == [0, 1]
    units = len(pd.read_csv(layout.thresholds_csv(LAYER)))
    assert len(table) == 2 * units

    changed = rerun(compose_config, base, ["topk.k=2", "thresholds.quantile=0.02"], layout)
    assert changed == {"thresholds", "tally", "topk", "attribute"}
    assert read_json(layout.thresholds_json(LAYER))["quantile"] == 0.02
    assert read_json(layout.tally_json(LAYER))["quantile"] == 0.02

    changed = rerun(compose_config, base, ["topk.k=2", "thresholds.quantile=0.02", "tally.iou_threshold=0.05"],
                    layout)
    assert changed == {"tally", "attribute"}
    summary = read_json(layout.tally_json(LAYER))
    tally = pd.read_csv(layout.tally_csv(LAYER))
    assert summary["iou_threshold"] == 0.05
    assert summary["detectors"] == int((tally["iou"] > 0.05).sum())

    changed = rerun(compose_config, base, ["topk.k=2", "thresholds.quantile=0.02", "tally.iou_threshold=0.05",
                                           "attribute.ig_steps=3"], layout)
    assert changed == {"attribute"}
    assert read_json(layout.attribute_json)["settings"]["ig_steps"] == 3


def test_a_stage_killed_before_its_stamp_runs_again(probe, tiny_checkpoint, tmp_path, compose_config):
    layout = RunLayout(tmp_path / "run")
    base = overrides(probe, layout.root, tiny_checkpoint)
    run_pipeline(compose_config(base))
    expected = pd.read_csv(layout.topk_csv(LAYER))
    before = stamps(layout)
    layout.stamp("topk", LAYER).unlink()  # as if killed after writing topk.csv, before the stamp
    layout.topk_csv(LAYER).write_text("unit,rank\n")  # a half-written file is never taken for finished
    run_pipeline(compose_config(base))
    pd.testing.assert_frame_equal(pd.read_csv(layout.topk_csv(LAYER)), expected)
    after = stamps(layout)
    # redone from the same inputs, the topk stamp has the same digest: the attribute stage stays current
    assert {stage for stage in before if after[stage] != before[stage]} == {"topk"}


def test_a_stage_run_alone_removes_the_report_that_showed_its_old_outputs(probe, tiny_checkpoint, tmp_path,
                                                                          compose_config):
    layout = RunLayout(tmp_path / "run")
    base = overrides(probe, layout.root, tiny_checkpoint)
    run_pipeline(compose_config(base))
    assert layout.report_index.is_file()
    run_pipeline(compose_config(base + ["stages=[report]"]))  # nothing replaced: the report stays
    assert layout.report_index.is_file()
    run_pipeline(compose_config(base + ["topk.k=2", "stages=[topk]"]))
    assert not layout.report_index.exists(), "the old report would show the k=4 strips as current"
    run_pipeline(compose_config(base + ["topk.k=2", "stages=[report]"]))
    assert layout.report_index.is_file()
