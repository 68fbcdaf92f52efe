"""The topk stage: each unit's most exciting probe images, with the region that fires.

For every unit of every map layer in ``layers``, the ``topk.k`` valid probe
images with the highest stored maximum activation (``<layer>/maxima``; no second
pass of the model), ties broken by the lower image index. For each of them:

- the image with the region where the bilinearly upsampled map exceeds the
  unit's threshold kept bright and the rest darkened, as NetDissect shows it;
- a crop of the unit's receptive field around its arg-max position
  (``dissect.receptive_field``: layer geometry, or a gradient-based measure).

Outputs in ``layers/<layer>/``: ``strips/unit_<u>.jpg`` (top row: highlighted
images, bottom row: receptive-field crops, best first), ``topk.csv`` (unit, rank,
image_index, image_id, max_activation, y, x of the arg-max in map cells, and the
crop box rf_top, rf_left, rf_bottom, rf_right in image pixels),
``receptive_field.json`` and, last, the layer's stamp (inputs: ``topk.k``, the
layer's thresholds stamp, the probe set).
"""

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from dissect.artifacts import map_layers, open_activations, read_thresholds, write_json_atomic
from dissect.errors import DissectError
from dissect.layers import get_layer
from dissect.layout import RunLayout
from dissect.models import load_model
from dissect.probe import open_probe_set
from dissect.receptive_field import ReceptiveField, receptive_field
from dissect.settings import TopkSettings, section
from dissect.stamps import is_current, stamp_digest, start, write_stamp
from dissect.upsample import float32_below, upsample

log = logging.getLogger(__name__)

#: The version of this stage's output format.
FORMAT = 1
TILE = 112
GAP = 2
DARKEN = 0.25


class TopkError(DissectError):
    """The top-k images cannot be collected for this run directory and probe set."""


def top_images(maxima: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """(N, U) maxima, (N,) valid -> (k', U) image indices by decreasing maximum, ties to the lower index.

    k' = min(k, number of valid images); invalid images never appear.
    """
    scores = np.where(valid[:, None], maxima.astype(np.float64), -np.inf)
    order = np.argsort(-scores, axis=0, kind="stable")
    return order[: min(k, int(valid.sum()))]


def highlight(image: np.ndarray, unit_map: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8 image, (h, w) map, float32 threshold -> image with up(map) <= T darkened and an outline."""
    size = image.shape[:2]
    fired = upsample(unit_map[None], size)[0] > threshold
    edge = fired & ~(np.roll(fired, 1, 0) & np.roll(fired, -1, 0) & np.roll(fired, 1, 1) & np.roll(fired, -1, 1))
    out = image.astype(np.float32) * np.where(fired, 1.0, DARKEN)[..., None]
    out[edge] = (255, 220, 0)
    return out.astype(np.uint8)


def strip(tiles_top: list[np.ndarray], tiles_bottom: list[np.ndarray]) -> Image.Image:
    """Two rows of (TILE, TILE, 3) tiles with GAP-pixel white gaps -> one RGB image."""
    width = len(tiles_top) * (TILE + GAP) - GAP
    canvas = np.full((2 * TILE + GAP, max(width, TILE), 3), 255, dtype=np.uint8)
    for row, tiles in enumerate((tiles_top, tiles_bottom)):
        for column, tile in enumerate(tiles):
            top, left = row * (TILE + GAP), column * (TILE + GAP)
            canvas[top:top + TILE, left:left + TILE] = tile
    return Image.fromarray(canvas)


def read_rows(maps: zarr.Array, indices: np.ndarray) -> dict[int, np.ndarray]:
    """The (U, h, w) maps of the given images, reading each chunk along the image axis once."""
    chunk = maps.chunks[0]
    rows: dict[int, np.ndarray] = {}
    wanted = np.unique(indices)
    for first in np.unique(wanted // chunk):
        block = maps[first * chunk:min((first + 1) * chunk, maps.shape[0])]
        for index in wanted[wanted // chunk == first]:
            rows[int(index)] = block[index - first * chunk]
    return rows


def check(cfg: DictConfig) -> None:
    """Refuse bad topk settings before any stage runs."""
    section(cfg.topk, TopkSettings)


def run(cfg: DictConfig) -> Path:
    """Collect top-k images and strips for every map layer of ``cfg.layers`` not done yet."""
    check(cfg)
    layout = RunLayout(Path(cfg.out_dir))
    store = open_activations(layout.root)
    probe = open_probe_set(cfg.dataset)
    if list(store["image_ids"][:]) != probe.image_ids:
        raise TopkError(f"the activations in {layout.root} were extracted from other images than {probe.root}")
    todo = {}
    for layer in map_layers(store, [str(name) for name in cfg.layers]):
        inputs = {"k": int(cfg.topk.k), "probe_set": str(probe.root),
                  "thresholds": stamp_digest(layout.stamp("thresholds", layer), "thresholds")}
        if not is_current(layout.stamp("topk", layer), inputs, FORMAT, f"topk of {layer}"):
            todo[layer] = inputs
    if not todo:
        return layout.root
    loaded = load_model(cfg.model)
    load_image = lru_cache(maxsize=256)(lambda index: np.asarray(Image.open(probe.image_paths[index]).convert("RGB")))
    for layer, inputs in todo.items():
        field = receptive_field(loaded.module, get_layer(loaded.module, layer), loaded.input_size)
        start(layout, "topk", layer)
        layer_topk(layout, store, layer, field, loaded.input_size, int(cfg.topk.k), load_image, probe.image_ids)
        write_stamp(layout.stamp("topk", layer), inputs, FORMAT)
    return layout.root


def layer_topk(layout: RunLayout, store: zarr.Group, layer: str, field: ReceptiveField, input_size: int, k: int,
               load_image, image_ids: list[str]) -> None:
    """Write the strips, receptive_field.json and topk.csv of one layer."""
    layout.topk_strips(layer).mkdir(parents=True, exist_ok=True)
    thresholds = float32_below(read_thresholds(layout, layer))
    order = top_images(store[layer]["maxima"][:], store["valid"][:], k)
    rows = read_rows(store[layer]["maps"], order)
    records = []
    for unit in tqdm(range(order.shape[1]), desc=f"topk {layer}", unit="unit"):
        top_tiles, crop_tiles = [], []
        for rank, index in enumerate(order[:, unit]):
            unit_map = rows[int(index)][unit].astype(np.float32)
            y, x = np.unravel_index(int(np.argmax(unit_map)), unit_map.shape)
            image = load_image(int(index))
            scale_y, scale_x = image.shape[0] / input_size, image.shape[1] / input_size
            top, left, bottom, right = field.box(int(y), int(x), input_size)
            box = (round(top * scale_y), round(left * scale_x), round(bottom * scale_y), round(right * scale_x))
            tile = np.asarray(Image.fromarray(image).resize((TILE, TILE), Image.BILINEAR))
            top_tiles.append(highlight(tile, unit_map, thresholds[unit]))
            crop = Image.fromarray(image[box[0]:max(box[2], box[0] + 1), box[1]:max(box[3], box[1] + 1)])
            crop_tiles.append(np.asarray(crop.resize((TILE, TILE), Image.BILINEAR)))
            records.append((unit, rank, int(index), image_ids[int(index)], float(unit_map.max()), int(y), int(x),
                            *box))
        strip(top_tiles, crop_tiles).save(layout.topk_strip(layer, unit), quality=85)
    write_json_atomic(layout.receptive_field_json(layer), {**field.__dict__, "input_size": input_size})
    pd.DataFrame.from_records(records, columns=["unit", "rank", "image_index", "image_id", "max_activation", "y",
                                                "x", "rf_top", "rf_left", "rf_bottom", "rf_right"]
                              ).to_csv(layout.topk_csv(layer), index=False)
