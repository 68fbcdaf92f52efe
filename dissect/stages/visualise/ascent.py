"""Activation maximisation: gradient ascent on the input, weights frozen, many targets in one batch.

``synthesise`` optimises one image per batch row, each for its own target and
from its own seed. Rows never interact: the model is in eval mode (batch
normalisation uses its running statistics), each row draws its initial image
and its random transforms from its own generator, Adam and the pixel steps act
element by element and normalise per row. The kernels must not depend on the
batch size either, and on the CPU they do three ways: oneDNN's convolutions,
NNPACK's (which PyTorch takes for batches of 16 and more), and any kernel run
on several threads, which splits a batch of one inside its matrix products but
a larger batch across its rows (a row's gradient changes in its last bits with
the batch, and 128 Adam steps, whose first steps move by lr x sign(gradient),
turn that into images that differ visibly). So with ``batch_invariant`` the
passes run on the CPU with oneDNN and NNPACK off and one thread (PyTorch's own
convolutions, row by row; the cores are used by running batches on several
dask workers, ``cluster.processes=true``), and with deterministic cuDNN on a
GPU (where batch invariance is not measured here). Then a batched run gives each row exactly what a run of that row alone
gives on the CPU (tests/test_visualise.py; benchmarks/visualise.py measures
the cost).

The objective *reached* is measured on the final image without transforms, at
the model's input size, so that it compares with the unit's activations on the
probe images. With ``redirect_relu`` the ReLUs pass gradients to rows stuck
where they are off (``relu_redirect``). A row whose objective had an all-zero
input gradient at every step
(a dead unit: nothing in the input drives it) is reported as flat.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dissect.settings import VisualiseSettings
from dissect.stages.attribute.model import PreparedModel
from dissect.stages.visualise.images import FourierImage, PixelImage, random_transforms, row_generators
from dissect.stages.visualise.objectives import Target, objective
from dissect.stages.visualise.relu_redirect import RedirectedReLUs


@dataclass(frozen=True)
class Normalisation:
    """The model's input normalisation: (x - mean) / std of RGB in [0, 1]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) RGB in [0, 1] -> normalised, differentiably."""
        mean = torch.tensor(self.mean, device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
        return (rgb - mean) / std


@dataclass(frozen=True)
class Synthesised:
    """One batch's results: ``images`` (B, S, S, 3) uint8, objective ``initial`` and ``reached`` (B,),
    ``max_gradient`` (B,) the largest |gradient| seen, ``flat`` (B,) bool (that gradient is 0), ``image_std`` (B,)
    the pixel standard deviation of each image in [0, 1], ``seconds`` of the whole batch."""

    images: np.ndarray
    initial: np.ndarray
    reached: np.ndarray
    max_gradient: np.ndarray
    flat: np.ndarray
    image_std: np.ndarray
    seconds: float


@contextlib.contextmanager
def batch_invariant_kernels(device: torch.device, enabled: bool) -> Iterator[None]:
    """Within: convolutions whose results for a row do not depend on the batch (module docstring)."""
    if not enabled:
        yield
    elif device.type == "cuda":
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
            yield
    else:
        flags, threads = contextlib.ExitStack(), torch.get_num_threads()
        with _without_tf32_warning():
            flags.enter_context(torch.backends.mkldnn.flags(enabled=False))
            flags.enter_context(torch.backends.nnpack.flags(enabled=False))
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            with _without_tf32_warning():
                flags.close()


@contextlib.contextmanager
def _without_tf32_warning() -> Iterator[None]:
    """Silence the UserWarning torch gives about TF32 on Intel GPUs whenever oneDNN's flags are set."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN", category=UserWarning)
        yield


def synthesise(model: PreparedModel, targets: list[Target], seeds: list[int], settings: VisualiseSettings,
               normalise: Normalisation, input_size: int, device: torch.device) -> Synthesised:
    """Optimise one image per (target, seed) row for ``settings.steps`` steps (module docstring)."""
    with batch_invariant_kernels(device, settings.batch_invariant):
        return _synthesise(model, targets, seeds, settings, normalise, input_size, device)


def _synthesise(model: PreparedModel, targets: list[Target], seeds: list[int], settings: VisualiseSettings,
                normalise: Normalisation, input_size: int, device: torch.device) -> Synthesised:
    started = time.perf_counter()
    generators = row_generators(seeds)
    image: FourierImage | PixelImage
    if settings.param == "fourier":
        image = FourierImage(generators, settings.fourier, device)
    else:
        image = PixelImage(generators, input_size, device)
    optimiser = torch.optim.Adam(image.parameters(),
                                 lr=settings.fourier.lr if settings.param == "fourier" else settings.pixel.lr)
    initial = _measure(model, image, targets, settings, normalise, input_size)
    max_gradient = torch.zeros(len(targets), device=device)
    for step in range(settings.steps):
        rgb = image.image()
        if settings.param == "fourier":
            rgb = random_transforms(rgb, generators, settings.fourier, input_size)
        with RedirectedReLUs() if settings.redirect_relu else contextlib.nullcontext():
            values = objective(model, normalise(rgb).contiguous(memory_format=torch.channels_last), targets,
                               settings.objective)
        (parameter,) = image.parameters()
        parameter.grad = None
        (-values.sum()).backward()
        max_gradient = torch.maximum(max_gradient, parameter.grad.abs().flatten(1).amax(1))
        optimiser.step()
        if isinstance(image, PixelImage):
            image.regularise(step, parameter.grad, settings.pixel)
    final = _final_rgb(image, input_size)
    reached = _measure(model, image, targets, settings, normalise, input_size)
    pixels = final.detach().cpu()
    images = (pixels.permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    gradient = max_gradient.cpu().numpy()
    return Synthesised(images, initial, reached, gradient, gradient == 0, pixels.flatten(1).std(1).numpy(),
                       time.perf_counter() - started)


def _final_rgb(image: FourierImage | PixelImage, input_size: int) -> torch.Tensor:
    """(B, 3, S, S) the image without transforms at the model's input size."""
    rgb = image.image()
    if rgb.shape[-1] != input_size:
        rgb = torch.nn.functional.interpolate(rgb, size=(input_size, input_size), mode="bilinear",
                                              align_corners=False)
    return rgb


@torch.no_grad()
def _measure(model: PreparedModel, image: FourierImage | PixelImage, targets: list[Target],
             settings: VisualiseSettings, normalise: Normalisation, input_size: int) -> np.ndarray:
    """(B,) objective of the current images without transforms, at the input size."""
    rgb = _final_rgb(image, input_size)
    return objective(model, normalise(rgb).contiguous(memory_format=torch.channels_last), targets,
                     settings.objective).cpu().numpy()
