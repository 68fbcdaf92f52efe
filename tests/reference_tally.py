"""Independent tallies, written the way the older tools do it: one image and one unit at a time.

Per image and unit: resize the map to the mask size, threshold it, and
``numpy.bincount`` the label numbers under the mask (each (pixel, label) pair
counted once). Two resizes:

- ``reference_counts``: ``torch.nn.functional.interpolate`` (bilinear,
  align_corners=False), every unit; ``tests/test_tally_reference.py`` and
  ``benchmarks/tally.py`` hold the stage's counts equal to these;
- ``lite_counts``: NetDissect-Lite's way, PIL's bilinear resize of the float32
  map (``Image.fromarray(map, mode="F").resize((w, h), Image.BILINEAR)``), which
  rounds differently at the threshold; a unit whose stored map maximum is at or
  below T is skipped (PIL's weights are convex, so it cannot fire), which makes
  it faster than Lite itself. ``benchmarks/tally.py`` times the stage against it
  and compares the IoU.

Neither shares code with ``dissect.stages.tally`` or ``dissect.upsample``.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from PIL import Image

from dissect.broden import CATEGORIES, IMAGE_CATEGORIES, PIXEL_CATEGORIES, BrodenDataset


def torch_resize(unit_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) float32 -> (size) float32 with ``torch.nn.functional.interpolate`` (bilinear, align_corners=False)."""
    return F.interpolate(torch.from_numpy(unit_map)[None, None], size=size, mode="bilinear",
                         align_corners=False)[0, 0].numpy()


def pil_resize(unit_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) float32 -> (size) float32 with PIL's bilinear resize, as NetDissect-Lite."""
    return np.asarray(Image.fromarray(unit_map, mode="F").resize((size[1], size[0]), Image.BILINEAR))


def reference_counts(store_path: Path, broden_root: Path, layers: list[str], thresholds: dict[str, np.ndarray],
                     lite: bool = False) -> dict[str, np.ndarray]:
    """The counts of the tally, one image and one unit at a time: every unit resized with ``torch_resize``,
    or with ``lite`` the units whose stored map maximum exceeds T, with ``pil_resize``.

    Returns ``truth`` (L+1,), ``intersection/<layer>`` (U, L+1) and
    ``activation/<layer>`` (U, n_categories), int64, keyed as ``tally_block``'s result.
    """
    broden = BrodenDataset(broden_root)
    n_labels = len(broden.labels)
    store = zarr.open_group(str(store_path), mode="r")
    maps = {layer: store[layer]["maps"][:] for layer in layers}
    maxima = {layer: store[layer]["maxima"][:] for layer in layers}
    resize = pil_resize if lite else torch_resize
    counts = {"truth": np.zeros(n_labels + 1, dtype=np.int64)}
    for layer in layers:
        counts[f"intersection/{layer}"] = np.zeros((maps[layer].shape[1], n_labels + 1), dtype=np.int64)
        counts[f"activation/{layer}"] = np.zeros((maps[layer].shape[1], len(CATEGORIES)), dtype=np.int64)
    for i in range(len(broden)):
        size = broden.mask_size(i)
        stacked = np.concatenate([broden.pixel_labels(i, c).reshape(-1, size[0] * size[1]) for c in PIXEL_CATEGORIES])
        pixel, mask_layer = np.nonzero(stacked.T)  # the labelled (pixel, mask layer) positions
        pairs = np.sort(pixel * (n_labels + 1) + stacked.T[pixel, mask_layer])
        pairs = pairs[np.r_[True, pairs[1:] != pairs[:-1]]]  # each (pixel, label) once
        pixel, label = pairs // (n_labels + 1), pairs % (n_labels + 1)
        slot = np.arange(len(pixel)) - np.searchsorted(pixel, pixel)  # the pair's rank among its pixel's pairs
        labels_at = np.zeros((size[0] * size[1], slot.max(initial=-1) + 1), dtype=np.int64)  # (P, S), 0-padded
        labels_at[pixel, slot] = label
        whole = [n for c in IMAGE_CATEGORIES for n in broden.image_labels(i, c)]
        annotated = [k for k, c in enumerate(CATEGORIES) if broden.has_category(i, c)]
        counts["truth"] += np.bincount(label, minlength=n_labels + 1)
        counts["truth"][whole] += size[0] * size[1]
        for layer in layers:
            units = np.flatnonzero(maxima[layer][i] > thresholds[layer]) if lite else range(len(maps[layer][i]))
            for unit in units:
                fired = (resize(maps[layer][i, unit].astype(np.float32), size) > thresholds[layer][unit]).ravel()
                under = labels_at[np.flatnonzero(fired)].ravel()
                counts[f"intersection/{layer}"][unit] += np.bincount(under[under > 0], minlength=n_labels + 1)
                counts[f"intersection/{layer}"][unit, whole] += fired.sum()
                counts[f"activation/{layer}"][unit, annotated] += fired.sum()
    return counts


def lite_counts(store_path: Path, broden_root: Path, layers: list[str],
                thresholds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``reference_counts`` the NetDissect-Lite way (``lite=True``)."""
    return reference_counts(store_path, broden_root, layers, thresholds, lite=True)


def reference_iou(counts: dict[str, np.ndarray], layer: str, label_categories: np.ndarray) -> np.ndarray:
    """(U, L) IoU = I / (A[category of the label] + T - I), 0 where the union is empty, from ``reference_counts``."""
    intersection = counts[f"intersection/{layer}"][:, 1:].astype(np.float64)
    union = counts[f"activation/{layer}"][:, label_categories] + counts["truth"][None, 1:] - intersection
    iou = np.zeros_like(intersection)
    np.divide(intersection, union, out=iou, where=union > 0)
    return iou
