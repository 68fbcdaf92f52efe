"""Bilinear upsampling of unit maps and their thresholded masks, shared by the tally, compositional and top-k stages.

up(A) follows ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``:
each output row y and column x has two source indices and float32 weights
(``bilinear_axis``), and up(A)[y, x] = C[lo(y), x] * w0(y) + C[hi(y), x] * w1(y)
with C[r, x] = A[r, lo(x)] * w0(x) + A[r, hi(x)] * w1(x), every product and sum
rounded to float32 (torch may fuse a multiply-add, so it can differ in the last
bit). ``upsample`` computes every pixel; ``fired_pixels`` computes the same
values, bit for bit, only where they can exceed the threshold.
"""

import functools
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

#: Relative slack of the cell test in ``fired_pixels``: float32 rounding can lift a bilinear value a few
#: ulps (2**-23 each) above the largest corner that weighs in it.
CORNER_SLACK = np.float32(2.0**-20)


def float32_below(thresholds: np.ndarray) -> np.ndarray:
    """(U,) float64 T -> (U,) float32 t, the largest float32 <= T; for any float32 x, x > t exactly when x > T."""
    rounded = thresholds.astype(np.float32)
    return np.where(rounded > thresholds, np.nextafter(rounded, np.float32(-np.inf)), rounded)


class Axis(NamedTuple):
    """1-D bilinear resampling of n_in to n_out positions: per output position, (n_out,) each."""

    lo: np.ndarray  # int64 source index
    hi: np.ndarray  # int64 second source index (lo + 1, or lo at the last source)
    w0: np.ndarray  # float32 weight of lo
    w1: np.ndarray  # float32 weight of hi


@functools.lru_cache(maxsize=64)
def bilinear_axis(n_in: int, n_out: int) -> Axis:
    """Source indices and weights of ``torch``'s bilinear resampling (align_corners=False) along one axis."""
    if n_in == n_out:
        index = np.arange(n_out)
        return Axis(index, index, np.ones(n_out, np.float32), np.zeros(n_out, np.float32))
    scale = np.float64(np.float32(n_in) / np.float32(n_out))  # as torch: a float32 ratio, the position in double
    source = np.maximum((scale * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32), np.float32(0))
    lo = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    w1 = np.clip(source - lo.astype(np.float32), np.float32(0), np.float32(1))
    return Axis(lo, hi, np.float32(1) - w1, w1)


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n, h, w) maps -> (n, size[0], size[1]) float32 up(A), every pixel."""
    rows, columns = bilinear_axis(maps.shape[1], size[0]), bilinear_axis(maps.shape[2], size[1])
    maps = maps.astype(np.float32, copy=False)
    across = maps[:, :, columns.lo] * columns.w0 + maps[:, :, columns.hi] * columns.w1  # (n, h, W)
    return across[:, rows.lo, :] * rows.w0[:, None] + across[:, rows.hi, :] * rows.w1[:, None]


class Cells(NamedTuple):
    """The output positions of one axis grouped into runs (cells) that share their source indices.

    ``lo``, ``hi`` (n_cells,) int64 source indices of each cell; ``top`` (n_cells,) the larger of them or,
    where w1 is 0 all along the cell, lo; ``members`` (n_cells, K) int64 output positions, n_out (one past
    the last) beyond a cell's end.
    """

    lo: np.ndarray
    hi: np.ndarray
    top: np.ndarray
    members: np.ndarray


@functools.lru_cache(maxsize=64)
def axis_cells(n_in: int, n_out: int) -> Cells:
    """The cells of ``bilinear_axis(n_in, n_out)``: runs of consecutive outputs with equal (lo, hi, w1 > 0)."""
    axis = bilinear_axis(n_in, n_out)
    key = np.stack([axis.lo, axis.hi, axis.w1 > 0], axis=1)
    starts = np.flatnonzero(np.r_[True, (key[1:] != key[:-1]).any(axis=1)])
    lengths = np.diff(np.r_[starts, n_out])
    members = np.full((len(starts), lengths.max()), n_out, dtype=np.int64)
    for cell, (first, length) in enumerate(zip(starts, lengths)):
        members[cell, :length] = np.arange(first, first + length)
    lo, hi = axis.lo[starts], axis.hi[starts]
    return Cells(lo, hi, np.where(axis.w1[starts] > 0, hi, lo), members)


def can_exceed(maximum: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Whether a bilinear value of corners whose largest is ``maximum`` can exceed the threshold (same shapes).

    Exact up to float32 rounding, which can lift a value a few ulps (2**-23 each) above its largest corner.
    """
    return maximum + np.abs(maximum) * CORNER_SLACK > thresholds


def fired_pixels(maps: np.ndarray, thresholds: np.ndarray, size: tuple[int, int],
                 max_cells: int = 1 << 14) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Where up(A) > t: yields (map index, flat pixel y * size[1] + x), both (k,) int64, in pieces.

    ``maps`` (n, h, w), ``thresholds`` (n,) float32 (see ``float32_below``). A pixel's value is computed
    only in the cells (``axis_cells`` of rows x columns) one of whose weighing corners can exceed t
    (``can_exceed``): a bilinear value never exceeds its corners' maximum. The values are ``upsample``'s,
    bit for bit. Each piece covers at most ``max_cells`` cells; every fired pixel is yielded once.
    """
    (h, w), (height, width) = maps.shape[1:], size
    rows, columns = bilinear_axis(h, height), bilinear_axis(w, width)
    row_cells, column_cells = axis_cells(h, height), axis_cells(w, width)
    maps = maps.astype(np.float32, copy=False)
    corner_max = np.maximum(np.take(maps, row_cells.lo, axis=1), np.take(maps, row_cells.top, axis=1))
    corner_max = np.maximum(np.take(corner_max, column_cells.lo, axis=2), np.take(corner_max, column_cells.top, axis=2))
    candidates = np.nonzero(can_exceed(corner_max, thresholds[:, None, None]))
    # a padded member (position n_out) takes weight NaN, so its value never exceeds t
    row_w0, row_w1 = np.r_[rows.w0, np.nan].astype(np.float32), np.r_[rows.w1, np.nan].astype(np.float32)
    column_w0, column_w1 = np.r_[columns.w0, np.nan].astype(np.float32), np.r_[columns.w1, np.nan].astype(np.float32)
    flat_maps = maps.reshape(-1)
    for first in range(0, len(candidates[0]), max_cells):
        index, row_cell, column_cell = (c[first:first + max_cells] for c in candidates)
        base = index * (h * w)
        r_lo, r_hi = row_cells.lo[row_cell] * w, row_cells.hi[row_cell] * w
        c_lo, c_hi = column_cells.lo[column_cell], column_cells.hi[column_cell]
        y, x = row_cells.members[row_cell], column_cells.members[column_cell]  # (k, Ky), (k, Kx)
        w0x, w1x = column_w0[x], column_w1[x]
        across_lo = (flat_maps[base + r_lo + c_lo][:, None] * w0x
                     + flat_maps[base + r_lo + c_hi][:, None] * w1x)  # (k, Kx): C[lo(y), x]
        across_hi = (flat_maps[base + r_hi + c_lo][:, None] * w0x
                     + flat_maps[base + r_hi + c_hi][:, None] * w1x)
        values = across_lo[:, None, :] * row_w0[y][:, :, None] + across_hi[:, None, :] * row_w1[y][:, :, None]
        cell, within = np.divmod(np.flatnonzero(values > thresholds[index][:, None, None]), y.shape[1] * x.shape[1])
        dy, dx = np.divmod(within, x.shape[1])
        yield index[cell], y[cell, dy] * width + x[cell, dx]


def fired_masks(maps: np.ndarray, thresholds: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(Ua, h, w) maps of the active units, (Ua,) float32 thresholds (see float32_below) -> (Ua, sh*sw) bool:
    up(A) > T."""
    masks = np.zeros((len(maps), size[0] * size[1]), dtype=bool)
    for index, pixel in fired_pixels(maps, thresholds, size):
        masks[index, pixel] = True
    return masks
