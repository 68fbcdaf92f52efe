"""Binary explanation masks, their Jaccard index, and overlay pictures of two masks."""

from __future__ import annotations

import numpy as np
from PIL import Image


def top_share_mask(values: np.ndarray, share: float) -> np.ndarray:
    """(H, W) map -> (H, W) bool: its ``round(share * H * W)`` (at least 1) highest pixels by value.

    Ties are broken towards the lower flat pixel index (row-major), so the
    mask has exactly that many pixels whatever the map's ties. A signed map is
    ranked by its signed value: the pixels that speak most *for* the target.
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    keep = max(1, int(round(share * flat.size)))
    order = np.argsort(-flat, kind="stable")
    mask = np.zeros(flat.size, dtype=bool)
    mask[order[:keep]] = True
    return mask.reshape(np.shape(values))


def top_segments_mask(values: np.ndarray, segments: np.ndarray, count: int) -> np.ndarray:
    """(H, W) map constant on each segment, (H, W) int labels -> (H, W) bool: the ``count`` segments of highest value.

    A segment's value is the mean of the map over it (LIME's coefficient);
    ties go to the lower label.
    """
    labels, inverse = np.unique(segments, return_inverse=True)
    sums = np.bincount(inverse.ravel(), weights=np.asarray(values, dtype=np.float64).ravel())
    means = sums / np.bincount(inverse.ravel())
    chosen = np.argsort(-means, kind="stable")[:count]
    return np.isin(inverse.reshape(segments.shape), chosen)


def jaccard(first: np.ndarray, second: np.ndarray) -> float:
    """|A and B| / |A or B| of two (H, W) bool masks; nan when both are empty (undefined)."""
    union = np.logical_or(first, second).sum()
    return float(np.logical_and(first, second).sum() / union) if union else float("nan")


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """(h, w) bool -> (size, size) bool by nearest neighbour (masks of two models with other input sizes)."""
    if mask.shape == (size, size):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127


#: Overlay colours: A only, B only, both (RGB).
OVERLAY_COLOURS = {"a": (230, 30, 30), "b": (30, 200, 30), "both": (250, 220, 0)}


def overlay(image: np.ndarray, first: np.ndarray, second: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """(H, W, 3) uint8 image, (H, W) bool masks A and B -> (H, W, 3) uint8: A red, B green, both yellow.

    The image is shown dimmed to half its brightness under the colours and as it is elsewhere.
    """
    out = image.astype(np.float32)
    for key, where in (("a", first & ~second), ("b", second & ~first), ("both", first & second)):
        out[where] = (1 - alpha) * 0.5 * out[where] + alpha * np.array(OVERLAY_COLOURS[key], np.float32)
    return out.round().clip(0, 255).astype(np.uint8)
