"""Deletion and insertion curves (Petsiuk et al. 2018) of a map, and their areas.

Pixels are taken in the order of the map (highest value first; ties to the
lower flat index). *Deletion* starts from the image and blacks out (pixel
value 0) the first ``k / steps`` of them at step k; *insertion* starts from a
blurred copy of the image and puts back the first ``k / steps`` of the
original pixels. After each step, k = 0..steps, the score is the softmax
probability of the explained class. The area under each curve is the
trapezoid rule over the removed (revealed) fraction in [0, 1]. A faithful map
makes the class probability fall fast under deletion (low AUC) and rise fast
under insertion (high AUC); a random map of the same image is the yardstick.
Quantus is not used: its pixel-flipping and region-perturbation metrics
delete only (no insertion curve, no blurred canvas) and bring in OpenCV; the
two curves are these few lines.
"""

from __future__ import annotations

import numpy as np
import torch

from dissect.stages.explanations.occlusion import Scorer


def pixel_order(values: np.ndarray) -> np.ndarray:
    """(H, W) map -> (H * W,) flat pixel indices by decreasing value, ties to the lower index."""
    return np.argsort(-np.asarray(values, dtype=np.float64).ravel(), kind="stable")


def curve_images(image: torch.Tensor, canvas: torch.Tensor, order: np.ndarray, steps: int) -> torch.Tensor:
    """(3, S, S) uint8 ``image`` and ``canvas`` -> (steps + 1, 3, S, S): step k has the first k/steps of ``order``
    copied from ``image`` onto ``canvas``.

    Deletion is ``curve_images(black, image, ...)`` (the image's pixels replaced by black's), insertion
    ``curve_images(image, blurred, ...)``.
    """
    channels, height, width = image.shape
    counts = np.round(np.linspace(0, height * width, steps + 1)).astype(int)
    flat_image, flat_canvas = image.reshape(channels, -1), canvas.reshape(channels, -1)
    frames = flat_canvas[None].repeat(steps + 1, 1, 1)
    for k, count in enumerate(counts):
        chosen = torch.from_numpy(order[:count])
        frames[k][:, chosen] = flat_image[:, chosen]
    return frames.reshape(steps + 1, channels, height, width)


def probabilities(scorer: Scorer, frames: torch.Tensor, target: int) -> np.ndarray:
    """(n, 3, S, S) uint8 -> (n,) softmax probability of class ``target``."""
    return torch.softmax(scorer.logits(frames).double(), dim=1)[:, target].numpy()


def auc(scores: np.ndarray) -> float:
    """Area under a curve sampled at ``len(scores)`` equally spaced fractions of [0, 1] (trapezoid rule)."""
    return float(np.trapezoid(scores, np.linspace(0.0, 1.0, len(scores))))


def deletion_insertion(scorer: Scorer, image: torch.Tensor, blurred: torch.Tensor, values: np.ndarray, target: int,
                       steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(3, S, S) uint8 image and its blurred copy, (S, S) map -> ((steps + 1,) deletion, (steps + 1,) insertion)
    probabilities of class ``target``."""
    order = pixel_order(values)
    deletion = probabilities(scorer, curve_images(torch.zeros_like(image), image, order, steps), target)
    insertion = probabilities(scorer, curve_images(image, blurred, order, steps), target)
    return deletion, insertion
