"""The paper's sanity result on the first-run demo: a trained network has clearly more detectors than random weights.

SmallCNN is trained with the embedded default recipe (train_embedded's
defaults: batch norm, both tasks, 6 epochs, lr 3e-3, seed 0) on the default
generated set (the ``demo`` profile of data_prep.broden_like: 3000 images,
113 labels, no concept above 3.9% of all pixels), exactly as ``make model``
does, and dissected on the same images, like the same architecture with
seeded random weights.

Measured on data/synthetic_broden with the model ``make model`` trains
(detectors over the post-ReLU maps features.relu3 + features.relu4, 192
units): trained 171 in four categories (material 142, texture 19, scene 9,
colour 1), random 26. The test asks for trained >= 3 x random (the issue's
bar) and detectors in at least three categories.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from data_prep.broden_like import generate
from dissect.embedded_training import train_embedded
from dissect.embedded_model import SmallCNN
from dissect.layers import LayerRecorder
from dissect.layout import RunLayout
from dissect.models import load_model
from dissect.pipeline import run_pipeline
from dissect.probe import Preprocessing, open_probe_set

LAYERS = ["features.relu3", "features.relu4"]
MIN_RATIO = 3.0
MIN_CATEGORIES = 3


def dissect(compose_config, probe: Path, checkpoint: Path, outputs: int, name: str,
            out_dir: Path) -> dict[str, dict]:
    cfg = compose_config(["model=default", f"model.name={name}", f"model.checkpoint={checkpoint}",
                          f"model.module.num_classes={outputs}",
                          f"layers=[{','.join(LAYERS)}]", "dataset=default", f"dataset.root={probe}",
                          f"out_dir={out_dir}", "stages=[extract,thresholds,tally]"])
    run_pipeline(cfg)
    return {layer: json.loads(RunLayout(out_dir).tally_json(layer).read_text()) for layer in LAYERS}


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> tuple[Path, Path, int]:
    """(probe set, checkpoint, outputs) of SmallCNN trained with the embedded recipe on the default demo set."""
    base = tmp_path_factory.mktemp("trained")
    probe = generate(base / "probe", profile="demo", seed=0, workers=2)
    metrics = train_embedded(probe, base / "trained")
    print(f"held-out accuracy {metrics['held_out_accuracy']:.3f}")
    return probe, base / "trained" / "model.pt", int(metrics["num_outputs"])


@pytest.mark.slow  # builds the demo set and trains a model (once for the module): about 4 min on 2 cores
def test_trained_model_has_clearly_more_detectors_than_random_weights(compose_config, trained_model, tmp_path):
    probe, checkpoint, outputs = trained_model
    torch.manual_seed(0)
    random_checkpoint = tmp_path / "random.pt"
    torch.save(SmallCNN(num_classes=outputs).state_dict(), random_checkpoint)

    trained = dissect(compose_config, probe, checkpoint, outputs, "trained", tmp_path / "run_trained")
    random = dissect(compose_config, probe, random_checkpoint, outputs, "random", tmp_path / "run_random")

    counts, categories = {}, {}
    for kind, summaries in (("trained", trained), ("random", random)):
        counts[kind] = sum(s["detectors"] for s in summaries.values())
        categories[kind] = {c for s in summaries.values() for c, n in s["detectors_by_category"].items() if n}
        for layer, s in summaries.items():
            by_category = {c: n for c, n in s["detectors_by_category"].items() if n}
            print(f"{kind:<7} {layer}: {s['detectors']}/{s['units']} detectors, {s['unique_detectors']} unique, "
                  f"{by_category}")
    print(f"detectors trained {counts['trained']} in {sorted(categories['trained'])}, random {counts['random']}")
    assert counts["trained"] >= MIN_RATIO * counts["random"]
    assert len(categories["trained"]) >= MIN_CATEGORIES



#: The trained layer whose best detectors' synthesised images must beat every probe image, and how many of them.
VISUALISED_LAYER, VISUALISED_UNITS = "features.relu4", 3


@pytest.mark.slow  # shares the trained model; the probe pass and 512 ascent steps (Lucid's) take about 40 s on 2 cores
def test_the_visualisation_of_a_trained_detector_beats_its_largest_probe_activation(compose_config, trained_model,
                                                                                    tmp_path):
    """The unit's centre position, optimised, exceeds its largest activation anywhere on any probe image.

    Measured on the earlier model of this module (1600 images of the basic set): at 512 steps the three best detectors of relu4 reach 3.9, 5.2 and 6.0 against
    2.8, 3.0 and 3.8 anywhere on the probe images; at 256 steps the first reached only 2.5."""
    probe, checkpoint, outputs = trained_model
    cfg = compose_config(["model=default", f"model.checkpoint={checkpoint}", f"model.module.num_classes={outputs}",
                          f"layers=[{VISUALISED_LAYER}]", "dataset=default", f"dataset.root={probe}",
                          f"out_dir={tmp_path / 'run'}", "stages=[extract,thresholds,tally,visualise]",
                          f"visualise.top_units={VISUALISED_UNITS}", "visualise.dead_units=0", "visualise.classes=[]",
                          "visualise.objective=centre", "visualise.steps=512", "visualise.dream.images=0",
                          "visualise.viewer.images=0"])
    run_pipeline(cfg)
    units = pd.read_csv(RunLayout(cfg.out_dir).visualise_units_csv)
    assert len(units) == VISUALISED_UNITS and (units["reason"] == "detector").all()
    # by a float32 forward pass here (not the stored maps): each unit's largest value at the centre of its map
    # (the stage's best_probe) and anywhere in it, over the probe images
    model = load_model(cfg.model).module
    preprocessing = Preprocessing(224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    paths = open_probe_set(cfg.dataset).image_paths
    chosen = torch.tensor(units["index"].tolist())
    centre = torch.full((len(units),), -float("inf"))
    anywhere = torch.full((len(units),), -float("inf"))
    with LayerRecorder(model, [VISUALISED_LAYER], stop_early=True) as recorder:
        for begin in range(0, len(paths), 64):
            images = torch.stack([preprocessing(Image.open(path)) for path in paths[begin:begin + 64]])
            maps = recorder.run(images)[VISUALISED_LAYER][:, chosen]  # (B, units, h, w)
            h, w = maps.shape[2:]
            centre = torch.maximum(centre, maps[:, :, h // 2, w // 2].amax(0))
            anywhere = torch.maximum(anywhere, maps.amax(dim=(0, 2, 3)))
    np.testing.assert_allclose(units["best_probe"], centre.numpy(), rtol=2e-3)  # the stage's, from float16 maps
    print(units[["index", "reached", "best_probe"]].assign(anywhere=anywhere.numpy()).to_string(index=False))
    assert (units["reached"].to_numpy() > anywhere.numpy()).all()
