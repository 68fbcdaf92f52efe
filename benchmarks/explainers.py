"""Seconds and model calls per image of the deterministic occlusion explainers against LIME.

Per image and model (the embedded default model and AlexNet with random
weights), each explainer of ``dissect.stages.explanations.occlusion`` (grid,
statistical, two-level, elbow) and LIME at the attribute stage's default
samples for the device (``attribute.device_defaults``) and segments, on the
same probe images, explaining each model's predicted class. Prints one row
per image, model and explainer, then the means and LIME's seconds over each
explainer's. Nothing is asserted.

    .venv/bin/python benchmarks/explainers.py --images 4
    .venv/bin/python benchmarks/explainers.py --images 8 --lime-samples 1000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dissect.layout import RunLayout  # noqa: E402,F401  (the benchmark writes nothing to a run directory)
from dissect.models import load_model  # noqa: E402
from dissect.probe import Preprocessing, open_probe_set  # noqa: E402
from dissect.settings import ExplanationsSettings, section  # noqa: E402
from dissect.stages.attribute import load_images, prepare_model, read_settings  # noqa: E402
from dissect.stages.explanations import EXPLAINER_FUNCTIONS, Scorer, lime_explanation  # noqa: E402

MODELS = {"embedded": ["model=default"], "alexnet (random)": ["model=alexnet", "model.weights=null"]}


def config(overrides: list[str]):
    """The project's Hydra config with ``overrides``."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def measure(name: str, overrides: list[str], images: int, lime_samples: int | None) -> list[dict]:
    """One row per image and explainer: seconds and model calls."""
    cfg = config(overrides)
    torch.manual_seed(0)
    loaded = load_model(cfg.model)
    preprocessing = Preprocessing(loaded.input_size, loaded.mean, loaded.std)
    probe = open_probe_set(cfg.dataset)
    batch = load_images(probe.image_paths[:images], preprocessing)
    settings = section(cfg.explanations, ExplanationsSettings)
    attribute = read_settings(cfg.attribute, "cpu")[0]
    lime = {"lime_segments": attribute.lime_segments, "lime_samples": lime_samples or attribute.lime_samples}
    scorer = Scorer(prepare_model(loaded.module), preprocessing, torch.device("cpu"), settings.batch_size)
    targets = scorer.logits(batch).argmax(1).tolist()
    rows = []
    for k in range(len(batch)):
        for explainer, explain in EXPLAINER_FUNCTIONS.items():
            result = explain(scorer, batch[k], targets[k], settings.grid_cells, settings.grid_keep,
                             settings.statistical_lambda)
            rows.append({"model": name, "image": probe.image_ids[k], "explainer": explainer,
                         "seconds": result.seconds, "model_calls": result.calls})
        result = lime_explanation(scorer, batch[k], targets[k], settings.lime_seeds[0], lime, settings)
        rows.append({"model": name, "image": probe.image_ids[k], "explainer": f"lime ({lime['lime_samples']} samples)",
                     "seconds": result.seconds, "model_calls": result.calls})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--lime-samples", type=int, default=None, help="default: attribute's CPU default")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = pd.DataFrame([row for name, overrides in MODELS.items()
                          for row in measure(name, overrides, args.images, args.lime_samples)])
    pd.set_option("display.width", 160)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    means = table.groupby(["model", "explainer"], sort=False)[["seconds", "model_calls"]].mean()
    lime = {model: group[group.index.get_level_values("explainer").str.startswith("lime")]["seconds"].iat[0]
            for model, group in means.groupby(level="model", sort=False)}
    means["lime_seconds_over_this"] = [lime[model] / seconds for (model, _), seconds in means["seconds"].items()]
    print(f"\nmeans over {args.images} image(s), torch threads {torch.get_num_threads()}:")
    print(means.to_string(float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
