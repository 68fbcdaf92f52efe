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
intersection). Label 0 (unlabelled) is ignored. Work runs on dask.distributed
over blocks of images; the partial tally of each finished block is kept in
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
from distributed import as_completed
from omegaconf import DictConfig
from tqdm import tqdm

from dissect.artifacts import concept_probe_set, map_layers, open_activations, read_json, read_thresholds, write_json_atomic
from dissect.broden import CATEGORIES, BrodenDataset, BrodenFormatError, image_concepts
from dissect.cluster import dask_client
from dissect.layout import RunLayout
from dissect.settings import TallySettings, section
from dissect.stamps import is_current, stamp_digest, start, write_stamp
from dissect.upsample import fired_masks, float32_below

log = logging.getLogger(__name__)

#: The version of this stage's output format.
FORMAT = 1


def tally_block(store_path: str, broden_root: str, layers: list[str], thresholds: dict[str, np.ndarray],
                start: int, stop: int, strict: bool) -> dict[str, Any]:
    """Partial tally of images start..stop (runs on a dask worker).

    Returns ``truth`` (L+1,), for each layer ``intersection/<layer>`` (U, L+1)
    and ``activation/<layer>`` (U, n_categories), all int64, and ``skipped``: a
    list of (image index, reason) for images whose masks could not be used.
    """
    broden = BrodenDataset(broden_root)
    n_labels = len(broden.labels)
    store = zarr.open_group(store_path, mode="r")
    valid = store["valid"][start:stop]
    maps = {layer: store[layer]["maps"][start:stop] for layer in layers}
    maxima = {layer: store[layer]["maxima"][start:stop] for layer in layers}
    result: dict[str, Any] = {"truth": np.zeros(n_labels + 1, dtype=np.int64), "skipped": []}
    below = {layer: float32_below(thresholds[layer]) for layer in layers}
    for layer in layers:
        n_units = maps[layer].shape[1]
        result[f"intersection/{layer}"] = np.zeros((n_units, n_labels + 1), dtype=np.int64)
        result[f"activation/{layer}"] = np.zeros((n_units, len(CATEGORIES)), dtype=np.int64)
    for j, i in enumerate(range(start, stop)):
        if not valid[j]:
            continue
        try:
            concepts = image_concepts(broden, i, n_labels)
        except BrodenFormatError as error:
            if strict:
                raise
            result["skipped"].append((i, str(error)))
            continue
        result["truth"][concepts.labels] += concepts.masks.sum(axis=1)
        annotated = np.flatnonzero(concepts.annotated)
        concept_pixels = concepts.masks.T.astype(np.float32)
        for layer in layers:
            active = np.flatnonzero(maxima[layer][j] > thresholds[layer])
            if active.size == 0:
                continue
            fired = fired_masks(maps[layer][j, active], below[layer][active], broden.mask_size(i))
            result[f"activation/{layer}"][np.ix_(active, annotated)] += fired.sum(axis=1)[:, None]
            overlap = fired.astype(np.float32) @ concept_pixels  # exact in float32: counts stay far below 2**24
            result[f"intersection/{layer}"][np.ix_(active, concepts.labels)] += overlap.astype(np.int64)
    return result


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
                   "labels": len(broden.labels)}
    if (parts / "meta.json").exists() and read_json(parts / "meta.json") != fingerprint:
        log.info("tally: thresholds, layers or settings changed since the kept block tallies; starting over")
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    write_json_atomic(parts / "meta.json", fingerprint)
    starts = list(range(0, n_images, block_images))
    todo = [s for s in starts if not _part_path(parts, s).exists()]
    if todo:
        store_path = str(layout.activations)
        with dask_client(cfg.cluster) as client:
            thresholds_future = client.scatter(thresholds, broadcast=True)
            block_of = {client.submit(tally_block, store_path, str(broden.root), layers, thresholds_future, s,
                                      min(s + block_images, n_images), bool(cfg.tally.strict), pure=False): s
                        for s in todo}
            remaining = sum(min(s + block_images, n_images) - s for s in todo)
            first_error: BaseException | None = None
            with tqdm(total=n_images, initial=n_images - remaining, desc="tally", unit="img") as bar:
                for future in as_completed(list(block_of)):
                    start = block_of[future]
                    if future.status == "error":  # keep tallying the other blocks, raise at the end
                        first_error = first_error or future.exception()
                    else:
                        _save_part(parts, start, future.result())
                    future.release()
                    bar.update(min(start + block_images, n_images) - start)
            if first_error is not None:
                raise first_error
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
