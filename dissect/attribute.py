"""The attribute stage: attribution maps of selected units and output classes, with two trust checks.

What is explained. A *unit* u of layer L is explained on its top-k probe images
(``<layer>/topk.csv``) with the target "u's maximum activation over its map":
``UnitMaxima`` runs the model up to L (a forward hook stops the forward pass
there) and returns the (N, U) spatial maxima, so every Captum method sees an
ordinary output index. An output *class* is explained on chosen images, the
target being the model's predicted class or a class index from the config.
Many (target, image) pairs go through one Captum call (inputs (B, 3, S, S),
targets (B,)), in chunks of ``attribute.batch_size`` pairs; LIME alone is
called per image (Captum fits one linear model per image in any case), with
the same seed, so that its maps do not depend on the batch.

Methods (all from Captum; this module is glue) and the map each one stores,
(S, S) per pair:

=====================  ====================================================  ========
method                 Captum                                                map
=====================  ====================================================  ========
saliency               Saliency (abs=True)                                   sum_c |grad|
input_x_gradient       InputXGradient                                        sum_c, signed
deconvolution          Saliency under GuidedReLUs("deconvolution")           sum_c |.|
guided_backprop        Saliency under GuidedReLUs("guided_backprop")         sum_c |.|
grad_cam               LayerGradCam (ReLU'd), LayerAttribution.interpolate   >= 0
guided_grad_cam        guided_backprop x grad_cam (bilinear), as Captum's    sum_c |.|
integrated_gradients   IntegratedGradients (Gauss-Legendre, black baseline)  sum_c, signed
occlusion              Occlusion (window x window, black baseline)           signed
lime                   Lime per image on SLIC superpixels, linear fit        signed
=====================  ====================================================  ========

"Black baseline" is the normalised image of zero pixels. Occlusion and LIME
features span the three channels, so their map is the (shared) per-pixel value.
Grad-CAM runs at ``attribute.grad_cam_layer``: by default the unit's own layer
for units and the last Conv2d for classes.

Guided methods (deconvolution, guided_backprop, guided_grad_cam) replace the
backward pass of every ReLU. Captum does that with hooks on ``nn.ReLU``
modules, which miss ``F.relu`` (GoogLeNet, DenseNet) and mix the calls of a
reused module (ResNet blocks), so the rules are applied here to the ReLU
*functions* instead, call by call (``dissect.guided_relu``). ``prepare_model``
works on a copy of the model with every ``inplace=True`` turned off.

Outputs in ``<out_dir>/attribute/``:

- ``pairs.csv``: pair, kind (unit|class), layer (empty for classes), target
  (unit or class index), image_index, image_id, rank (top-k rank for units,
  order of the chosen images for classes), grad_cam_layer, score (the unit's
  maximum or the class logit on the image).
- ``maps.zarr``: per method an array ``<method>`` (pairs, S, S) float16 holding
  each map divided by its largest absolute value, and ``scale/<method>``
  (pairs,) float32 with that value (0 for an all-zero map); the raw map is
  ``maps[method][p] * scale[method][p]``. Float16 keeps 3 significant digits
  relative to each map's peak, whatever the method's units.
- ``strips/<layer>/unit_<u:05d>.png`` (rows: the unit's images; columns: the
  image, then each method's map over it) and
  ``strips/classes/image_<index:06d>_class_<c>.png`` (one row per class pair).
- ``agreement.csv`` (Broden probe sets): for each selected unit labelled with
  concept c (``layers/<layer>/tally.csv``), per method, the share of the map's
  *positive* mass inside c's mask on the unit's top images (mean over images
  with positive mass) against the chance share (the mask's area share on the
  same images).
- ``randomisation.csv``: the parameter-randomisation check of Adebayo et al.
  (2018). Parameterised modules are re-initialised (``reset_parameters``,
  seeded) cascading from the last one called in the forward pass down to the
  first; after each of ``randomisation_steps`` stages of the cascade the maps
  of up to ``randomisation_pairs`` pairs are recomputed and compared with the
  trained model's by the Spearman rank correlation of their absolute values
  (mean and standard deviation over the pairs whose trained map is not
  constant; a randomised map that became constant counts 0).
- ``attribute.json``: settings, conventions, timings, agreement per method,
  final randomisation correlations and the methods flagged because their maps
  barely change once every layer is randomised (correlation above
  ``max_correlation``).
- the stage's stamp, written last (inputs: the settings, the model, the probe
  set, the layers, ``tally.iou_threshold`` and the tally and topk stamps of
  every layer), so a new tally or new top-k images re-run the stage.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats
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
from matplotlib import colormaps
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw
from skimage.segmentation import slic
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from dissect.artifacts import open_activations, write_json_atomic
from dissect.broden import IMAGE_CATEGORIES, PIXEL_CATEGORIES, BrodenDataset
from dissect.devices import pick_device
from dissect.errors import DissectError
from dissect.guided_relu import GuidedReLUs, other_activations
from dissect.layout import RunLayout
from dissect.layers import get_layer
from dissect.models import load_model
from dissect.probe import Preprocessing, open_probe_set
from dissect.stamps import canonical, is_current, optional_digest, start, write_stamp

log = logging.getLogger(__name__)

#: The version of this stage's output format.
FORMAT = 1

#: Each method and what its stored map is (attribute.json and the report say it).
MAP_CONVENTIONS = {
    "saliency": "sum over channels of |gradient|",
    "input_x_gradient": "sum over channels of input x gradient, signed",
    "deconvolution": "sum over channels of |deconvnet signal|",
    "guided_backprop": "sum over channels of |guided gradient|",
    "grad_cam": "ReLU of the weighted layer maps, bilinearly upsampled (>= 0)",
    "guided_grad_cam": "sum over channels of |guided backprop x Grad-CAM|",
    "integrated_gradients": "sum over channels, signed (sums to f(x) - f(black))",
    "occlusion": "mean output drop of the windows covering the pixel, signed",
    "lime": "linear coefficient of the pixel's superpixel, signed",
}
#: Every method, in the column order of the strips.
METHODS = tuple(MAP_CONVENTIONS)
#: Methods whose map is a sum of absolute values (the others keep their sign).
ABSOLUTE_METHODS = frozenset({"saliency", "deconvolution", "guided_backprop", "guided_grad_cam"})
#: Methods that are the input gradient under a guided ReLU rule (``dissect.guided_relu``) of the same name.
GUIDED_RULES = frozenset({"deconvolution", "guided_backprop"})
#: Methods that use a guided ReLU rule.
GUIDED_METHODS = GUIDED_RULES | {"guided_grad_cam"}
UNIT_SELECTIONS = ("top", "label", "pairs", "none")
TILE = 96
GAP = 2
HEADER = 14
#: Captum's chatter on every call of a batched run; nothing the user can act on.
CAPTUM_NOISE = ("Input Tensor \\d+ did not already require gradients",)


class AttributionError(DissectError):
    """The attributions cannot be computed with this configuration, model or run directory."""


class _StopForward(Exception):
    """Raised from a hook once the explained layer has run, to skip the rest of the forward pass."""


# --------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class AttributeSettings:
    """The validated ``attribute`` config (see README for the meaning of each key)."""

    units: str
    top_units: int
    unit_label: str | None
    unit_pairs: tuple[tuple[str, int], ...]
    images_per_unit: int
    class_target: str | int | None
    class_images: int | tuple[str, ...]
    methods: tuple[str, ...]
    grad_cam_layer: str | None
    ig_steps: int
    ig_internal_batch: int
    occlusion_window: int
    occlusion_stride: int
    lime_segments: int
    lime_samples: int
    batch_size: int
    randomisation_pairs: int
    randomisation_steps: int
    max_correlation: float
    seed: int
    device: str


SETTING_KEYS = tuple(f.name for f in fields(AttributeSettings))
#: The keys that cost time: null in the config takes the value of ``attribute.device_defaults.<cpu|cuda>``.
DEVICE_DEFAULT_KEYS = ("top_units", "images_per_unit", "class_images", "ig_steps", "occlusion_stride",
                       "lime_samples", "randomisation_pairs", "randomisation_steps")
DEVICE_DEFAULTS = "device_defaults"


def read_settings(cfg: Mapping[str, Any], device_type: str) -> tuple[AttributeSettings, dict[str, Any]]:
    """Validate the ``attribute`` config for a device of type ``device_type`` (cpu, cuda).

    Returns the settings and the keys that were null, with the device default
    each one took. Errors name the key and what is allowed.
    """
    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    missing = [key for key in (*SETTING_KEYS, DEVICE_DEFAULTS) if key not in config]
    unknown = sorted(str(key) for key in config if key not in (*SETTING_KEYS, DEVICE_DEFAULTS))
    if missing or unknown:
        raise AttributionError(f"attribute config: missing key(s) {missing}, unknown key(s) {unknown}; "
                               f"the keys are {[*SETTING_KEYS, DEVICE_DEFAULTS]}")
    table = config.pop(DEVICE_DEFAULTS).get("cuda" if device_type == "cuda" else "cpu") or {}
    filled = {key: table.get(key) for key in DEVICE_DEFAULT_KEYS if config[key] is None}
    absent = [key for key, value in filled.items() if value is None]
    if absent:
        raise AttributionError(f"attribute.{absent[0]} is null but attribute.{DEVICE_DEFAULTS}."
                               f"{'cuda' if device_type == 'cuda' else 'cpu'} has no value for it; set either")
    config.update(filled)
    if config["units"] not in UNIT_SELECTIONS:
        raise AttributionError(f"attribute.units={config['units']!r}; allowed: {', '.join(UNIT_SELECTIONS)}")
    if config["units"] == "label" and not config["unit_label"]:
        raise AttributionError("attribute.units=label needs attribute.unit_label (a concept name such as red-c)")
    methods = list(METHODS) if config["methods"] == "all" else list(config["methods"] or [])
    unknown_methods = [m for m in methods if m not in METHODS]
    if unknown_methods or not methods:
        raise AttributionError(f"attribute.methods={config['methods']!r} names unknown or no methods "
                               f"{unknown_methods}; allowed: all, or a list of {', '.join(METHODS)}")
    target = config["class_target"]
    if not (target is None or target == "predicted" or (isinstance(target, int) and target >= 0)):
        raise AttributionError(f"attribute.class_target={target!r}; allowed: predicted, a class index >= 0, or null")
    images = config["class_images"]
    if not (isinstance(images, int) and images >= 0 or isinstance(images, list)):
        raise AttributionError(f"attribute.class_images={images!r}; allowed: a number of images, or a list of ids")
    for key in ("top_units", "images_per_unit", "ig_steps", "ig_internal_batch", "occlusion_window",
                "occlusion_stride", "lime_segments", "lime_samples", "batch_size", "randomisation_steps"):
        if isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] < 1:
            raise AttributionError(f"attribute.{key}={config[key]!r}; allowed: an integer >= 1")
    if config["occlusion_stride"] > config["occlusion_window"]:
        raise AttributionError(f"attribute.occlusion_stride={config['occlusion_stride']} exceeds "
                               f"attribute.occlusion_window={config['occlusion_window']}; allowed: a stride "
                               "no larger than the window (pixels between windows would never be occluded)")
    if not isinstance(config["randomisation_pairs"], int) or config["randomisation_pairs"] < 0:
        raise AttributionError(f"attribute.randomisation_pairs={config['randomisation_pairs']!r}; "
                               "allowed: an integer >= 0 (0 skips the check)")
    pairs = []
    for entry in config["unit_pairs"] or []:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], int)):
            raise AttributionError(f"attribute.unit_pairs entry {entry!r}; allowed: [layer, unit], "
                                   "e.g. unit_pairs=[[features.10,3]]")
        pairs.append((str(entry[0]), int(entry[1])))
    return AttributeSettings(
        units=config["units"], top_units=config["top_units"], unit_label=config["unit_label"],
        unit_pairs=tuple(pairs), images_per_unit=config["images_per_unit"], class_target=target,
        class_images=images if isinstance(images, int) else tuple(str(i) for i in images),
        methods=tuple(m for m in METHODS if m in methods), grad_cam_layer=config["grad_cam_layer"],
        ig_steps=config["ig_steps"], ig_internal_batch=config["ig_internal_batch"],
        occlusion_window=config["occlusion_window"], occlusion_stride=config["occlusion_stride"],
        lime_segments=config["lime_segments"], lime_samples=config["lime_samples"],
        batch_size=config["batch_size"], randomisation_pairs=config["randomisation_pairs"],
        randomisation_steps=config["randomisation_steps"], max_correlation=float(config["max_correlation"]),
        seed=int(config["seed"]), device=str(config["device"])), filled


# ------------------------------------------------------------------------------------ model preparation


class PreparedModel(nn.Module):
    """A model ready for attribution (see ``prepare_model``); layer names are those of ``net``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised images -> the model's output."""
        return self.net(x)

    def layer(self, name: str) -> nn.Module:
        """The submodule of the model named ``name`` (dotted, as in ``named_modules``)."""
        return get_layer(self.net, name)


def call_counts(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Run ``model`` once on ``example``: calls per module name, in first-call order.

    Names are dotted paths of ``model.named_modules()``; the root is left out.
    """
    counts: dict[str, int] = {}

    def counter(name: str) -> Callable[[nn.Module, Any, Any], None]:
        return lambda module, args, output: counts.__setitem__(name, counts.get(name, 0) + 1)

    handles = [module.register_forward_hook(counter(name)) for name, module in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def prepare_model(model: nn.Module) -> PreparedModel:
    """A copy of ``model`` on which every method is correct, in eval mode, parameters frozen, channels-last.

    Convolution weights are stored channels-last (with channels-last inputs,
    ``compute_maps``, a forward and backward pass of a convolutional network
    runs about 1.5x faster on the CPU). The ``inplace`` flag of every module is
    turned off, so that layer methods see the outputs they record unchanged.
    """
    net = copy.deepcopy(model).eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    for module in net.modules():
        if getattr(module, "inplace", None) is True:
            module.inplace = False
    return PreparedModel(net).to(memory_format=torch.channels_last)


class UnitMaxima(nn.Module):
    """The maxima of a layer's units: (N, 3, S, S) -> (N, U), the spatial max of each (N, U, h, w) map.

    The forward pass stops once the layer has run; a (N, D) vector layer is
    returned as it is. The hook is registered at each call, after any hook of
    Captum's, so it sees (and ends) the output Captum's layer methods record.
    """

    def __init__(self, model: PreparedModel, layer: str) -> None:
        super().__init__()
        self.model = model
        self.layer_name = layer
        model.layer(layer)  # an unknown name fails here; not kept as an attribute, which would register it twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recorded: list[torch.Tensor] = []

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            recorded.append(output)
            raise _StopForward

        handle = self.model.layer(self.layer_name).register_forward_hook(hook)
        try:
            self.model(x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not recorded:
            raise AttributionError(f"layer {self.layer_name!r} was not called in the forward pass")
        output = recorded[0]
        if not isinstance(output, torch.Tensor) or output.ndim not in (2, 4):
            raise AttributionError(f"layer {self.layer_name!r} gives {type(output).__name__} "
                                   f"{getattr(output, 'shape', '')}; units need a (N, U, h, w) or (N, U) tensor")
        return output.amax(dim=(2, 3)) if output.ndim == 4 else output


@dataclass(frozen=True)
class Explained:
    """What the methods explain: ``module`` maps (N, 3, S, S) to (N, T) scores; ``grad_cam_layer`` lies inside it."""

    module: nn.Module
    grad_cam_layer: nn.Module | None


def explained(model: PreparedModel, layer: str | None, grad_cam_layer: str | None) -> Explained:
    """The scores of ``layer``'s units (``UnitMaxima``), or the model's outputs when ``layer`` is None."""
    module = model if layer is None else UnitMaxima(model, layer)
    return Explained(module, None if grad_cam_layer is None else model.layer(grad_cam_layer))


# ------------------------------------------------------------------------------------------------ methods


@dataclass(frozen=True)
class MethodSettings:
    """The knobs of the methods: the ``attribute`` config keys of the same names (defaults as in config.yaml)."""

    ig_steps: int = 32
    ig_internal_batch: int = 64
    occlusion_window: int = 32
    occlusion_stride: int = 16
    lime_segments: int = 50
    lime_samples: int = 100
    batch_size: int = 16
    seed: int = 0


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
                     baseline: torch.Tensor, settings: MethodSettings, images: np.ndarray | None = None
                     ) -> torch.Tensor:
    """One Captum call for a batch of pairs: (B, 3, S, S) inputs, (B,) target indices -> (B, S, S) float32 maps.

    ``baseline`` (1, 3, S, S) is the black image (integrated gradients,
    occlusion, LIME); ``images`` (B, S, S, 3) uint8 are the unnormalised
    inputs, needed by LIME's superpixels. The map conventions are in the module
    docstring. The perturbation methods run ``settings.batch_size`` rows per
    forward pass (occlusion: B images times batch_size // B windows; LIME:
    batch_size samples of one image).
    """
    module = target.module
    baselines = baseline.expand_as(inputs)
    with warnings.catch_warnings():
        for message in CAPTUM_NOISE:
            warnings.filterwarnings("ignore", message=message)
        if method == "saliency":
            return Saliency(module).attribute(inputs, target=targets, abs=True).sum(1)
        if method == "input_x_gradient":
            return InputXGradient(module).attribute(inputs, target=targets).sum(1)
        if method in GUIDED_RULES:
            with GuidedReLUs(method):
                return Saliency(module).attribute(inputs, target=targets, abs=False).abs().sum(1)
        if method in ("grad_cam", "guided_grad_cam") and target.grad_cam_layer is None:
            raise AttributionError(f"{method} needs a grad_cam_layer; the model has no Conv2d, set "
                                   "attribute.grad_cam_layer or leave grad_cam and guided_grad_cam out of methods")
        if method == "grad_cam":
            return grad_cam(target, inputs, targets).sum(1)
        if method == "guided_grad_cam":
            with GuidedReLUs("guided_backprop"):
                guided = Saliency(module).attribute(inputs, target=targets, abs=False)
            return (guided * grad_cam(target, inputs, targets)).abs().sum(1)
        if method == "integrated_gradients":
            return IntegratedGradients(module).attribute(
                inputs, baselines=baselines, target=targets, n_steps=settings.ig_steps,
                internal_batch_size=settings.ig_internal_batch).sum(1)
        if method == "occlusion":
            window, stride = settings.occlusion_window, settings.occlusion_stride
            return Occlusion(module).attribute(
                inputs, sliding_window_shapes=(3, window, window), strides=(3, stride, stride), baselines=baselines,
                target=targets, perturbations_per_eval=max(1, settings.batch_size // len(inputs))).mean(1)
        if method == "lime":
            if images is None:
                raise AttributionError("lime needs the unnormalised images (B, S, S, 3) uint8 for its superpixels")
            return lime_maps(module, inputs, targets, baselines, superpixels(images, settings.lime_segments), settings)
    raise AttributionError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")


def grad_cam(target: Explained, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) inputs -> (B, 1, S, S) ReLU'd Grad-CAM at ``target.grad_cam_layer``, bilinearly upsampled."""
    cam = LayerGradCam(target.module, target.grad_cam_layer).attribute(inputs, target=targets,
                                                                       relu_attributions=True)
    return LayerAttribution.interpolate(cam, tuple(inputs.shape[2:]), interpolate_mode="bilinear")


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


# ------------------------------------------------------------------------------------- pairs and batches


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
                                uint8.permute(0, 2, 3, 1).numpy())
        out[batch.start:batch.stop] = maps.detach().float().cpu().numpy()
        if progress is not None:
            progress.update(batch.stop - batch.start)
    return out


def forward_order(model: PreparedModel, example: torch.Tensor) -> list[str]:
    """Names of the modules of ``model.net`` in the order of their first call on ``example``."""
    return list(call_counts(model.net, example))


def last_conv(model: PreparedModel, example: torch.Tensor) -> str | None:
    """The last Conv2d called in the forward pass (the default Grad-CAM layer of classes), None if none."""
    modules = dict(model.net.named_modules())
    convs = [name for name in forward_order(model, example) if isinstance(modules[name], nn.Conv2d)]
    return convs[-1] if convs else None


def check_grad_cam_layers(pairs: pd.DataFrame, order: list[str]) -> None:
    """Unit layers and Grad-CAM layers must run in the forward pass, a Grad-CAM layer no later than its unit layer."""
    for layer, grad_cam_layer in pairs[["layer", "grad_cam_layer"]].drop_duplicates().itertuples(index=False):
        if layer and layer not in order:
            raise AttributionError(f"layer {layer!r} is not called in the forward pass of the model")
        if grad_cam_layer and grad_cam_layer not in order:
            raise AttributionError(f"attribute.grad_cam_layer={grad_cam_layer!r} is not called in the forward pass")
        if layer and grad_cam_layer and order.index(grad_cam_layer) > order.index(layer):
            raise AttributionError(f"attribute.grad_cam_layer={grad_cam_layer!r} runs after the unit layer "
                                   f"{layer!r}; choose a layer at or before it, or null for the unit's own layer")


# ------------------------------------------------------------------------------------------- trust checks


def positive_share_inside(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(P, S, S) maps, (P, S, S) bool masks -> (P,) share of the positive mass inside the mask (nan: no mass)."""
    positive = np.clip(maps.astype(np.float64), 0, None).reshape(len(maps), -1)
    total = positive.sum(axis=1)
    inside = (positive * masks.reshape(len(masks), -1)).sum(axis=1)
    return np.divide(inside, total, out=np.full(len(maps), np.nan), where=total > 0)


def spearman_abs(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(P, S, S) x 2 -> (P,) Spearman rank correlation of |first| and |second| per pair (ties: average ranks).

    The question is whether ``first``'s ranking survives in ``second``: nan
    where ``first`` is constant (it has no ranking), 0 where only ``second`` is.
    """
    ranks = [scipy.stats.rankdata(np.abs(m.astype(np.float64)).reshape(len(m), -1), axis=1) for m in (first, second)]
    centred = [r - r.mean(axis=1, keepdims=True) for r in ranks]
    norms = [np.sqrt((c * c).sum(axis=1)) for c in centred]
    product = norms[0] * norms[1]
    correlation = np.divide((centred[0] * centred[1]).sum(axis=1), product, out=np.zeros(len(first)),
                            where=product > 0)
    return np.where(norms[0] > 0, correlation, np.nan)


def cascade_modules(model: PreparedModel, example: torch.Tensor) -> list[str]:
    """Modules with their own parameters and a ``reset_parameters``, from the last called to the first."""
    modules = dict(model.net.named_modules())
    return [name for name in reversed(forward_order(model, example))
            if hasattr(modules[name], "reset_parameters") and list(modules[name].parameters(recurse=False))]


def randomisation_check(model: PreparedModel, pairs: pd.DataFrame, images: torch.Tensor,
                        trained: dict[str, np.ndarray], settings: MethodSettings, preprocessing: Preprocessing,
                        batch_size: int, steps: int, device: torch.device) -> pd.DataFrame:
    """Cascading parameter randomisation: Spearman correlation of trained and randomised maps per method and step.

    ``trained[method]`` (P, S, S) are the stored (``stored_form``) maps of ``pairs``.
    Returns rows step, randomised (modules re-initialised so far), deepest (the
    earliest-called of them), method, spearman_mean, spearman_std, pairs (those
    whose trained map is not constant, over which mean and std are taken).
    """
    random_model = copy.deepcopy(model)
    example = preprocessing.normalise(images[:1].to(device))
    cascade = cascade_modules(random_model, example)
    if not cascade:
        raise AttributionError("the model has no module with parameters and reset_parameters to randomise")
    modules = dict(random_model.net.named_modules())
    rows = []
    done = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)
        for step in tqdm(range(1, min(steps, len(cascade)) + 1), desc="randomisation", unit="step"):
            upto = math.ceil(step * len(cascade) / min(steps, len(cascade)))
            for name in cascade[done:upto]:
                modules[name].reset_parameters()
            done = upto
            for method, trained_maps in trained.items():
                maps = compute_maps(random_model, pairs, images, method, settings, preprocessing, batch_size, device)
                correlation = spearman_abs(trained_maps, stored_form(maps)[0])
                defined = correlation[~np.isnan(correlation)]
                rows.append((step, done, cascade[done - 1], method,
                             float(defined.mean()) if len(defined) else float("nan"),
                             float(defined.std()) if len(defined) else float("nan"), len(defined)))
    return pd.DataFrame.from_records(rows, columns=["step", "randomised", "deepest", "method", "spearman_mean",
                                                    "spearman_std", "pairs"])


def concept_mask(broden: BrodenDataset, index: int, number: int, category: str, size: int) -> np.ndarray:
    """(size, size) bool: where image ``index`` shows label ``number``, its mask resampled by nearest neighbour."""
    if category in IMAGE_CATEGORIES:
        present = number in broden.image_labels(index, category)
        return np.full((size, size), present)
    sh, sw = broden.mask_size(index)
    mask = np.zeros((sh, sw), dtype=bool)
    for pixel_category in PIXEL_CATEGORIES:
        mask |= (broden.pixel_labels(index, pixel_category) == number).any(axis=0)
    rows = np.minimum(((np.arange(size) + 0.5) * sh / size).astype(int), sh - 1)
    columns = np.minimum(((np.arange(size) + 0.5) * sw / size).astype(int), sw - 1)
    return mask[np.ix_(rows, columns)]


def agreement_table(layout: RunLayout, broden: BrodenDataset, pairs: pd.DataFrame, maps: zarr.Group,
                    methods: tuple[str, ...], size: int) -> pd.DataFrame:
    """Per selected unit and method: its concept's share of the positive map mass against the chance share.

    ``maps`` is maps.zarr, holding the maps of every pair of ``pairs``; a unit's pairs are consecutive.
    """
    rows = []
    units = pairs[pairs["kind"] == "unit"]
    for (layer, unit), group in units.groupby(["layer", "target"], sort=False):
        if not layout.tally_csv(layer).exists():
            continue
        tally = pd.read_csv(layout.tally_csv(layer), keep_default_na=False).set_index("unit")
        concepts = pd.read_csv(layout.concepts_csv(layer), keep_default_na=False)
        label, category = tally.at[unit, "label"], tally.at[unit, "category"]
        match = concepts[(concepts["name"] == label) & (concepts["category"] == category)]
        number = int(match["number"].iat[0])
        masks = np.stack([concept_mask(broden, int(i), number, category, size) for i in group["image_index"]])
        for method, method_maps in read_maps(maps, methods, group).items():
            share = positive_share_inside(method_maps, masks)
            used = ~np.isnan(share)
            inside = float(share[used].mean()) if used.any() else float("nan")
            chance = float(masks[used].mean()) if used.any() else float("nan")
            rows.append((layer, int(unit), label, category, float(tally.at[unit, "iou"]), method, int(used.sum()),
                         inside, chance, inside / chance if chance > 0 else float("nan")))
    return pd.DataFrame.from_records(rows, columns=["layer", "unit", "label", "category", "iou", "method", "images",
                                                    "inside_share", "chance_share", "ratio"])


# ------------------------------------------------------------------------------------------------ strips


def heat_overlay(image: np.ndarray, heat: np.ndarray, signed: bool) -> np.ndarray:
    """(T, T, 3) uint8 image, (T, T) map -> the map in colour over the image, opacity growing with |map|.

    The map is scaled by its 99.5th percentile of |value|; signed maps use
    Captum's red (negative) to green (positive) scale, absolute maps ``inferno``.
    """
    peak = float(np.percentile(np.abs(heat), 99.5))
    level = np.clip(heat / peak, -1.0, 1.0) if peak > 0 else np.zeros_like(heat)
    colours = colormaps["RdYlGn"]((level + 1) / 2) if signed else colormaps["inferno"](np.abs(level))
    alpha = 0.85 * np.abs(level)[..., None]
    return (image * (1 - alpha) + colours[..., :3] * 255 * alpha).astype(np.uint8)


def strip_image(rows: list[tuple[np.ndarray, dict[str, np.ndarray]]], methods: tuple[str, ...]) -> Image.Image:
    """One row per pair: ((S, S, 3) uint8 image, method -> (S, S) map) -> header + tiles (image, then each map)."""
    columns = ["image", *methods]
    width = len(columns) * (TILE + GAP) - GAP
    canvas = Image.new("RGB", (width, HEADER + len(rows) * (TILE + GAP)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, name in enumerate(columns):
        draw.text((k * (TILE + GAP) + 2, 1), name.replace("integrated_gradients", "integrated_grad")[:16],
                  fill=(0, 0, 0))
    for r, (image, maps) in enumerate(rows):
        tile = np.asarray(Image.fromarray(image).resize((TILE, TILE), Image.BILINEAR))
        top = HEADER + r * (TILE + GAP)
        canvas.paste(Image.fromarray(tile), (0, top))
        for k, method in enumerate(methods, start=1):
            heat = np.asarray(Image.fromarray(maps[method].astype(np.float32), mode="F").resize((TILE, TILE),
                                                                                                 Image.BILINEAR))
            overlay = heat_overlay(tile.astype(np.float32), heat, signed=method not in ABSOLUTE_METHODS)
            canvas.paste(Image.fromarray(overlay), (k * (TILE + GAP), top))
    return canvas


def read_maps(maps: zarr.Group, methods: tuple[str, ...], rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """The stored maps (``stored_form``) of consecutive pairs ``rows`` of the pair table: method -> (n, S, S)."""
    start, stop = int(rows["pair"].iat[0]), int(rows["pair"].iat[-1]) + 1
    return {method: maps[method][start:stop].astype(np.float32) for method in methods}


def write_strips(layout: RunLayout, pairs: pd.DataFrame, images: torch.Tensor, maps: zarr.Group,
                 methods: tuple[str, ...]) -> None:
    """A strip per selected unit (its images as rows) and per class pair, from maps.zarr."""
    hwc = images.permute(0, 2, 3, 1).numpy()
    groups = [(("unit", layer, unit), group) for (layer, unit), group in
              pairs[pairs["kind"] == "unit"].groupby(["layer", "target"], sort=False)]
    groups += [(("class", row.image_index, row.target), pairs.loc[[row.Index]])
               for row in pairs[pairs["kind"] == "class"].itertuples()]
    for (kind, first, second), group in tqdm(groups, desc="attribution strips", unit="strip"):
        stored = read_maps(maps, methods, group)
        rows = [(hwc[p], {method: values[k] for method, values in stored.items()})
                for k, p in enumerate(group["pair"])]
        path = (layout.attribute_unit_strip(first, second) if kind == "unit"
                else layout.attribute_class_strip(first, second))
        path.parent.mkdir(parents=True, exist_ok=True)
        strip_image(rows, methods).save(path)


# ------------------------------------------------------------------------------------------------- stage


def select_units(layout: RunLayout, layers: list[str], settings: AttributeSettings,
                 iou_threshold: float) -> list[tuple[str, int]]:
    """The (layer, unit) pairs to explain, in layer order, then by decreasing IoU (top) or unit index.

    ``top`` takes the ``top_units`` detectors (IoU > iou_threshold) of highest IoU of each tallied layer.
    """
    if settings.units == "none":
        return []
    if settings.units == "pairs":
        return list(settings.unit_pairs)
    selected = []
    for layer in layers:
        tally_path = layout.tally_csv(layer)
        if not tally_path.exists():
            continue
        table = pd.read_csv(tally_path, keep_default_na=False)
        if settings.units == "top":
            table = table[table["iou"] > iou_threshold].sort_values(["iou", "unit"], ascending=[False, True],
                                                                     kind="stable").head(settings.top_units)
        else:
            table = table[table["label"] == settings.unit_label]
        selected += [(layer, int(unit)) for unit in table["unit"]]
    if settings.units == "top" and not any(layout.tally_csv(layer).exists() for layer in layers):
        raise AttributionError(f"attribute.units=top: no layer of {layers} has a tally.csv in {layout.root}; "
                               "run the tally and topk stages first, or set attribute.units=pairs or none")
    return selected


def unit_pair_rows(layout: RunLayout, units: list[tuple[str, int]], images_per_unit: int) -> list[dict[str, Any]]:
    """Pair rows (without pair number) of each unit's first images_per_unit top-k images (topk.csv)."""
    rows: list[dict[str, Any]] = []
    tables: dict[str, pd.DataFrame] = {}
    for layer, unit in units:
        if layer not in tables:
            path = layout.topk_csv(layer)
            if not path.exists():
                raise AttributionError(f"no top-k images of layer {layer!r} ({path} is missing); "
                                       "run the topk stage for it first")
            tables[layer] = pd.read_csv(path, keep_default_na=False)
        table = tables[layer]
        if unit not in set(table["unit"]):
            raise AttributionError(f"unit {unit} of layer {layer!r} is not in {layout.topk_csv(layer)}; "
                                   f"units are 0..{int(table['unit'].max())}")
        top = table[table["unit"] == unit].sort_values("rank")
        if len(top) < images_per_unit:
            raise AttributionError(f"attribute.images_per_unit={images_per_unit} exceeds the {len(top)} top-k images "
                                   f"stored for layer {layer!r}; lower it or rerun topk with a larger topk.k")
        rows += [{"kind": "unit", "layer": layer, "target": unit, "image_index": int(r.image_index),
                  "image_id": r.image_id, "rank": int(r.rank)} for r in top.head(images_per_unit).itertuples()]
    return rows


def class_image_indices(settings: AttributeSettings, image_ids: list[str], valid: np.ndarray) -> list[int]:
    """The probe image indices of the class maps: the first n valid images, or the listed ids."""
    if settings.class_target is None:
        return []
    if isinstance(settings.class_images, int):
        return [int(i) for i in np.flatnonzero(valid)[:settings.class_images]]
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    unknown = [image_id for image_id in settings.class_images if image_id not in position]
    if unknown:
        raise AttributionError(f"attribute.class_images names unknown image id(s) {unknown}; ids are those of "
                               f"the probe set, e.g. {image_ids[:3]}")
    return [position[image_id] for image_id in settings.class_images]


def load_images(paths: list[Path], preprocessing: Preprocessing) -> torch.Tensor:
    """(P, 3, S, S) uint8 images at the model's input size."""
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(preprocessing.load(image))
    return torch.stack(images) if images else torch.zeros(0, 3, preprocessing.input_size,
                                                          preprocessing.input_size, dtype=torch.uint8)


def scores(model: PreparedModel, pairs: pd.DataFrame, images: torch.Tensor, preprocessing: Preprocessing,
           batch_size: int, device: torch.device) -> np.ndarray:
    """(P,) the explained score of every pair: the unit's maximum, or the class output."""
    out = np.zeros(len(pairs), dtype=np.float32)
    targets = torch.tensor(pairs["target"].tolist(), dtype=torch.long)
    with torch.no_grad():
        for batch in pair_batches(pairs, batch_size):
            values = explained(model, batch.layer, None).module(
                preprocessing.normalise(images[batch.start:batch.stop].to(device)))
            if values.ndim != 2:
                raise AttributionError(f"class targets need a model whose output is (N, classes); it gives "
                                       f"{tuple(values.shape)}. Set attribute.class_target=null")
            batch_targets = targets[batch.start:batch.stop]
            if int(batch_targets.max()) >= values.shape[1]:
                what = "units" if batch.layer else "outputs"
                raise AttributionError(f"target {int(batch_targets.max())} is out of range: "
                                       f"{batch.layer or 'the model'} has {values.shape[1]} {what}")
            rows = torch.arange(batch.stop - batch.start, device=device)
            out[batch.start:batch.stop] = values[rows, batch_targets.to(device)].float().cpu().numpy()
    return out


def predicted_classes(model: PreparedModel, images: torch.Tensor, preprocessing: Preprocessing, batch_size: int,
                      device: torch.device) -> list[int]:
    """(N, 3, S, S) uint8 -> the arg-max class of each image."""
    predicted = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(preprocessing.normalise(images[start:start + batch_size].to(device)))
            if logits.ndim != 2:
                raise AttributionError(f"class targets need a model whose output is (N, classes); it gives "
                                       f"{tuple(logits.shape)}. Set attribute.class_target=null")
            predicted += logits.argmax(dim=1).tolist()
    return predicted


def build_pairs(layout: RunLayout, cfg: DictConfig, settings: AttributeSettings, model: PreparedModel,
                preprocessing: Preprocessing, image_paths: list[Path], image_ids: list[str], valid: np.ndarray,
                example: torch.Tensor, device: torch.device) -> tuple[pd.DataFrame, torch.Tensor]:
    """The pair table (see module docstring) and the (P, 3, S, S) uint8 image of every pair."""
    units = select_units(layout, [str(layer) for layer in cfg.layers], settings, float(cfg.tally.iou_threshold))
    rows = unit_pair_rows(layout, units, settings.images_per_unit)
    class_indices = class_image_indices(settings, image_ids, valid)
    if class_indices:
        class_images = load_images([image_paths[i] for i in class_indices], preprocessing)
        targets = (predicted_classes(model, class_images, preprocessing, settings.batch_size, device)
                   if settings.class_target == "predicted" else [int(settings.class_target)] * len(class_indices))
        rows += [{"kind": "class", "layer": "", "target": t, "image_index": i, "image_id": image_ids[i], "rank": r}
                 for r, (i, t) in enumerate(zip(class_indices, targets))]
    if not rows:
        raise AttributionError("nothing to explain: attribute.units=none and attribute.class_target=null")
    pairs = pd.DataFrame(rows, columns=["kind", "layer", "target", "image_index", "image_id", "rank"])
    pairs.insert(0, "pair", np.arange(len(pairs)))
    default_class_layer = last_conv(model, example) or ""
    pairs["grad_cam_layer"] = [settings.grad_cam_layer or (layer if kind == "unit" else default_class_layer)
                               for kind, layer in zip(pairs["kind"], pairs["layer"])]
    check_grad_cam_layers(pairs, forward_order(model, example))
    images = load_images([image_paths[i] for i in pairs["image_index"]], preprocessing)
    pairs["score"] = scores(model, pairs, images, preprocessing, settings.batch_size, device)
    return pairs, images


def drop_undefined_guided_methods(settings: AttributeSettings, model: PreparedModel, example: torch.Tensor,
                                   all_methods: bool) -> AttributeSettings:
    """``settings`` without the guided methods when the model has activations they are not defined for.

    The guided rules replace the backward pass of ReLU only. With
    ``methods: all`` they are left out with one warning; asked for by name,
    they stop the stage.
    """
    guided = [m for m in settings.methods if m in GUIDED_METHODS]
    others = other_activations(model, example) if guided else {}
    if not others:
        return settings
    found = ", ".join(f"{name} ({calls} calls)" for name, calls in others.items())
    if not all_methods:
        raise AttributionError(f"the guided methods {guided} are defined for ReLU only, and the model also applies "
                               f"{found}; leave them out of attribute.methods")
    log.warning("attribute: leaving out %s: the guided rules are defined for ReLU only, and the model also "
                "applies %s", ", ".join(guided), found)
    return replace(settings, methods=tuple(m for m in settings.methods if m not in GUIDED_METHODS))


def model_passes(method: str, settings: AttributeSettings, input_size: int) -> tuple[int, int]:
    """(forward, backward) passes of one image through the model for one map of ``method``."""
    if method == "integrated_gradients":
        return settings.ig_steps, settings.ig_steps
    if method == "occlusion":
        positions = math.ceil(max(input_size - settings.occlusion_window, 0) / settings.occlusion_stride) + 1
        return positions * positions + 1, 0
    if method == "lime":
        return settings.lime_samples, 0
    if method == "guided_grad_cam":
        return 2, 2
    return 1, 1


def cost_sentence(settings: AttributeSettings, pairs: pd.DataFrame, input_size: int) -> str:
    """How many model passes the stage is about to make, for the log (forward and backward, one image each)."""
    per_pair = [model_passes(method, settings, input_size) for method in settings.methods]
    forward, backward = (sum(p[k] for p in per_pair) for k in (0, 1))
    checked = min(settings.randomisation_pairs, len(pairs)) * settings.randomisation_steps
    return (f"{len(pairs)} pairs x {len(settings.methods)} methods: {len(pairs) * forward:,} forward and "
            f"{len(pairs) * backward:,} backward passes of one image, then the randomisation check "
            f"({min(settings.randomisation_pairs, len(pairs))} pairs x {settings.randomisation_steps} steps): "
            f"{checked * forward:,} and {checked * backward:,} more")


def stage_inputs(cfg: DictConfig, layout: RunLayout, settings: AttributeSettings,
                 description: dict[str, Any]) -> dict[str, Any]:
    """What the outputs depend on (``dissect.stamps``), upstream tally and topk stamps included."""
    layers = [str(layer) for layer in cfg.layers]
    return canonical({"attribute": asdict(settings), "model": description, "dataset": str(cfg.dataset.root),
                      "layers": layers, "iou_threshold": float(cfg.tally.iou_threshold),
                      "upstream": {layer: {stage: optional_digest(layout.stamp(stage, layer))
                                           for stage in ("tally", "topk")} for layer in layers}})


def open_maps(layout: RunLayout, key: dict[str, Any]) -> zarr.Group:
    """maps.zarr for these inputs: kept when they match (finished methods are resumed), else started over."""
    out_dir, path = layout.attribute_dir, layout.attribute_maps
    if path.exists() and zarr.open_group(path, mode="r").attrs.get("fingerprint") != key:
        log.info("attribute: the inputs changed since %s was written; starting over", out_dir)
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        group = zarr.open_group(path, mode="w")
        group.attrs.update({"fingerprint": key, "complete": [], "seconds": {}})
    return zarr.open_group(path, mode="a")


def write_method(group: zarr.Group, method: str, model: PreparedModel, pairs: pd.DataFrame, images: torch.Tensor,
                 settings: MethodSettings, preprocessing: Preprocessing, device: torch.device, progress: tqdm) -> None:
    """Compute one method's maps batch by batch into maps.zarr (``stored_form``), then mark the method complete."""
    size = images.shape[-1]
    chunk = (max(1, min(settings.batch_size, len(pairs))), size, size)
    values = group.create_array(method, shape=(len(pairs), size, size), dtype="float16", chunks=chunk, overwrite=True)
    scales = group.require_group("scale").create_array(method, shape=(len(pairs),), dtype="float32", overwrite=True)
    started = time.perf_counter()
    for batch in pair_batches(pairs, settings.batch_size):
        rows = slice(batch.start, batch.stop)
        values[rows], scales[rows] = stored_form(compute_maps(model, pairs.iloc[rows], images[rows], method, settings,
                                                              preprocessing, settings.batch_size, device, progress))
    group.attrs.update({"complete": [*group.attrs["complete"], method],
                        "seconds": {**group.attrs["seconds"], method: time.perf_counter() - started}})


def check(cfg: DictConfig) -> None:
    """Refuse bad attribute settings before any stage runs."""
    if "attribute" not in cfg:
        raise AttributionError("the config has no attribute section; add it to conf/config.yaml (see README)")
    read_settings(cfg.attribute, pick_device(str(cfg.attribute.get("device", "auto")), "attribute.device").type)


def run(cfg: DictConfig) -> Path:
    """Attribution maps, strips, agreement and randomisation checks for the selected units and classes."""
    check(cfg)
    device = pick_device(str(cfg.attribute.device), "attribute.device")
    settings, filled = read_settings(cfg.attribute, device.type)
    if filled:
        log.info("attribute on %s: %s (attribute.%s.%s; set a key to override)", device.type,
                 ", ".join(f"{key}={value}" for key, value in filled.items()), DEVICE_DEFAULTS,
                 "cuda" if device.type == "cuda" else "cpu")
    layout = RunLayout(Path(cfg.out_dir))
    run_dir, out_dir = layout.root, layout.attribute_dir
    store = open_activations(run_dir)
    probe = open_probe_set(cfg.dataset)
    if list(store["image_ids"][:]) != probe.image_ids:
        raise AttributionError(f"the activations in {run_dir} were extracted from other images than {probe.root}")
    loaded = load_model(cfg.model)
    preprocessing = Preprocessing(loaded.input_size, loaded.mean, loaded.std)
    valid = store["valid"][:]
    first = int(np.flatnonzero(valid)[0])
    example = preprocessing.normalise(load_images([probe.image_paths[first]], preprocessing)).to(device)
    model = prepare_model(loaded.module.to(device))
    settings = drop_undefined_guided_methods(settings, model, example, cfg.attribute.methods == "all")
    key = stage_inputs(cfg, layout, settings, loaded.description)
    if is_current(layout.stamp("attribute"), key, FORMAT, "attribute"):
        return out_dir
    pairs, images = build_pairs(layout, cfg, settings, model, preprocessing, probe.image_paths, probe.image_ids,
                                valid, example, device)
    log.info("attribute: %s", cost_sentence(settings, pairs, loaded.input_size))
    start(layout.stamp("attribute"))
    maps = open_maps(layout, key)
    pairs.to_csv(layout.attribute_pairs_csv, index=False)
    method_settings = MethodSettings(**{f.name: getattr(settings, f.name) for f in fields(MethodSettings)})
    todo = [m for m in settings.methods if m not in maps.attrs["complete"]]
    with tqdm(total=len(todo) * len(pairs), desc="attribute", unit="map") as progress:
        for method in todo:
            progress.set_postfix_str(method)
            write_method(maps, method, model, pairs, images, method_settings, preprocessing, device, progress)
    write_strips(layout, pairs, images, maps, settings.methods)
    agreement = None
    if cfg.dataset.kind == "broden" and (pairs["kind"] == "unit").any():
        agreement = agreement_table(layout, BrodenDataset(probe.root), pairs, maps, settings.methods,
                                    loaded.input_size)
        agreement.to_csv(layout.attribute_agreement_csv, index=False, float_format="%.6f")
    randomisation = None
    if settings.randomisation_pairs > 0:
        chosen = np.unique(np.linspace(0, len(pairs) - 1, min(settings.randomisation_pairs, len(pairs))).round()
                           ).astype(int)
        subset = pairs.iloc[chosen].reset_index(drop=True)
        randomisation = randomisation_check(model, subset, images[chosen],
                                            {m: np.stack([maps[m][p] for p in chosen]) for m in settings.methods},
                                            method_settings, preprocessing, settings.batch_size,
                                            settings.randomisation_steps, device)
        randomisation.to_csv(layout.attribute_randomisation_csv, index=False, float_format="%.6f")
    write_json_atomic(layout.attribute_json, summary(settings, pairs, maps, agreement, randomisation, device))
    write_stamp(layout.stamp("attribute"), key, FORMAT)
    return out_dir


def summary(settings: AttributeSettings, pairs: pd.DataFrame, maps: zarr.Group,
            agreement: pd.DataFrame | None, randomisation: pd.DataFrame | None, device: torch.device
            ) -> dict[str, Any]:
    """attribute.json: what was run, how fast, and what the trust checks say per method."""
    seconds = dict(maps.attrs["seconds"])
    methods: dict[str, dict[str, Any]] = {}
    for method in settings.methods:
        entry: dict[str, Any] = {"map": MAP_CONVENTIONS[method], "seconds": seconds.get(method),
                                 "pairs_per_second": len(pairs) / seconds[method] if seconds.get(method) else None}
        if agreement is not None and len(agreement):
            rows = agreement[(agreement["method"] == method) & agreement["inside_share"].notna()]
            entry["agreement"] = {"units": len(rows), "mean_inside_share": _mean(rows["inside_share"]),
                                  "mean_chance_share": _mean(rows["chance_share"])}
        if randomisation is not None:
            rows = randomisation[randomisation["method"] == method]
            final = float(rows.loc[rows["step"].idxmax(), "spearman_mean"])
            entry["randomisation"] = {"final_spearman": None if math.isnan(final) else final,
                                      "flagged": final > settings.max_correlation}
        methods[method] = entry
    flagged = [m for m, entry in methods.items() if entry.get("randomisation", {}).get("flagged")]
    return {"settings": asdict(settings), "device": str(device), "pairs": {"unit": int((pairs["kind"] == "unit").sum()),
                                                                 "class": int((pairs["kind"] == "class").sum())},
            "units": int(pairs[pairs["kind"] == "unit"][["layer", "target"]].drop_duplicates().shape[0]),
            "methods": methods, "max_correlation": settings.max_correlation, "flagged_methods": flagged,
            "flag_meaning": "the maps barely change when every layer's weights are randomised, so they do not "
                            "reflect what the model learned (Adebayo et al. 2018)"}


def _mean(values: pd.Series) -> float | None:
    return float(values.mean()) if len(values) else None
