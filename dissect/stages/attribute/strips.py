"""PNG strips of a unit's (or a class image's) maps, one row per image, one column per method."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import zarr
from matplotlib import colormaps
from PIL import Image, ImageDraw
from tqdm import tqdm

from dissect.layout import RunLayout
from dissect.stages.attribute.methods import (
    ABSOLUTE_METHODS,
    read_maps,
)

TILE = 96


GAP = 2


HEADER = 14


def heat_overlay(image: np.ndarray, heat: np.ndarray, signed: bool) -> np.ndarray:
    """(T, T, 3) uint8 image, (T, T) map -> the map in colour over the image, opacity growing with |map|.

    The map is scaled by its 99.5th percentile of |value|; signed maps use
    Captum's red (negative) to green (positive) scale, absolute maps ``inferno``.
    """
    peak = float(np.percentile(np.abs(heat), 99.5))
    level = np.clip(heat / peak, -1.0, 1.0) if peak > 0 else np.zeros_like(heat)
    colours = colormaps["RdYlGn"]((level + 1) / 2) if signed else colormaps["inferno"](np.abs(level))
    alpha = 0.85 * np.abs(level)[..., None]
    return (image * (1 - alpha) + colours[..., :3] * 255 * alpha).astype(np.uint8)


def strip_image(rows: list[tuple[np.ndarray, dict[str, np.ndarray]]], methods: tuple[str, ...]) -> Image.Image:
    """One row per pair: ((S, S, 3) uint8 image, method -> (S, S) map) -> header + tiles (image, then each map)."""
    columns = ["image", *methods]
    width = len(columns) * (TILE + GAP) - GAP
    canvas = Image.new("RGB", (width, HEADER + len(rows) * (TILE + GAP)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, name in enumerate(columns):
        draw.text((k * (TILE + GAP) + 2, 1), name.replace("integrated_gradients", "integrated_grad")[:16],
                  fill=(0, 0, 0))
    for r, (image, maps) in enumerate(rows):
        tile = np.asarray(Image.fromarray(image).resize((TILE, TILE), Image.BILINEAR))
        top = HEADER + r * (TILE + GAP)
        canvas.paste(Image.fromarray(tile), (0, top))
        for k, method in enumerate(methods, start=1):
            heat = np.asarray(Image.fromarray(maps[method].astype(np.float32), mode="F").resize((TILE, TILE),
                                                                                                 Image.BILINEAR))
            overlay = heat_overlay(tile.astype(np.float32), heat, signed=method not in ABSOLUTE_METHODS)
            canvas.paste(Image.fromarray(overlay), (k * (TILE + GAP), top))
    return canvas


def write_strips(layout: RunLayout, pairs: pd.DataFrame, images: torch.Tensor, maps: zarr.Group,
                 methods: tuple[str, ...]) -> None:
    """A strip per selected unit (its images as rows) and per class pair, from maps.zarr."""
    hwc = images.permute(0, 2, 3, 1).numpy()
    groups = [(("unit", layer, unit), group) for (layer, unit), group in
              pairs[pairs["kind"] == "unit"].groupby(["layer", "target"], sort=False)]
    groups += [(("class", row.image_index, row.target), pairs.loc[[row.Index]])
               for row in pairs[pairs["kind"] == "class"].itertuples()]
    for (kind, first, second), group in tqdm(groups, desc="attribution strips", unit="strip"):
        stored = read_maps(maps, methods, group)
        rows = [(hwc[p], {method: values[k] for method, values in stored.items()})
                for k, p in enumerate(group["pair"])]
        path = (layout.attribute_unit_strip(first, second) if kind == "unit"
                else layout.attribute_class_strip(first, second))
        path.parent.mkdir(parents=True, exist_ok=True)
        strip_image(rows, methods).save(path)
