"""Hand-built models whose units detect chosen concepts of the generated probe set.

``PlantedDetectors`` computes, for each input image, a few per-pixel responses
from first principles (no learning) and average-pools them by ``stride`` to a
(N, U, S/stride, S/stride) map, which it passes through an ``nn.Identity``
named ``units`` (the layer to record: ``layers=[units]``). Each response is
graded, not flat, so that the top-quantile threshold of the dissection falls
inside the planted concept and the fired mask grows from its most typical
pixels outwards:

- a *colour unit* per colour name: ``exp(-d^2 / s^2)`` with ``d`` the distance
  of the pixel's RGB (in [0, 1]) to the generator's RGB of that colour
  (``data_prep.synthetic_broden.COLORS``);
- a *stripe unit* (texture ``striped``), rotation invariant: the coherence
  ``sqrt((Jxx - Jyy)^2 + 4 Jxy^2) / (Jxx + Jyy + floor)`` of the local colour
  structure tensor J (Sobel gradients of the lightly blurred image, summed over
  RGB, smoothed by a Gaussian window wider than a stripe period), passed through
  a logistic step at ``gate`` and multiplied by a Gaussian centre weighting.
  Stripes are one-dimensional everywhere (coherence >= 0.97 on every striped
  image of the generated set), chequers, grids, dots, zigzags and the scenes'
  photos and object outlines are not (<= 0.88 with the default window). The
  step makes every striped image respond about equally whatever its colours;
  the centre weighting grades the response inside an image, so the top 0.5%
  of cells are the centres of all striped images rather than the whole of the
  few highest-contrast ones (which would make the colours of those few images
  runner-up concepts).

Dissection only uses the ranking of a unit's cells (up to bilinear
interpolation), so the responses' scales are arbitrary; they stay in [0, 1],
where float16 storage is fine.
The model expects RGB in [0, 1]: use ``model.mean=[0,0,0] model.std=[1,1,1]``.
Unit order (``unit_concepts``): the colour units in the order given, then
the stripe unit.
"""

from __future__ import annotations

import math

import numpy as np

import torch
from torch import nn
from torch.nn import functional as F

from data_prep.synthetic_broden import COLORS


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D normalised Gaussian of standard deviation sigma (pixels), radius 3 sigma."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _blur(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) maps, padded by reflection (replication for small maps)."""
    channels = maps.shape[1]
    radius = (len(kernel) - 1) // 2
    mode = "reflect" if radius < min(maps.shape[-2:]) else "replicate"
    k = kernel.to(maps)
    horizontal = k.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = k.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    maps = F.conv2d(F.pad(maps, (radius, radius, 0, 0), mode=mode), horizontal, groups=channels)
    return F.conv2d(F.pad(maps, (0, 0, radius, radius), mode=mode), vertical, groups=channels)


class PlantedDetectors(nn.Module):
    """Colour units and a stripe-texture unit; record the layer ``units`` (output (N, U, S/stride, S/stride)).

    Args:
        colors: colour label names of the generated set, one colour unit each.
        color_scale: ``s`` of the colour units, in RGB units of [0, 1].
        stripes: whether to add the stripe unit (last).
        stride: average-pooling stride from pixels to the unit maps.
        presmooth: standard deviation (pixels) of a Gaussian blur before the Sobel
            gradients, which takes the generator's pixel noise out of the structure tensor.
        window: standard deviation of the structure-tensor window, in map cells.
        energy_floor: added to the tensor's trace in the coherence's denominator, so that
            flat regions (no edges) have coherence near 0.
        gate: coherence at which the stripe response is half on (a logistic step).
        gate_width: width of that step.
        centre_sigma: standard deviation, in image sizes, of the Gaussian centre weighting
            of the stripe response.
    """

    def __init__(self, colors: tuple[str, ...] | list[str] = ("red-c", "yellow-c"), color_scale: float = 0.15,
                 stripes: bool = True, stride: int = 4, presmooth: float = 3.0, window: float = 12.0,
                 energy_floor: float = 1e-5, gate: float = 0.93, gate_width: float = 0.01,
                 centre_sigma: float = 0.35) -> None:
        super().__init__()
        unknown = [name for name in colors if name not in COLORS]
        if unknown:
            raise ValueError(f"unknown colour(s) {unknown}; allowed: {list(COLORS)}")
        self.color_names = list(colors)
        self.register_buffer("color_rgb", torch.tensor([COLORS[name] for name in colors], dtype=torch.float32) / 255)
        self.color_scale = float(color_scale)
        self.stripes = bool(stripes)
        self.stride = int(stride)
        self.energy_floor = float(energy_floor)
        self.gate = float(gate)
        self.gate_width = float(gate_width)
        self.centre_sigma = float(centre_sigma)
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
        self.register_buffer("sobel", torch.stack([sobel, sobel.T])[:, None])  # (2, 1, 3, 3): d/dx, d/dy
        self.register_buffer("presmooth", _gaussian_kernel(presmooth))
        self.register_buffer("window", _gaussian_kernel(window))
        self.units = nn.Identity()

    @property
    def unit_concepts(self) -> list[str]:
        """The planted concept of each unit, in unit order."""
        return self.color_names + (["striped"] if self.stripes else [])

    def color_responses(self, rgb: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 1] -> (N, C, H, W) per-pixel closeness exp(-d^2 / s^2) to each colour."""
        diff = rgb[:, None] - self.color_rgb.to(rgb)[None, :, :, None, None]
        return torch.exp(-diff.pow(2).sum(dim=2) / self.color_scale**2)

    def coherence(self, rgb: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 1] -> (N, H/stride, W/stride) coherence of the smoothed colour structure tensor."""
        n, c, h, w = rgb.shape
        smooth = _blur(rgb, self.presmooth)
        padded = F.pad(smooth.reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="reflect")
        grad = F.conv2d(padded, self.sobel.to(rgb)).reshape(n, c, 2, h, w)
        gx, gy = grad[:, :, 0], grad[:, :, 1]
        tensor = torch.stack([(gx * gx).sum(1), (gy * gy).sum(1), (gx * gy).sum(1)], dim=1)  # (N, 3, H, W)
        tensor = _blur(F.avg_pool2d(tensor, self.stride), self.window)
        jxx, jyy, jxy = tensor[:, 0], tensor[:, 1], tensor[:, 2]
        return torch.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy + self.energy_floor)

    def stripe_response(self, rgb: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 1] -> (N, 1, H/stride, W/stride): coherence step x centre weighting."""
        coherence = self.coherence(rgb)
        h, w = coherence.shape[-2:]
        y = (torch.arange(h, dtype=rgb.dtype, device=rgb.device) + 0.5) / h - 0.5
        x = (torch.arange(w, dtype=rgb.dtype, device=rgb.device) + 0.5) / w - 0.5
        centre = torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * self.centre_sigma**2))
        return (torch.sigmoid((coherence - self.gate) / self.gate_width) * centre)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 1] -> (N, U, H/stride, W/stride) unit maps (recorded at ``units``)."""
        x = x.float()
        maps = [F.avg_pool2d(self.color_responses(x), self.stride)]
        if self.stripes:
            maps.append(self.stripe_response(x))
        return self.units(torch.cat(maps, dim=1))


class PlantedRedClassifier(nn.Module):
    """A two-class classifier whose class 0 depends only on red regions: the planted truth of the explainers.

    Logit 0 is ``gain x (mean red-unit response - offset)`` (the red colour
    unit of ``PlantedDetectors`` at stride 1, averaged over the image), logit 1
    is 0, so the class-0 probability is ``sigmoid(logit 0)``. Blacking out a
    red pixel lowers logit 0 in proportion to its red response; no other pixel
    moves it. Expects RGB in [0, 1] (``model.mean=[0,0,0] model.std=[1,1,1]``).
    """

    def __init__(self, gain: float = 40.0, offset: float = 0.05) -> None:
        super().__init__()
        self.detectors = PlantedDetectors(colors=("red-c",), stripes=False, stride=1)
        self.gain = float(gain)
        self.offset = float(offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) RGB in [0, 1] -> (N, 2) logits."""
        red = self.detectors(x)[:, 0].mean(dim=(1, 2))
        return torch.stack([self.gain * (red - self.offset), torch.zeros_like(red)], dim=1)


def red_region_images(n: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, S, S, 3) uint8 images of non-red rectangles with one red disc each (about 15-22% of the pixels),
    and the (n, S, S) bool masks of the discs (the generator's red, ``COLORS['red-c']``, with pixel noise)."""
    rng = np.random.default_rng(seed)
    palette = np.array([(40, 160, 50), (30, 70, 210), (128, 128, 128), (240, 220, 40), (240, 240, 240)])
    red = np.array(COLORS["red-c"])
    yy, xx = np.mgrid[:size, :size]
    images, masks = [], []
    for _ in range(n):
        image = np.broadcast_to(palette[rng.integers(len(palette))], (size, size, 3)).astype(np.float64)
        for _ in range(4):
            top, left = rng.integers(0, size - 8, 2)
            image[top:top + rng.integers(8, 32), left:left + rng.integers(8, 32)] = palette[rng.integers(len(palette))]
        radius = size * rng.uniform(0.22, 0.26)
        cy, cx = rng.uniform(radius, size - radius, 2)
        disc = (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= radius**2
        image[disc] = red
        images.append(np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8))
        masks.append(disc)
    return np.stack(images), np.stack(masks)
