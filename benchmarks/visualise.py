"""Benchmark of the visualise stage's batching: seconds per synthesised image, 64 units in one batch or one at a time.

Usage: ``python benchmarks/visualise.py [--models embedded alexnet] [--units 64] [--single 8] [--steps N]
[--param fourier|pixel] [--device cpu|cuda] [--no-batch-invariant]``

For each model (random weights: speed does not depend on them), ``--units``
units of its unit layer are optimised in one batch (the stage's path:
``dissect.stages.visualise.ascent.synthesise`` on ``--units`` rows) and
``--single`` of them one at a time (batches of one row). A batch of one costs
the same for every unit, so the seconds per unit of one-at-a-time runs are
measured on ``--single`` units rather than all of them. The settings are the
config's (``conf/config.yaml``, ``visualise``), with ``--steps`` and
``--param`` to override. Prints seconds per unit of both paths, the speed-up,
and the largest difference between a unit's batched and single images
(0 or 1 grey level: the rows of a batch are independent).
"""

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torchvision
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dissect.embedded_model import SmallCNN  # noqa: E402
from dissect.settings import VisualiseSettings, section  # noqa: E402
from dissect.stages.attribute.model import prepare_model  # noqa: E402
from dissect.stages.visualise.ascent import Normalisation, synthesise  # noqa: E402
from dissect.stages.visualise.objectives import Target  # noqa: E402

MODELS = {  # builder, input size, mean, std, unit layer
    "embedded": (lambda: SmallCNN(num_classes=36), 224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "features.relu4"),
    "alexnet": (lambda: torchvision.models.alexnet(weights=None), 227, (0.485, 0.456, 0.406),
                (0.229, 0.224, 0.225), "features.10"),
}


def config_settings() -> VisualiseSettings:
    """The ``visualise`` section of conf/config.yaml."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return section(compose(config_name="config").visualise, VisualiseSettings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--units", type=int, default=64)
    parser.add_argument("--single", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="default: visualise.steps of the config")
    parser.add_argument("--param", choices=["fourier", "pixel"], default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-batch-invariant", action="store_true",
                        help="oneDNN (CPU) / cuDNN autotuned kernels: faster, but rows depend on the batch")
    args = parser.parse_args()
    settings = config_settings()
    settings = replace(settings, steps=args.steps or settings.steps, param=args.param or settings.param,
                       batch_invariant=not args.no_batch_invariant)
    device = torch.device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, {settings.param}, {settings.steps} steps, "
          f"batch_invariant={settings.batch_invariant}")
    print(f"{'model':10} {'units':>5} {'batched s/unit':>15} {'single s/unit':>14} {'speed-up':>9} {'max diff':>9}")
    for name in args.models:
        build, size, mean, std, layer = MODELS[name]
        torch.manual_seed(0)
        model = prepare_model(build().to(device))
        normalise = Normalisation(mean, std)
        targets = [Target("unit", layer, unit) for unit in range(args.units)]
        seeds = list(range(args.units))
        synthesise(model, targets[:2], seeds[:2], replace(settings, steps=2), normalise, size, device)  # warm-up
        started = time.perf_counter()
        batched = synthesise(model, targets, seeds, settings, normalise, size, device)
        batched_seconds = (time.perf_counter() - started) / args.units
        started = time.perf_counter()
        singles = [synthesise(model, [target], [seed], settings, normalise, size, device)
                   for target, seed in zip(targets[:args.single], seeds[:args.single])]
        single_seconds = (time.perf_counter() - started) / args.single
        difference = max(int(np.abs(batched.images[k].astype(int) - single.images[0].astype(int)).max())
                         for k, single in enumerate(singles))
        print(f"{name:10} {args.units:5d} {batched_seconds:15.3f} {single_seconds:14.3f} "
              f"{single_seconds / batched_seconds:8.1f}x {difference:9d}")


if __name__ == "__main__":
    main()
