"""The attribute stage: maps against autograd, batching, planted detectors, guided-method hygiene, trust checks."""

import math
import os
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
import zarr
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from torch.nn import functional as F

from conftest import CONF_DIR, on_cluster, tiny_overrides, write_activation_store
from data_prep.synthetic_broden import generate
from dissect.stages import attribute, extract, tally, thresholds, topk
from dissect.artifacts import read_json
from dissect.stages.attribute import (
    METHODS,
    AttributionError,
    MethodSettings,
    attribution_maps,
    compute_maps,
    explained,
    positive_share_inside,
    prepare_model,
    randomisation_check,
    read_settings,
    spearman_abs,
    stored_form,
)
from dissect.broden import CATEGORIES
from dissect.embedded_model import SmallCNN
from dissect.layout import RunLayout
from dissect.probe import Preprocessing
from reports import attribute_section

IDENTITY = Preprocessing(input_size=64, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
CPU = torch.device("cpu")
GRADIENT_METHODS = ("saliency", "input_x_gradient", "deconvolution", "guided_backprop", "grad_cam",
                    "guided_grad_cam", "integrated_gradients")
#: The stage settings of these tests (conf/config.yaml holds those of a real run).
SETTINGS = {"units": "top", "top_units": 2, "unit_label": None, "unit_pairs": [], "images_per_unit": 3,
            "class_target": "predicted", "class_images": 2, "methods": "all", "grad_cam_layer": None,
            "ig_steps": 16, "ig_internal_batch": 32, "occlusion_window": 8, "occlusion_stride": 4,
            "lime_segments": 20, "lime_samples": 40, "shap_references": 3, "batch_size": 8, "randomisation_pairs": 4,
            "randomisation_steps": 2, "max_correlation": 0.5, "seed": 0, "device": "cpu", "device_defaults": {}}


class TinyNet(nn.Module):
    """conv (3 -> 2, 3x3) + ReLU + linear (2*6*6 -> 3) with fixed seeded weights, for 6 x 6 inputs."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(72, 3)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).flatten(1))


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """(1, 1, k, k) normalised 2-D Gaussian, radius 3 sigma."""
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]


class RedSpots(nn.Module):
    """Planted detectors on RGB in [0, 1]: unit 0 fires on red, unit 1 on green (layer ``units``).

    A 1x1 conv scores each pixel (red: 2 (R - G - B) - 1, about 0.17 on the generator's red and negative on
    every other Broden colour, also where JPEG blends two of them; green: 2 (G - R - B) - 0.4), a ReLU keeps
    the positive part, and a Gaussian blur makes the response graded: it peaks where the most red (green)
    lies around a position. The output is each unit's spatial maximum.
    """

    def __init__(self, sigma: float = 1.0) -> None:
        super().__init__()
        self.colour = nn.Conv2d(3, 2, 1)
        self.relu = nn.ReLU()
        kernel = gaussian_kernel(sigma)
        self.spread = nn.Conv2d(2, 2, kernel.shape[-1], padding=kernel.shape[-1] // 2, groups=2, bias=False)
        self.units = nn.Identity()
        with torch.no_grad():
            self.colour.weight.copy_(torch.tensor([[2.0, -2.0, -2.0], [-2.0, 2.0, -2.0]])[:, :, None, None])
            self.colour.bias.copy_(torch.tensor([-1.0, -0.4]))
            self.spread.weight.copy_(kernel.expand(2, 1, -1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) RGB in [0, 1] -> (N, 2) the maxima of the unit maps (N, 2, S, S)."""
        return self.units(self.spread(self.relu(self.colour(x)))).amax(dim=(2, 3))


def red_disc_images(n: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """(n, 3, S, S) uint8 images of non-red rectangles with one red disc each, and the (n, S, S) disc masks."""
    rng = np.random.default_rng(seed)
    palette = np.array([(40, 160, 50), (30, 70, 210), (128, 128, 128), (240, 220, 40), (240, 240, 240)])
    images, masks = [], []
    yy, xx = np.mgrid[:size, :size]
    for _ in range(n):
        image = np.broadcast_to(palette[rng.integers(len(palette))], (size, size, 3)).copy()
        for _ in range(4):
            top, left = rng.integers(0, size - 8, 2)
            image[top:top + rng.integers(8, 32), left:left + rng.integers(8, 32)] = palette[rng.integers(len(palette))]
        radius = rng.integers(12, 17)
        cy, cx = rng.integers(radius, size - radius, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        image[disc] = (210, 30, 30)
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        images.append(torch.from_numpy(image).permute(2, 0, 1))
        masks.append(disc)
    return torch.stack(images), np.stack(masks)


def pair_table(kinds: list[str], layers: list[str], targets: list[int], grad_cam_layers: list[str]) -> pd.DataFrame:
    """A pair table as the stage builds it (image i is pair i)."""
    return pd.DataFrame({"pair": range(len(kinds)), "kind": kinds, "layer": layers, "target": targets,
                         "image_index": range(len(kinds)), "grad_cam_layer": grad_cam_layers})


# ----------------------------------------------------------------------------- exact values on a tiny net


def hand_gradient(f, x: torch.Tensor) -> torch.Tensor:
    """d f(x) / d x for a scalar function of one (1, 3, 6, 6) image, by torch.autograd."""
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(f(x), x)[0]


def hand_integrated_gradients(f, x: torch.Tensor, baseline: torch.Tensor, steps: int) -> torch.Tensor:
    """(x - b) * sum_k w_k grad f(b + a_k (x - b)), Gauss-Legendre nodes a_k and weights w_k on [0, 1]."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    total = torch.zeros_like(x)
    for node, weight in zip((nodes + 1) / 2, weights / 2):
        total += float(weight) * hand_gradient(f, baseline + float(node) * (x - baseline))
    return (x - baseline) * total


@pytest.mark.parametrize("layer", ["conv", None], ids=["unit", "class"])
def test_saliency_input_x_gradient_and_integrated_gradients_equal_autograd(layer):
    net = TinyNet()
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([0, 1, 1] if layer else [2, 0, 1])
    baseline = torch.full((1, 3, 6, 6), -0.5)
    target = explained(prepare_model(net), layer, "conv")
    settings = MethodSettings(ig_steps=64, ig_internal_batch=50)
    maps = {m: attribution_maps(target, m, x, targets, baseline, settings)
            for m in ("saliency", "input_x_gradient", "integrated_gradients")}
    for i in range(3):
        def f(image, i=i):
            return net.conv(image)[0, targets[i]].amax() if layer else net(image)[0, targets[i]]

        grad = hand_gradient(f, x[i:i + 1])
        torch.testing.assert_close(maps["saliency"][i], grad.abs().sum(1)[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(maps["input_x_gradient"][i], (x[i:i + 1] * grad).sum(1)[0], rtol=1e-5, atol=1e-6)
        ig = hand_integrated_gradients(f, x[i:i + 1], baseline, steps=64)
        torch.testing.assert_close(maps["integrated_gradients"][i], ig.sum(1)[0], rtol=1e-4, atol=1e-5)
    # completeness: each map sums to f(x) - f(baseline). Gauss-Legendre quadrature is not exact on a
    # piecewise-linear net (its gradient jumps at ReLU and max switches): the gap is up to 1.7% at 64 steps
    # here and below 0.2% at 256, so 256 steps are checked against a 0.5% tolerance.
    exact = attribution_maps(target, "integrated_gradients", x, targets, baseline, MethodSettings(ig_steps=256))
    with torch.no_grad():
        differences = (target.module(x) - target.module(baseline.expand_as(x)))[torch.arange(3), targets]
    torch.testing.assert_close(exact.sum(dim=(1, 2)), differences, rtol=0.005, atol=1e-4)


def test_positive_share_and_spearman_match_direct_computations():
    rng = np.random.default_rng(0)
    maps, masks = rng.normal(size=(3, 5, 5)), rng.random((3, 5, 5)) > 0.6
    maps[2] = -1.0  # no positive mass
    share = positive_share_inside(maps, masks)
    for p in range(2):
        positive = np.clip(maps[p], 0, None)
        assert share[p] == pytest.approx(positive[masks[p]].sum() / positive.sum())
    assert np.isnan(share[2])
    first, second = rng.normal(size=(4, 6, 6)), rng.normal(size=(4, 6, 6))
    second[1] = first[1] * -2.0  # same ranks of |.|
    second[2] = np.round(second[2])  # ties
    expected = [scipy.stats.spearmanr(np.abs(a).ravel(), np.abs(b).ravel())[0] for a, b in zip(first, second)]
    np.testing.assert_allclose(spearman_abs(first, second), expected, atol=1e-12)
    constant = np.zeros((6, 6))
    np.testing.assert_array_equal(spearman_abs(np.stack([constant, first[0]]), np.stack([first[0], constant])),
                                  [np.nan, 0.0])  # no ranking to keep; a ranking lost


# ----------------------------------------------------------------------------------------------- batching


def test_one_batched_call_gives_the_maps_of_one_call_per_pair():
    torch.manual_seed(0)
    size = 32
    preprocessing = Preprocessing(size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    images = torch.randint(0, 256, (6, 3, size, size), dtype=torch.uint8)
    model = prepare_model(SmallCNN(num_classes=5, width=4))
    pairs = pair_table(["unit"] * 4 + ["class"] * 2, ["features.conv3"] * 4 + [""] * 2, [0, 3, 5, 5, 1, 4],
                       ["features.conv2"] * 4 + ["features.conv4"] * 2)
    settings = MethodSettings(ig_steps=8, ig_internal_batch=12, occlusion_window=8, occlusion_stride=8,
                              lime_segments=12, lime_samples=24, batch_size=8)
    for method in METHODS:
        batched = compute_maps(model, pairs, images, method, settings, preprocessing, 6, CPU)
        one_by_one = np.concatenate([compute_maps(model, pairs.iloc[[p]], images[p:p + 1], method, settings,
                                                  preprocessing, 1, CPU) for p in range(len(pairs))])
        assert np.abs(batched).max() > 0, method
        # Convolutions sum in another order at another batch size; an occlusion map is a difference of two
        # outputs, so its rounding is float32's epsilon times the output (about 1e-7 here), not times the map.
        np.testing.assert_allclose(batched, one_by_one, rtol=1e-4, atol=1e-5 * np.abs(batched).max(),
                                   err_msg=method)


# ------------------------------------------------------------------------------------- planted detectors


def test_a_red_detector_puts_its_attribution_on_the_red_disc():
    images, discs = red_disc_images(4)
    model = prepare_model(RedSpots(sigma=4.0))
    pairs = pair_table(["unit"] * 4, ["units"] * 4, [0] * 4, ["units"] * 4)
    settings = MethodSettings(ig_steps=16, occlusion_window=8, occlusion_stride=4, batch_size=24)
    chance = discs.mean()
    for method in (*GRADIENT_METHODS, "occlusion"):
        maps = compute_maps(model, pairs, images, method, settings, IDENTITY, 4, CPU)
        share = positive_share_inside(maps, discs)
        assert share.min() > 0.6 and share.mean() > 3 * chance, (method, share.round(2), chance)


# --------------------------------------------------------------------------------- guided-method hygiene


class TwoBranches(nn.Module):
    """Two convs whose outputs go through one ReLU module or two (or F.relu); the convs run before either ReLU."""

    def __init__(self, relus: str, inplace: bool = False) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.relus = relus  # "distinct" modules, one "shared" module, or "functional" F.relu calls
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.relu_a = nn.ReLU(inplace=inplace)
        self.relu_b = self.relu_a if relus == "shared" else nn.ReLU(inplace=inplace)
        self.head = nn.Conv2d(8, 3, 3, padding=1)
        self.relu_head = nn.ReLU(inplace=inplace)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        if self.relus == "functional":
            hidden = torch.cat([F.relu(a, inplace=self.inplace), b.relu_() if self.inplace else b.relu()], 1)
            return F.relu(self.head(hidden), inplace=self.inplace).amax(dim=(2, 3))
        return self.relu_head(self.head(torch.cat([self.relu_a(a), self.relu_b(b)], 1))).amax(dim=(2, 3))


def guided_maps(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    target = attribute.Explained(prepare_model(net), None)
    return {m: attribution_maps(target, m, x, torch.tensor([0, 2]), x[:1] * 0, MethodSettings())
            for m in ("deconvolution", "guided_backprop")}


def captum_guided_maps(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Captum's own module-hook implementation, correct on a net whose every ReLU is its own nn.ReLU module."""
    from captum.attr import Deconvolution, GuidedBackprop

    targets = torch.tensor([0, 2])
    return {"deconvolution": Deconvolution(net).attribute(x, target=targets).abs().sum(1),
            "guided_backprop": GuidedBackprop(net).attribute(x, target=targets).abs().sum(1)}


@pytest.mark.parametrize("relus,inplace", [("shared", False), ("shared", True), ("functional", False),
                                           ("functional", True)])
def test_guided_maps_of_reused_and_functional_relus_equal_captum_on_distinct_modules(relus, inplace):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    reference = captum_guided_maps(TwoBranches("distinct"), x)
    net = TwoBranches(relus, inplace=inplace)
    for method, maps in guided_maps(net, x).items():
        torch.testing.assert_close(maps, reference[method], msg=method)
    if relus == "shared":  # Captum alone mixes the two calls of the shared module
        assert not torch.allclose(captum_guided_maps(net, x)["deconvolution"], reference["deconvolution"])
    assert net.relu_a.inplace == inplace, "the caller's model is left as it was"


class TwoLayerPerceptron(nn.Module):
    """x (N, 3, 2, 2) -> v . relu(W2 relu(W1 x)) with fixed weights; ReLU as a function, the second one reused."""

    def __init__(self, w1: np.ndarray, w2: np.ndarray, v: np.ndarray) -> None:
        super().__init__()
        self.w1, self.w2, self.v = (torch.tensor(w, dtype=torch.float32) for w in (w1, w2, v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(x.flatten(1) @ self.w1.T)
        return (torch.relu(hidden @ self.w2.T) @ self.v)[:, None]


def test_guided_backprop_and_deconvnet_equal_the_rules_applied_by_hand():
    rng = np.random.default_rng(5)
    w1, w2, v, x = rng.normal(size=(6, 12)), rng.normal(size=(5, 6)), rng.normal(size=5), rng.normal(size=12)
    h1 = np.maximum(w1 @ x, 0)
    h2 = np.maximum(w2 @ h1, 0)
    guided = w1.T @ (np.maximum(w2.T @ (np.maximum(v, 0) * (h2 > 0)), 0) * (h1 > 0))
    deconv = w1.T @ np.maximum(w2.T @ np.maximum(v, 0), 0)
    target = attribute.Explained(prepare_model(TwoLayerPerceptron(w1, w2, v)), None)
    inputs = torch.tensor(x, dtype=torch.float32).reshape(1, 3, 2, 2)
    for method, expected in (("guided_backprop", guided), ("deconvolution", deconv)):
        maps = attribution_maps(target, method, inputs, torch.tensor([0]), inputs * 0, MethodSettings())
        np.testing.assert_allclose(maps[0].numpy(), np.abs(expected.reshape(3, 2, 2)).sum(0), rtol=1e-5, err_msg=method)


def test_relu_only_methods_are_left_out_with_a_warning_where_a_model_has_other_activations(caplog):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Conv2d(4, 2, 3), nn.ReLU6(), nn.Flatten(1))
    model, x = prepare_model(net), torch.randn(1, 3, 8, 8)
    every, _ = read_settings(SETTINGS, "cpu")
    with caplog.at_level("WARNING"):
        kept = attribute.drop_relu_only_methods(every, model, x, all_methods=True)
    relu_only = ("deconvolution", "guided_backprop", "guided_grad_cam", "lrp", "deeplift", "deeplift_shap")
    assert kept.methods == tuple(m for m in METHODS if m not in relu_only)
    assert "leaving out deconvolution, guided_backprop, guided_grad_cam, lrp, deeplift, deeplift_shap" in caplog.text
    assert "gelu (1 calls), hardtanh (1 calls)" in caplog.text  # nn.ReLU6 is F.hardtanh
    named, _ = read_settings({**SETTINGS, "methods": ["saliency", "guided_backprop"]}, "cpu")
    with pytest.raises(AttributionError, match=r"\['guided_backprop'\] are defined for ReLU networks only.*gelu"):
        attribute.drop_relu_only_methods(named, model, x, all_methods=False)
    relu_net = prepare_model(nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(1)))
    assert attribute.drop_relu_only_methods(every, relu_net, x, all_methods=True) == every


# --------------------------------------------------------------------------------- LRP and DeepLIFT


def test_lrp_conserves_relevance_and_applies_the_flat_and_epsilon_rules_by_hand():
    rng = np.random.default_rng(6)
    w1, w2 = rng.normal(size=(6, 12)), rng.normal(size=(3, 6))
    net = nn.Sequential(nn.Flatten(1), nn.Linear(12, 6, bias=False), nn.ReLU(), nn.Linear(6, 3, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor(w1))
        net[3].weight.copy_(torch.tensor(w2))
    x = rng.normal(size=(2, 12))
    targets = [2, 0]
    maps = attribution_maps(attribute.Explained(prepare_model(net), None), "lrp",
                            torch.tensor(x, dtype=torch.float32).reshape(2, 3, 2, 2), torch.tensor(targets),
                            torch.zeros(1, 3, 2, 2), MethodSettings())
    for row, target in enumerate(targets):
        hidden = np.maximum(w1 @ x[row], 0)
        score = w2[target] @ hidden
        # epsilon rule on the last layer (R_j = h_j w_tj R_t / z_t, R_t = z_t), flat rule on the first (R_i = sum_j R_j / 12)
        relevance_hidden = hidden * w2[target] * score / (score + 1e-6 * np.sign(score))
        by_hand = np.full(12, relevance_hidden.sum() / 12).reshape(3, 2, 2).sum(0)
        np.testing.assert_allclose(maps[row].numpy(), by_hand, rtol=1e-4, atol=1e-6)
        assert float(maps[row].sum()) == pytest.approx(score, rel=1e-4)  # conservation, without biases


class PooledNet(nn.Module):
    """Convs, two ReLUs (distinct modules, one shared module, or F.relu in place) and a max pooling; no biases.

    ``stem=False``: conv -> max pool 2 -> conv -> ReLU -> 1x1 conv -> ReLU -> linear, on which Captum's
    DeepLift is right (where a hooked ReLU and a max pooling are adjacent, Captum's own maps miss summation to
    delta, by up to 0.016 of 0.1 on this net, so they cannot be the reference there). ``stem=True``: conv ->
    ReLU -> max pool 3, stride 2 (overlapping windows, as AlexNet's and ResNet's stems) -> conv -> ReLU -> linear.
    """

    def __init__(self, relus: str, stem: bool = False) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.relus, self.stem = relus, stem
        self.a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.b = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.c = nn.Conv2d(4, 4, 1, bias=False)
        self.relu_a = nn.ReLU()
        self.relu_b = self.relu_a if relus == "shared" else nn.ReLU()
        self.pool = nn.MaxPool2d(3, 2, 1) if stem else nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = ((lambda h: F.relu(h, inplace=True)),) * 2 if self.relus == "functional" else (
            self.relu_a, self.relu_b)
        if self.stem:
            return self.fc(second(self.b(self.pool(first(self.a(x))))).flatten(1))
        return self.fc(second(self.c(first(self.b(self.pool(self.a(x)))))).flatten(1))


@pytest.mark.parametrize("relus", ["distinct", "shared", "functional"])
def test_lrp_of_reused_and_functional_relus_conserves_relevance_and_equals_distinct_modules(relus):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    targets = torch.tensor([1, 2])
    maps = {name: attribution_maps(attribute.Explained(prepare_model(PooledNet(name)), None), "lrp", x, targets,
                                   x[:1] * 0, MethodSettings()) for name in ("distinct", relus)}
    torch.testing.assert_close(maps[relus], maps["distinct"])
    with torch.no_grad():
        scores = PooledNet(relus)(x)[torch.arange(2), targets]
    # flat, z+ and epsilon rules without biases conserve; z+ on a mixed-sign input and epsilon lose about 1e-6
    torch.testing.assert_close(maps[relus].sum(dim=(1, 2)), scores, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("relus", ["distinct", "shared", "functional"])
def test_deeplift_equals_captum_and_meets_captums_summation_to_delta_check(relus):
    from captum.attr import DeepLift, DeepLiftShap

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    baseline = torch.full((1, 3, 8, 8), -0.3)
    targets = torch.tensor([0, 2])
    reference = PooledNet("distinct")  # Captum's module hooks are right where every ReLU is its own module
    captum_maps = DeepLift(reference).attribute(x, baseline.expand_as(x), target=targets).sum(1)
    net = PooledNet(relus)
    ours = attribution_maps(attribute.Explained(prepare_model(net), None), "deeplift", x, targets, baseline,
                            MethodSettings())
    torch.testing.assert_close(ours, captum_maps, rtol=1e-4, atol=1e-6)
    for stem in (False, True):  # with a ReLU feeding overlapping pooling windows too
        raw = attribute.deeplift(prepare_model(PooledNet(relus, stem)), x, baseline.expand_as(x), targets)
        delta = DeepLift(PooledNet("distinct", stem)).compute_convergence_delta(
            raw, start_point=baseline.expand_as(x), end_point=x, target=targets)
        assert delta.abs().max() < 1e-5, (stem, delta)  # Captum's check: the map sums to f(x) - f(baseline)
    references = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(10))
    shap = attribute.deeplift_shap(prepare_model(net), x, references, targets)
    torch.testing.assert_close(shap, DeepLiftShap(reference).attribute(x, references, target=targets),
                               rtol=1e-4, atol=1e-6)
    assert net.relu_a.inplace is False


# ------------------------------------------------------------------------------------ randomisation check


def colour_disc_classes(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, S, S) uint8 grey-noise images with one disc of colour k and their classes k (0 red, 1 green, 2 blue)."""
    rng = np.random.default_rng(seed)
    colours = np.array([(210, 30, 30), (40, 160, 50), (30, 70, 210)])
    yy, xx = np.mgrid[:size, :size]
    images, classes = [], rng.integers(0, 3, n)
    for k in classes:
        image = rng.normal(128, 30, (size, size, 3))
        radius = rng.integers(6, 12)
        cy, cx = rng.integers(radius, size - radius, 2)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = colours[k]
        images.append(torch.from_numpy(np.clip(image, 0, 255).astype(np.uint8)).permute(2, 0, 1))
    return torch.stack(images), torch.from_numpy(classes)


def test_randomising_the_weights_changes_grad_cam_and_integrated_gradients():
    preprocessing = Preprocessing(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    images, classes = colour_disc_classes(256, 64, seed=0)
    torch.manual_seed(0)
    net = SmallCNN(num_classes=3, width=8)
    optimiser = torch.optim.AdamW(net.parameters(), lr=3e-3)
    inputs = preprocessing.normalise(images)
    for epoch in range(6):
        for batch in torch.randperm(len(images)).split(32):
            loss = F.cross_entropy(net(inputs[batch]), classes[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(inputs).argmax(1) == classes).float().mean())
    assert accuracy > 0.8, "the model must have learned something for the check to mean anything"
    methods = ("grad_cam", "integrated_gradients", "guided_backprop")
    model = prepare_model(net)
    pairs = pair_table(["class"] * 6, [""] * 6, classes[:6].tolist(), ["features.conv4"] * 6)
    settings = MethodSettings(ig_steps=16, ig_internal_batch=64)
    trained = {m: stored_form(compute_maps(model, pairs, images[:6], m, settings, preprocessing, 6, CPU))[0]
               for m in methods}
    table = randomisation_check(model, pairs, images[:6], trained, settings, preprocessing, 6, steps=3, device=CPU)
    assert table["step"].tolist() == [1] * 3 + [2] * 3 + [3] * 3
    assert table["randomised"].iloc[-1] == 10  # conv1..conv4, bn1..bn4, fc1, fc2
    assert table["deepest"].iloc[-1] == "features.conv1"
    final = table[table["step"] == 3].set_index("method")["spearman_mean"]
    assert final["grad_cam"] < 0.4 and final["integrated_gradients"] < 0.4, final.to_dict()
    same = randomisation_check(model, pairs, images[:6], trained, settings, preprocessing, 6, steps=3, device=CPU)
    pd.testing.assert_frame_equal(table, same)  # seeded


# --------------------------------------------------------------------------------------- the whole stage


def test_settings_errors_name_the_key_and_what_is_allowed(compose_config):
    defaults, _ = read_settings(compose_config([]).attribute, "cpu")  # conf/config.yaml holds every key, valid
    assert defaults.methods == METHODS and defaults.units == "top"
    with pytest.raises(AttributionError, match="allowed: all, or a list of saliency"):
        read_settings({**SETTINGS, "methods": ["saliency", "smoothgrad"]}, "cpu")
    with pytest.raises(AttributionError, match=r"missing key\(s\) \['seed'\]"):
        read_settings({key: value for key, value in SETTINGS.items() if key != "seed"}, "cpu")
    with pytest.raises(AttributionError, match="allowed: top, label, pairs, none"):
        read_settings({**SETTINGS, "units": "best"}, "cpu")
    with pytest.raises(AttributionError, match=r"attribute.ig_steps is null but attribute.device_defaults.cpu"):
        read_settings({**SETTINGS, "ig_steps": None}, "cpu")


def test_null_costly_keys_take_the_defaults_of_the_device():
    device_defaults = {"cpu": {"top_units": 1, "ig_steps": 8}, "cuda": {"top_units": 5, "ig_steps": 64}}
    config = {**SETTINGS, "top_units": None, "ig_steps": None, "device_defaults": device_defaults}
    on_cpu, filled = read_settings(config, "cpu")
    assert (on_cpu.top_units, on_cpu.ig_steps, filled) == (1, 8, {"top_units": 1, "ig_steps": 8})
    on_gpu, _ = read_settings(config, "cuda")
    assert (on_gpu.top_units, on_gpu.ig_steps) == (5, 64)
    chosen, filled = read_settings({**config, "ig_steps": 3}, "cpu")  # a value set by the user stays
    assert (chosen.ig_steps, filled) == (3, {"top_units": 1})


class RowCounter(nn.Module):
    """TinyNet that counts the image rows of its forward passes, and of those that carry a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()
        self.forward_rows = self.backward_rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forward_rows += len(x)
        output = self.net(x)
        if output.requires_grad:  # counted when a gradient flows back through these rows
            output.register_hook(lambda grad: setattr(self, "backward_rows", self.backward_rows + len(grad)))
        return output


@pytest.mark.parametrize("method", ["saliency", "guided_grad_cam", "integrated_gradients", "lrp", "deeplift",
                                    "deeplift_shap", "occlusion", "lime"])
def test_the_announced_passes_are_those_the_methods_make(method):
    settings, _ = read_settings({**SETTINGS, "ig_steps": 5, "ig_internal_batch": 64, "occlusion_window": 3,
                                 "occlusion_stride": 2, "lime_samples": 7, "lime_segments": 4}, "cpu")
    counter = RowCounter()
    model = prepare_model(counter)
    images = torch.randint(0, 255, (2, 3, 6, 6), dtype=torch.uint8)
    x = images.float() / 255
    method_settings = MethodSettings(**{f.name: getattr(settings, f.name) for f in fields(MethodSettings)})
    counted = model.net  # prepare_model works on a copy
    if method == "lrp":  # its choice of canonizers costs one forward pass of one image once per model: made here
        attribute.relevance.canonizers(counted, x[:1])
        counted.forward_rows = 0
    attribution_maps(explained(model, None, "net.conv"), method, x, torch.tensor([0, 1]), x[:1] * 0,
                     method_settings, images.permute(0, 2, 3, 1).numpy(), Preprocessing(6, (0, 0, 0), (1, 1, 1)))
    # occlusion on 6 px with window 3, stride 2: Captum's ceil((6 - 3) / 2) + 1 = 3 positions per side
    expected = {"saliency": (1, 1), "guided_grad_cam": (2, 2), "integrated_gradients": (5, 5),
                "occlusion": (3 * 3 + 1, 0), "lime": (7, 0), "lrp": (1, 1),
                "deeplift": (2, 2), "deeplift_shap": (2 * 3, 2 * 3)}[method]  # input + reference; 3 references
    assert attribute.model_passes(method, settings, 6) == expected
    assert (counted.forward_rows, counted.backward_rows) == (2 * expected[0], 2 * expected[1])


HOSTILE = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """A generated probe set (red renamed with HTML), dissected with RedSpots, then the attribute stage."""
    base = tmp_path_factory.mktemp("attribute")
    probe = generate(base / "broden", n_images=40, size=64, seed=7, workers=1)
    for name in ("label.csv", "c_color.csv"):
        table = pd.read_csv(probe / name, keep_default_na=False)
        table["name"] = table["name"].replace("red-c", f"red-c{HOSTILE}")
        table.to_csv(probe / name, index=False)
    overrides = ["model=default", "model.module._target_=test_attribute.RedSpots", "~model.module.num_classes",
                 "model.checkpoint=null", "model.input_size=64", "model.mean=[0,0,0]", "model.std=[1,1,1]",
                 "layers=[units]", "dataset=default", f"dataset.root={probe}", f"out_dir={base / 'run'}",
                 "extract.batch_size=8", "extract.num_workers=0", "extract.chunk_mib=0.01",
                 "thresholds.quantile=0.005", "topk.k=4"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    cfg = OmegaConf.merge(cfg, {"attribute": {**SETTINGS, "units": "label", "unit_label": f"red-c{HOSTILE}"}})
    for stage in (extract, thresholds, tally, topk):
        stage.run(cfg)
    return cfg, attribute.run(cfg)


def test_the_stage_writes_pairs_maps_strips_and_checks(planted_run):
    cfg, out_dir = planted_run
    layout = RunLayout(cfg.out_dir)
    assert out_dir == layout.attribute_dir
    pairs = pd.read_csv(layout.attribute_pairs_csv, keep_default_na=False)
    units = pairs[pairs["kind"] == "unit"]
    tallied = pd.read_csv(layout.tally_csv("units"), keep_default_na=False)
    assert tallied.at[0, "label"] == f"red-c{HOSTILE}" and tallied.at[0, "iou"] > 0.5
    assert units["target"].unique().tolist() == [0]  # units=label: every unit labelled red
    top = pd.read_csv(layout.topk_csv("units"))
    top = top[(top["unit"] == 0) & (top["rank"] < 3)]
    assert units["image_index"].tolist() == top["image_index"].tolist()
    # the explained score is the unit's maximum as the extract stage stored it (float16)
    np.testing.assert_allclose(units["score"], top["max_activation"], rtol=2e-3)
    classes = pairs[pairs["kind"] == "class"]
    assert classes["image_index"].tolist() == [0, 1] and set(classes["grad_cam_layer"]) == {"spread"}

    maps = zarr.open_group(layout.attribute_maps, mode="r")
    images = torch.stack([IDENTITY.load(Image.open(Path(cfg.dataset.root) / "images" / i)) for i in pairs["image_id"]])
    model = prepare_model(RedSpots())
    for method in METHODS:
        stored, scale = maps[method][:], maps["scale"][method][:]
        assert stored.shape == (len(pairs), 64, 64) and stored.dtype == np.float16
        assert (scale[units.index] > 0).all(), method  # the red unit on its top images
        np.testing.assert_array_equal(np.abs(stored).reshape(len(pairs), -1).max(1), scale > 0)
    for method in ("saliency", "integrated_gradients", "occlusion"):  # stored maps x scale = a direct call
        settings = MethodSettings(**{f.name: SETTINGS[f.name] for f in fields(MethodSettings)})
        direct = compute_maps(model, pairs, images, method, settings, IDENTITY, 1, CPU)
        raw = maps[method][:].astype(np.float32) * maps["scale"][method][:][:, None, None]
        np.testing.assert_allclose(raw, direct, atol=2e-3 * np.abs(direct).max())

    strip = Image.open(layout.attribute_unit_strip("units", 0))
    assert strip.size == ((1 + len(METHODS)) * (attribute.TILE + attribute.GAP) - attribute.GAP,
                          attribute.HEADER + 3 * (attribute.TILE + attribute.GAP))
    class_strips = [layout.attribute_class_strip(int(row.image_index), int(row.target)) for row in classes.itertuples()]
    assert all(path.is_file() for path in class_strips)
    assert len(list(class_strips[0].parent.glob("*.png"))) == 2

    agreement = pd.read_csv(layout.attribute_agreement_csv, keep_default_na=False)
    red = agreement[agreement["unit"] == 0].set_index("method")
    assert (red["label"] == f"red-c{HOSTILE}").all()
    for method in ("saliency", "input_x_gradient", "guided_backprop", "integrated_gradients"):
        assert red.at[method, "inside_share"] > max(0.5, 2 * red.at[method, "chance_share"]), red.loc[method]

    randomisation = pd.read_csv(layout.attribute_randomisation_csv)
    summary = read_json(layout.attribute_json)
    final = randomisation[randomisation["step"] == 2].set_index("method")["spearman_mean"]
    assert sorted(final.index) == sorted(METHODS)  # randomisation_steps = 2: every method checked twice
    # attribute.json reports the last step of randomisation.csv; the flag rule is checked on a hand-made table
    # in test_the_summary_flags_the_methods_whose_final_correlation_exceeds_the_limit
    for method in METHODS:
        reported = summary["methods"][method]["randomisation"]["final_spearman"]
        assert (reported is None) if np.isnan(final[method]) else reported == pytest.approx(final[method], abs=1e-6)
    assert summary["pairs"] == {"unit": 3, "class": 2}


def write_hand_tally(layout: RunLayout, layer: str, rows: list[tuple[int, str, float]]) -> None:
    """A tally.csv of (unit, label, iou) rows, in the given row order, with the columns the tally writes."""
    table = pd.DataFrame(rows, columns=["unit", "label", "iou"])
    table.insert(1, "category", "color")
    for category in CATEGORIES:
        table[f"{category}-label"] = table["label"] if category == "color" else ""
        table[f"{category}-iou"] = table["iou"] if category == "color" else 0.0
    layout.layer_dir(layer).mkdir(parents=True, exist_ok=True)
    table.to_csv(layout.tally_csv(layer), index=False, float_format="%.6f")


def test_unit_selection_takes_the_best_detectors_by_hand(tmp_path):
    layout = RunLayout(tmp_path)
    # IoUs are binary fractions, so that 0.125 reads back as exactly the threshold.
    write_hand_tally(layout, "a", [(0, "red-c", 0.25), (1, "grass-c", 0.375), (2, "red-c", 0.125),
                                   (3, "sky-c", 0.375), (4, "red-c", 0.0625)])
    # rows out of unit order: the tie of units 2 and 0 must go to unit 0 whatever the row order
    write_hand_tally(layout, "b", [(2, "red-c", 0.5), (3, "grass-c", 0.25), (1, "red-c", 0.125), (0, "sky-c", 0.5)])
    layers, threshold = ["a", "untallied", "b"], 0.125  # a layer without tally.csv is passed over
    expected = {  # by hand: a: 1 and 3 tie at 0.375 > 0 (0.25); 2 (= threshold) and 4 are no detectors;
        #           b: 0 and 2 tie at 0.5 > 3 (0.25); 1 (= threshold) is no detector
        1: [("a", 1), ("b", 0)],
        2: [("a", 1), ("a", 3), ("b", 0), ("b", 2)],
        5: [("a", 1), ("a", 3), ("a", 0), ("b", 0), ("b", 2), ("b", 3)],
    }
    for top_units, units in expected.items():
        settings = read_settings({**SETTINGS, "top_units": top_units}, "cpu")[0]
        assert attribute.select_units(layout, layers, settings, threshold) == units, top_units
    assert attribute.select_units(layout, layers, read_settings(SETTINGS, "cpu")[0], 0.3) == [("a", 1), ("a", 3),
                                                                                              ("b", 0), ("b", 2)]
    # units=label: every unit labelled red-c, detector or not (layer a: rows in unit order, as the tally writes)
    labelled = read_settings({**SETTINGS, "units": "label", "unit_label": "red-c"}, "cpu")[0]
    assert attribute.select_units(layout, ["a", "untallied"], labelled, threshold) == [("a", 0), ("a", 2), ("a", 4)]


def test_the_summary_flags_the_methods_whose_final_correlation_exceeds_the_limit(tmp_path):
    methods = ["saliency", "grad_cam", "integrated_gradients", "occlusion", "lime"]
    settings = read_settings({**SETTINGS, "methods": methods}, "cpu")[0]
    assert settings.max_correlation == 0.5
    maps = zarr.open_group(tmp_path / "maps.zarr", mode="w")
    maps.attrs["seconds"] = {method: 2.0 for method in methods}
    pairs = pair_table(["unit"] * 3 + ["class"], ["units"] * 3 + [""], [0, 0, 1, 2], ["units"] * 4)
    # step 1 says the opposite of step 2 for most methods: only the last step counts
    first = {"saliency": 0.1, "grad_cam": 0.95, "integrated_gradients": 0.99, "occlusion": 0.3, "lime": 0.2}
    final = {"saliency": 0.9, "grad_cam": 0.2, "integrated_gradients": 0.5, "occlusion": float("nan"), "lime": 0.75}
    rows = [(step, 2 * step, "units", method, values[method], 0.0, 4)
            for step, values in ((2, final), (1, first)) for method in methods]
    randomisation = pd.DataFrame.from_records(rows, columns=["step", "randomised", "deepest", "method",
                                                             "spearman_mean", "spearman_std", "pairs"])
    result = attribute.summary(settings, pairs, maps, None, randomisation, CPU)
    # 0.9 and 0.75 exceed 0.5; 0.5 itself does not (the rule is > max_correlation); NaN: nothing to flag
    assert result["flagged_methods"] == ["saliency", "lime"]
    assert {m: result["methods"][m]["randomisation"] for m in methods} == {
        "saliency": {"final_spearman": 0.9, "flagged": True},
        "grad_cam": {"final_spearman": 0.2, "flagged": False},
        "integrated_gradients": {"final_spearman": 0.5, "flagged": False},
        "occlusion": {"final_spearman": None, "flagged": False},
        "lime": {"final_spearman": 0.75, "flagged": True}}
    assert result["pairs"] == {"unit": 3, "class": 1} and result["units"] == 2
    assert result["methods"]["saliency"]["pairs_per_second"] == 2.0  # 4 pairs in 2 s


# ------------------------------------------------------------------------------- on a cluster of processes


def stage_outputs(layout: RunLayout) -> dict[str, bytes]:
    """The bytes of every table and strip the stage wrote (maps.zarr and attribute.json are compared apart)."""
    paths = [layout.attribute_pairs_csv, layout.attribute_agreement_csv, layout.attribute_randomisation_csv,
             *sorted((layout.attribute_dir / "strips").rglob("*.png"))]
    return {str(path.relative_to(layout.attribute_dir)): path.read_bytes() for path in paths if path.exists()}


def run_here_and_there(cfg, cluster, here: Path, there: Path) -> tuple[RunLayout, RunLayout]:
    """The stage on the default in-process cluster with one thread, then on ``cluster`` (one thread per worker).

    The same thread count makes the same CPU kernels sum in the same order. (At 2 threads the backward pass
    of a convolution sums in another order, and a few float16 map values differ in the last bit: 1 of the
    28672 saliency values of the checkpointed test.)
    """
    attribute.run(OmegaConf.merge(cfg, {"out_dir": str(here), "cluster": {"threads_per_worker": 1}}))
    attribute.run(on_cluster(cfg, cluster, out_dir=str(there)))
    return RunLayout(here), RunLayout(there)


def assert_same_outputs(here: RunLayout, there: RunLayout, tables: set[str]) -> dict[str, int]:
    """Tables, strips and maps.zarr arrays equal bit for bit; returns the tasks each worker ran (attribute.json)."""
    assert tables < set(stage_outputs(here))
    assert stage_outputs(there) == stage_outputs(here)
    maps_here, maps_there = (zarr.open_group(layout.attribute_maps, mode="r") for layout in (here, there))
    assert maps_there.attrs["complete"] == maps_here.attrs["complete"] == list(METHODS)
    for method in METHODS:
        np.testing.assert_array_equal(maps_there[method][:], maps_here[method][:], err_msg=method)
        np.testing.assert_array_equal(maps_there["scale"][method][:], maps_here["scale"][method][:], err_msg=method)
    in_process = read_json(here.attribute_json)["workers"]
    assert len(in_process) == 1 and next(iter(in_process)).startswith("inproc://")  # the default cluster
    summary = read_json(there.attribute_json)
    assert summary["device"] == "cpu"
    return {address: entry["tasks"] for address, entry in summary["workers"].items()}


@pytest.mark.slow  # every method on two worker processes: about 14 s
def test_on_two_worker_processes_the_stage_writes_what_it_writes_in_process(planted_run, two_workers, tmp_path):
    cfg, _ = planted_run
    for name in ("here", "there"):
        shutil.copytree(cfg.out_dir, tmp_path / name, ignore=shutil.ignore_patterns("attribute"))
    here, there = run_here_and_there(cfg, two_workers, tmp_path / "here", tmp_path / "there")
    tasks = assert_same_outputs(here, there, {"pairs.csv", "agreement.csv", "randomisation.csv"})
    assert set(tasks) == {worker.worker_address for worker in two_workers.workers.values()}
    assert min(tasks.values()) > 0, tasks  # both workers computed maps
    # 5 pairs in 2 batches (the unit's 3, the 2 class pairs) x every method, and 2 randomisation steps x every method
    assert sum(tasks.values()) == 2 * len(METHODS) + 2 * len(METHODS)


@pytest.mark.slow  # about 11 s
def test_class_maps_of_a_checkpointed_model_on_two_worker_processes_equal_the_in_process_ones(
        image_folder, tiny_checkpoint, two_workers, compose_config, tmp_path):
    cfg = compose_config(tiny_overrides(image_folder, tmp_path / "here", tiny_checkpoint))
    cfg = OmegaConf.merge(cfg, {"attribute": {**SETTINGS, "units": "none", "class_images": 7, "batch_size": 3}})
    image_ids = attribute.stage.open_probe_set(cfg.dataset).image_ids
    for name in ("here", "there"):  # the stage reads only the image ids and validity of the extract stage's store
        write_activation_store(tmp_path / name, image_ids, {"features.conv2": np.zeros((len(image_ids), 1, 1, 1))})
    here, there = run_here_and_there(cfg, two_workers, tmp_path / "here", tmp_path / "there")
    tasks = assert_same_outputs(here, there, {"pairs.csv", "randomisation.csv"})  # no agreement on a plain folder
    assert len(tasks) == 2 and min(tasks.values()) > 0, tasks
    assert sum(tasks.values()) == (3 + 2) * len(METHODS)  # 7 pairs in 3 batches, 2 randomisation steps, x methods


def test_a_finished_stage_is_skipped(planted_run):
    cfg, out_dir = planted_run
    layout = RunLayout(cfg.out_dir)
    before = {path: path.stat().st_mtime_ns for path in (layout.attribute_json, layout.stamp("attribute"))}
    assert attribute.run(cfg) == out_dir
    assert {path: path.stat().st_mtime_ns for path in before} == before


def test_the_report_section_escapes_labels_and_links_strips(planted_run, tmp_path):
    cfg, out_dir = planted_run
    layout = RunLayout(cfg.out_dir)
    run_dir = layout.root
    html = attribute_section.render(run_dir, layout.report_dir)
    assert html and "integrated_gradients" in html and "randomisation" in html.lower()
    assert HOSTILE not in html
    fragment = attribute_section.unit_fragment(run_dir, "units", 0)
    strip = Path(os.path.relpath(layout.attribute_unit_strip("units", 0), layout.report_dir)).as_posix()
    assert strip == "../attribute/strips/layers/units/unit_00000.png"
    assert f"<img loading=\"lazy\" src=\"{strip}\"" in fragment
    assert HOSTILE not in fragment and "&lt;img src=x" in fragment
    assert attribute_section.unit_fragment(run_dir, "units", 1) == ""  # not labelled red, not selected
    assert attribute_section.render(tmp_path, tmp_path / "report") is None
