"""Deterministic occlusion explainers of a class score: grid, statistical, two-level and elbow.

Each one blacks out square cells of the image (pixel value 0: the black
baseline of the attribute stage), measures the drop of the explained score
(the class logit) per cell, and keeps the cells that matter:

- ``grid``: ``grid_cells`` x ``grid_cells`` cells of side about
  max(H, W) / grid_cells (the model's inputs are square), each blacked out
  once, all in one batched pass (1 + cells images); cells ranked by their
  drop; the mask keeps the top ``grid_keep`` cells (a count, or a share of
  the cells);
- ``statistical``: the same cells; keeps those whose drop exceeds
  mean + ``statistical_lambda`` x std of the drops;
- ``two_level``: a 3 x 3 split first; the coarse cells whose drop is positive
  and above the mean of the nine are split 3 x 3 again and their sub-cells
  blacked out; keeps the sub-cells whose drop is positive and above the mean
  of the sub-cells' drops (1 + 9 + 9 x kept coarse cells images, against
  1 + 100 for the grid);
- ``elbow``: the grid's drops sorted in decreasing order; keeps the cells
  before the knee, the point of the sorted curve farthest below the chord
  from its first to its last point (Satopaa et al. 2011's "Kneedle" for a
  decreasing convex curve), at least one.

Every explainer is deterministic (no random draw; ties broken by cell order),
returns a binary mask, a heat map (each pixel: the drop of the finest cell
that covers it; for two-level's coarse cells not split again, their drop / 9,
a drop per sub-cell) and counts its model calls (images through the model).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from dissect.probe import Preprocessing
from dissect.stages.attribute.model import PreparedModel

#: The deterministic explainers, in the order of the tables.
EXPLAINERS = ("grid", "statistical", "two_level", "elbow")

Box = tuple[int, int, int, int]  # top, left, bottom, right (exclusive)


@dataclass
class Scorer:
    """The explained class scores of a model on uint8 images, counting the images it is called on."""

    model: PreparedModel
    preprocessing: Preprocessing
    device: torch.device
    batch_size: int
    calls: int = 0

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 -> (N, T) float32 outputs on the CPU, ``batch_size`` images per forward pass."""
        out = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = self.preprocessing.normalise(images[start:start + self.batch_size].to(self.device))
                out.append(self.model(batch.contiguous(memory_format=torch.channels_last)).float().cpu())
        self.calls += len(images)
        return torch.cat(out)

    def scores(self, images: torch.Tensor, target: int) -> np.ndarray:
        """(N, 3, S, S) uint8 -> (N,) float64 logits of class ``target``."""
        return self.logits(images)[:, target].double().numpy()


@dataclass(frozen=True)
class Explanation:
    """One explainer on one image: (S, S) bool ``mask``, (S, S) float32 ``heat``, model ``calls``, ``seconds``.

    ``cells`` are the boxes it scored, ``drops`` (cells,) their drops, ``kept`` the indices of the kept cells.
    """

    mask: np.ndarray
    heat: np.ndarray
    calls: int
    seconds: float
    cells: tuple[Box, ...]
    drops: np.ndarray
    kept: tuple[int, ...]


def split_boxes(box: Box, parts: int) -> list[Box]:
    """A box cut into ``parts`` x ``parts`` boxes (row-major), as equal as integers allow."""
    top, left, bottom, right = box
    rows = np.linspace(top, bottom, parts + 1).round().astype(int)
    columns = np.linspace(left, right, parts + 1).round().astype(int)
    return [(int(rows[i]), int(columns[j]), int(rows[i + 1]), int(columns[j + 1]))
            for i in range(parts) for j in range(parts) if rows[i + 1] > rows[i] and columns[j + 1] > columns[j]]


def grid_boxes(height: int, width: int, cells: int) -> list[Box]:
    """The image cut into ``cells`` x ``cells`` cells (row-major) of side about max(H, W) / cells (square images)."""
    return split_boxes((0, 0, height, width), cells)


def occlusion_drops(scorer: Scorer, image: torch.Tensor, target: int, boxes: list[Box],
                    original: float | None = None) -> tuple[np.ndarray, float]:
    """(3, S, S) uint8 image -> ((len(boxes),) score drops with each box blacked out, the unoccluded score).

    One batched pass of the occluded copies (and of the image, unless its ``original`` score is given).
    """
    copies = image[None].repeat(len(boxes), 1, 1, 1)
    for k, (top, left, bottom, right) in enumerate(boxes):
        copies[k, :, top:bottom, left:right] = 0
    if original is None:
        values = scorer.scores(torch.cat([image[None], copies]), target)
        original, occluded = float(values[0]), values[1:]
    else:
        occluded = scorer.scores(copies, target)
    return original - occluded, original


def boxes_mask(shape: tuple[int, int], boxes: list[Box], values: np.ndarray | None = None) -> np.ndarray:
    """(H, W) bool union of ``boxes``, or with ``values`` (len(boxes),) each box filled with its value (float32)."""
    out = np.zeros(shape, dtype=bool if values is None else np.float32)
    for k, (top, left, bottom, right) in enumerate(boxes):
        out[top:bottom, left:right] = True if values is None else values[k]
    return out


def keep_count(keep: int | float, cells: int) -> int:
    """``grid_keep`` as a number of cells: an int is a count, a float in (0, 1) a share (at least 1 cell)."""
    return min(cells, int(keep)) if isinstance(keep, int) else max(1, int(round(keep * cells)))


def ranking(drops: np.ndarray) -> np.ndarray:
    """(n,) drops -> cell indices by decreasing drop (ties: lower index first)."""
    return np.argsort(-drops, kind="stable")


def knee(sorted_drops: np.ndarray) -> int:
    """Cells kept by the elbow rule: the index of the point farthest below the chord of the decreasing curve (>= 1)."""
    n = len(sorted_drops)
    if n < 3:
        return 1
    chord = np.linspace(sorted_drops[0], sorted_drops[-1], n)
    return max(1, int(np.argmax(chord - sorted_drops)))


def _finish(image: torch.Tensor, boxes: list[Box], drops: np.ndarray, kept: list[int], calls: int,
            started: float, heat_values: np.ndarray | None = None) -> Explanation:
    """The Explanation of kept ``boxes`` of an image (3, S, S)."""
    shape = tuple(image.shape[1:])
    kept = sorted(int(k) for k in kept)
    return Explanation(boxes_mask(shape, [boxes[k] for k in kept]),
                       boxes_mask(shape, boxes, drops if heat_values is None else heat_values), calls,
                       time.perf_counter() - started, tuple(boxes), drops, tuple(kept))


def grid_explainer(scorer: Scorer, image: torch.Tensor, target: int, cells: int, keep: int | float,
                   statistical_lambda: float) -> Explanation:
    """The grid explainer (top ``keep`` cells by drop) on one (3, S, S) uint8 image."""
    started, calls = time.perf_counter(), scorer.calls
    boxes = grid_boxes(image.shape[1], image.shape[2], cells)
    drops, _ = occlusion_drops(scorer, image, target, boxes)
    return _finish(image, boxes, drops, list(ranking(drops)[:keep_count(keep, len(boxes))]), scorer.calls - calls,
                   started)


def statistical_explainer(scorer: Scorer, image: torch.Tensor, target: int, cells: int, keep: int | float,
                          statistical_lambda: float) -> Explanation:
    """The statistical explainer (cells whose drop > mean + lambda std of the drops) on one image."""
    started, calls = time.perf_counter(), scorer.calls
    boxes = grid_boxes(image.shape[1], image.shape[2], cells)
    drops, _ = occlusion_drops(scorer, image, target, boxes)
    threshold = drops.mean() + statistical_lambda * drops.std()
    return _finish(image, boxes, drops, list(np.flatnonzero(drops > threshold)), scorer.calls - calls, started)


def elbow_explainer(scorer: Scorer, image: torch.Tensor, target: int, cells: int, keep: int | float,
                    statistical_lambda: float) -> Explanation:
    """The elbow explainer (cells before the knee of the sorted drops) on one image."""
    started, calls = time.perf_counter(), scorer.calls
    boxes = grid_boxes(image.shape[1], image.shape[2], cells)
    drops, _ = occlusion_drops(scorer, image, target, boxes)
    order = ranking(drops)
    return _finish(image, boxes, drops, list(order[:knee(drops[order])]), scorer.calls - calls, started)


def above_mean(drops: np.ndarray) -> np.ndarray:
    """Indices of the drops that are positive and above the mean of ``drops``."""
    return np.flatnonzero((drops > drops.mean()) & (drops > 0))


def two_level_explainer(scorer: Scorer, image: torch.Tensor, target: int, cells: int, keep: int | float,
                        statistical_lambda: float) -> Explanation:
    """The two-level explainer (3 x 3 cells, the important ones split 3 x 3 again) on one image."""
    started, calls = time.perf_counter(), scorer.calls
    coarse = split_boxes((0, 0, image.shape[1], image.shape[2]), 3)
    coarse_drops, original = occlusion_drops(scorer, image, target, coarse)
    important = above_mean(coarse_drops)
    boxes, drops, heat = [], [], []
    for k, box in enumerate(coarse):
        if k in important:
            continue
        boxes.append(box)
        drops.append(coarse_drops[k])
        heat.append(coarse_drops[k] / 9)
    fine = [sub for k in important for sub in split_boxes(coarse[k], 3)]
    fine_drops = occlusion_drops(scorer, image, target, fine, original)[0] if fine else np.zeros(0)
    kept = [len(boxes) + k for k in above_mean(fine_drops)] if fine else []
    boxes += fine
    all_drops = np.array([*drops, *fine_drops])
    return _finish(image, boxes, all_drops, kept, scorer.calls - calls, started, np.array([*heat, *fine_drops]))


#: Each explainer's function: (scorer, image, target, grid_cells, grid_keep, statistical_lambda) -> Explanation.
EXPLAINER_FUNCTIONS: dict[str, Callable[..., Explanation]] = {
    "grid": grid_explainer, "statistical": statistical_explainer, "two_level": two_level_explainer,
    "elbow": elbow_explainer}
