"""The tally stage: IoU of every unit with every concept of a Broden-format probe set.

For each image and map layer, every unit whose stored maximum exceeds its
threshold T_u (thresholds stage) has its map upsampled bilinearly to the mask
resolution and thresholded, M_u = up(A_u) > T_u; units below T_u cannot fire
(bilinear values never exceed the map's maximum) and are skipped. Over the whole
probe set it accumulates

- ``intersection[u, c] += |M_u AND L_c|`` with L_c the union of c's pixels over
  every mask layer of the image (scene and texture labels cover the image),
- ``activation[u, k] += |M_u|`` for each category k annotated in the image,
- ``truth[c] += |L_c|``,

and IoU[u, c] = intersection / (activation[u, primary category of c] + truth -
intersection). Label 0 (unlabelled) is ignored.

The masks are read from the probe set's mask cache (``dissect.mask_cache``,
under ``tally.mask_cache``; the stage builds it on its dask cluster before the
first block if it is missing): each pixel's class (its set of labels) and each
image's whole-image labels. Only fired pixels are touched (``fired_pixels``: the
values of up(A_u) in the low-resolution cells one of whose corners can exceed
T_u); each adds 1 to (unit, label) for the labels of its class, in one
``bincount`` per piece, and a whole-image label's intersection is the unit's
fired count. The counts are integers, exact.

Work runs on dask.distributed over blocks of images; the workers memory-map
the cache read-only. The partial tally of each finished block is kept in
``tally/parts/``, so a killed tally resumes, and a change of
``tally.iou_threshold`` alone rewrites the results from the kept blocks.

Outputs, per map layer in ``layers/<layer>/``: ``tally.csv`` (one row per
unit: unit, category, label, iou, then ``<category>-label`` and
``<category>-iou`` for each category), ``iou.npy`` (U, L) float32 with the
columns described by ``concepts.csv`` (column, number, name, category),
``tally.json`` (the summary) and the layer's stamp (inputs: the layer's
thresholds stamp, the probe set, ``iou_threshold`` and ``strict``). Images
whose masks could not be read are listed in ``tally/skipped_masks.csv``.
"""

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from omegaconf import DictConfig
from tqdm import tqdm

from dissect.artifacts import concept_probe_set, map_layers, open_activations, read_json, read_thresholds, write_json_atomic
from dissect.broden import CATEGORIES, BrodenDataset, BrodenFormatError
from dissect.cluster import dask_client, results_in_window
from dissect.layout import RunLayout
from dissect.mask_cache import MaskCache, cache_name, ensure_mask_cache
from dissect.settings import TallySettings, section
from dissect.stamps import is_current, stamp_digest, start, write_stamp
from dissect.upsample import can_exceed, fired_pixels, float32_below

log = logging.getLogger(__name__)

#: The version of this stage's output format.
FORMAT = 1
#: Map values (maps x h x w) upsampled together in ``layer_counts``.
MAP_VALUES_PER_CHUNK = 1 << 22


def tally_block(store_path: str, cache_path: str, layers: list[str], thresholds: dict[str, np.ndarray],
                start: int, stop: int, strict: bool) -> dict[str, Any]:
    """Partial tally of images start..stop (runs on a dask worker) from the probe set's mask cache.

    Returns ``truth`` (L+1,), for each layer ``intersection/<layer>`` (U, L+1)
    and ``activation/<layer>`` (U, n_categories), all int64, and ``skipped``: a
    list of (image index, reason) for images whose masks could not be used.
    """
    cache = MaskCache(cache_path)
    store = zarr.open_group(store_path, mode="r")
    valid = store["valid"][start:stop]
    result: dict[str, Any] = {"skipped": []}
    kept = []
    for i in np.flatnonzero(valid).tolist():
        reason = cache.errors.get(start + i)
        if reason is None:
            kept.append(i)
        elif strict:
            raise BrodenFormatError(reason)
        else:
            result["skipped"].append((start + i, reason))
    images = start + np.array(kept, dtype=np.int64)
    result["truth"] = cache.truth(images)
    for layer in layers:
        maps = store[layer]["maps"][start:stop][kept]
        maxima = store[layer]["maxima"][start:stop][kept]
        result[f"intersection/{layer}"], result[f"activation/{layer}"] = layer_counts(
            cache, images, maps, maxima, float32_below(thresholds[layer]))
    return result


def layer_counts(cache: MaskCache, images: np.ndarray, maps: np.ndarray, maxima: np.ndarray,
                 thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n,) images, their (n, U, h, w) maps and (n, U) map maxima, (U,) float32 thresholds (``float32_below``)
    -> intersection (U, L+1) and activation (U, n_categories), int64.

    Only the maps whose maximum can exceed the threshold are upsampled, and only at their fired pixels
    (``fired_pixels``); each fired pixel adds 1 to its unit's count of every label of its pixel class, and
    whole-image labels and the activation take the unit's fired count in the image.
    """
    n_images, n_units, h, w = maps.shape
    columns = cache.n_labels + 1
    intersection = np.zeros(n_units * columns, dtype=np.int64)
    fired_count = np.zeros(n_images * n_units, dtype=np.int64)
    chunk = max(1, MAP_VALUES_PER_CHUNK // (h * w))
    for size in {cache.mask_size(i) for i in images.tolist()}:
        of_size = (cache.sizes[images] == size).all(axis=1)[:, None]
        active = np.flatnonzero(can_exceed(maxima, thresholds[None, :]) & of_size)  # image * U + unit
        for first in range(0, len(active), chunk):
            pairs = active[first:first + chunk]
            image, unit = np.divmod(pairs, n_units)
            pixel_start = cache.pixel_offset[images[image]]
            class_start = cache.class_offset[images[image]]
            for index, pixel in fired_pixels(maps.reshape(-1, h, w)[pairs], thresholds[unit], size):
                fired_count += np.bincount(pairs[index], minlength=fired_count.size)
                classes = cache.pixel_class[pixel_start[index] + pixel].astype(np.int64) + class_start[index]
                keys = unit[index, None] * columns + cache.class_labels[classes]  # (k, S); label 0 pads
                intersection += np.bincount(keys.ravel(), minlength=intersection.size)
    intersection = intersection.reshape(n_units, columns)
    intersection[:, 0] = 0
    fired_count = fired_count.reshape(n_images, n_units)
    whole = [cache.image_whole_labels(i) for i in images.tolist()]
    owner = np.repeat(np.arange(n_images), [len(labels) for labels in whole])
    np.add.at(intersection.T, np.concatenate([np.zeros(0, np.int64), *whole]), fired_count[owner])
    return intersection, fired_count.T @ cache.annotated[images].astype(np.int64)


def iou_matrix(intersection: np.ndarray, activation: np.ndarray, truth: np.ndarray,
               label_categories: np.ndarray) -> np.ndarray:
    """(U, L+1), (U, n_categories), (L+1,), (L+1,) category index per label -> (U, L) IoU (0 where undefined)."""
    inter = intersection[:, 1:].astype(np.float64)
    union = activation[:, label_categories[1:]] + truth[None, 1:] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def check(cfg: DictConfig) -> None:
    """Refuse bad tally settings before any stage runs."""
    section(cfg.tally, TallySettings)


def run(cfg: DictConfig) -> Path:
    """Tally every map layer of ``cfg.layers`` against the probe set's concepts; resume from kept block tallies."""
    check(cfg)
    layout = RunLayout(Path(cfg.out_dir))
    run_dir = layout.root
    store = open_activations(run_dir)
    broden = concept_probe_set(cfg.dataset, store, run_dir, "the tally")
    layers = map_layers(store, [str(name) for name in cfg.layers])
    if not layers:
        log.info("tally: no map layer among %s, nothing to tally", list(cfg.layers))
        return run_dir
    inputs = {layer: layer_inputs(cfg, layout, broden, layer) for layer in layers}
    todo = [layer for layer in layers
            if not is_current(layout.stamp("tally", layer), inputs[layer], FORMAT, f"tally of {layer}")]
    if not todo:
        return run_dir
    thresholds = {layer: read_thresholds(layout, layer) for layer in todo}
    totals, skipped = tally_all(cfg, layout, broden, todo, thresholds)
    label_categories = np.array([-1] + [CATEGORIES.index(broden.category_of(n))
                                        for n in range(1, len(broden.labels) + 1)])
    write_skipped(layout.skipped_masks, skipped, broden)
    for layer in todo:
        start(layout, "tally", layer)
        iou = iou_matrix(totals[f"intersection/{layer}"], totals[f"activation/{layer}"], totals["truth"],
                         label_categories)
        write_layer_results(layout, layer, iou, broden, label_categories, float(cfg.tally.iou_threshold), {
            "quantile": read_json(layout.thresholds_json(layer))["quantile"],
            "images_tallied": int(store["valid"][:].sum()) - len(skipped),
            "images_skipped": len(skipped),
        })
        write_stamp(layout.stamp("tally", layer), inputs[layer], FORMAT)
    return run_dir


def layer_inputs(cfg: DictConfig, layout: RunLayout, broden: BrodenDataset, layer: str) -> dict[str, Any]:
    """What a layer's tally depends on (the block size changes nothing)."""
    return {"thresholds": stamp_digest(layout.stamp("thresholds", layer), "thresholds"),
            "probe_set": str(broden.root), "labels": len(broden.labels),
            "iou_threshold": float(cfg.tally.iou_threshold), "strict": bool(cfg.tally.strict)}


def tally_all(cfg: DictConfig, layout: RunLayout, broden: BrodenDataset, layers: list[str],
              thresholds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[tuple[int, str]]]:
    """Tally the blocks not yet kept in tally/parts/, then sum every block's tally."""
    n_images = len(broden)
    block_images = int(cfg.tally.block_images)
    parts = layout.tally_parts
    fingerprint = {"layers": layers, "block_images": block_images, "strict": bool(cfg.tally.strict),
                   "thresholds": {layer: thresholds[layer].tolist() for layer in layers},
                   "labels": len(broden.labels), "masks": cache_name(broden)}
    if (parts / "meta.json").exists() and read_json(parts / "meta.json") != fingerprint:
        log.info("tally: thresholds, layers, settings or the probe set changed since the kept block tallies; "
                 "starting over")
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    write_json_atomic(parts / "meta.json", fingerprint)
    starts = list(range(0, n_images, block_images))
    todo = [s for s in starts if not _part_path(parts, s).exists()]
    if todo:
        store_path = str(layout.activations)
        with dask_client(cfg.cluster) as client:
            cache_path = str(ensure_mask_cache(broden, Path(str(cfg.tally.mask_cache)).resolve(), client))
            thresholds_future = client.scatter(thresholds, broadcast=True)
            calls = [(store_path, cache_path, layers, thresholds_future, s, min(s + block_images, n_images),
                      bool(cfg.tally.strict)) for s in todo]
            remaining = sum(min(s + block_images, n_images) - s for s in todo)
            with tqdm(total=n_images, initial=n_images - remaining, desc="tally", unit="img") as bar:
                # a failed block is raised after the others are tallied and kept
                for number, block in results_in_window(client, tally_block, calls, keep_going=True):
                    start = todo[number]
                    _save_part(parts, start, block)
                    bar.update(min(start + block_images, n_images) - start)
    return _sum_parts(parts, starts)


def _part_path(parts: Path, start: int) -> Path:
    return parts / f"block_{start:09d}.npz"


def _save_part(parts: Path, start: int, block: dict[str, Any]) -> None:
    """Keep one block's tally; written under a temporary name and renamed, so a kept part is whole."""
    skipped = block["skipped"]
    arrays = {key: value for key, value in block.items() if key != "skipped"}
    arrays["skipped_index"] = np.array([i for i, _ in skipped], dtype=np.int64)
    arrays["skipped_reason"] = np.array([reason for _, reason in skipped], dtype=str)
    tmp = parts / f"tmp_{start:09d}.npz"
    np.savez_compressed(tmp, **arrays)
    tmp.replace(_part_path(parts, start))


def _sum_parts(parts: Path, starts: list[int]) -> tuple[dict[str, np.ndarray], list[tuple[int, str]]]:
    totals: dict[str, np.ndarray] = {}
    skipped: list[tuple[int, str]] = []
    for first in starts:
        with np.load(_part_path(parts, first)) as part:
            for key in part.files:
                if key.startswith("skipped_"):
                    continue
                totals[key] = totals[key] + part[key] if key in totals else part[key].copy()
            skipped += list(zip(part["skipped_index"].tolist(), part["skipped_reason"].tolist()))
    return totals, skipped


def write_skipped(path: Path, skipped: list[tuple[int, str]], broden: BrodenDataset) -> None:
    """skipped_masks.csv: index, image, reason of each image left out for unreadable masks."""
    table = pd.DataFrame({"index": [i for i, _ in skipped], "image": [broden.image_ids[i] for i, _ in skipped],
                          "reason": [reason for _, reason in skipped]})
    table.to_csv(path, index=False)
    if skipped:
        log.warning("tally: %d images were skipped for unreadable masks; see %s", len(skipped), path)


def write_layer_results(layout: RunLayout, layer: str, iou: np.ndarray, broden: BrodenDataset,
                        label_categories: np.ndarray, iou_threshold: float, extra: dict[str, Any]) -> None:
    """tally.csv, iou.npy, concepts.csv and tally.json of one layer from its (U, L) IoU matrix."""
    layout.layer_dir(layer).mkdir(parents=True, exist_ok=True)
    names = np.array(broden.label_names[1:len(broden.labels) + 1], dtype=object)
    categories = label_categories[1:]
    best = iou.argmax(axis=1)  # ties go to the lowest label number
    table = pd.DataFrame({"unit": np.arange(len(iou)),
                          "category": [CATEGORIES[categories[b]] for b in best],
                          "label": names[best],
                          "iou": iou[np.arange(len(iou)), best]})
    for k, category in enumerate(CATEGORIES):
        columns = np.flatnonzero(categories == k)
        if columns.size:
            best_in = columns[iou[:, columns].argmax(axis=1)]
            table[f"{category}-label"] = names[best_in]
            table[f"{category}-iou"] = iou[np.arange(len(iou)), best_in]
        else:
            table[f"{category}-label"] = ""
            table[f"{category}-iou"] = 0.0
    table.to_csv(layout.tally_csv(layer), index=False, float_format="%.6f")
    np.save(layout.iou_npy(layer), iou.astype(np.float32))
    pd.DataFrame({"column": np.arange(len(names)), "number": np.arange(1, len(names) + 1), "name": names,
                  "category": [CATEGORIES[k] for k in categories]}).to_csv(layout.concepts_csv(layer), index=False)
    detectors = table[table["iou"] > iou_threshold]
    write_json_atomic(layout.tally_json(layer), {
        "layer": layer,
        "units": len(table),
        "detectors": len(detectors),
        "unique_detectors": int(detectors["label"].nunique()),
        "detectors_by_category": {c: int((detectors["category"] == c).sum()) for c in CATEGORIES},
        "unique_detectors_by_category": {c: int(detectors.loc[detectors["category"] == c, "label"].nunique())
                                         for c in CATEGORIES},
        "iou_threshold": iou_threshold,
        **extra,
    })


def summary_table(run_dir: Path, layers: list[str]) -> str:
    """Plain-text table of units, detectors and unique detectors per category for each tallied layer."""
    lines = []
    layout = RunLayout(Path(run_dir))
    for layer in layers:
        path = layout.tally_json(layer)
        if not path.exists():
            continue
        summary = read_json(path)
        lines.append(f"{layer}: {summary['units']} units, {summary['detectors']} detectors "
                     f"(IoU > {summary['iou_threshold']}), {summary['unique_detectors']} unique")
        for category in CATEGORIES:
            lines.append(f"  {category:<9} detectors {summary['detectors_by_category'][category]:>5}"
                         f"   unique {summary['unique_detectors_by_category'][category]:>4}")
    return "\n".join(lines)
