"""The thresholds stage: per-unit top-quantile thresholds of the raw activations.

For each map layer, T_u is the ``thresholds.quantile`` top quantile (0.005 by
default, i.e. the 99.5th percentile) of unit u's stored float16 activations
over all valid images and all spatial positions. It equals
``numpy.quantile(values, 1 - quantile)`` (linear interpolation) on the unit's
values: numpy's formula between the order statistics at ascending ranks lo and
lo + 1 (``quantile_rank``). No layer is ever loaded whole; the work runs on the
run's dask cluster in tasks of ``thresholds.block_images`` images. Two methods
find those order statistics, within the budget ``thresholds.memory_mib``:

- **top-m counts** (one pass over the maps, tried first): each block counts,
  per unit, how often each float16 value occurs among its m largest values
  (m = n_values - lo, the number of order statistics from rank lo up): a
  ``bincount`` of every unit's raw float16 bit patterns, read back in key
  order (``dense_top_counts``) when a unit has many values in the block,
  else the units' keys partitioned and sorted into runs
  (``sorted_top_counts``). The client adds each block's counts to
  its own as blocks finish and keeps those of the m largest values again
  (``keep_top``, ``merge_top_counts``); the order statistics are read off the
  kept counts (``keys_at_descending``).
  A unit keeps at most min(m, 65,536) distinct values, however many images
  there are, and in practice far fewer (the top 0.5% of a unit's values
  spans a few thousand float16 values). A merge holds ``COUNTS_MERGE_BYTES``
  per entry of its two inputs; when one would hold more than the budget, the
  stage switches to:
- **radix select** (two passes): the float16 values are mapped to 16-bit keys
  in the same order (``order_keys``), and the order statistics are found digit
  by digit. Pass 1 counts each unit's keys by their high byte ((U, 256) counts
  summed over blocks), which gives the high byte of the keys at ranks lo and
  lo + 1 and their ranks within that byte; pass 2 counts the low bytes of just
  the keys with that high byte ((U, 2, 256) counts), which gives the rest. The
  client holds 4 KiB of counts per unit whatever the number of images. Error
  bound: zero. Two 8-bit digits cover every bit of a float16 key, so the order
  statistics are the exact stored values and the thresholds are bit-identical
  to the top-m counts and to ``numpy.quantile`` (only a -0.0 reads as +0.0,
  which compares equal).

Because both methods give the same thresholds, the budget is not an input of
the layer's stamp: changing it re-runs nothing.

Output: ``layers/<layer>/thresholds.csv`` with columns ``unit, threshold``,
``layers/<layer>/thresholds.json`` with the quantile, the method used, the
largest merge's peak of the top-m counts in MiB (``counts_peak_mib``; for the
radix select, the merge that would have passed the budget) against the budget
and the counts, then the layer's stamp
(inputs: the quantile and the extract stage's stamp).
"""

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
#: Bytes a merge of the top-m counts holds at its peak per entry of its two inputs (16 bytes each, kept
#: with the merge's temporaries; 73.6 measured with tracemalloc at 75,000-480,000 entries).
COUNTS_MERGE_BYTES = 80
#: The methods, as thresholds.json names them.
METHODS = {
    "top-m counts": "exact: per unit, the counts of the float16 values among each block's m largest, summed over "
                    "blocks keeping the m largest, one pass",
    "radix select": "exact: per-unit counts of the float16 keys' high byte, then of the low byte under the "
                    "quantile's high byte, two passes; error bound zero",
}
#: Values per unit of a block from which ``dense_top_counts`` (65,536 bins a unit) beats ``sorted_top_counts``.
DENSE_MIN_VALUES = 1 << 15
#: Bits of a key (a float16 bit pattern), and the distinct keys.
KEY_BITS = 16
KEYS = 1 << KEY_BITS
#: Values of one digit of a 16-bit key.
DIGITS = 256


def quantile_rank(n_values: int, quantile: float) -> tuple[int, float]:
    """(lo, frac): numpy's linear quantile at 1 - quantile is v[lo] + frac * (v[lo + 1] - v[lo]) of sorted v."""
    position = (1.0 - quantile) * (n_values - 1)
    lo = math.floor(position)
    return lo, position - lo


#: (codes, counts): (E,) int64 codes unit * KEYS + key (``order_keys``), ascending, and (E,) int64 how many
#: of the unit's values have that key.
TopCounts = tuple[np.ndarray, np.ndarray]


class CountsOverBudget(Exception):
    """A merge of the top-m counts would hold more than ``thresholds.memory_mib`` (args: its peak in MiB)."""


def block_values(store_path: str, layer: str, start: int, stop: int) -> np.ndarray:
    """Images start..stop of a layer's maps -> (U, n) float16 values per unit (invalid images left out)."""
    root = zarr.open_group(store_path, mode="r")
    valid = root["valid"][start:stop]
    maps = root[layer]["maps"][start:stop][valid]
    return np.moveaxis(maps, 1, 0).reshape(maps.shape[1], -1)


def keep_top(codes: np.ndarray, counts: np.ndarray, m: int) -> TopCounts:
    """``TopCounts`` as two arrays -> its entries that hold each unit's m largest values.

    An entry is kept when fewer than m values of its unit are larger, so the
    kept counts of a unit sum to at least m (or to all of its values).
    """
    units = codes >> KEY_BITS
    starts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]])
    suffix = np.append(np.cumsum(counts[::-1])[::-1], 0)  # the count of this entry and of every later one
    after_unit = np.repeat(suffix[np.r_[starts[1:], len(codes)]], np.diff(np.r_[starts, len(codes)]))
    larger = suffix[:-1] - counts - after_unit  # values of the same unit above this entry's
    keep = larger < m
    return codes[keep], counts[keep]


def keys_of(values: np.ndarray) -> np.ndarray:
    """float16 values (any shape) -> their uint16 keys, ``order_keys`` through a table of every bit pattern."""
    return _KEY_OF_BITS[values.view(np.uint16)]


def dense_top_counts(values: np.ndarray, m: int) -> TopCounts:
    """(U, n) float16 values -> ``TopCounts`` of each row's m largest, by a ``bincount`` of every row.

    Each row's raw bit patterns are counted, and the 65,536 counts read in key
    order (cheaper than mapping every value to its key first). Costs about 2 ns
    per value plus 0.3 ms per row (its 65,536 bins).
    """
    codes, counts = [], []
    for unit, row in enumerate(values.view(np.uint16)):
        per_bits = np.bincount(row, minlength=KEYS)
        per_bits[0] += per_bits[0x8000]  # -0.0 counts as +0.0, as order_keys maps it
        per_bits[0x8000] = 0
        per_key = per_bits[_BITS_OF_KEY]
        present = np.flatnonzero(per_key)
        codes.append(present + unit * KEYS)
        counts.append(per_key[present])
    return keep_top(np.concatenate(codes), np.concatenate(counts), m)


def sorted_top_counts(values: np.ndarray, m: int) -> TopCounts:
    """(U, n) float16 values -> ``TopCounts`` of each row's m largest, by partitioning and sorting their keys.

    Costs about 15 ns per value kept (numpy sorts 16-bit keys by radix) and
    nothing per row. When m < n a row keeps exactly m values: ties at the cut
    are counted only as far as they reach the m largest, which is all a merge
    needs (every value among the m largest of all blocks is among the m
    largest of its own block).
    """
    keys = keys_of(values)
    n = keys.shape[1]
    if m < n:
        keys = np.partition(keys, n - m, axis=1)[:, n - m:]
    ordered = np.sort(keys, axis=1, kind="stable")
    starts = np.ones(ordered.shape, dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    units, columns = np.nonzero(starts)  # the first value of every run of equal keys, row by row
    ends = np.append(columns[1:], 0)
    ends[np.append(units[1:] != units[:-1], True)] = ordered.shape[1]  # a row's last run ends with the row
    return units.astype(np.int64) * KEYS + ordered[units, columns], (ends - columns).astype(np.int64)


def block_top_counts(store_path: str, layer: str, start: int, stop: int, m: int) -> TopCounts:
    """Images start..stop of a layer's maps -> ``TopCounts`` of each unit's m largest values (invalid images left
    out; runs on a worker): ``dense_top_counts`` when a unit has at least ``DENSE_MIN_VALUES`` values in the
    block, else ``sorted_top_counts`` (both give the same m largest values)."""
    values = block_values(store_path, layer, start, stop)
    return (dense_top_counts if values.shape[1] >= DENSE_MIN_VALUES else sorted_top_counts)(values, m)


def merge_top_counts(merged: TopCounts, part: TopCounts, m: int) -> TopCounts:
    """Two ``TopCounts`` (as ``block_top_counts`` gives) -> those of the m largest values per unit of both together."""
    codes, counts = np.concatenate([merged[0], part[0]]), np.concatenate([merged[1], part[1]])
    if not len(codes):  # no valid image yet
        return codes, counts
    order = np.argsort(codes, kind="stable")  # two ascending runs: a linear merge
    codes, counts = codes[order], counts[order]
    first = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    return keep_top(codes[first], np.add.reduceat(counts, first), m)


def keys_at_descending(codes: np.ndarray, counts: np.ndarray, n_units: int, positions: np.ndarray) -> np.ndarray:
    """``TopCounts`` codes and counts, (R,) positions from the top (0 = largest) -> (U, R) keys there.

    Every position must be below m, the number of largest values the counts keep.
    """
    bounds = np.searchsorted(codes >> KEY_BITS, np.arange(n_units + 1))
    keys = np.empty((n_units, len(positions)), dtype=np.int64)
    for unit in range(n_units):
        span = slice(bounds[unit], bounds[unit + 1])
        from_top = np.cumsum(counts[span][::-1])  # values at or above each entry, largest entry first
        keys[unit] = codes[span][::-1][np.searchsorted(from_top, positions, side="right")] % KEYS
    return keys


def lerp(below: np.ndarray, above: np.ndarray, frac: float) -> np.ndarray:
    """(U,) order statistics at ranks lo and lo + 1 -> (U,) float64 numpy.quantile's linear interpolation."""
    below, above = below.astype(np.float64), above.astype(np.float64)
    diff = above - below
    # the same two-sided formula as numpy's _lerp, so results agree to the last bit in float64
    return np.where(frac >= 0.5, above - diff * (1 - frac), below + diff * frac)


def order_keys(values: np.ndarray) -> np.ndarray:
    """float16 values (any shape) -> uint16 keys in the same order as the values (-0.0 as +0.0; NaN at the ends)."""
    bits = (values + np.float16(0)).view(np.uint16)  # -0.0 + 0.0 is +0.0
    return np.where(bits & 0x8000, ~bits, bits | 0x8000).astype(np.uint16)


def key_values(keys: np.ndarray) -> np.ndarray:
    """uint16 keys (any shape) -> the float16 values they order (the inverse of ``order_keys``)."""
    keys = keys.astype(np.uint16)
    return np.where(keys & 0x8000, keys & 0x7FFF, ~keys).astype(np.uint16).view(np.float16)


with np.errstate(invalid="ignore"):  # NaN + 0.0
    #: The key of every float16 bit pattern, indexed by the pattern (``order_keys`` of every float16).
    _KEY_OF_BITS = order_keys(np.arange(KEYS, dtype=np.uint16).view(np.float16))
#: The float16 bit pattern of every key, indexed by the key (-0.0's own key, 0x7FFF, is never given).
_BITS_OF_KEY = key_values(np.arange(KEYS)).view(np.uint16).astype(np.intp)


def block_digit_counts(store_path: str, layer: str, start: int, stop: int,
                       high: np.ndarray | None) -> np.ndarray:
    """Counts of key digits per unit of images start..stop (runs on a dask worker).

    high None: (U, 256) counts of the keys' high bytes. high (U, R) uint8:
    (U, R, 256) counts of the low bytes of the keys whose high byte is high[u, r].
    """
    keys = keys_of(block_values(store_path, layer, start, stop))
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


def merge_blocks(client: Client, task: Callable[..., Any], store_path: Path, layer: str, block_images: int,
                 extra: tuple, combine: Callable[[Any, Any], Any], initial: Any, desc: str) -> Any:
    """``task(store, layer, start, stop, *extra)`` on every block of images, combined on the client as they finish
    (``combine(merged, part)``, ``initial`` before the first block).

    Blocks run in a bounded window (``results_in_window``), so the block results
    waiting in the workers' memory do not grow with the number of images.
    """
    n_images = zarr.open_group(store_path, mode="r")[layer]["maps"].shape[0]
    calls = [(str(store_path), layer, first, min(first + block_images, n_images), *extra)
             for first in range(0, n_images, block_images)]
    merged = initial
    with tqdm(total=len(calls), desc=desc, unit="block") as bar:
        for _, part in results_in_window(client, task, calls):
            merged = combine(merged, part)
            bar.update()
    return merged


def top_counts_thresholds(client: Client, store_path: Path, layer: str, lo: int, frac: float, n_values: int,
                          block_images: int, memory_mib: float) -> tuple[np.ndarray, float]:
    """(U,) thresholds of a map layer by the top-m counts (one pass), and the largest merge's peak in MiB.

    Raises CountsOverBudget as soon as a merge would hold more than ``memory_mib``.
    """
    m = n_values - lo
    n_units = zarr.open_group(store_path, mode="r")[layer]["maps"].shape[1]
    peak = 0.0

    def combine(merged: TopCounts, part: TopCounts) -> TopCounts:
        nonlocal peak
        peak = max(peak, COUNTS_MERGE_BYTES * (len(merged[0]) + len(part[0])) / 2**20)
        if peak > memory_mib:
            raise CountsOverBudget(peak)
        return merge_top_counts(merged, part, m)

    empty = np.zeros(0, dtype=np.int64)
    codes, counts = merge_blocks(client, block_top_counts, store_path, layer, block_images, (m,), combine,
                                 (empty, empty), f"thresholds {layer}")
    # ascending ranks lo and lo + 1 are m - 1 and m - 2 from the top
    keys = keys_at_descending(codes, counts, n_units, np.array([m - 1, max(m - 2, 0)]))
    values = key_values(keys)
    return lerp(values[:, 0], values[:, 1], frac), peak


def radix_thresholds(client: Client, store_path: Path, layer: str, lo: int, frac: float, n_values: int,
                     block_images: int) -> np.ndarray:
    """(U,) thresholds of a map layer by radix select over the float16 keys (two passes, O(U) memory)."""
    n_units = zarr.open_group(store_path, mode="r")[layer]["maps"].shape[1]
    ranks = np.broadcast_to(np.array([lo, min(lo + 1, n_values - 1)]), (n_units, 2))
    high_counts = merge_blocks(client, block_digit_counts, store_path, layer, block_images, (None,), np.add, 0,
                               f"thresholds {layer} (pass 1 of 2)")
    high, within = select_digit(np.broadcast_to(high_counts[:, None], (n_units, 2, DIGITS)), ranks)
    low_counts = merge_blocks(client, block_digit_counts, store_path, layer, block_images, (high.astype(np.uint8),),
                              np.add, 0, f"thresholds {layer} (pass 2 of 2)")
    low, _ = select_digit(low_counts, within)
    values = key_values(high * DIGITS + low)
    return lerp(values[:, 0], values[:, 1], frac)


def layer_thresholds(client: Client, store_path: Path, layer: str, quantile: float, block_images: int,
                     memory_mib: float) -> tuple[np.ndarray, dict[str, object]]:
    """(U,) per-unit thresholds of a map layer and how they were found (the method, the counts' peak in MiB).

    The top-m counts first; the radix select when a merge of the counts would
    hold more than ``memory_mib`` (the same thresholds, in two more passes).
    """
    root = zarr.open_group(store_path, mode="r")
    _, n_units, h, w = root[layer]["maps"].shape
    n_values = int(root["valid"][:].sum()) * h * w
    lo, frac = quantile_rank(n_values, quantile)
    try:
        thresholds, peak = top_counts_thresholds(client, store_path, layer, lo, frac, n_values, block_images,
                                                 memory_mib)
        method = "top-m counts"
        log.info("thresholds %s: top-m counts, peak %.4g MiB (thresholds.memory_mib=%g)", layer, peak, memory_mib)
    except CountsOverBudget as over:
        peak, method = over.args[0], "radix select"
        log.info("thresholds %s: a merge of the top-m counts would hold %.4g MiB, over thresholds.memory_mib=%g; "
                 "radix select instead", layer, peak, memory_mib)
        thresholds = radix_thresholds(client, store_path, layer, lo, frac, n_values, block_images)
    return thresholds, {"method": method, "method_detail": METHODS[method], "counts_peak_mib": peak,
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
