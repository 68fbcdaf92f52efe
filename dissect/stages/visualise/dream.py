"""Deep dream: raise a layer's squared L2 norm on a real image, octave by octave (Mordvintsev et al. 2015).

The image is processed at ``octaves`` sizes, the smallest first, each
``octave_scale`` times the previous one and the last the model's input size.
At each octave the image is the base image at that size plus the detail the
earlier octaves added (upsampled); ``steps`` gradient steps follow, each on the
image shifted by a random offset of up to ``jitter`` pixels (rolled, so no
pixel is lost) and of size ``lr`` times the gradient divided by its mean
absolute value, after which pixels are clipped to [0, 1]. The objective is
recorded at the start and the end of every octave.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from dissect.settings import DreamSettings
from dissect.stages.attribute.model import PreparedModel
from dissect.stages.visualise.ascent import Normalisation
from dissect.stages.visualise.objectives import Target, objective


@dataclass(frozen=True)
class Dreamed:
    """``image`` (S, S, 3) uint8; per octave its ``sizes``, the objective at its ``start`` and ``end``; ``seconds``."""

    image: np.ndarray
    sizes: list[int]
    start: list[float]
    end: list[float]
    seconds: float


def octave_sizes(size: int, settings: DreamSettings) -> list[int]:
    """The side of the image at each octave, smallest first, the last ``size``; at least 16 pixels."""
    return [max(16, round(size / settings.octave_scale ** (settings.octaves - 1 - k)))
            for k in range(settings.octaves)]


def _resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """(1, 3, h, w) -> (1, 3, size, size), bilinear."""
    return F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)


def dream(model: PreparedModel, layer: str, image: torch.Tensor, settings: DreamSettings, normalise: Normalisation,
          seed: int) -> Dreamed:
    """Deep dream of ``layer`` on a (3, S, S) RGB image in [0, 1] (module docstring); jitter drawn from ``seed``."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    target = [Target("layer", layer)]
    base = image[None].float()
    size = base.shape[-1]
    sizes = octave_sizes(size, settings)
    detail = torch.zeros_like(_resize(base, sizes[0]))
    start, end = [], []
    for octave_size in sizes:
        low = _resize(base, octave_size)
        current = (low + _resize(detail, octave_size)).clamp(0, 1)
        start.append(_value(model, current, target, normalise))
        for _ in range(settings.steps):
            dy, dx = (int(v) for v in torch.randint(-settings.jitter, settings.jitter + 1, (2,), generator=generator))
            shifted = torch.roll(current, shifts=(dy, dx), dims=(2, 3)).requires_grad_(True)
            value = objective(model, normalise(shifted), target, "mean").sum()
            (grad,) = torch.autograd.grad(value, shifted)
            grad = torch.roll(grad, shifts=(-dy, -dx), dims=(2, 3))
            with torch.no_grad():
                current = (current + settings.lr * grad / grad.abs().mean().clamp_min(1e-12)).clamp(0, 1)
        end.append(_value(model, current, target, normalise))
        detail = current - low
    pixels = (current[0].permute(1, 2, 0).cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return Dreamed(pixels, sizes, start, end, time.perf_counter() - started)


@torch.no_grad()
def _value(model: PreparedModel, image: torch.Tensor, target: list[Target], normalise: Normalisation) -> float:
    """The layer objective of a (1, 3, s, s) RGB image."""
    return float(objective(model, normalise(image), target, "mean")[0])
