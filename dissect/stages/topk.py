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

The work runs on the run's dask cluster (``dissect.cluster``) in three kinds of
task, none of which holds a layer's (N, U) maxima or maps whole:

1. ``block_candidates``: a block of images (whole Zarr chunks of the maxima)
   -> that block's top k per unit; the client merges the candidates of every
   block into the final top k as they arrive (``merge_candidates``: the order
   is total, so the result equals ``top_images`` on the whole array whatever the
   blocks and their arrival order);
2. ``read_unit_maps``: the stored (h, w) maps of the chosen (image, unit) pairs
   that lie in a block of whole maps chunks, each chunk read once;
3. ``render_strips``: a group of units -> their strip files (each written by
   this one task) and their ``topk.csv`` rows; it reads the probe images.
"""

import logging
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from distributed import Client
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from dissect.artifacts import chunk_blocks, map_layers, open_activations, read_thresholds, write_json_atomic
from dissect.cluster import check_worker_paths, dask_client, results_in_window, worker_count
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
#: A task reads about this many MiB of one array (whole chunks, at least one).
BLOCK_MIB = 32.0
#: Most units whose strips one task draws.
MAX_UNITS_PER_TASK = 64
#: The columns of topk.csv.
COLUMNS = ["unit", "rank", "image_index", "image_id", "max_activation", "y", "x", "rf_top", "rf_left", "rf_bottom",
           "rf_right"]


class TopkError(DissectError):
    """The top-k images cannot be collected for this run directory and probe set."""


def ranked(values: np.ndarray, indices: np.ndarray, k: int) -> np.ndarray:
    """(C, U) values and image indices of C candidates per unit -> (min(k, C), U) positions into C.

    Per unit, by decreasing value, ties to the lower image index (NaN last).
    """
    return np.lexsort((indices, -values.astype(np.float64)), axis=0)[:k]


def top_images(maxima: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """(N, U) maxima, (N,) valid -> (k', U) image indices by decreasing maximum, ties to the lower index.

    k' = min(k, number of valid images); invalid images never appear.
    """
    rows = np.flatnonzero(valid)
    indices = np.broadcast_to(rows[:, None], (len(rows), maxima.shape[1]))
    return np.take_along_axis(indices, ranked(maxima[rows], indices, k), axis=0)


def merge_candidates(values: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(C, U) candidate values and image indices (any order) -> the best (min(k, C), U) of each, best first."""
    best = ranked(values, indices, k)
    return np.take_along_axis(values, best, axis=0), np.take_along_axis(indices, best, axis=0)


def block_candidates(store_path: str, layer: str, start: int, stop: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top k of images start..stop of a layer (runs on a dask worker).

    Returns (k_b, U) float32 maxima and (k_b, U) int64 image indices, best first,
    k_b = min(k, valid images in the block).
    """
    store = zarr.open_group(store_path, mode="r")
    maxima = store[layer]["maxima"][start:stop]
    order = top_images(maxima, store["valid"][start:stop], k)
    return np.take_along_axis(maxima, order, axis=0), order + start


def layer_candidates(client: Client, store_path: str, layers: list[str], k: int,
                     block_mib: float) -> dict[str, np.ndarray]:
    """(k', U) top-image indices of each layer (as ``top_images``), from block tasks in a bounded window."""
    store = zarr.open_group(store_path, mode="r")
    calls = [(store_path, layer, first, last, k) for layer in layers
             for first, last in chunk_blocks(store[layer]["maxima"], block_mib)]
    best: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    total = sum(store[layer]["maxima"].shape[0] for layer in layers)
    with tqdm(total=total, desc="topk maxima", unit="img") as bar:
        for number, (values, indices) in results_in_window(client, block_candidates, calls):
            _, layer, first, last, _ = calls[number]
            if layer in best:
                values, indices = merge_candidates(np.concatenate([best[layer][0], values]),
                                                   np.concatenate([best[layer][1], indices]), k)
            best[layer] = values, indices
            bar.update(last - first)
    return {layer: best[layer][1] for layer in layers}


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


def read_unit_maps(store_path: str, layer: str, images: np.ndarray, units: np.ndarray) -> np.ndarray:
    """(n,) image indices and (n,) units -> their (n, h, w) float16 stored maps (runs on a dask worker).

    Each chunk along the image axis that holds one of the images is read once.
    """
    maps = zarr.open_group(store_path, mode="r")[layer]["maps"]
    chunk = maps.chunks[0]
    out = np.empty((len(images), *maps.shape[2:]), dtype=maps.dtype)
    for first in np.unique(images // chunk) * chunk:
        rows = maps[first:first + chunk]
        inside = images // chunk == first // chunk
        out[inside] = rows[images[inside] - first, units[inside]]
    return out


def gather_unit_maps(client: Client, store_path: str, layer: str, order: np.ndarray,
                     block_mib: float) -> np.ndarray:
    """(k', U) image indices -> (k', U, h, w) float16: unit u's stored map on image order[r, u].

    One task per block of whole maps chunks that holds a chosen image.
    """
    maps = zarr.open_group(store_path, mode="r")[layer]["maps"]
    out = np.empty((*order.shape, *maps.shape[2:]), dtype=maps.dtype)
    calls, chosen = [], []
    for first, last in chunk_blocks(maps, block_mib):
        ranks, units = np.nonzero((order >= first) & (order < last))
        if len(ranks):
            calls.append((store_path, layer, order[ranks, units], units))
            chosen.append((ranks, units))
    for number, values in results_in_window(client, read_unit_maps, calls):
        out[chosen[number]] = values
    return out


def render_strips(units: list[int], image_paths: dict[int, str], order: np.ndarray, unit_maps: np.ndarray,
                  thresholds: np.ndarray, field: ReceptiveField, input_size: int,
                  strip_paths: list[str]) -> list[tuple]:
    """Draw and write the strips of a group of G units (runs on a dask worker); return their topk.csv rows.

    ``order`` (k', G) image indices, ``unit_maps`` (k', G, h, w) their stored
    maps, ``thresholds`` (G,) float32 (``float32_below``), ``image_paths`` the
    file of every image in ``order``. Rows are (unit, rank, image_index,
    max_activation, y, x, rf_top, rf_left, rf_bottom, rf_right), unit by unit.
    """
    load_image = lru_cache(maxsize=256)(lambda index: np.asarray(Image.open(image_paths[index]).convert("RGB")))
    records = []
    for column, unit in enumerate(units):
        top_tiles, crop_tiles = [], []
        for rank, index in enumerate(order[:, column]):
            unit_map = unit_maps[rank, column].astype(np.float32)
            y, x = np.unravel_index(int(np.argmax(unit_map)), unit_map.shape)
            image = load_image(int(index))
            scale_y, scale_x = image.shape[0] / input_size, image.shape[1] / input_size
            top, left, bottom, right = field.box(int(y), int(x), input_size)
            box = (round(top * scale_y), round(left * scale_x), round(bottom * scale_y), round(right * scale_x))
            tile = np.asarray(Image.fromarray(image).resize((TILE, TILE), Image.BILINEAR))
            top_tiles.append(highlight(tile, unit_map, thresholds[column]))
            crop = Image.fromarray(image[box[0]:max(box[2], box[0] + 1), box[1]:max(box[3], box[1] + 1)])
            crop_tiles.append(np.asarray(crop.resize((TILE, TILE), Image.BILINEAR)))
            records.append((unit, rank, int(index), float(unit_map.max()), int(y), int(x), *box))
        strip(top_tiles, crop_tiles).save(strip_paths[column], quality=85)
    return records


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
    k = int(cfg.topk.k)
    store_path = str(layout.activations)
    image_paths = [str(path) for path in probe.image_paths]
    with dask_client(cfg.cluster) as client:
        check_worker_paths(client, [layout.activations, probe.root])
        orders = layer_candidates(client, store_path, list(todo), k, BLOCK_MIB)
        for layer, inputs in todo.items():
            field = receptive_field(loaded.module, get_layer(loaded.module, layer), loaded.input_size)
            start(layout, "topk", layer)
            layer_topk(client, layout, layer, orders[layer], field, loaded.input_size, image_paths, probe.image_ids)
            write_stamp(layout.stamp("topk", layer), inputs, FORMAT)
    return layout.root


def layer_topk(client: Client, layout: RunLayout, layer: str, order: np.ndarray, field: ReceptiveField,
               input_size: int, image_paths: list[str], image_ids: list[str]) -> None:
    """Write the strips (tasks of groups of units), receptive_field.json and topk.csv of one layer.

    ``order``: (k', U) top-image indices of every unit (``layer_candidates``).
    """
    layout.topk_strips(layer).mkdir(parents=True, exist_ok=True)
    check_worker_paths(client, [], writable=[layout.topk_strips(layer)])
    thresholds = float32_below(read_thresholds(layout, layer))
    store_path = str(layout.activations)
    unit_maps = gather_unit_maps(client, store_path, layer, order, BLOCK_MIB)
    n_units = order.shape[1]
    threads = sum(client.nthreads().values()) or worker_count(client)  # one group per thread, few images re-read
    per_task = max(1, min(MAX_UNITS_PER_TASK, math.ceil(n_units / threads)))
    calls = []
    for first in range(0, n_units, per_task):
        units = list(range(first, min(first + per_task, n_units)))
        paths = {int(index): image_paths[int(index)] for index in np.unique(order[:, units])}
        calls.append((units, paths, order[:, units], unit_maps[:, units], thresholds[units], field, input_size,
                      [str(layout.topk_strip(layer, unit)) for unit in units]))
    rows: dict[int, list[tuple]] = {}
    with tqdm(total=n_units, desc=f"topk {layer}", unit="unit") as bar:
        for number, strip_rows in results_in_window(client, render_strips, calls):
            units = calls[number][0]
            rows[units[0]] = strip_rows
            bar.update(len(units))
    records = [(unit, rank, index, image_ids[index], *rest)
               for first in sorted(rows) for unit, rank, index, *rest in rows[first]]
    write_json_atomic(layout.receptive_field_json(layer), {**field.__dict__, "input_size": input_size})
    pd.DataFrame.from_records(records, columns=COLUMNS).to_csv(layout.topk_csv(layer), index=False)
