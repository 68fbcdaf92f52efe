"""The compositional stage: formulas' IoU by brute force, beam search against exhaustive search, the tally's labels."""

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF_DIR, tiny_overrides
from data_prep.synthetic_broden import generate
from dissect.artifacts import open_activations, read_thresholds
from dissect.broden import CATEGORIES, BrodenDataset, image_concepts
from dissect.layout import RunLayout
from dissect.settings import CompositionalSettings, section
from dissect.stages import compositional, extract, tally, thresholds
from dissect.upsample import fired_masks, float32_below

LAYERS = ["features.conv2", "features.conv3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_checkpoint):
    """60 generated images at 64 px, a tiny random SmallCNN, dissected and searched (beam 5, length 3)."""
    base = tmp_path_factory.mktemp("compositional")
    probe = generate(base / "broden", n_images=60, size=64, seed=2, workers=1)
    overrides = tiny_overrides(probe, base / "run", tiny_checkpoint) + [
        "dataset=default", f"dataset.root={probe}", f"layers=[{','.join(LAYERS)}]", "thresholds.quantile=0.02",
        "compositional.units_per_task=5"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    for stage in (extract, thresholds, tally, compositional):
        stage.run(cfg)
    return cfg


def raw_masks(cfg, layer: str) -> tuple[list[np.ndarray], list[dict[int, np.ndarray]], np.ndarray]:
    """Per image: the (U, P) fired masks of every unit, {label number: (P,) mask}, and (N, K) annotated categories."""
    layout = RunLayout(Path(cfg.out_dir))
    store = open_activations(layout.root)
    broden = BrodenDataset(cfg.dataset.root)
    below = float32_below(read_thresholds(layout, layer))
    fired, concepts, annotated = [], [], []
    for i in range(len(broden)):
        maps = store[layer]["maps"][i]
        fired.append(fired_masks(maps, below, broden.mask_size(i)))
        found = image_concepts(broden, i, len(broden.labels))
        concepts.append({int(n): mask for n, mask in zip(found.labels, found.masks)})
        annotated.append(found.annotated)
    return fired, concepts, np.array(annotated)


def brute_iou(formula: list, unit: int, fired, concepts, annotated, category_of, images=None) -> float:
    """IoU of a machine-form formula ``[n, [op, n], ...]`` by evaluating it pixel by pixel in every image
    (or in ``images`` only)."""
    numbers = [formula[0]] + [n for _, n in formula[1:]]
    needed = sorted({CATEGORIES.index(category_of(n)) for n in numbers})
    inter = union = 0
    for i, masks in enumerate(concepts):
        if not annotated[i, needed].all() or (images is not None and i not in images):
            continue
        size = fired[i].shape[1]
        value = masks.get(formula[0], np.zeros(size, bool))
        for op, n in formula[1:]:
            other = masks.get(n, np.zeros(size, bool))
            value = value | other if op == "or" else value & other if op == "and" else value & ~other
        inter += int((fired[i][unit] & value).sum())
        union += int((fired[i][unit] | value).sum())
    return inter / union if union else 0.0


def test_every_reported_formula_has_the_iou_of_a_pixel_by_pixel_count(run):
    broden = BrodenDataset(run.dataset.root)
    for layer in LAYERS:
        table = pd.read_csv(RunLayout(Path(run.out_dir)).compositional_csv(layer))
        fired, concepts, annotated = raw_masks(run, layer)
        assert len(table) == fired[0].shape[0]
        for row in table.itertuples():
            expected = brute_iou(json.loads(row.formula_json), row.unit, fired, concepts, annotated,
                                 broden.category_of)
            assert row.iou == pytest.approx(expected, abs=1e-6), (layer, row.unit, row.formula)
            for runner in json.loads(row.runner_ups):
                assert runner["iou"] <= row.iou + 1e-9
        assert (table["iou"] >= table["single_iou"]).all()


def test_single_concepts_are_the_tallys_labels_and_ious(run):
    layout = RunLayout(Path(run.out_dir))
    for layer in LAYERS:
        ours = pd.read_csv(layout.compositional_csv(layer))
        tallied = pd.read_csv(layout.tally_csv(layer))
        assert list(ours["single_label"]) == list(tallied["label"])  # every concept annotates its own category here
        np.testing.assert_allclose(ours["single_iou"], tallied["iou"], atol=2e-6)


def exhaustive_best(unit: int, n_labels: int, fired, concepts, annotated, category_of) -> float:
    """The best IoU of every single concept and every length-2 formula, by brute force."""
    best = 0.0
    for a in range(1, n_labels + 1):
        best = max(best, brute_iou([a], unit, fired, concepts, annotated, category_of))
    for a, b in itertools.permutations(range(1, n_labels + 1), 2):
        for op in ("or", "and", "and not"):
            best = max(best, brute_iou([a, [op, b]], unit, fired, concepts, annotated, category_of))
    return best


def test_a_beam_as_wide_as_the_concepts_finds_the_exhaustive_best(run):
    broden = BrodenDataset(run.dataset.root)
    layout = RunLayout(Path(run.out_dir))
    layer = "features.conv2"
    n_labels = len(broden.labels)
    settings = CompositionalSettings(beam=n_labels, max_length=2, length_penalty=0.0, runner_ups=0, units_per_task=8,
                                     max_images=0, sample_seed=0)
    categories = np.array([CATEGORIES.index(broden.category_of(n)) for n in range(1, n_labels + 1)])
    job = compositional.SearchJob(str(layout.activations), compositional.MaskFiles.of(layout),
                                  layer, read_thresholds(layout, layer), categories,
                                  np.array([broden.mask_size(i) for i in range(len(broden))]), settings)
    fired, concepts, annotated = raw_masks(run, layer)
    for unit in (0, 3):
        explored = compositional.search_units(job, [unit])[0]
        assert len([f for f, _ in explored if f.length == 2]) == n_labels * (n_labels - 1) * 3  # all were scored
        assert explored[0][1] == pytest.approx(exhaustive_best(unit, n_labels, fired, concepts, annotated,
                                                                broden.category_of), abs=1e-12)


def test_a_sampled_search_counts_exactly_over_its_recorded_sample(run, tmp_path):
    """compositional.max_images below the valid images: the search runs on a seeded sample, recorded, exact."""
    import shutil

    from dissect.stages.compositional import search_sample

    copy = tmp_path / "run"
    shutil.copytree(run.out_dir, copy)
    cfg = run.copy()
    cfg.out_dir, cfg.compositional.max_images, cfg.compositional.sample_seed = str(copy), 25, 3
    compositional.run(cfg)
    layout = RunLayout(copy)
    sample = np.load(layout.concept_sample)
    valid = open_activations(layout.root)["valid"][:]
    np.testing.assert_array_equal(sample, search_sample(valid, section(cfg.compositional, CompositionalSettings)))
    broden = BrodenDataset(run.dataset.root)
    layer = "features.conv2"
    summary = json.loads(layout.compositional_json(layer).read_text())
    assert summary["images"] == {"probe_set": 60, "valid": int(valid.sum()), "searched": 25, "sampled": True,
                                 "sample_seed": 3, "sample_digest": compositional.sample_digest(sample)}
    fired, concepts, annotated = raw_masks(run, layer)
    table = pd.read_csv(layout.compositional_csv(layer))
    for row in table.itertuples():
        expected = brute_iou(json.loads(row.formula_json), row.unit, fired, concepts, annotated, broden.category_of,
                             images=set(sample.tolist()))
        assert row.iou == pytest.approx(expected, abs=1e-6), (row.unit, row.formula)
    assert not table.equals(pd.read_csv(RunLayout(Path(run.out_dir)).compositional_csv(layer)))
    from reports.compositional_section import layer_fragment

    assert f"seeded sample of 25 of the {int(valid.sum())} valid images" in layer_fragment(layout, layer)


def test_a_formula_text_and_machine_form():
    formula = compositional.Formula((2,)).extend(compositional.OR, 0).extend(compositional.AND_NOT, 1)
    assert formula.text(["water", "blue", "river"]) == "(river OR water) AND NOT blue"
    assert formula.machine([10, 11, 12]) == [12, ["or", 10], ["and not", 11]]


def test_the_report_shows_each_units_formula_and_the_layer_summary(run):
    from html import escape

    from browser import console_errors, open_page
    from reports.build import build_report

    layout = RunLayout(Path(run.out_dir))
    index = build_report(layout.root, LAYERS)
    table = pd.read_csv(layout.compositional_csv("features.conv2"))
    dom, stderr = open_page(layout.report_layer_page("features.conv2"))
    assert not console_errors(stderr), console_errors(stderr)
    for row in table.itertuples():
        assert f"formula: <b>{escape(row.formula)}</b> IoU {row.iou:.3f}" in dom
    summary = json.loads(layout.compositional_json("features.conv2").read_text())
    assert summary["formula_beats_single"] == int((table["gain"] > 0).sum())
    assert (f"a formula beats the single label for <b>{summary['formula_beats_single']} of {len(table)}</b> units"
            in index.read_text())
