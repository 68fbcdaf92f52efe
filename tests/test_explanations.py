"""The explanations stage: masks and Jaccard by numpy, occlusion explainers on a planted classifier, determinism,
deletion/insertion against a random map, the whole stage on a small run, and its report section."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from conftest import CONF_DIR, write_activation_store
from dissect.artifacts import read_json
from dissect.layout import RunLayout
from dissect.probe import Preprocessing
from dissect.settings import ExplanationsSettings
from dissect.stages import attribute, explanations
from dissect.stages.attribute import prepare_model
from dissect.stages.explanations import (
    EXPLAINER_FUNCTIONS,
    Scorer,
    auc,
    blur,
    deletion_insertion,
    grid_boxes,
    jaccard,
    knee,
    random_map,
    ranking,
    top_segments_mask,
    top_share_mask,
)
from planted_models import PlantedRedClassifier, red_region_images

IDENTITY = Preprocessing(input_size=64, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
CPU = torch.device("cpu")
#: The stage settings of these tests (conf/config.yaml holds those of a real run).
SETTINGS = {"explainers": "all", "mask_share": 0.2, "grid_cells": 10, "grid_keep": 0.2, "statistical_lambda": 1.0,
            "lime_superpixels": 5, "lime_seeds": [0, 1], "blur_sigma": 2.0, "insertion_sigma": 8.0, "steps": 16,
            "compare_run": None, "overlays": 2, "seed": 0, "batch_size": 64}


@pytest.fixture(scope="module")
def planted():
    """The planted red classifier's scorer and six images with their red discs ((6, 3, 64, 64) uint8, (6, 64, 64))."""
    images, discs = red_region_images(6, 64, seed=0)
    scorer = Scorer(prepare_model(PlantedRedClassifier()), IDENTITY, CPU, 64)
    return scorer, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), discs


# ------------------------------------------------------------------------- masks and Jaccard against numpy


def test_top_share_masks_and_jaccard_equal_numpy_on_fixed_arrays():
    values = np.array([[0.9, -1.0, 0.3], [0.3, 2.0, 0.0], [0.3, -0.5, 0.1]])
    # 9 pixels x 0.34 = 3.06 -> 3 pixels: 2.0, 0.9, then the first 0.3 in row-major order (ties to the lower index)
    np.testing.assert_array_equal(top_share_mask(values, 0.34), [[1, 0, 1], [0, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(top_share_mask(values, 0.01), [[0, 0, 0], [0, 1, 0], [0, 0, 0]])  # at least 1
    rng = np.random.default_rng(0)
    for share in (0.05, 0.2, 0.5):
        random = rng.normal(size=(12, 17))  # no ties: the mask is every pixel at or above the k-th largest value
        k = int(round(share * random.size))
        threshold = np.sort(random.ravel())[::-1][k - 1]
        np.testing.assert_array_equal(top_share_mask(random, share), random >= threshold)
    a = np.array([[1, 1, 0], [0, 1, 0]], bool)
    b = np.array([[1, 0, 0], [0, 1, 1]], bool)
    assert jaccard(a, b) == pytest.approx(2 / 4)  # by hand: both at (0,0), (1,1); either at 4 pixels
    for _ in range(5):
        x, y = rng.random((9, 9)) > 0.5, rng.random((9, 9)) > 0.7
        assert jaccard(x, y) == pytest.approx(np.sum(x * y) / np.sum(np.maximum(x, y)))
    assert jaccard(a, a) == 1.0 and np.isnan(jaccard(a & False, a & False))


def test_top_segments_keep_the_segments_of_highest_mean():
    segments = np.array([[0, 0, 1, 1], [2, 2, 1, 1], [3, 3, 3, 3]])
    values = np.array([[5.0, 5.0, 1.0, 1.0], [7.0, 7.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]])
    np.testing.assert_array_equal(top_segments_mask(values, segments, 2), [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])


def test_the_knee_of_a_step_curve_is_its_last_high_point():
    assert knee(np.array([9.0, 9.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0])) == 3
    assert knee(np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.0])) in (2, 3)  # convex decay bends early
    assert knee(np.array([5.0, 5.0])) == 1


# ------------------------------------------------------------------------- planted classifier: red regions


@pytest.mark.parametrize("name", list(EXPLAINER_FUNCTIONS))
def test_each_occlusion_explainer_covers_the_red_region_and_is_deterministic(planted, name):
    scorer, images, discs = planted
    for k in range(4):
        first = EXPLAINER_FUNCTIONS[name](scorer, images[k], 0, 10, 0.2, 1.0)
        second = EXPLAINER_FUNCTIONS[name](scorer, images[k], 0, 10, 0.2, 1.0)
        assert jaccard(first.mask, discs[k]) >= 0.5, (name, k, jaccard(first.mask, discs[k]))
        assert jaccard(first.mask, second.mask) == 1.0 and np.array_equal(first.heat, second.heat)
        assert first.calls == second.calls > 0
    if name == "two_level":  # fewer model calls than the grid's 1 + 100
        assert first.calls < 1 + 100


def test_the_grid_ranks_the_red_cells_first(planted):
    scorer, images, discs = planted
    for k in range(len(images)):
        explanation = EXPLAINER_FUNCTIONS["grid"](scorer, images[k], 0, 10, 0.2, 1.0)
        boxes = grid_boxes(64, 64, 10)
        assert len(boxes) == 100 and {(b - t, r - left) for t, left, b, r in boxes} <= {(6, 6), (6, 7), (7, 6), (7, 7)}
        red = np.array([discs[k][t:b, left:r].sum() for t, left, b, r in boxes])  # red pixels per cell, by numpy
        order = ranking(explanation.drops)
        assert set(order[:np.count_nonzero(red)]) == set(np.flatnonzero(red)), k  # every red cell before the rest
        # and in the order of their red pixels (the drop sums the red response, 0.9-1 per red pixel under noise)
        assert all(red[order[i + 1]] <= red[order[i]] + 2 for i in range(np.count_nonzero(red) - 1)), k
        assert list(explanation.kept) == sorted(order[:20])  # grid_keep 0.2 of 100 cells


def test_deletion_and_insertion_of_the_occlusion_map_beat_a_random_map(planted):
    scorer, images, _ = planted
    canvases = blur(images, 8.0)
    for k in range(len(images)):
        heat = EXPLAINER_FUNCTIONS["grid"](scorer, images[k], 0, 10, 0.2, 1.0).heat
        deletion, insertion = deletion_insertion(scorer, images[k], canvases[k], heat, 0, 16)
        random_deletion, random_insertion = deletion_insertion(scorer, images[k], canvases[k],
                                                               random_map(0, k, 64), 0, 16)
        assert len(deletion) == 17 and deletion[0] == pytest.approx(insertion[-1])  # both ends: the image itself
        assert auc(deletion) < auc(random_deletion) - 0.2, k
        assert auc(insertion) > auc(random_insertion) + 0.1, k
    assert auc(np.array([1.0, 0.0, 0.0])) == pytest.approx(0.25)  # trapezoids of width 1/2: (1 + 0) / 4


# ---------------------------------------------------------------------------------------- the whole stage


ATTRIBUTE = {"units": "none", "top_units": 1, "unit_label": None, "unit_pairs": [], "images_per_unit": 1,
             "class_target": "predicted", "class_images": 6, "methods": ["saliency", "input_x_gradient", "occlusion",
                                                                           "lime"],
             "grad_cam_layer": None, "ig_steps": 4, "ig_internal_batch": 8, "occlusion_window": 8,
             "occlusion_stride": 8, "lime_segments": 50, "lime_samples": 30, "shap_references": 2, "batch_size": 8,
             "randomisation_pairs": 0, "randomisation_steps": 1, "max_correlation": 0.5, "seed": 0, "device": "cpu",
             "device_defaults": {}}


@pytest.fixture(scope="module")
def explained_run(tmp_path_factory):
    """Six red-disc images (a plain folder), the planted classifier, the attribute stage, then the explanations stage."""
    base = tmp_path_factory.mktemp("explanations")
    images, discs = red_region_images(6, 64, seed=0)
    for k, image in enumerate(images):
        path = base / "probe" / f"img{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    overrides = ["model=default", "model.module._target_=planted_models.PlantedRedClassifier",
                 "~model.module.num_classes", "model.checkpoint=null", "model.input_size=64", "model.mean=[0,0,0]",
                 "model.std=[1,1,1]", "layers=[detectors.units]", "dataset=folder", f"dataset.root={base / 'probe'}",
                 f"out_dir={base / 'run'}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    cfg = OmegaConf.merge(cfg, {"attribute": ATTRIBUTE, "explanations": SETTINGS})
    ids = [f"img{k}.png" for k in range(6)]
    write_activation_store(base / "run", ids, {"detectors.units": np.zeros((6, 1, 1, 1))})
    attribute.run(cfg)
    return cfg, explanations.run(cfg), discs


def test_the_stage_writes_tables_masks_overlays_and_curves(explained_run):
    cfg, out_dir, discs = explained_run
    layout = RunLayout(cfg.out_dir)
    assert out_dir == layout.explanations_dir
    pairs = pd.read_csv(layout.explanations_pairs_csv)
    assert pairs["target"].tolist() == [0] * 6  # the planted classifier predicts "red" on every image
    summary = read_json(layout.explanations_json)

    methods = pd.read_csv(layout.jaccard_csv("methods"))
    masks = zarr.open_group(layout.explanations_masks, mode="r")
    position = {pair: k for k, pair in enumerate(pairs["pair"])}
    for row in methods.sample(12, random_state=0).itertuples():  # stored masks -> the table's Jaccard, by numpy
        a, b = masks[row.a][position[row.pair]], masks[row.b][position[row.pair]]
        assert row.jaccard == pytest.approx(np.sum(a & b) / np.sum(a | b), abs=1e-6)
    for name in ("grid", "statistical", "two_level", "elbow", "occlusion", "saliency"):
        stored = masks[name][:]
        overlap = [np.sum(m & d) / np.sum(m | d) for m, d in zip(stored, discs)]
        assert min(overlap) >= 0.5, (name, np.round(overlap, 2))  # the planted truth, read back from masks.zarr

    seeds = pd.read_csv(layout.jaccard_csv("seeds"))
    controls = seeds[seeds["b"].str.endswith("(run 2)")]
    assert sorted(controls["a"].unique()) == ["elbow", "grid", "statistical", "two_level"]
    assert (controls["jaccard"] == 1.0).all() and len(controls) == 4 * 6
    lime = seeds[seeds["a"] == "lime_seed0"]
    assert len(lime) == 6 and (lime["jaccard"] < 1).any(), lime["jaccard"].tolist()
    assert summary["deterministic_control"] == {"rows": 24, "all_one": True}

    blurred = pd.read_csv(layout.jaccard_csv("blur"))
    assert set(blurred["a"]) == {"grid", "statistical", "two_level", "elbow", "lime_seed0"}
    assert (blurred["predicted_sharp"] == 0).all() and blurred["probability_blurred"].between(0, 1).all()

    runs = pd.read_csv(layout.explainers_csv)
    sharp = runs[runs["run"] == "sharp"].groupby("explainer")["model_calls"].first()
    assert sharp["grid"] == 101 and sharp["lime_seed0"] == 30 and sharp["two_level"] < 101
    timing = summary["explainers"]
    assert timing["grid"]["lime_over_explainer"] == pytest.approx(
        runs[(runs.run == "sharp") & (runs.explainer == "lime_seed0")]["seconds"].mean()
        / runs[(runs.run == "sharp") & (runs.explainer == "grid")]["seconds"].mean(), rel=1e-3)

    scores = pd.read_csv(layout.faithfulness_csv).set_index(["pair", "method"])
    for method in ("saliency", "occlusion", "grid"):
        for pair in pairs["pair"]:
            assert scores.at[(pair, method), "deletion_auc"] < scores.at[(pair, "random"), "deletion_auc"]
            assert scores.at[(pair, method), "insertion_auc"] > scores.at[(pair, "random"), "insertion_auc"]
    curves = pd.read_csv(layout.curves_csv)
    assert len(curves) == len(scores) * 2 * 17
    overlays = summary["overlays"]
    assert overlays and all((layout.root / entry["path"]).is_file() for entry in overlays)
    picture = np.asarray(Image.open(layout.root / overlays[0]["path"]))
    assert picture.shape == (64, 64, 3)
    assert layout.stamp("explanations").is_file() and layout.curves_png.is_file()


def test_a_finished_stage_is_skipped_and_a_changed_setting_reruns_it(explained_run, tmp_path):
    cfg, out_dir, _ = explained_run
    layout = RunLayout(cfg.out_dir)
    stamp = layout.stamp("explanations").stat().st_mtime_ns
    assert explanations.run(cfg) == out_dir and layout.stamp("explanations").stat().st_mtime_ns == stamp
    inputs = read_json(layout.stamp("explanations"))["inputs"]
    assert inputs["attribute"] == read_json(layout.stamp("attribute"))["digest"]
    shutil.copytree(layout.root, tmp_path / "copy")
    copy = OmegaConf.merge(cfg, {"out_dir": str(tmp_path / "copy"), "explanations": {"steps": 4,
                                                                                    "explainers": ["grid"]}})
    explanations.run(copy)
    curves = pd.read_csv(RunLayout(tmp_path / "copy").curves_csv)
    assert curves["step"].max() == 4 and "statistical" not in set(curves["method"])
    assert read_json(RunLayout(tmp_path / "copy").stamp("explanations"))["digest"] != \
        read_json(layout.stamp("explanations"))["digest"]


def test_no_class_pairs_is_one_clear_error(explained_run, tmp_path):
    cfg, _, _ = explained_run
    layout = RunLayout(tmp_path)
    layout.attribute_dir.mkdir(parents=True)
    pd.DataFrame({"pair": [0], "kind": ["unit"], "layer": ["x"], "target": [0], "image_index": [0],
                  "image_id": ["a"]}).to_csv(layout.attribute_pairs_csv, index=False)
    with pytest.raises(explanations.ExplanationError, match="has no class pairs to compare; set attribute.class_target"):
        explanations.class_pairs(layout)


def test_settings_errors_name_the_key(compose_config):
    defaults = explanations.stage.read_settings(compose_config([]))  # conf/config.yaml: every key, valid
    assert defaults.explainer_names == ("grid", "statistical", "two_level", "elbow", "lime")
    for key, value, expected in (("mask_share", 1.5, "explanations.mask_share=1.5 is not allowed"),
                                 ("grid_keep", 0, "explanations.grid_keep=0 is not allowed"),
                                 ("lime_seeds", [3, 3], "two different seeds"),
                                 ("explainers", ["grid", "shap"], "a non-empty list of grid")):
        with pytest.raises(Exception, match=expected):
            ExplanationsSettings(**{**SETTINGS, key: value})


def test_the_report_section_shows_the_tables_overlays_and_aucs_in_a_browser(explained_run, tmp_path):
    from browser import console_errors, open_page
    from reports.build import page
    from reports.explanations_section import render

    cfg, _, _ = explained_run
    layout = RunLayout(cfg.out_dir)
    layout.report_dir.mkdir(exist_ok=True)
    path = layout.report_dir / "explanations-test.html"
    path.write_text(page("explanations", render(layout.root, layout.report_dir)), encoding="utf-8")
    dom, stderr = open_page(path, screenshot=tmp_path / "section.png")
    assert console_errors(stderr) == [] and "<pre id=\"js-errors\"></pre>" in dom
    assert "Comparing explanations" in dom and "Control: the deterministic explainers gave Jaccard 1" in dom
    scores = pd.read_csv(layout.faithfulness_csv).groupby("method")[["deletion_auc", "insertion_auc"]].mean()
    faithfulness = dom[dom.index("id=\"faithfulness\""):]
    for method in ("saliency", "grid", "random"):  # the AUCs shown are the means of faithfulness.csv
        cells = faithfulness[faithfulness.index(f"<td>{method}</td>"):].split("</tr>")[0]
        assert f"<td>{scores.at[method, 'deletion_auc']:.3f}</td><td>{scores.at[method, 'insertion_auc']:.3f}</td>" \
            in cells, method
    assert "better on both" in faithfulness[faithfulness.index("<td>grid</td>"):].split("</tr>")[0]
    methods = pd.read_csv(layout.jaccard_csv("methods"))
    mean = methods[(methods["a"] == "grid") & (methods["b"] == "lime_seed0")]["jaccard"].mean()
    matrix = dom[dom.index("id=\"jaccard-matrix\""):].split("</table>")[0]
    assert f"{mean:.2f}" in matrix.split("<th>grid</th>", 2)[-1].split("</tr>")[0]
    summary = read_json(layout.explanations_json)
    assert dom.count("class=\"overlays\"") == 3  # methods (explainers against LIME), seeds, blur
    assert dom.count("<img loading=\"lazy\" width=\"128\"") == len(summary["overlays"])
    assert "id=\"explainer-timing\"" in dom and "lime_seed0" in dom


def test_the_model_comparison_matches_images_by_id_and_equals_numpy(explained_run, tmp_path):
    """Against a second run whose grid masks are shifted by 8 pixels (another model's explanations, as far as the
    comparison can tell): the grid rows are numpy's Jaccard of the two stored masks, the untouched methods give 1."""
    cfg, _, _ = explained_run
    layout = RunLayout(cfg.out_dir)
    other, copy = tmp_path / "other", tmp_path / "copy"
    shutil.copytree(layout.root, other)
    shutil.copytree(layout.root, copy)
    group = zarr.open_group(RunLayout(other).explanations_masks, mode="a")
    shifted = np.roll(group["grid"][:], 8, axis=2)
    group["grid"][:] = shifted
    explanations.run(OmegaConf.merge(cfg, {"out_dir": str(copy), "explanations": {"compare_run": str(other),
                                                                                "explainers": ["grid", "statistical"]}}))
    table = pd.read_csv(RunLayout(copy).jaccard_csv("models"))
    pairs = pd.read_csv(RunLayout(copy).explanations_pairs_csv)
    mine = zarr.open_group(RunLayout(copy).explanations_masks, mode="r")["grid"][:]
    grid = table[table["a"] == "grid"]
    assert sorted(grid["image_id"]) == sorted(pairs["image_id"])
    for row in grid.itertuples():
        k = int(pairs.index[pairs["pair"] == row.pair][0])
        assert row.jaccard == pytest.approx(np.sum(mine[k] & shifted[k]) / np.sum(mine[k] | shifted[k]), abs=1e-6)
    assert (grid["jaccard"] < 1).any()
    assert (table.loc[table["a"] == "statistical", "jaccard"] == 1).all()
