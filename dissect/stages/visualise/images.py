"""The synthesised images: how they are parameterised, regularised and randomly transformed at each step.

Two parameterisations, one batch row per optimised image, every row with its
own random generator (so a row's result does not depend on the other rows):

- ``FourierImage`` (Olah et al. 2017, after Lucid): the parameters are the
  real FFT coefficients (B, 3, h, w//2+1) of an image in a decorrelated colour
  space, scaled by 1 / frequency**decay_power so that every frequency learns at
  a comparable rate; the inverse FFT is mapped to RGB by the square root of the
  colour covariance of natural images and squashed into [0, 1] by a sigmoid.
  The image is made at ``size`` pixels and resized to the model's input. At
  every step it goes through ``random_transforms`` (pad, jitter, scale, rotate),
  so the optimisation cannot exploit single pixels.
- ``PixelImage`` (Yosinski et al. 2015): the parameters are RGB offsets from
  mid-grey at the model's input size; after each step the offsets decay (L2),
  are blurred every few steps, and the pixels of smallest norm and smallest
  contribution |x * grad| are reset to grey. The steps are Adam's (element by
  element, so every pixel moves at a rate of ``lr`` whatever the scale of the
  model's gradients), the regularisers applied after each.

Images are (B, 3, S, S) RGB in [0, 1]; the model's normalisation is applied by
the caller.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from dissect.settings import FourierSettings, PixelSettings

#: The square root of the colour covariance of natural images (ImageNet), as a 3 x 3 RGB matrix; Lucid's constant.
COLOR_CORRELATION_SQRT = torch.tensor([[0.26, 0.09, 0.02],
                                       [0.27, 0.00, -0.05],
                                       [0.27, -0.09, 0.03]])
#: Lucid divides the inverse FFT by this so that a unit-variance spectrum gives pixel values of order 1.
FOURIER_SCALE = 4.0


def row_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per batch row, seeded with that row's seed."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, C, H, W) images blurred by a separable Gaussian of ``sigma`` pixels (reflect padding)."""
    if sigma <= 0:
        return images
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    mode = "reflect" if radius < min(images.shape[-2:]) else "replicate"
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    images = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode=mode), horizontal, groups=channels)
    return F.conv2d(F.pad(images, (0, 0, radius, radius), mode=mode), vertical, groups=channels)


def random_transforms(images: torch.Tensor, generators: list[torch.Generator], settings: FourierSettings,
                      out_size: int) -> torch.Tensor:
    """(B, 3, s, s) -> (B, 3, out_size, out_size): pad with grey, jitter, scale and rotate, jitter again, resize.

    Each row draws its offsets, scale and angle from its own generator. The
    scale is uniform in [1 - scale_range, 1 + scale_range], the angle in
    [-rotate_degrees, rotate_degrees]; the jitters are random crops of up to
    ``jitter`` and ``jitter // 2`` pixels.
    """
    if settings.pad:
        images = F.pad(images, [settings.pad] * 4, mode="constant", value=0.5)
    images = _jitter(images, generators, settings.jitter)
    rows = len(images)
    draws = torch.stack([torch.rand(2, generator=g) for g in generators])  # (B, 2) in [0, 1)
    scale = 1 + settings.scale_range * (2 * draws[:, 0] - 1)
    angle = math.radians(settings.rotate_degrees) * (2 * draws[:, 1] - 1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(rows)], 1),
                         torch.stack([sin, cos, torch.zeros(rows)], 1)], 1).to(images)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5
    images = _jitter(images, generators, settings.jitter // 2)
    return F.interpolate(images, size=(out_size, out_size), mode="bilinear", align_corners=False)


def _jitter(images: torch.Tensor, generators: list[torch.Generator], jitter: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H - jitter, W - jitter): each row cropped at its own random offset."""
    if jitter <= 0:
        return images
    size = images.shape[-1] - jitter
    crops = []
    for row, generator in enumerate(generators):
        dy, dx = (int(v) for v in torch.randint(0, jitter + 1, (2,), generator=generator))
        crops.append(images[row, :, dy:dy + size, dx:dx + size])
    return torch.stack(crops)


class FourierImage:
    """B images parameterised by their decorrelated-colour spectrum (module docstring); ``image()`` is (B, 3, s, s)."""

    def __init__(self, generators: list[torch.Generator], settings: FourierSettings, device: torch.device) -> None:
        size = settings.size
        fy = torch.fft.fftfreq(size)[:, None]
        fx = torch.fft.rfftfreq(size)[None, :]
        frequencies = torch.sqrt(fy**2 + fx**2)  # (s, s//2+1), cycles per pixel
        self.scale = (1.0 / torch.clamp(frequencies, min=1.0 / size) ** settings.decay_power).to(device)
        shape = (3, size, size // 2 + 1, 2)
        self.spectrum = torch.stack([torch.randn(shape, generator=g) * settings.init_sd
                                     for g in generators]).to(device).requires_grad_(True)
        correlation = COLOR_CORRELATION_SQRT / COLOR_CORRELATION_SQRT.norm(dim=0).max()
        self.colour = correlation.to(device)
        self.size = size

    def parameters(self) -> list[torch.Tensor]:
        return [self.spectrum]

    def image(self) -> torch.Tensor:
        """(B, 3, s, s) RGB in (0, 1)."""
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        decorrelated = torch.fft.irfft2(spectrum, s=(self.size, self.size), norm="ortho") / FOURIER_SCALE
        rgb = torch.einsum("ij,bjhw->bihw", self.colour, decorrelated)
        return torch.sigmoid(rgb)


class PixelImage:
    """B images as RGB offsets from grey at the model's input size (module docstring); ``image()`` is (B, 3, S, S)."""

    def __init__(self, generators: list[torch.Generator], size: int, device: torch.device) -> None:
        self.offsets = torch.stack([torch.randn((3, size, size), generator=g) * 0.01
                                    for g in generators]).to(device).requires_grad_(True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.offsets]

    def image(self) -> torch.Tensor:
        """(B, 3, S, S) RGB in [0, 1]."""
        return (0.5 + self.offsets).clamp(0, 1)

    @torch.no_grad()
    def regularise(self, step: int, grad: torch.Tensor, settings: PixelSettings) -> None:
        """Yosinski et al. (2015)'s regularisers after step ``step`` of the optimiser, ``grad`` (B, 3, S, S) its
        gradient: L2 decay, a blur every ``blur_every`` steps, weak pixels (norm, contribution |x * grad|) reset."""
        x = self.offsets
        x *= 1 - settings.l2_decay
        if settings.blur_every and (step + 1) % settings.blur_every == 0:
            x.copy_(gaussian_blur(x, settings.blur_sigma))
        if settings.norm_percentile > 0:
            x *= _above_percentile(x.norm(dim=1), settings.norm_percentile)
        if settings.contribution_percentile > 0:
            x *= _above_percentile((x * grad).sum(dim=1).abs(), settings.contribution_percentile)
        x.clamp_(-0.5, 0.5)


def _above_percentile(values: torch.Tensor, percentile: float) -> torch.Tensor:
    """(B, H, W) -> (B, 1, H, W) 1.0 where a pixel's value is at least its row's ``percentile``, else 0.0."""
    cut = torch.quantile(values.flatten(1), percentile / 100, dim=1).view(-1, 1, 1)
    return (values >= cut).to(values.dtype)[:, None]
