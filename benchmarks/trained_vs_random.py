"""Network Dissection's sanity result on the embedded defaults: trained weights against random weights.

Usage: ``python benchmarks/trained_vs_random.py [--seed 0] [--layers features.relu3 features.relu4]``

Dissects (extract, thresholds, tally) the embedded default model
(``data/embedded_model/model.pt``, trained by ``make model``) and the same
architecture (``dissect.embedded_model.SmallCNN``) with random weights (a
state_dict drawn with ``torch.manual_seed(seed)``, saved beside its run) on the
default generated probe set (``data/synthetic_broden``, built by ``make data``),
into ``results/embedded-synthetic`` and ``results/embedded_random-synthetic``
(finished stages are reused, so the trained run is the one ``make dissect``
makes; by default the model's default layers, of which the tally covers the
convolutional ones), and prints, per layer and per concept category,
the units, detectors (IoU > tally.iou_threshold) and unique detectors of both.
It prints numbers only; it asserts nothing.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dissect.layout import RunLayout

REPO = Path(__file__).resolve().parents[1]
TRAINED = REPO / "data" / "embedded_model" / "model.pt"
PROBE = REPO / "data" / "synthetic_broden"
RESULTS = REPO / "results"
CATEGORIES = ("color", "object", "part", "material", "scene", "texture")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def random_checkpoint(path: Path, num_classes: int, seed: int) -> Path:
    """A SmallCNN(num_classes) state_dict drawn with torch.manual_seed(seed), written once to ``path``."""
    from dissect.embedded_model import SmallCNN

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        torch.save(SmallCNN(num_classes=num_classes).state_dict(), path)
    return path


def dissect(name: str, checkpoint: Path, layers: list[str] | None, out_dir: Path) -> tuple[float, list[str]]:
    """Run extract, thresholds and tally for the embedded architecture with ``checkpoint``.

    Returns the seconds taken and the layers run (``layers``, or the model's default layers when None).
    """
    from dissect.pipeline import run_pipeline

    overrides = ["model=default", f"model.name={name}", f"model.checkpoint={checkpoint}", "dataset=default",
                 f"dataset.root={PROBE}", f"out_dir={out_dir}", "stages=[extract,thresholds,tally]"]
    if layers:
        overrides.append(f"layers=[{','.join(layers)}]")
    cfg = compose(overrides)
    started = time.perf_counter()
    run_pipeline(cfg)
    return time.perf_counter() - started, [str(layer) for layer in cfg.layers]


def summary(out_dir: Path, layer: str) -> dict:
    return json.loads(RunLayout(out_dir).tally_json(layer).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", default=None,
                        help="layers to dissect (default: the model's default layers, as make dissect runs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    missing = [f"{path} (run `make {target}`)" for path, target in ((PROBE / "index.csv", "data"), (TRAINED, "model"))
               if not path.exists()]
    if missing:
        sys.exit("missing: " + "; ".join(missing))
    num_classes = int(compose(["model=default"]).model.module.num_classes)  # the trained model's outputs
    runs = {
        "trained": ("embedded", TRAINED, RESULTS / "embedded-synthetic"),
        "random": ("embedded_random",
                   random_checkpoint(RESULTS / "embedded_random-synthetic" / f"random_seed{args.seed}.pt",
                                     num_classes, args.seed),
                   RESULTS / "embedded_random-synthetic"),
    }
    seconds = {}
    for kind, (name, checkpoint, out_dir) in runs.items():
        seconds[kind], layers = dissect(name, checkpoint, args.layers, out_dir)
    layers = [layer for layer in layers if RunLayout(runs["trained"][2]).tally_json(layer).exists()]  # map layers
    print(f"\nprobe set {PROBE} ; trained {TRAINED} ; random: SmallCNN seed {args.seed}")
    print(f"pipeline seconds (stages already done are skipped): trained {seconds['trained']:.1f}, "
          f"random {seconds['random']:.1f}")
    header = f"{'layer':<16} {'category':<9} {'units':>5} {'det trained':>11} {'det random':>10} " \
             f"{'uniq trained':>12} {'uniq random':>11}"
    print(header)
    print("-" * len(header))
    totals = {"units": 0, "trained": 0, "random": 0}
    for layer in layers:
        trained, random = (summary(runs[kind][2], layer) for kind in ("trained", "random"))
        for category in CATEGORIES:
            print(f"{layer:<16} {category:<9} {'':>5} {trained['detectors_by_category'][category]:>11} "
                  f"{random['detectors_by_category'][category]:>10} "
                  f"{trained['unique_detectors_by_category'][category]:>12} "
                  f"{random['unique_detectors_by_category'][category]:>11}")
        print(f"{layer:<16} {'all':<9} {trained['units']:>5} {trained['detectors']:>11} {random['detectors']:>10} "
              f"{trained['unique_detectors']:>12} {random['unique_detectors']:>11}")
        totals["units"] += trained["units"]
        totals["trained"] += trained["detectors"]
        totals["random"] += random["detectors"]
    print(f"{'total':<16} {'':<9} {totals['units']:>5} {totals['trained']:>11} {totals['random']:>10}")


if __name__ == "__main__":
    main()
