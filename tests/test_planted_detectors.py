"""End-to-end dissection of hand-built units with planted concepts (tests/planted_models.py).

A generated Broden-format set (600 images, 224 px, seed 0) is dissected with
extract, thresholds and tally; each planted unit must be labelled with its
planted concept, be a detector (IoU > 0.04) and beat every other concept by a
clear margin. Measured on this set (seed 0): red-c 0.081 (runner-up ball
0.013), yellow-c 0.073 (ball 0.012), striped 0.132 (green-c 0.031); on seeds 1
and 2 the best/runner-up ratios were 4.1 to 6.6 and the lowest planted IoU
0.057, so the test asks for a ratio of at least MARGIN = 2.5.

Why the IoUs are no higher: at quantile 0.005 a unit fires on about 0.5% of
the map cells (fewer pixels after bilinear upsampling), while red-c covers
2.6% and striped images 3.8% of the pixels, so even a perfect detector scores
IoU ~0.1 to 0.2 here. Scenes (~13% each), materials and sky (~17%) cannot
reach 0.04 at all, which is why no unit is planted for them.
"""

import csv
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from PIL import Image

from data_prep.synthetic_broden import generate
from dissect.layout import RunLayout
from dissect.pipeline import run_pipeline

N_IMAGES = 600
SIZE = 224
PLANTED = ["red-c", "yellow-c", "striped"]  # unit order of PlantedDetectors(colors=(red-c, yellow-c))
MARGIN = 2.5
IOU_THRESHOLD = 0.04


@pytest.fixture(scope="module")
def planted_probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("planted") / "probe", n_images=N_IMAGES, size=SIZE, seed=0, workers=2)


def planted_overrides(probe: Path, out_dir: Path) -> list[str]:
    """The real config with the planted module as a `_target_` model that sees RGB in [0, 1]."""
    return [
        "model=default",
        "model.name=planted",
        "model.module._target_=planted_models.PlantedDetectors",
        "~model.module.num_classes",
        "+model.module.colors=[red-c,yellow-c]",
        "model.checkpoint=null",
        f"model.input_size={SIZE}",
        "model.mean=[0,0,0]",
        "model.std=[1,1,1]",
        "layers=[units]",
        "dataset=default",
        f"dataset.root={probe}",
        f"out_dir={out_dir}",
        "stages=[extract,thresholds,tally,topk,report]",
        "topk.k=3",
    ]


@pytest.fixture(scope="module")
def planted_run(planted_probe: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR

    out_dir = tmp_path_factory.mktemp("planted_run") / "run"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=planted_overrides(planted_probe, out_dir))
    outputs = run_pipeline(cfg)
    assert list(outputs) == ["extract", "thresholds", "tally", "topk", "report"]
    return out_dir


def test_planted_units_are_labelled_with_their_concept_by_a_clear_margin(planted_run: Path):
    layout = RunLayout(planted_run)
    table = pd.read_csv(layout.tally_csv("units"))
    iou = np.load(layout.iou_npy("units"))
    names = pd.read_csv(layout.concepts_csv("units"))["name"].tolist()
    assert len(table) == len(PLANTED) and iou.shape == (len(PLANTED), len(names))
    for unit, concept in enumerate(PLANTED):
        order = np.argsort(-iou[unit])
        best, runner_up = iou[unit, order[0]], iou[unit, order[1]]
        print(f"unit {unit}: {table.loc[unit, 'label']} IoU {best:.4f}; runner-up {names[order[1]]} "
              f"{runner_up:.4f} (x{best / runner_up:.1f})")
        assert table.loc[unit, "label"] == concept
        assert names[order[0]] == concept
        assert table.loc[unit, "iou"] == pytest.approx(best, abs=1e-6)
        assert best > IOU_THRESHOLD
        assert best >= MARGIN * runner_up, f"{concept}: {best:.4f} vs {names[order[1]]} {runner_up:.4f}"
    assert table.loc[2, "category"] == "texture" and table.loc[0, "category"] == "color"
    summary = pd.read_json(layout.tally_json("units"), typ="series")
    assert summary["detectors"] == len(PLANTED)
    assert summary["unique_detectors"] == len(PLANTED)
    assert summary["detectors_by_category"] == {"color": 2, "object": 0, "part": 0, "material": 0, "scene": 0,
                                                "texture": 1}


def _upsample2(values: np.ndarray) -> np.ndarray:
    """Bilinear x2 of an (h, w) array, half-pixel centres (align_corners=False), edges clamped."""
    def along(array: np.ndarray, axis: int) -> np.ndarray:
        n = array.shape[axis]
        source = np.clip((np.arange(2 * n) + 0.5) / 2 - 0.5, 0, n - 1)
        lo = np.floor(source).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        shape = [1, 1]
        shape[axis] = -1
        frac = (source - lo).reshape(shape)
        return np.take(array, lo, axis=axis) * (1 - frac) + np.take(array, hi, axis=axis) * frac

    return along(along(values, 0), 1)


def test_red_unit_threshold_and_iou_match_an_independent_numpy_computation(planted_run: Path, planted_probe: Path):
    layout = RunLayout(planted_run)
    maps = zarr.open_group(layout.activations, mode="r")["units"]["maps"][:, 0].astype(np.float64)
    threshold = np.quantile(maps, 1 - 0.005)
    stage_threshold = pd.read_csv(layout.thresholds_csv("units"))["threshold"][0]
    assert stage_threshold == pytest.approx(threshold, rel=1e-12)
    number = {row["name"]: int(row["number"]) for row in csv.DictReader(open(planted_probe / "label.csv"))}["red-c"]
    intersection = activation = truth = 0
    for i, row in enumerate(csv.DictReader(open(planted_probe / "index.csv"))):
        fired = _upsample2(maps[i]) > threshold
        files = [name for name in row["color"].split(";") if name]
        if not files:  # colour not annotated: the image does not count for colour concepts
            continue
        red = np.zeros(fired.shape, dtype=bool)
        for name in files:
            rgb = np.asarray(Image.open(planted_probe / "images" / name).convert("RGB")).astype(np.int64)
            red |= rgb[..., 0] + 256 * rgb[..., 1] == number
        intersection += int((fired & red).sum())
        activation += int(fired.sum())
        truth += int(red.sum())
    expected = intersection / (activation + truth - intersection)
    print(f"red unit: threshold {threshold:.5f}, IoU {expected:.5f}, precision {intersection / activation:.3f}")
    column = pd.read_csv(layout.concepts_csv("units")).set_index("name").loc["red-c", "column"]
    assert np.load(layout.iou_npy("units"))[0, column] == pytest.approx(expected, rel=1e-5)
    assert intersection / activation > 0.95  # the red unit fires on red pixels only


def test_the_report_shows_the_planted_concepts_on_their_units_cards(planted_run: Path):
    layout = RunLayout(planted_run)
    page = layout.report_layer_page("units").read_text()
    for unit, concept in enumerate(PLANTED):
        card = re.search(rf"<div class='card' id='unit-units-{unit}'.*?(?=<div class='card|</div><script>)", page, re.S)
        assert card, f"no card for planted unit {unit}"
        assert f"data-label='{concept}'" in card.group(0)
        assert f"<h3>unit {unit}: {concept} " in card.group(0)
        strip = Path(os.path.relpath(layout.topk_strip("units", unit), layout.report_dir)).as_posix()
        assert strip == f"../layers/units/strips/unit_{unit:05d}.jpg" and strip in card.group(0)
    index = layout.report_index.read_text()
    assert all(f"{concept} (" in index for concept in PLANTED)  # bar-graph entries of the planted concepts
