"""Bilinear upsampling of unit maps and their thresholded masks, shared by the tally and top-k stages."""

import functools

import numpy as np


def float32_below(thresholds: np.ndarray) -> np.ndarray:
    """(U,) float64 T -> (U,) float32 t, the largest float32 <= T; for any float32 x, x > t exactly when x > T."""
    rounded = thresholds.astype(np.float32)
    return np.where(rounded > thresholds, np.nextafter(rounded, np.float32(-np.inf)), rounded)


@functools.lru_cache(maxsize=64)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 weights of 1-D bilinear resampling, the convention of
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``."""
    source = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    left = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
    right = np.minimum(left + 1, n_in - 1)
    weight = source - left
    matrix = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(matrix, (np.arange(n_out), left), 1.0 - weight)
    np.add.at(matrix, (np.arange(n_out), right), weight)
    return matrix.astype(np.float32)


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n, h, w) maps -> (n, size[0], size[1]) float32, bilinear (align_corners=False), as two matrix products."""
    rows = bilinear_matrix(maps.shape[1], size[0])
    columns = bilinear_matrix(maps.shape[2], size[1])
    return rows @ maps.astype(np.float32) @ columns.T


def fired_masks(maps: np.ndarray, thresholds: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(Ua, h, w) maps of the active units, (Ua,) float32 thresholds (see float32_below) -> (Ua, sh*sw) bool:
    the bilinear upsampling up(A), as two small matrix products, > T."""
    return (upsample(maps, size) > thresholds[:, None, None]).reshape(len(maps), -1)
