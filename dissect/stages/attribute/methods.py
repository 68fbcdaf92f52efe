"""The attribution methods: one table entry each, and the batched call of one method on many pairs."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import zarr
from captum._utils.models.linear_model import SkLearnLinearRegression
from captum.attr import (
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    Lime,
    Occlusion,
    Saliency,
)
from skimage.segmentation import slic
from torch import nn
from tqdm import tqdm

from dissect.probe import Preprocessing
from dissect.stages.attribute.errors import AttributionError
from dissect.stages.attribute.guided_relu import GuidedReLUs
from dissect.stages.attribute.model import (
    Explained,
    PreparedModel,
    UnitMaxima,
    explained,
)
from dissect.stages.attribute.relevance import deeplift, deeplift_shap, lrp, shap_references

#: Captum's chatter on every call of a batched run; nothing the user can act on.
CAPTUM_NOISE = ("Input Tensor \\d+ did not already require gradients",)


@dataclass(frozen=True)
class MethodSettings:
    """The knobs of the methods: the ``attribute`` config keys of the same names (defaults as in config.yaml)."""

    ig_steps: int = 32
    ig_internal_batch: int = 64
    occlusion_window: int = 32
    occlusion_stride: int = 16
    lime_segments: int = 50
    lime_samples: int = 100
    shap_references: int = 4
    batch_size: int = 16
    seed: int = 0


@dataclass(frozen=True)
class Batch:
    """What a method gets for one batch of pairs.

    ``inputs`` (B, 3, S, S) normalised images, ``targets`` (B,) output indices
    of ``target.module``, ``baselines`` (B, 3, S, S) the black image,
    ``images`` (B, S, S, 3) uint8 the unnormalised inputs (LIME's superpixels),
    ``preprocessing`` how pixels are normalised (DeepLIFT-SHAP's noise references).
    """

    target: Explained
    inputs: torch.Tensor
    targets: torch.Tensor
    baselines: torch.Tensor
    images: np.ndarray | None
    settings: MethodSettings
    preprocessing: Preprocessing | None = None


@dataclass(frozen=True)
class Method:
    """One attribution method: how to compute its (B, S, S) maps, what they are, and what it costs.

    ``passes(settings, S)`` gives the (forward, backward) passes of one image
    per map; ``absolute``: the map is a sum of absolute values (else signed);
    ``guided``: it uses a guided ReLU rule (``guided_relu``); ``relu_only``:
    its rules are defined for ReLU networks only (the guided methods, LRP and
    DeepLIFT), so a model with other activations loses it.
    """

    compute: Callable[[Batch], torch.Tensor]
    convention: str
    absolute: bool = False
    guided: bool = False
    relu_only: bool = False
    passes: Callable[[MethodSettings, int], tuple[int, int]] = lambda settings, size: (1, 1)


def guided_gradient(batch: Batch, rule: str) -> torch.Tensor:
    """(B, 3, S, S) input gradient of the targets with every ReLU's backward pass replaced by ``rule``."""
    with GuidedReLUs(rule):
        return Saliency(batch.target.module).attribute(batch.inputs, target=batch.targets, abs=False)


def grad_cam(batch: Batch) -> torch.Tensor:
    """(B, 1, S, S) ReLU'd Grad-CAM at ``batch.target.grad_cam_layer``, bilinearly upsampled to the input."""
    if batch.target.grad_cam_layer is None:
        raise AttributionError("grad_cam and guided_grad_cam need a grad_cam_layer; the model has no Conv2d, set "
                               "attribute.grad_cam_layer or leave grad_cam and guided_grad_cam out of methods")
    cam = LayerGradCam(batch.target.module, batch.target.grad_cam_layer).attribute(
        batch.inputs, target=batch.targets, relu_attributions=True)
    return LayerAttribution.interpolate(cam, tuple(batch.inputs.shape[2:]), interpolate_mode="bilinear")


def occlusion(batch: Batch) -> torch.Tensor:
    """(B, S, S): the mean output drop of the windows (over all three channels) covering each pixel."""
    window, stride = batch.settings.occlusion_window, batch.settings.occlusion_stride
    return Occlusion(batch.target.module).attribute(
        batch.inputs, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
        baselines=batch.baselines, target=batch.targets,
        perturbations_per_eval=max(1, batch.settings.batch_size // len(batch.inputs))).mean(1)


def occlusion_passes(settings: MethodSettings, size: int) -> tuple[int, int]:
    """One forward pass per window position (Captum: ceil((S - window) / stride) + 1 per side) and one unoccluded."""
    positions = math.ceil(max(size - settings.occlusion_window, 0) / settings.occlusion_stride) + 1
    return positions * positions + 1, 0


def explained_net(module: nn.Module) -> nn.Module:
    """The model inside an explained module (``PreparedModel`` or ``UnitMaxima``), as its layers are named."""
    return module.model.net if isinstance(module, UnitMaxima) else getattr(module, "net", module)


def shap_maps(batch: Batch) -> torch.Tensor:
    """(B, 3, S, S) DeepLIFT-SHAP: DeepLIFT averaged over the black image and seeded noise references."""
    if batch.preprocessing is None:
        raise AttributionError("deeplift_shap needs the preprocessing of the model for its noise references")
    references = shap_references(batch.baselines[:1], batch.settings.shap_references, batch.settings.seed,
                                 batch.preprocessing.normalise)
    return deeplift_shap(batch.target.module, batch.inputs, references, batch.targets)


def lime(batch: Batch) -> torch.Tensor:
    """(B, S, S): LIME's linear coefficient of each pixel's SLIC superpixel."""
    if batch.images is None:
        raise AttributionError("lime needs the unnormalised images (B, S, S, 3) uint8 for its superpixels")
    return lime_maps(batch.target.module, batch.inputs, batch.targets, batch.baselines,
                     superpixels(batch.images, batch.settings.lime_segments), batch.settings)


#: Every method, in the column order of the strips: adding a method is one entry.
METHOD_TABLE: dict[str, Method] = {
    "saliency": Method(
        lambda b: Saliency(b.target.module).attribute(b.inputs, target=b.targets, abs=True).sum(1),
        "sum over channels of |gradient|", absolute=True),
    "input_x_gradient": Method(
        lambda b: InputXGradient(b.target.module).attribute(b.inputs, target=b.targets).sum(1),
        "sum over channels of input x gradient, signed"),
    "deconvolution": Method(
        lambda b: guided_gradient(b, "deconvolution").abs().sum(1),
        "sum over channels of |deconvnet signal|", absolute=True, guided=True, relu_only=True),
    "guided_backprop": Method(
        lambda b: guided_gradient(b, "guided_backprop").abs().sum(1),
        "sum over channels of |guided gradient|", absolute=True, guided=True, relu_only=True),
    "grad_cam": Method(
        lambda b: grad_cam(b).sum(1),
        "ReLU of the weighted layer maps, bilinearly upsampled (>= 0)"),
    "guided_grad_cam": Method(  # as Captum's GuidedGradCam: guided backprop x upsampled Grad-CAM
        lambda b: (guided_gradient(b, "guided_backprop") * grad_cam(b)).abs().sum(1),
        "sum over channels of |guided backprop x Grad-CAM|", absolute=True, guided=True, relu_only=True,
        passes=lambda settings, size: (2, 2)),
    "integrated_gradients": Method(
        lambda b: IntegratedGradients(b.target.module).attribute(
            b.inputs, baselines=b.baselines, target=b.targets, n_steps=b.settings.ig_steps,
            internal_batch_size=b.settings.ig_internal_batch).sum(1),
        "sum over channels, signed (sums to f(x) - f(black))",
        passes=lambda settings, size: (settings.ig_steps, settings.ig_steps)),
    "lrp": Method(  # zennit's EpsilonPlusFlat rules (dissect.stages.attribute.relevance explains the choice)
        lambda b: lrp(b.target.module, explained_net(b.target.module), b.inputs, b.targets).sum(1),
        "sum over channels of LRP relevance (flat, z+, epsilon rules), signed", relu_only=True),
    "deeplift": Method(
        lambda b: deeplift(b.target.module, b.inputs, b.baselines, b.targets).sum(1),
        "sum over channels, signed (Rescale rule; sums to f(x) - f(black) for classes)", relu_only=True,
        passes=lambda settings, size: (2, 2)),
    "deeplift_shap": Method(
        lambda b: shap_maps(b).sum(1),
        "sum over channels, signed (DeepLIFT averaged over black and noise references)", relu_only=True,
        passes=lambda settings, size: (2 * settings.shap_references, 2 * settings.shap_references)),
    "occlusion": Method(occlusion, "mean output drop of the windows covering the pixel, signed",
                        passes=occlusion_passes),
    "lime": Method(lime, "linear coefficient of the pixel's superpixel, signed",
                   passes=lambda settings, size: (settings.lime_samples, 0)),
}
METHODS = tuple(METHOD_TABLE)
MAP_CONVENTIONS = {name: method.convention for name, method in METHOD_TABLE.items()}
ABSOLUTE_METHODS = frozenset(name for name, method in METHOD_TABLE.items() if method.absolute)
GUIDED_METHODS = frozenset(name for name, method in METHOD_TABLE.items() if method.guided)
RELU_ONLY_METHODS = frozenset(name for name, method in METHOD_TABLE.items() if method.relu_only)


def superpixels(images: np.ndarray, n_segments: int) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) int64 SLIC labels 0..k-1 per image, repeated over channels.

    SLIC runs with compactness 10 on the image smoothed by a Gaussian of 1 pixel
    (without it, pixel noise shatters the clusters, which SLIC then merges into one).
    """
    masks = []
    for image in images:
        labels = slic(image, n_segments=n_segments, compactness=10.0, sigma=1.0, start_label=0)
        masks.append(np.unique(labels, return_inverse=True)[1].reshape(labels.shape))
    return torch.from_numpy(np.stack(masks)).long()[:, None].expand(-1, 3, -1, -1)


def attribution_maps(target: Explained, method: str, inputs: torch.Tensor, targets: torch.Tensor,
                     baseline: torch.Tensor, settings: MethodSettings, images: np.ndarray | None = None,
                     preprocessing: Preprocessing | None = None) -> torch.Tensor:
    """One call of ``method`` for a batch of pairs: (B, 3, S, S) inputs, (B,) targets -> (B, S, S) float32 maps.

    ``baseline`` (1, 3, S, S) is the black image (integrated gradients,
    occlusion, LIME); ``images`` (B, S, S, 3) uint8 are the unnormalised
    inputs, needed by LIME's superpixels; ``preprocessing`` by DeepLIFT-SHAP's
    noise references. The perturbation methods run
    ``settings.batch_size`` rows per forward pass (occlusion: B images times
    batch_size // B windows; LIME: batch_size samples of one image).
    """
    if method not in METHOD_TABLE:
        raise AttributionError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    with warnings.catch_warnings():
        for message in CAPTUM_NOISE:
            warnings.filterwarnings("ignore", message=message)
        return METHOD_TABLE[method].compute(Batch(target, inputs, targets, baseline.expand_as(inputs), images,
                                                  settings, preprocessing))


def lime_maps(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, baselines: torch.Tensor,
              superpixel_masks: torch.Tensor, settings: MethodSettings) -> torch.Tensor:
    """LIME per image, (B, 3, S, S) -> (B, S, S): the fitted coefficient of each pixel's superpixel.

    Captum's Lime fits one linear model per image anyway; calling it per image
    with the same seed makes each map independent of the batch it is in.
    """
    maps = []
    for row in range(len(inputs)):
        with torch.random.fork_rng(devices=[inputs.device] if inputs.device.type == "cuda" else []):
            torch.manual_seed(settings.seed)
            maps.append(Lime(module, SkLearnLinearRegression()).attribute(
                inputs[row:row + 1], target=targets[row:row + 1], baselines=baselines[row:row + 1],
                feature_mask=superpixel_masks[row:row + 1].to(inputs.device), n_samples=settings.lime_samples,
                perturbations_per_eval=settings.batch_size))
    return torch.cat(maps).mean(1)


def black_baseline(preprocessing: Preprocessing, device: torch.device) -> torch.Tensor:
    """(1, 3, S, S): the normalised image of zero pixels."""
    size = preprocessing.input_size
    return preprocessing.normalise(torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device))


def stored_form(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P, S, S) float32 maps -> ((P, S, S) float16 maps / their largest |value|, (P,) float32 that value)."""
    scale = np.abs(maps).reshape(len(maps), -1).max(axis=1).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)[:, None, None]
    return (maps / safe).astype(np.float16), scale


@dataclass(frozen=True)
class PairBatch:
    """Rows ``start:stop`` of the pair table, all explaining the same layer (None: the model's outputs)."""

    start: int
    stop: int
    layer: str | None
    grad_cam_layer: str | None


def pair_batches(pairs: pd.DataFrame, batch_size: int) -> list[PairBatch]:
    """Consecutive runs of pairs with the same layer and Grad-CAM layer, cut into chunks of batch_size."""
    keys = [(None if kind == "class" else layer, grad_cam_layer or None)
            for kind, layer, grad_cam_layer in zip(pairs["kind"], pairs["layer"], pairs["grad_cam_layer"])]
    batches, start = [], 0
    for stop in range(1, len(keys) + 1):
        if stop == len(keys) or keys[stop] != keys[start] or stop - start == batch_size:
            batches.append(PairBatch(start, stop, *keys[start]))
            start = stop
    return batches


def compute_maps(model: PreparedModel, pairs: pd.DataFrame, images: torch.Tensor, method: str,
                 settings: MethodSettings, preprocessing: Preprocessing, batch_size: int,
                 device: torch.device, progress: tqdm | None = None) -> np.ndarray:
    """Maps of one method for every pair: (P, 3, S, S) uint8 images of the pairs -> (P, S, S) float32."""
    out = np.zeros((len(pairs), *images.shape[2:]), dtype=np.float32)
    baseline = black_baseline(preprocessing, device)
    targets = torch.tensor(pairs["target"].tolist(), dtype=torch.long)
    for batch in pair_batches(pairs, batch_size):
        uint8 = images[batch.start:batch.stop]
        inputs = preprocessing.normalise(uint8.to(device)).contiguous(memory_format=torch.channels_last)
        maps = attribution_maps(explained(model, batch.layer, batch.grad_cam_layer), method, inputs,
                                targets[batch.start:batch.stop].to(device), baseline, settings,
                                uint8.permute(0, 2, 3, 1).numpy(), preprocessing)
        out[batch.start:batch.stop] = maps.detach().float().cpu().numpy()
        if progress is not None:
            progress.update(batch.stop - batch.start)
    return out


def model_passes(method: str, settings: MethodSettings, input_size: int) -> tuple[int, int]:
    """(forward, backward) passes of one image through the model for one map of ``method``."""
    return METHOD_TABLE[method].passes(settings, input_size)


def read_maps(maps: zarr.Group, methods: tuple[str, ...], rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """The stored maps (``stored_form``) of consecutive pairs ``rows`` of the pair table: method -> (n, S, S)."""
    start, stop = int(rows["pair"].iat[0]), int(rows["pair"].iat[-1]) + 1
    return {method: maps[method][start:stop].astype(np.float32) for method in methods}

