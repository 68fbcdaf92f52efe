"""The per-image activation-map viewer: every unit's stored map of a layer as one grayscale tile.

The maps are those the extract stage stored (``activations.zarr``, float16),
so the viewer runs no model. Tile u (row u // columns, column u % columns,
columns = ceil(sqrt(U))) shows unit u's (h, w) map, each cell a block of
``zoom`` x ``zoom`` pixels, gray level round(255 * clip(value / scale, 0, 1)):

- ``normalise: unit``: scale = the unit's own maximum on this image;
- ``normalise: layer``: scale = the largest value of any unit on this image.

A unit whose map is all zero or negative on the image (scale 0) is a black
tile, which is how a dead unit shows. Tiles are separated by ``GAP`` pixels of
``GAP_COLOUR``. The overlay shows the image, then each of the
``overlay_units`` units of largest maximum on it, its map upsampled
(bilinear) over the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dissect.stages.attribute.strips import heat_overlay

#: Pixels between tiles, and their colour (not a gray level, so that a black tile stands out as a dead unit).
GAP = 2
GAP_COLOUR = (40, 90, 160)
#: Target side of a tile in pixels: small maps are zoomed by an integer factor up to about this.
TILE_TARGET = 48
#: Side of each panel of the overlay picture.
OVERLAY_SIDE = 160


@dataclass(frozen=True)
class Grid:
    """Where the tiles lie: ``columns``, ``zoom`` (pixels per map cell), the (h, w) map shape, ``gap``."""

    columns: int
    zoom: int
    map_shape: tuple[int, int]
    gap: int = GAP

    def origin(self, unit: int) -> tuple[int, int]:
        """(top, left) pixel of unit ``unit``'s tile."""
        h, w = self.map_shape
        row, column = divmod(unit, self.columns)
        return self.gap + row * (h * self.zoom + self.gap), self.gap + column * (w * self.zoom + self.gap)


def grid_layout(units: int, map_shape: tuple[int, int]) -> Grid:
    """The grid of ``units`` tiles of (h, w) maps: ceil(sqrt(U)) columns, zoom max(1, TILE_TARGET // max(h, w))."""
    return Grid(math.ceil(math.sqrt(units)), max(1, TILE_TARGET // max(map_shape)), tuple(map_shape))


def tile_scales(maps: np.ndarray, normalise: str) -> np.ndarray:
    """(U, h, w) maps -> (U,) the value shown white: each unit's maximum (``unit``) or the layer's (``layer``), >= 0."""
    peaks = np.maximum(maps.reshape(len(maps), -1).max(1), 0).astype(np.float64)
    return peaks if normalise == "unit" else np.full(len(maps), peaks.max() if len(peaks) else 0.0)


def map_grid(maps: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, Grid]:
    """(U, h, w) maps and (U,) scales -> the (H, W, 3) uint8 grid picture and its layout (module docstring)."""
    units, h, w = maps.shape
    grid = grid_layout(units, (h, w))
    rows = math.ceil(units / grid.columns)
    canvas = np.empty((GAP + rows * (h * grid.zoom + GAP), GAP + grid.columns * (w * grid.zoom + GAP), 3), np.uint8)
    canvas[:] = GAP_COLOUR
    for unit in range(units):
        level = np.zeros((h, w)) if scales[unit] <= 0 else np.clip(maps[unit] / scales[unit], 0, 1)
        gray = np.round(255 * level).astype(np.uint8).repeat(grid.zoom, 0).repeat(grid.zoom, 1)
        top, left = grid.origin(unit)
        canvas[top:top + h * grid.zoom, left:left + w * grid.zoom] = gray[..., None]
    return canvas, grid


def strongest_units(maps: np.ndarray, count: int) -> list[int]:
    """The ``count`` units of largest maximum on the image, strongest first (ties: lower unit first)."""
    peaks = maps.reshape(len(maps), -1).max(1)
    return sorted(range(len(maps)), key=lambda u: (-float(peaks[u]), u))[:count]


def overlay_picture(image: np.ndarray, maps: np.ndarray, units: list[int]) -> np.ndarray:
    """(S, S, 3) uint8 image, (U, h, w) maps -> a row of panels: the image, then each unit's map over it."""
    base = np.asarray(Image.fromarray(image).resize((OVERLAY_SIDE, OVERLAY_SIDE), Image.BILINEAR))
    panels = [base]
    for unit in units:
        heat = np.asarray(Image.fromarray(maps[unit].astype(np.float32), mode="F")
                          .resize((OVERLAY_SIDE, OVERLAY_SIDE), Image.BILINEAR))
        panels.append(heat_overlay(base, np.maximum(heat, 0), signed=False))
    gap = np.full((OVERLAY_SIDE, GAP, 3), 255, np.uint8)
    row = [panels[0]]
    for panel in panels[1:]:
        row += [gap, panel]
    return np.concatenate(row, axis=1)
