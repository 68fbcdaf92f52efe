"""The thresholds stage: per-unit top-quantile thresholds of the raw activations.

For each map layer, T_u is the ``thresholds.quantile`` top quantile (0.005 by
default, i.e. the 99.5th percentile) of unit u's stored float16 activations
over all valid images and all spatial positions. It equals
``numpy.quantile(values, 1 - quantile)`` (linear interpolation) on the unit's
values: numpy's formula between the order statistics at ascending ranks lo and
lo + 1 (``quantile_rank``). No layer is ever loaded whole; the work runs on the
run's dask cluster in tasks of ``thresholds.block_images`` images. Two methods
find those order statistics, chosen per layer by ``thresholds.memory_mib``:

- **top-m merge** (one pass over the maps): each block contributes its top m
  values per unit, m = n_values - lo the number of order statistics from rank
  lo up, and the client merges the blocks as they finish, keeping the top m.
  The merge holds up to ``EXACT_PEAK_COPIES`` x U x m float32 values at its
  peak (the kept top m, whose partition keeps 2m alive, a block's top m, their
  concatenation and its partition), which grows with the number of images
  (m is about quantile x images x h x w). Used when that peak fits the budget.
  Beside it, the workers hold at most a window of twice their threads of
  block results (U x min(m, block values) float32 each) waiting to be merged.
- **radix select** (two passes, otherwise): the float16 values are mapped to
  16-bit keys in the same order (``order_keys``), and the order statistics are
  found digit by digit. Pass 1 counts each unit's keys by their high byte
  ((U, 256) counts summed over blocks), which gives the high byte of the keys
  at ranks lo and lo + 1 and their ranks within that byte; pass 2 counts the
  low bytes of just the keys with that high byte ((U, 2, 256) counts), which
  gives the rest. The client holds 4 KiB of counts per unit whatever the
  number of images. Error bound: zero. Two 8-bit digits cover every bit of a
  float16 key, so the order statistics are the exact stored values and the
  thresholds are bit-identical to the top-m merge and to ``numpy.quantile``
  (only a -0.0 reads as +0.0, which compares equal).

Because both methods give the same thresholds, the budget is not an input of
the layer's stamp: changing it re-runs nothing.

Output: ``layers/<layer>/thresholds.csv`` with columns ``unit, threshold``,
``layers/<layer>/thresholds.json`` with the quantile, the method used, the top-m
merge's peak against the budget and the counts, then the layer's stamp
(inputs: the quantile and the extract stage's stamp).
"""

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from distributed import Client
from omegaconf import DictConfig
from tqdm import tqdm

from dissect.artifacts import map_layers, open_activations, write_json_atomic
from dissect.cluster import dask_client, results_in_window
from dissect.layout import RunLayout
from dissect.settings import ThresholdsSettings, section
from dissect.stamps import is_current, stamp_digest, start, write_stamp

log = logging.getLogger(__name__)

#: The version of this stage's output format.
FORMAT = 1
#: float32 copies of the (U, m) kept top m that the top-m merge holds at its peak (measured with tracemalloc).
EXACT_PEAK_COPIES = 7
#: The methods, as thresholds.json names them.
METHODS = {
    "top-m merge": "exact: each block's top m values per unit merged into the top m, one pass",
    "radix select": "exact: per-unit counts of the float16 keys' high byte, then of the low byte under the "
                    "quantile's high byte, two passes; error bound zero",
}
#: Values of one digit of a 16-bit key.
DIGITS = 256


def quantile_rank(n_values: int, quantile: float) -> tuple[int, float]:
    """(lo, frac): numpy's linear quantile at 1 - quantile is v[lo] + frac * (v[lo + 1] - v[lo]) of sorted v."""
    position = (1.0 - quantile) * (n_values - 1)
    lo = math.floor(position)
    return lo, position - lo


def exact_peak_mib(n_units: int, m: int) -> float:
    """MiB the top-m merge holds at its peak for U units keeping their top m values."""
    return EXACT_PEAK_COPIES * n_units * m * 4 / 2**20


def block_values(store_path: str, layer: str, start: int, stop: int) -> np.ndarray:
    """Images start..stop of a layer's maps -> (U, n) float16 values per unit (invalid images left out)."""
    root = zarr.open_group(store_path, mode="r")
    valid = root["valid"][start:stop]
    maps = root[layer]["maps"][start:stop][valid]
    return np.moveaxis(maps, 1, 0).reshape(maps.shape[1], -1)


def top_values(values: np.ndarray, m: int) -> np.ndarray:
    """(U, n) values -> (U, min(m, n)) holding each row's m largest values, unordered."""
    if values.shape[1] <= m:
        return values
    return np.partition(values, values.shape[1] - m, axis=1)[:, -m:]


def block_top_values(store_path: str, layer: str, start: int, stop: int, m: int) -> np.ndarray:
    """Top m values per unit of images start..stop of a layer's maps -> (U, <=m) float32 (invalid images left out)."""
    return top_values(block_values(store_path, layer, start, stop).astype(np.float32), m)


def lerp(below: np.ndarray, above: np.ndarray, frac: float) -> np.ndarray:
    """(U,) order statistics at ranks lo and lo + 1 -> (U,) float64 numpy.quantile's linear interpolation."""
    below, above = below.astype(np.float64), above.astype(np.float64)
    diff = above - below
    # the same two-sided formula as numpy's _lerp, so results agree to the last bit in float64
    return np.where(frac >= 0.5, above - diff * (1 - frac), below + diff * frac)


def interpolate_threshold(top: np.ndarray, lo: int, frac: float, n_values: int) -> np.ndarray:
    """(U, m) top values (m = n_values - lo) -> (U,) thresholds, numpy's linear interpolation between ranks lo, lo+1."""
    ordered = np.sort(top, axis=1)
    return lerp(ordered[:, 0], ordered[:, 1] if ordered.shape[1] > 1 else ordered[:, 0], frac)


def order_keys(values: np.ndarray) -> np.ndarray:
    """float16 values (any shape) -> uint16 keys in the same order as the values (-0.0 as +0.0; NaN at the ends)."""
    bits = (values + np.float16(0)).view(np.uint16)  # -0.0 + 0.0 is +0.0
    return np.where(bits & 0x8000, ~bits, bits | 0x8000).astype(np.uint16)


def key_values(keys: np.ndarray) -> np.ndarray:
    """uint16 keys (any shape) -> the float16 values they order (the inverse of ``order_keys``)."""
    keys = keys.astype(np.uint16)
    return np.where(keys & 0x8000, keys & 0x7FFF, ~keys).astype(np.uint16).view(np.float16)


def block_digit_counts(store_path: str, layer: str, start: int, stop: int,
                       high: np.ndarray | None) -> np.ndarray:
    """Counts of key digits per unit of images start..stop (runs on a dask worker).

    high None: (U, 256) counts of the keys' high bytes. high (U, R) uint8:
    (U, R, 256) counts of the low bytes of the keys whose high byte is high[u, r].
    """
    keys = order_keys(block_values(store_path, layer, start, stop))
    if high is None:
        return np.stack([np.bincount(row >> 8, minlength=DIGITS) for row in keys]).astype(np.int64)
    counts = np.zeros((*high.shape, DIGITS), dtype=np.int64)
    for unit, row in enumerate(keys):
        for r, byte in enumerate(high[unit]):
            counts[unit, r] = np.bincount(row[(row >> 8) == byte] & 0xFF, minlength=DIGITS)
    return counts


def select_digit(counts: np.ndarray, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U, R, 256) digit counts, (U, R) ascending ranks -> (U, R) digits holding each rank, (U, R) ranks within them."""
    cumulative = np.cumsum(counts, axis=-1)
    digits = (cumulative <= ranks[..., None]).sum(axis=-1)
    before = np.take_along_axis(cumulative - counts, digits[..., None], axis=-1)[..., 0]
    return digits, ranks - before


def merge_blocks(client: Client, task: Callable[..., np.ndarray], store_path: Path, layer: str, block_images: int,
                 extra: tuple, combine: Callable[[np.ndarray, np.ndarray], np.ndarray], desc: str) -> np.ndarray:
    """``task(store, layer, start, stop, *extra)`` on every block of images, combined on the client as they finish.

    Blocks run in a bounded window (``results_in_window``), so the block results
    waiting in the workers' memory do not grow with the number of images.
    """
    n_images = zarr.open_group(store_path, mode="r")[layer]["maps"].shape[0]
    calls = [(str(store_path), layer, first, min(first + block_images, n_images), *extra)
             for first in range(0, n_images, block_images)]
    merged = None
    with tqdm(total=len(calls), desc=desc, unit="block") as bar:
        for _, part in results_in_window(client, task, calls):
            merged = part if merged is None else combine(merged, part)
            bar.update()
    return merged


def top_m_thresholds(client: Client, store_path: Path, layer: str, lo: int, frac: float, n_values: int,
                     block_images: int) -> np.ndarray:
    """(U,) thresholds of a map layer by the top-m merge (one pass)."""
    m = n_values - lo
    top = merge_blocks(client, block_top_values, store_path, layer, block_images, (m,),
                       lambda merged, part: top_values(np.concatenate([merged, part], axis=1), m),
                       f"thresholds {layer}")
    return interpolate_threshold(top, lo, frac, n_values)


def radix_thresholds(client: Client, store_path: Path, layer: str, lo: int, frac: float, n_values: int,
                     block_images: int) -> np.ndarray:
    """(U,) thresholds of a map layer by radix select over the float16 keys (two passes, O(U) memory)."""
    n_units = zarr.open_group(store_path, mode="r")[layer]["maps"].shape[1]
    ranks = np.broadcast_to(np.array([lo, min(lo + 1, n_values - 1)]), (n_units, 2))
    high_counts = merge_blocks(client, block_digit_counts, store_path, layer, block_images, (None,), np.add,
                               f"thresholds {layer} (pass 1 of 2)")
    high, within = select_digit(np.broadcast_to(high_counts[:, None], (n_units, 2, DIGITS)), ranks)
    low_counts = merge_blocks(client, block_digit_counts, store_path, layer, block_images, (high.astype(np.uint8),),
                              np.add, f"thresholds {layer} (pass 2 of 2)")
    low, _ = select_digit(low_counts, within)
    values = key_values(high * DIGITS + low)
    return lerp(values[:, 0], values[:, 1], frac)


def layer_thresholds(client: Client, store_path: Path, layer: str, quantile: float, block_images: int,
                     memory_mib: float) -> tuple[np.ndarray, dict[str, object]]:
    """(U,) per-unit thresholds of a map layer and how they were found (the method, the top-m merge's peak)."""
    root = zarr.open_group(store_path, mode="r")
    _, n_units, h, w = root[layer]["maps"].shape
    n_values = int(root["valid"][:].sum()) * h * w
    lo, frac = quantile_rank(n_values, quantile)
    peak = exact_peak_mib(n_units, n_values - lo)
    method = "top-m merge" if peak <= memory_mib else "radix select"
    log.info("thresholds %s: %s (the top-m merge would peak at %.4g MiB; thresholds.memory_mib=%g)",
             layer, method, peak, memory_mib)
    compute = top_m_thresholds if method == "top-m merge" else radix_thresholds
    thresholds = compute(client, store_path, layer, lo, frac, n_values, block_images)
    return thresholds, {"method": method, "method_detail": METHODS[method], "top_m_peak_mib": peak,
                        "memory_mib": memory_mib}


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
                thresholds, how = layer_thresholds(client, layout.activations, layer, quantile,
                                                   int(cfg.thresholds.block_images),
                                                   float(cfg.thresholds.memory_mib))
                start(layout, "thresholds", layer)
                write_thresholds(layout, layer, thresholds, quantile, store, how)
                write_stamp(layout.stamp("thresholds", layer), inputs, FORMAT)
    return layout.root


def layer_inputs(layout: RunLayout, quantile: float) -> dict[str, object]:
    """What a layer's thresholds depend on: not the block size, nor the memory budget (both methods are exact)."""
    return {"quantile": quantile, "extract": stamp_digest(layout.stamp("extract"), "extract")}


def write_thresholds(layout: RunLayout, layer: str, thresholds: np.ndarray, quantile: float, store: zarr.Group,
                     how: dict[str, object] | None = None) -> None:
    """Write thresholds.csv and thresholds.json of ``layer`` ((U,) thresholds; ``how``: the method, when known)."""
    layout.layer_dir(layer).mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"unit": np.arange(len(thresholds)), "threshold": thresholds})
    table.to_csv(layout.thresholds_csv(layer), index=False, float_format="%.17g")
    write_json_atomic(layout.thresholds_json(layer), {
        "quantile": quantile,
        "result": "numpy.quantile(values, 1 - quantile), linear interpolation",
        **(how or {}),
        "valid_images": int(store["valid"][:].sum()),
    })
