"""The tally stage against the per-image, per-unit reference of tests/reference_tally.py: equal, exactly."""

from pathlib import Path

import numpy as np

from data_prep.synthetic_broden import generate
from dissect.stages import tally
from dissect.artifacts import read_thresholds
from dissect.broden import CATEGORIES, BrodenDataset
from dissect.layout import RunLayout
from dissect.mask_cache import ensure_mask_cache
from dissect.pipeline import run_pipeline
from reference_tally import reference_counts, reference_iou

LAYERS = ["features.relu2", "features.relu3"]


def test_the_stage_counts_and_iou_equal_the_reference(tmp_path, tiny_checkpoint, compose_config):
    probe = generate(tmp_path / "probe", n_images=40, size=64, seed=9, workers=1)
    layout = RunLayout(tmp_path / "run")
    cfg = compose_config(["model=default", "model.module.num_classes=4", "+model.module.width=4",
                          f"model.checkpoint={tiny_checkpoint}", "model.input_size=64",
                          f"layers=[{','.join(LAYERS)}]", f"dataset.root={probe}", f"out_dir={layout.root}",
                          "extract.batch_size=8", "extract.num_workers=0", "extract.chunk_mib=0.01",
                          "tally.block_images=16", "stages=[extract,thresholds,tally]"])
    run_pipeline(cfg)
    thresholds = {layer: read_thresholds(layout, layer) for layer in LAYERS}
    expected = reference_counts(layout.activations, probe, LAYERS, thresholds)
    cache = ensure_mask_cache(BrodenDataset(probe), Path(cfg.tally.mask_cache))  # the one the stage built
    block = tally.tally_block(str(layout.activations), str(cache), LAYERS, thresholds, 0, 40, False)
    for key, counts in expected.items():
        np.testing.assert_array_equal(block[key], counts, err_msg=key)
    assert all(expected[f"intersection/{layer}"].sum() > 0 for layer in LAYERS), "some unit fires on some concept"
    broden = BrodenDataset(probe)
    label_categories = np.array([CATEGORIES.index(broden.category_of(n)) for n in range(1, len(broden.labels) + 1)])
    for layer in LAYERS:
        iou = reference_iou(expected, layer, label_categories).astype(np.float32)
        np.testing.assert_array_equal(np.load(layout.iou_npy(layer)), iou, err_msg=layer)
