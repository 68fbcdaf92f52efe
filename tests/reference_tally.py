"""An independent tally, written the way the older tools do it: one image and one unit at a time.

Per image and unit: resize the map with ``torch.nn.functional.interpolate``
(bilinear, align_corners=False), threshold it, and ``numpy.bincount`` the label
numbers under the mask (each (pixel, label) pair counted once). It shares no
code with ``dissect.stages.tally``; ``tests/test_tally_reference.py`` and
``benchmarks/tally.py`` hold the stage to it.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from dissect.broden import CATEGORIES, IMAGE_CATEGORIES, PIXEL_CATEGORIES, BrodenDataset


def reference_counts(store_path: Path, broden_root: Path, layers: list[str],
                     thresholds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The counts of the tally, one image and one unit at a time.

    Returns ``truth`` (L+1,), ``intersection/<layer>`` (U, L+1) and
    ``activation/<layer>`` (U, n_categories), int64, keyed as ``tally_block``'s result.
    """
    broden = BrodenDataset(broden_root)
    n_labels = len(broden.labels)
    store = zarr.open_group(str(store_path), mode="r")
    maps = {layer: store[layer]["maps"][:] for layer in layers}
    counts = {"truth": np.zeros(n_labels + 1, dtype=np.int64)}
    for layer in layers:
        counts[f"intersection/{layer}"] = np.zeros((maps[layer].shape[1], n_labels + 1), dtype=np.int64)
        counts[f"activation/{layer}"] = np.zeros((maps[layer].shape[1], len(CATEGORIES)), dtype=np.int64)
    for i in range(len(broden)):
        size = broden.mask_size(i)
        stacked = np.concatenate([broden.pixel_labels(i, c).reshape(-1, size[0] * size[1]) for c in PIXEL_CATEGORIES])
        pixel, mask_layer = np.nonzero(stacked.T)  # the labelled (pixel, mask layer) positions
        pairs = np.unique(pixel * (n_labels + 1) + stacked.T[pixel, mask_layer])  # each (pixel, label) once
        pixel, label = pairs // (n_labels + 1), pairs % (n_labels + 1)
        whole = [n for c in IMAGE_CATEGORIES for n in broden.image_labels(i, c)]
        annotated = [k for k, c in enumerate(CATEGORIES) if broden.has_category(i, c)]
        counts["truth"] += np.bincount(label, minlength=n_labels + 1)
        counts["truth"][whole] += size[0] * size[1]
        for layer in layers:
            for unit, unit_map in enumerate(maps[layer][i]):
                resized = F.interpolate(torch.from_numpy(unit_map.astype(np.float32))[None, None], size=size,
                                        mode="bilinear", align_corners=False)[0, 0].numpy()
                fired = (resized > thresholds[layer][unit]).ravel()
                counts[f"intersection/{layer}"][unit] += np.bincount(label[fired[pixel]], minlength=n_labels + 1)
                counts[f"intersection/{layer}"][unit, whole] += fired.sum()
                counts[f"activation/{layer}"][unit, annotated] += fired.sum()
    return counts


def reference_iou(counts: dict[str, np.ndarray], layer: str, label_categories: np.ndarray) -> np.ndarray:
    """(U, L) IoU = I / (A[category of the label] + T - I), 0 where the union is empty, from ``reference_counts``."""
    intersection = counts[f"intersection/{layer}"][:, 1:].astype(np.float64)
    union = counts[f"activation/{layer}"][:, label_categories] + counts["truth"][None, 1:] - intersection
    iou = np.zeros_like(intersection)
    np.divide(intersection, union, out=iou, where=union > 0)
    return iou
