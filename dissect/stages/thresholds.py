"""The thresholds stage: per-unit top-quantile thresholds of the raw activations.

For each map layer, T_u is the ``thresholds.quantile`` top quantile (0.005 by
default, i.e. the 99.5th percentile) of unit u's stored float16 activations
over all valid images and all spatial positions. It is exact: it equals
``numpy.quantile(values, 1 - quantile)`` (linear interpolation) on the unit's
values, with no sketch error. Each block of images contributes its top m
values per unit, where m is the number of order statistics above the
interpolation point, and the blocks are merged keeping the top m, so memory is
O(units * m) and no layer is ever loaded whole.

Output: ``layers/<layer>/thresholds.csv`` with columns ``unit, threshold``,
``layers/<layer>/thresholds.json`` with the quantile and the counts, then the
layer's stamp (inputs: the quantile and the extract stage's stamp).
"""

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from distributed import Client, as_completed
from omegaconf import DictConfig
from tqdm import tqdm

from dissect.artifacts import map_layers, open_activations, write_json_atomic
from dissect.cluster import dask_client
from dissect.layout import RunLayout
from dissect.settings import ThresholdsSettings, section
from dissect.stamps import is_current, stamp_digest, start, write_stamp

log = logging.getLogger(__name__)

#: The version of this stage's output format.
FORMAT = 1


def quantile_rank(n_values: int, quantile: float) -> tuple[int, float]:
    """(lo, frac): numpy's linear quantile at 1 - quantile is v[lo] + frac * (v[lo + 1] - v[lo]) of sorted v."""
    position = (1.0 - quantile) * (n_values - 1)
    lo = math.floor(position)
    return lo, position - lo


def top_values(values: np.ndarray, m: int) -> np.ndarray:
    """(U, n) values -> (U, min(m, n)) holding each row's m largest values, unordered."""
    if values.shape[1] <= m:
        return values
    return np.partition(values, values.shape[1] - m, axis=1)[:, -m:]


def block_top_values(store_path: str, layer: str, start: int, stop: int, m: int) -> np.ndarray:
    """Top m values per unit of images start..stop of a layer's maps -> (U, <=m) float32 (invalid images left out)."""
    root = zarr.open_group(store_path, mode="r")
    valid = root["valid"][start:stop]
    maps = root[layer]["maps"][start:stop][valid]
    values = np.moveaxis(maps, 1, 0).reshape(maps.shape[1], -1).astype(np.float32)
    return top_values(values, m)


def interpolate_threshold(top: np.ndarray, lo: int, frac: float, n_values: int) -> np.ndarray:
    """(U, m) top values (m = n_values - lo) -> (U,) thresholds, numpy's linear interpolation between ranks lo, lo+1."""
    ordered = np.sort(top, axis=1)
    below = ordered[:, 0].astype(np.float64)
    above = ordered[:, 1].astype(np.float64) if ordered.shape[1] > 1 else below
    diff = above - below
    # the same two-sided formula as numpy's _lerp, so results agree to the last bit in float64
    return np.where(frac >= 0.5, above - diff * (1 - frac), below + diff * frac)


def layer_thresholds(client: Client, store_path: Path, layer: str, quantile: float, block_images: int) -> np.ndarray:
    """(U,) exact per-unit thresholds of a map layer, merging block tops as they finish."""
    root = zarr.open_group(store_path, mode="r")
    n_images, n_units, h, w = root[layer]["maps"].shape
    n_values = int(root["valid"][:].sum()) * h * w
    lo, frac = quantile_rank(n_values, quantile)
    m = n_values - lo
    futures = [client.submit(block_top_values, str(store_path), layer, start, min(start + block_images, n_images), m,
                             pure=False)
               for start in range(0, n_images, block_images)]
    merged = np.empty((n_units, 0), dtype=np.float32)
    with tqdm(total=len(futures), desc=f"thresholds {layer}", unit="block") as bar:
        for future in as_completed(futures):
            merged = top_values(np.concatenate([merged, future.result()], axis=1), m)
            future.release()
            bar.update()
    return interpolate_threshold(merged, lo, frac, n_values)



def check(cfg: DictConfig) -> None:
    """Refuse bad thresholds settings before any stage runs."""
    section(cfg.thresholds, ThresholdsSettings)


def run(cfg: DictConfig) -> Path:
    """Compute thresholds for every map layer of ``cfg.layers``; skip layers already done at this quantile."""
    check(cfg)
    layout = RunLayout(Path(cfg.out_dir))
    store = open_activations(layout.root)
    quantile = float(cfg.thresholds.quantile)
    todo = {}
    for layer in map_layers(store, [str(name) for name in cfg.layers]):
        inputs = layer_inputs(layout, quantile)
        if not is_current(layout.stamp("thresholds", layer), inputs, FORMAT, f"thresholds of {layer}"):
            todo[layer] = inputs
    if todo:
        with dask_client(cfg.cluster) as client:
            for layer, inputs in todo.items():
                thresholds = layer_thresholds(client, layout.activations, layer, quantile,
                                              int(cfg.thresholds.block_images))
                start(layout, "thresholds", layer)
                write_thresholds(layout, layer, thresholds, quantile, store)
                write_stamp(layout.stamp("thresholds", layer), inputs, FORMAT)
    return layout.root


def layer_inputs(layout: RunLayout, quantile: float) -> dict[str, object]:
    """What a layer's thresholds depend on (the block size changes nothing: the quantile is exact)."""
    return {"quantile": quantile, "extract": stamp_digest(layout.stamp("extract"), "extract")}


def write_thresholds(layout: RunLayout, layer: str, thresholds: np.ndarray, quantile: float,
                     store: zarr.Group) -> None:
    """Write thresholds.csv and thresholds.json of ``layer`` ((U,) thresholds)."""
    layout.layer_dir(layer).mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"unit": np.arange(len(thresholds)), "threshold": thresholds})
    table.to_csv(layout.thresholds_csv(layer), index=False, float_format="%.17g")
    write_json_atomic(layout.thresholds_json(layer), {
        "quantile": quantile,
        "method": "exact: numpy.quantile(values, 1 - quantile), linear interpolation",
        "valid_images": int(store["valid"][:].sum()),
    })
