"""Benchmark of the attribute stage's batching: pairs/s of one Captum call per batch against one call per pair.

Usage: ``python benchmarks/attribute.py [--model alexnet|embedded] [--pairs 32] [--methods saliency grad_cam]``

The same (unit, image) pairs, random units of one layer on photo crops at the
model's input size, go through ``dissect.stages.attribute.compute_maps`` twice: once
with ``batch_size = pairs`` (the stage's batched path: inputs (B, 3, S, S),
targets (B,)) and once with ``batch_size = 1`` (one Captum call per pair). Each
method runs once untimed first (warm-up), then the best of ``--repeats`` timed
runs is kept. Weights are random (speed does not depend on them). The maps of
the two paths are checked to agree. Prints pairs/s of each path and the speed-up.

It also prints the ceiling of any batching on this machine: plain
``torch.autograd`` (no Captum) gradients of the same unit maxima with respect
to the input, all pairs in one batch against one pair at a time. Where the
per-pair path is already bound by the arithmetic of the forward and backward
passes (small models on a CPU), batching cannot beat this ratio.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import photo_crops  # noqa: E402

from dissect.stages.attribute import METHODS, MethodSettings, compute_maps, explained, prepare_model  # noqa: E402
from dissect.embedded_model import SmallCNN  # noqa: E402
from dissect.probe import Preprocessing  # noqa: E402

GRADIENT_METHODS = ["saliency", "input_x_gradient", "deconvolution", "guided_backprop", "grad_cam",
                    "guided_grad_cam", "integrated_gradients"]
MODELS = {  # builder, input size, mean, std, unit layer (and its units)
    "alexnet": (lambda: torchvision.models.alexnet(weights=None), 227, (0.485, 0.456, 0.406),
                (0.229, 0.224, 0.225), "features.10", 256),
    "embedded": (lambda: SmallCNN(num_classes=11), 224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "features.conv4", 128),
}


def timed(function, repeats: int) -> tuple[float, np.ndarray]:
    """Best wall-clock seconds of ``repeats`` calls after one untimed call, and the last result."""
    result = function()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return best, result


def input_gradients(module: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> None:
    """Gradients of module(inputs)[i, targets[i]] with respect to inputs (N, 3, S, S), batch_size rows at a time."""
    for start in range(0, len(inputs), batch_size):
        rows = inputs[start:start + batch_size].clone().requires_grad_(True)
        scores = module(rows)
        picked = scores[torch.arange(len(rows)), targets[start:start + batch_size]].sum()
        torch.autograd.grad(picked, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="alexnet")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=GRADIENT_METHODS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    build, size, mean, std, layer, n_units = MODELS[args.model]
    torch.manual_seed(0)
    preprocessing = Preprocessing(size, mean, std)
    images = torch.from_numpy(np.stack(photo_crops(args.pairs, size))).permute(0, 3, 1, 2).contiguous()
    model = prepare_model(build().eval())
    units = np.random.default_rng(0).integers(0, n_units, args.pairs)
    pairs = pd.DataFrame({"pair": range(args.pairs), "kind": "unit", "layer": layer, "target": units,
                          "image_index": range(args.pairs), "grad_cam_layer": layer})
    settings = MethodSettings(ig_steps=32, ig_internal_batch=64, batch_size=args.pairs)
    device = torch.device("cpu")
    print(f"{args.model}, {size} px, {args.pairs} (unit, image) pairs of {layer}, {torch.get_num_threads()} "
          f"threads; best of {args.repeats}")
    print(f"{'method':<22}{'batched pairs/s':>17}{'per-pair pairs/s':>18}{'speed-up':>10}")
    module = explained(model, layer, None).module
    inputs = preprocessing.normalise(images).contiguous(memory_format=torch.channels_last)  # as compute_maps
    targets = torch.from_numpy(units)
    batched_s, _ = timed(lambda: input_gradients(module, inputs, targets, args.pairs), args.repeats)
    single_s, _ = timed(lambda: input_gradients(module, inputs, targets, 1), args.repeats)
    print(f"{'(ceiling: autograd)':<22}{args.pairs / batched_s:>17.1f}{args.pairs / single_s:>18.1f}"
          f"{single_s / batched_s:>9.1f}x")
    for method in args.methods:
        batched_s, batched = timed(lambda: compute_maps(model, pairs, images, method, settings, preprocessing,
                                                        args.pairs, device), args.repeats)
        single_s, single = timed(lambda: compute_maps(model, pairs, images, method, settings, preprocessing,
                                                      1, device), args.repeats)
        peak = np.abs(batched).max()
        if not np.allclose(batched, single, rtol=1e-3, atol=1e-5 * peak):
            raise AssertionError(f"{method}: the batched and per-pair maps differ")
        print(f"{method:<22}{args.pairs / batched_s:>17.1f}{args.pairs / single_s:>18.1f}"
              f"{single_s / batched_s:>9.1f}x")


if __name__ == "__main__":
    main()
