"""The visualise stage: synthesised images against planted detectors, batching, dead units, deep dream, the viewer."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
import zarr
from hydra import compose, initialize_config_dir
from matplotlib.colors import rgb_to_hsv
from PIL import Image
from skimage import data as photos
from torch import nn

from conftest import CONF_DIR
from data_prep.synthetic_broden import COLORS, generate
from dissect.artifacts import read_json
from dissect.embedded_model import SmallCNN
from dissect.errors import ConfigError
from dissect.layers import LayerRecorder
from dissect.layout import RunLayout
from dissect.pipeline import run_pipeline
from dissect.settings import VisualiseSettings, section
from dissect.stages import visualise
from dissect.stages.attribute.model import prepare_model
from dissect.stages.visualise.ascent import Normalisation, synthesise
from dissect.stages.visualise.dream import dream
from dissect.stages.visualise import viewer as visualise_viewer
from dissect.stages.visualise.objectives import Target
from planted_models import PlantedDetectors
from browser import console_errors, open_page

CPU = torch.device("cpu")
IDENTITY = Normalisation((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
PLANTED_COLOURS = ("red-c", "green-c", "blue-c")
#: The largest distance allowed between the mean hue of the pixels where a colour unit responds and its colour's hue
#: (hue on the circle [0, 1)): 0.03 is about 11 degrees.
HUE_TOLERANCE = 0.03
#: The least share of the image where a colour unit's response exceeds one half.
MIN_RESPONDING_SHARE = 0.2


def default_settings(**changes) -> VisualiseSettings:
    """The visualise section of conf/config.yaml, with changes."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config")
    return replace(section(cfg.visualise, VisualiseSettings), **changes)


def circular_hue_distance(a: float, b: float) -> float:
    """Distance of two hues on the circle [0, 1)."""
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


def mean_hue(pixels: np.ndarray) -> float:
    """Circular mean hue of (P, 3) RGB pixels in [0, 1]."""
    angle = 2 * np.pi * rgb_to_hsv(pixels)[:, 0]
    return float(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean()) / (2 * np.pi)) % 1.0


@pytest.mark.parametrize("param", ["fourier", "pixel"])
def test_a_colour_unit_wants_to_see_its_colour(param):
    model = prepare_model(PlantedDetectors(colors=PLANTED_COLOURS, stripes=False))
    settings = default_settings(param=param, steps=128, redirect_relu=False)  # the planted model has no ReLU
    targets = [Target("unit", "units", unit) for unit in range(len(PLANTED_COLOURS))]
    result = synthesise(model, targets, [11, 12, 13], settings, IDENTITY, 64, CPU)
    for unit, name in enumerate(PLANTED_COLOURS):
        rgb = result.images[unit].astype(np.float64) / 255  # (64, 64, 3)
        response = model.net.color_responses(torch.from_numpy(rgb).permute(2, 0, 1)[None].float())[0, unit].numpy()
        responding = response > 0.5
        assert responding.mean() >= MIN_RESPONDING_SHARE, (name, responding.mean())
        wanted = rgb_to_hsv(np.array(COLORS[name], dtype=np.float64) / 255)[0]
        assert circular_hue_distance(mean_hue(rgb[responding]), wanted) <= HUE_TOLERANCE, name
        assert result.reached[unit] > 10 * result.initial[unit] and not result.flat[unit]


@pytest.mark.parametrize(("net", "param"), [("planted", "fourier"), ("planted", "pixel"), ("convolutional", "fourier"),
                                            ("convolutional", "pixel"), ("alexnet", "fourier")])
def test_a_batched_run_gives_each_unit_exactly_what_a_run_of_it_alone_gives(net, param):
    """Each way the CPU kernels could make a row depend on its batch is exercised: oneDNN's convolutions (all
    convolutional nets), NNPACK's (16 rows), two threads splitting one row's matrix products (AlexNet at 227 px,
    whose batch of one differs from its batch of two in 8 steps without one thread)."""
    torch.manual_seed(0)
    rows, size = 3, 64
    if net == "planted":
        model, layer = prepare_model(PlantedDetectors(colors=PLANTED_COLOURS, stripes=False)), "units"
    elif net == "convolutional":
        model, layer, rows = prepare_model(SmallCNN(num_classes=4, width=4)), "features.relu3", 16
    else:
        model, layer, rows, size = prepare_model(torchvision.models.alexnet(weights=None)), "features.10", 2, 227
    settings = default_settings(param=param, steps=8 if net == "alexnet" else 12, redirect_relu=net != "planted")
    targets = [Target("unit", layer, unit % 3) for unit in range(rows)]
    seeds = [5 + row for row in range(rows)]
    batched = synthesise(model, targets, seeds, settings, IDENTITY, size, CPU)
    for row, (target, seed) in list(enumerate(zip(targets, seeds)))[:3]:
        alone = synthesise(model, [target], [seed], settings, IDENTITY, size, CPU)
        np.testing.assert_array_equal(batched.images[row], alone.images[0])
        assert batched.reached[row] == alone.reached[0]
    again = synthesise(model, targets, seeds, settings, IDENTITY, size, CPU)
    np.testing.assert_array_equal(again.images, batched.images)  # the same seed, the same images
    other = synthesise(model, targets, [seed + 100 for seed in seeds], settings, IDENTITY, size, CPU)
    assert not np.array_equal(other.images, batched.images)


class OneDeadUnit(nn.Module):
    """A 3 x 3 convolution of two units then ReLU; unit 1 has zero weights and bias -1, so it never fires."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        with torch.no_grad():
            self.conv.weight[1] = 0
            self.conv.bias[1] = -1
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


@pytest.mark.parametrize("param", ["fourier", "pixel"])
def test_a_dead_unit_yields_a_flat_image_reported_as_flat(param):
    settings = default_settings(param=param, steps=16)
    result = synthesise(prepare_model(OneDeadUnit()), [Target("unit", "relu", 0), Target("unit", "relu", 1)],
                        [1, 2], settings, IDENTITY, 32, CPU)
    assert result.flat.tolist() == [False, True]
    assert result.max_gradient[1] == 0 and result.reached[1] == 0 and result.reached[0] > result.initial[0]
    assert result.images[1].std() / 255 < 0.01 and result.image_std[1] < 0.01 < result.image_std[0]


def test_deep_dream_raises_its_layer_objective_at_every_octave():
    torch.manual_seed(0)
    model = prepare_model(SmallCNN(num_classes=4, width=4))
    photo = np.array(Image.fromarray(photos.astronaut()).resize((96, 96), Image.BILINEAR))
    image = torch.from_numpy(photo).permute(2, 0, 1).float() / 255
    settings = default_settings().dream
    settings = replace(settings, octaves=3, steps=4)
    normalise = Normalisation((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    result = dream(model, "features.relu3", image, settings, normalise, seed=0)
    assert result.sizes == [49, 69, 96]  # 96 / 1.4^2, 96 / 1.4, 96
    assert all(end > begin for begin, end in zip(result.start, result.end)), (result.start, result.end)
    # the last value is the layer's squared L2 norm on the dreamed image, computed here by a recorded forward pass
    dreamed = torch.from_numpy(result.image).permute(2, 0, 1)[None].float() / 255
    with LayerRecorder(model.net, ["features.relu3"]) as recorder:
        activations = recorder.run(normalise(dreamed))["features.relu3"]
    assert float(activations.pow(2).sum()) == pytest.approx(result.end[-1], rel=0.02)  # the PNG is rounded to uint8
    assert not np.array_equal(result.image, photo)


def test_bad_settings_name_the_key_and_what_is_allowed():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["visualise.param=lucid"])
    with pytest.raises(ConfigError, match="visualise.param='lucid' is not allowed; it must be one of fourier, pixel"):
        visualise.check(cfg)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["visualise.fourier.size=4"])
    with pytest.raises(ConfigError, match=r"visualise.fourier.size=4 is not allowed; it must be an integer >= 8"):
        visualise.check(cfg)


@pytest.fixture(scope="module")
def visualised_run(tmp_path_factory):
    """A tiny SmallCNN whose unit 0 of conv4 is dead, dissected on 40 generated images, then visualise and report."""
    base = tmp_path_factory.mktemp("visualise")
    probe = generate(base / "broden", n_images=40, size=64, seed=3, workers=1)
    torch.manual_seed(0)
    net = SmallCNN(num_classes=4, width=4)
    with torch.no_grad():
        net.features.conv4.weight[0] = 0
        net.features.conv4.bias[0] = -1
    checkpoint = base / "tiny.pt"
    torch.save(net.state_dict(), checkpoint)
    overrides = ["model=default", "model.module.num_classes=4", "+model.module.width=4",
                 f"model.checkpoint={checkpoint}", "model.input_size=64",
                 "layers=[features.relu2,features.relu4]", "dataset=default", f"dataset.root={probe}",
                 f"out_dir={base / 'run'}", "extract.batch_size=8", "extract.num_workers=0", "extract.chunk_mib=0.01",
                 "stages=[extract,thresholds,tally,audit,visualise,report]",
                 "visualise.top_units=2", "visualise.dead_units=1", "visualise.steps=8", "visualise.classes=[1]",
                 "visualise.copies=2", "visualise.fourier.size=32", "visualise.dream.images=1",
                 "visualise.dream.octaves=2", "visualise.dream.steps=3", "visualise.viewer.images=2"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    run_pipeline(cfg)
    return cfg


def test_the_stage_visualises_the_best_detectors_and_the_dead_unit(visualised_run):
    layout = RunLayout(visualised_run.out_dir)
    units = pd.read_csv(layout.visualise_units_csv, keep_default_na=False, na_values=[""])
    assert units.columns.tolist() == visualise.UNIT_COLUMNS
    store = zarr.open_group(layout.activations, mode="r")
    for layer in ("features.relu2", "features.relu4"):
        tally = pd.read_csv(layout.tally_csv(layer), keep_default_na=False)
        best = tally[tally["iou"] > 0.04].sort_values(["iou", "unit"], ascending=[False, True]).head(2)
        rows = units[(units["layer"] == layer) & (units["reason"] == "detector")]
        assert sorted(set(rows["index"])) == sorted(best["unit"]), layer
        assert (rows.groupby("index")["copy"].apply(sorted) == pd.Series([[0, 1]] * len(best),
                                                                           index=sorted(best["unit"]))).all()
        # the best probe value: the channel mean's maximum over the images, by numpy on the stored maps
        maps = store[layer]["maps"][:].astype(np.float32)
        means = maps.mean(axis=(2, 3))
        compared = units[units["layer"] == layer]
        np.testing.assert_allclose(compared["best_probe"], means.max(0)[compared["index"]], rtol=1e-5, atol=1e-7)
        assert (compared["best_probe_image"] == means.argmax(0)[compared["index"]]).all()
    dead = units[units["reason"] == "dead"]
    audit = pd.read_csv(layout.audit_units_csv)
    assert bool(audit[(audit["layer"] == "features.relu4") & (audit["unit"] == 0)]["dead"].iloc[0])
    assert dead[["layer", "index"]].drop_duplicates().values.tolist() == [["features.relu4", 0]]
    assert dead["flat"].all() and (dead["max_gradient"] == 0).all()
    assert (units.loc[units["reason"] == "detector", "flat"] == False).all()  # noqa: E712
    classes = units[units["kind"] == "class"]
    assert classes["index"].tolist() == [1, 1] and classes["copy"].tolist() == [0, 1]
    assert classes["best_probe"].isna().all()
    for row in units.itertuples():
        assert Image.open(layout.root / row.image).size == (64, 64)
    # two copies of a unit come from two seeds, so they differ
    first = units[(units["reason"] == "detector")].iloc[0]
    pictures = [np.asarray(Image.open(layout.root / p)) for p in
                units[(units["layer"] == first["layer"]) & (units["index"] == first["index"])]["image"]]
    assert not np.array_equal(*pictures)
    summary = read_json(layout.visualise_json)
    assert summary["images"] == {"units": int((units["kind"] == "unit").sum()), "classes": 2}
    assert {(f["layer"], f["index"]) for f in summary["flat"]} == {("features.relu4", 0)}


def test_the_viewer_tiles_are_the_stored_maps(visualised_run):
    layout = RunLayout(visualised_run.out_dir)
    viewer = pd.read_csv(layout.visualise_viewer_csv)
    assert sorted(set(viewer["image_index"])) == [0, 1] and set(viewer["layer"]) == {"features.relu2",
                                                                                       "features.relu4"}
    store = zarr.open_group(layout.activations, mode="r")
    for row in viewer.itertuples():
        maps = store[row.layer]["maps"][row.image_index].astype(np.float32)  # (U, h, w)
        picture = np.asarray(Image.open(layout.root / row.maps_png))
        scales = np.array(json.loads(row.scales))
        np.testing.assert_allclose(scales, np.maximum(maps.reshape(len(maps), -1).max(1), 0), rtol=1e-6)
        for unit in range(row.units):
            r, c = divmod(unit, row.columns)
            top = row.gap + r * (row.map_height * row.zoom + row.gap)
            left = row.gap + c * (row.map_width * row.zoom + row.gap)
            tile = picture[top:top + row.map_height * row.zoom:row.zoom, left:left + row.map_width * row.zoom:row.zoom]
            assert (tile[..., 0] == tile[..., 1]).all()  # gray
            expected = np.zeros_like(maps[unit]) if scales[unit] == 0 else np.clip(maps[unit] / scales[unit], 0, 1)
            np.testing.assert_allclose(tile[..., 0] / 255, expected, atol=0.5 / 255 + 1e-3)
        if row.layer == "features.relu4":
            assert scales[0] == 0 and (picture[row.gap:row.gap + row.map_height * row.zoom,
                                               row.gap:row.gap + row.map_width * row.zoom] == 0).all()
        strongest = json.loads(row.strongest)
        assert strongest == sorted(range(len(maps)), key=lambda u: (-maps[u].max(), u))[:3]


def test_the_dream_and_the_report_pages(visualised_run):
    layout = RunLayout(visualised_run.out_dir)
    dreams = pd.read_csv(layout.visualise_dream_csv)
    assert dreams["octave"].tolist() == [0, 1] and (dreams["end"] > dreams["start"]).all()
    assert dreams["layer"].unique().tolist() == ["features.relu4"]  # the middle one of the two dissected layers
    index = layout.report_index.read_text()
    assert "id='visualise'" in index and "What units want to see" in index
    units = pd.read_csv(layout.visualise_units_csv, keep_default_na=False, na_values=[""])
    detector = units[units["reason"] == "detector"].iloc[0]
    card_page = layout.report_layer_page(detector["layer"]).read_text()
    assert f"../{detector['image']}" in card_page
    assert "flat: nothing drives it" in layout.report_layer_page("features.relu4").read_text()  # the dead unit
    grid = layout.report_visualise_page("features.relu4")
    viewer_page = layout.report_viewer_page(0)
    assert grid.is_file() and viewer_page.is_file()
    for page in (layout.report_index, grid, viewer_page):
        dom, stderr = open_page(page)
        assert not console_errors(stderr), stderr
        for source in [part.split("'")[0] for part in dom.split("src='")[1:]] + \
                      [part.split('"')[0] for part in dom.split('src="')[1:]]:
            assert (page.parent / source).resolve().is_file(), source  # every picture the page shows exists


def test_a_finished_stage_is_skipped_and_a_changed_setting_reruns_it_alone(visualised_run, caplog):
    layout = RunLayout(visualised_run.out_dir)
    before = layout.visualise_json.stat().st_mtime_ns
    upstream = {stage: layout.stamp(stage, layer).read_bytes() for stage, layer in
                (("extract", None), ("audit", None), ("tally", "features.relu4"))}
    cfg = visualised_run.copy()
    cfg.stages = ["visualise"]
    with caplog.at_level("INFO"):
        run_pipeline(cfg)
    assert layout.visualise_json.stat().st_mtime_ns == before
    assert "visualise: done with these settings and inputs, skipping" in caplog.text
    cfg.stages = ["extract", "thresholds", "tally", "audit", "visualise"]
    cfg.visualise.steps = 9
    caplog.clear()
    with caplog.at_level("INFO"):
        run_pipeline(cfg)
    assert "visualise: changed: visualise.steps; running again" in caplog.text
    assert read_json(layout.visualise_json)["settings"]["steps"] == 9
    assert pd.read_csv(layout.visualise_units_csv)["steps"].eq(9).all()
    assert {stage: layout.stamp(stage, layer).read_bytes() for stage, layer in
            (("extract", None), ("audit", None), ("tally", "features.relu4"))} == upstream


def test_vector_unit_and_class_objectives_are_the_values_the_model_gives_on_the_image():
    torch.manual_seed(0)
    net = SmallCNN(num_classes=4, width=4)
    model = prepare_model(net)
    settings = default_settings(steps=48)
    normalise = Normalisation((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    targets = [Target("unit", "classifier.fc1", 5), Target("unit", "classifier.fc1", 9)]
    units = synthesise(model, targets, [1, 2], settings, normalise, 64, CPU)
    classes = synthesise(model, [Target("class", None, 2)], [3], settings, normalise, 64, CPU)
    images = torch.from_numpy(np.stack([*units.images, *classes.images])).permute(0, 3, 1, 2).float() / 255
    with LayerRecorder(net.eval(), ["classifier.fc1"]) as recorder:
        recorded = recorder.run(normalise(images))["classifier.fc1"]
    with torch.no_grad():
        logits = net(normalise(images))
    # the PNGs are rounded to uint8, so the values match to that rounding
    np.testing.assert_allclose(units.reached, recorded[[0, 1], [5, 9]].numpy(), rtol=0.02, atol=0.02)
    assert classes.reached[0] == pytest.approx(float(logits[2, 2]), rel=0.02, abs=0.02)
    assert (units.reached > units.initial).all() and classes.reached[0] > classes.initial[0]


def test_tile_scales_per_unit_and_per_layer():
    maps = np.array([[[0.0, 2.0]], [[-1.0, -3.0]], [[5.0, 1.0]]])  # (3 units, 1, 2)
    np.testing.assert_array_equal(visualise_viewer.tile_scales(maps, "unit"), [2.0, 0.0, 5.0])
    np.testing.assert_array_equal(visualise_viewer.tile_scales(maps, "layer"), [5.0, 5.0, 5.0])
