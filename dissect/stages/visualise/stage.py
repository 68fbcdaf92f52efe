"""The visualise stage: its targets and inputs, its tasks on the cluster, its outputs and stamp.

This process reads the settings, loads the model (to check layers and class
indices), chooses the targets (``targets_table``) and the images to dream on
and to view, and writes every output. The model work (one task per batch of
targets of one layer, one task per deep-dream image) runs as dask tasks on the
run's cluster, each worker with its own copy of the model
(``dissect.stages.attribute.worker``: loaded once per worker, an in-process
worker reuses this process's). Every random draw is seeded per row
(``row_seed``), so the images do not depend on the batching or on which
worker ran what. The viewer runs no model: it reads the stored maps.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import zarr
from distributed import as_completed, get_worker
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from dissect.artifacts import map_layers, open_activations, write_json_atomic
from dissect.cluster import dask_client, device_lock
from dissect.devices import pick_device
from dissect.errors import ConfigError, DataError
from dissect.layers import get_layer
from dissect.layout import RunLayout
from dissect.probe import Preprocessing, ProbeSet, open_probe_set
from dissect.settings import VisualiseSettings, section
from dissect.stages.attribute.model import prepare_model
from dissect.stages.attribute.pairs import load_images, select_units
from dissect.stages.attribute.stage import prepare_workers
from dissect.stages.attribute.worker import ModelSpec, load_seeded, worker_model
from dissect.stages.visualise.ascent import Normalisation, Synthesised, synthesise
from dissect.stages.visualise.dream import Dreamed, dream
from dissect.stages.visualise.objectives import Target, output_size
from dissect.stages.visualise.viewer import map_grid, overlay_picture, strongest_units, tile_scales
from dissect.stamps import canonical, is_current, optional_digest, start, write_stamp

log = logging.getLogger(__name__)

#: The version of this stage's output format.
FORMAT = 1

#: The columns of units.csv, in order.
UNIT_COLUMNS = ["kind", "layer", "index", "copy", "seed", "reason", "objective", "param", "steps", "initial",
                "reached", "best_probe", "best_probe_image", "exceeds_probe", "flat", "max_gradient", "image_std",
                "image"]


def check(cfg: DictConfig) -> None:
    """Refuse bad visualise settings before any stage runs."""
    if "visualise" not in cfg:
        raise ConfigError("the config has no visualise section; add it to conf/config.yaml (see README)")
    settings = section(cfg.visualise, VisualiseSettings)
    pick_device(settings.device, "visualise.device")


def row_seed(seed: int, kind: str, layer: str | None, index: int | None, copy: int) -> int:
    """The seed of one synthesised image: ``visualise.seed`` mixed with what the image is of, never with its batch."""
    return (zlib.crc32(f"{kind}|{layer}|{index}|{copy}".encode()) ^ seed) % 2**31


def dead_units(layout: RunLayout, layers: list[str], count: int) -> list[tuple[str, int, str]]:
    """Up to ``count`` dead, then nearly dead, units per layer from the audit (layer, unit, reason); [] without it."""
    if count == 0 or not layout.stamp("audit").exists():
        return []
    table = pd.read_csv(layout.audit_units_csv)
    chosen = []
    for layer in layers:
        rows = table[table["layer"] == layer]
        dead = [(layer, int(u), "dead") for u in rows.loc[rows["dead"], "unit"]]
        nearly = [(layer, int(u), "nearly dead") for u in rows.loc[rows["nearly_dead"] & ~rows["dead"], "unit"]]
        chosen += (dead + nearly)[:count]
    return chosen


def targets_table(layout: RunLayout, layers: list[str], settings: VisualiseSettings, iou_threshold: float,
                  unit_counts: dict[str | None, int]) -> pd.DataFrame:
    """One row per image to synthesise: kind, layer ("" for classes), index, copy, seed, reason.

    Units: the selection shared with the attribute stage (``select_units``),
    then the audit's dead or nearly dead units, each once; classes after.
    ``unit_counts`` gives the units of each layer (None: the classes), checked here.
    """
    pairs = tuple((str(p[0]), int(p[1])) for p in settings.unit_pairs)
    selection = UnitSelection(settings.units, settings.top_units, settings.unit_label, pairs)
    reasons = {"top": "detector", "label": "label", "pairs": "pair"}
    units = [(layer, unit, reasons.get(settings.units, "")) for layer, unit in
             select_units(layout, layers, selection, iou_threshold, "visualise")]
    seen = {(layer, unit) for layer, unit, _ in units}
    units += [row for row in dead_units(layout, layers, settings.dead_units) if row[:2] not in seen]
    rows = []
    for layer, unit, reason in units:
        if layer not in unit_counts:
            raise ConfigError(f"visualise: layer {layer!r} is not among the recorded layers "
                              f"{[name for name in unit_counts if name is not None]}")
        if unit >= unit_counts[layer]:
            raise ConfigError(f"visualise.unit_pairs: unit {unit} of layer {layer!r} does not exist; "
                              f"units are 0..{unit_counts[layer] - 1}")
        rows += [("unit", layer, unit, copy, reason) for copy in range(settings.copies)]
    for target in settings.classes:
        if target >= unit_counts[None]:
            raise ConfigError(f"visualise.classes: class {target} does not exist; the model has "
                              f"{unit_counts[None]} outputs (0..{unit_counts[None] - 1})")
        rows += [("class", "", int(target), copy, "class") for copy in range(settings.copies)]
    table = pd.DataFrame(rows, columns=["kind", "layer", "index", "copy", "reason"])
    table.insert(4, "seed", [row_seed(settings.seed, r.kind, r.layer or None, r.index, r.copy)
                             for r in table.itertuples()])
    return table


@dataclass(frozen=True)
class UnitSelection:
    """The unit selection of the ``visualise`` section, in the form ``select_units`` reads."""

    units: str
    top_units: int
    unit_label: str | None
    unit_pairs: tuple[tuple[str, int], ...]


def probe_best(store: zarr.Group, layer: str, units: list[int], unit_objective: str) -> dict[int, tuple[float, int]]:
    """Unit -> (its largest objective over the valid probe images, that image's index), read chunk by chunk.

    The objective is the one ``synthesise`` maximises (objectives.py): the
    channel's mean or centre value for a map layer, the element for a vector layer.
    """
    group, valid = store[layer], store["valid"][:]
    array = group["maps"] if "maps" in group else group["activations"]
    step = array.chunks[0]
    best = {unit: (-np.inf, -1) for unit in units}
    for begin in range(0, array.shape[0], step):
        block = array[begin:begin + step][:, units].astype(np.float32)
        if block.ndim == 4:
            h, w = block.shape[2:]
            block = block[:, :, h // 2, w // 2] if unit_objective == "centre" else block.mean(axis=(2, 3))
        block[~valid[begin:begin + step]] = -np.inf
        for column, unit in enumerate(units):
            row = int(np.argmax(block[:, column]))
            if block[row, column] > best[unit][0]:
                best[unit] = (float(block[row, column]), begin + row)
    return best


def synthesise_task(spec: ModelSpec, targets: list[Target], seeds: list[int], settings: VisualiseSettings,
                    normalise: Normalisation, input_size: int) -> tuple[Synthesised, str, str]:
    """One batch of synthesised images on this worker's model: (result, worker address, device)."""
    model, device = worker_model(spec)
    with device_lock():
        result = synthesise(model, targets, seeds, settings, normalise, input_size, device)
    return result, get_worker().address, str(device)


def dream_task(spec: ModelSpec, layer: str, image: torch.Tensor, settings: VisualiseSettings,
               normalise: Normalisation, seed: int) -> Dreamed:
    """Deep dream of ``layer`` on one (3, S, S) uint8 image on this worker's model."""
    model, device = worker_model(spec)
    with device_lock():
        return dream(model, layer, image.to(device).float() / 255, settings.dream, normalise, seed)


def layer_batches(table: pd.DataFrame, batch_size: int) -> list[list[int]]:
    """Row numbers of ``table`` cut into batches of at most batch_size rows that read one layer each."""
    batches = []
    for _, rows in table.groupby("layer", sort=False):
        index = rows.index.tolist()
        batches += [index[k:k + batch_size] for k in range(0, len(index), batch_size)]
    return batches


def image_choice(entries: int | list[Any], probe: ProbeSet, valid: np.ndarray, key: str,
                 paths: bool) -> list[tuple[int | None, Path]]:
    """(probe index or None, image path) of a number of first valid probe images or a list of ids (or paths)."""
    if isinstance(entries, int):
        return [(int(i), Path(probe.image_paths[i])) for i in np.flatnonzero(valid)[:entries]]
    position = {image_id: k for k, image_id in enumerate(probe.image_ids)}
    chosen = []
    for entry in entries:
        if str(entry) in position:
            chosen.append((position[str(entry)], Path(probe.image_paths[position[str(entry)]])))
        elif paths and Path(str(entry)).is_file():
            chosen.append((None, Path(str(entry))))
        else:
            allowed = "a probe image id or an image file" if paths else "a probe image id"
            raise DataError(f"visualise.{key}: {entry!r} is not {allowed} (ids look like {probe.image_ids[0]!r})")
    return chosen


def stage_inputs(cfg: DictConfig, layout: RunLayout, settings: VisualiseSettings,
                 description: dict[str, Any]) -> dict[str, Any]:
    """What the outputs depend on (``dissect.stamps``): settings, model, probe set, layers, upstream stamps."""
    layers = [str(layer) for layer in cfg.layers]
    return canonical({"visualise": asdict(settings), "model": description, "dataset": str(cfg.dataset.root),
                      "layers": layers, "iou_threshold": float(cfg.tally.iou_threshold),
                      "upstream": {"extract": optional_digest(layout.stamp("extract")),
                                   "audit": optional_digest(layout.stamp("audit")),
                                   "tally": {layer: optional_digest(layout.stamp("tally", layer))
                                             for layer in layers}}})


def run(cfg: DictConfig) -> Path:
    """Synthesised images of the selected units and classes, deep dreams and activation-map grids."""
    check(cfg)
    settings = section(cfg.visualise, VisualiseSettings)
    device = pick_device(settings.device, "visualise.device")
    layout = RunLayout(Path(cfg.out_dir))
    store = open_activations(layout.root)
    probe = open_probe_set(cfg.dataset)
    layers = [str(layer) for layer in cfg.layers]
    loaded = load_seeded(cfg.model, settings.seed)
    key = stage_inputs(cfg, layout, settings, loaded.description)
    if is_current(layout.stamp("visualise"), key, FORMAT, "visualise"):
        return layout.visualise_dir
    model = prepare_model(loaded.module.to(device))
    preprocessing = Preprocessing(loaded.input_size, loaded.mean, loaded.std)
    normalise = Normalisation(loaded.mean, loaded.std)
    valid = store["valid"][:]
    counts: dict[str | None, int] = {layer: int(store.attrs["layers"][layer]["shape"][0])
                                     for layer in store.attrs["layer_order"]}
    for layer in {str(p[0]) for p in settings.unit_pairs} - set(counts):
        get_layer(model.net, layer)  # an unknown name fails with the close names
        counts[layer] = output_size(model, layer, loaded.input_size, device)
    counts[None] = output_size(model, None, loaded.input_size, device)
    table = targets_table(layout, layers, settings, float(cfg.tally.iou_threshold), counts)
    dissected = map_layers(store, layers)
    dream_layer = settings.dream.layer or (dissected[len(dissected) // 2] if dissected else None)
    dreams = image_choice(settings.dream.images, probe, valid, "dream.images", paths=True) if dream_layer else []
    if dream_layer:
        get_layer(model.net, dream_layer)
    viewer_layers = settings.viewer.layers or dissected
    not_maps = [layer for layer in viewer_layers if layer not in dissected]
    if not_maps:
        raise ConfigError(f"visualise.viewer.layers: {not_maps} are not dissected map layers; allowed: {dissected}")
    viewed = image_choice(settings.viewer.images, probe, valid, "viewer.images", paths=False)
    log.info("visualise: %d images of %d steps (%s), %d deep dreams of %s, %d images viewed", len(table),
             settings.steps, settings.param, len(dreams), dream_layer, len(viewed))

    start(layout, "visualise")
    shutil.rmtree(layout.visualise_dir, ignore_errors=True)
    layout.visualise_dir.mkdir(parents=True)
    config = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(config, dict)
    spec = ModelSpec({**config, "checkpoint": loaded.description["checkpoint"]}, settings.device, settings.seed)
    started = time.perf_counter()
    with dask_client(cfg.cluster) as client:
        devices = prepare_workers(client, spec, model, device)
        images = load_images([str(path) for _, path in dreams], preprocessing) if dreams else None
        results, workers = synthesise_all(client, spec, table, settings, normalise, loaded.input_size, devices)
        dreamed = [client.submit(dream_task, spec, dream_layer, images[k], settings, normalise,
                                 row_seed(settings.seed, "dream", dream_layer, k, 0), pure=False)
                   for k in range(len(dreams))]
        dreamed = [future.result() for future in tqdm(dreamed, desc="deep dream", unit="image")]
    seconds = time.perf_counter() - started
    units = write_synthesised(layout, store, table, results, settings)
    dream_rows = write_dreams(layout, dreams, dreamed, dream_layer, probe)
    viewer_rows = write_viewer(layout, store, probe, viewed, viewer_layers, settings, preprocessing)
    write_json_atomic(layout.visualise_json, summary(settings, units, dream_rows, viewer_rows, results, workers,
                                                     seconds, dream_layer))
    write_stamp(layout.stamp("visualise"), key, FORMAT)
    return layout.visualise_dir


def synthesise_all(client: Any, spec: ModelSpec, table: pd.DataFrame, settings: VisualiseSettings,
                   normalise: Normalisation, input_size: int, devices: dict[str, str]
                   ) -> tuple[dict[int, tuple[list[int], Synthesised]], dict[str, dict[str, Any]]]:
    """Batch number -> (its rows of ``table``, its result), and per worker its device and the tasks it ran."""
    futures = {}
    for number, rows in enumerate(layer_batches(table, settings.batch_size)):
        targets = [Target(table.at[r, "kind"], table.at[r, "layer"] or None, int(table.at[r, "index"])) for r in rows]
        seeds = [int(table.at[r, "seed"]) for r in rows]
        futures[client.submit(synthesise_task, spec, targets, seeds, settings, normalise, input_size,
                              pure=False)] = (number, rows)
    workers = {address: {"device": name, "tasks": 0} for address, name in devices.items()}
    results = {}
    with tqdm(total=len(table), desc="visualise", unit="image") as bar:
        for future in as_completed(list(futures)):
            number, rows = futures[future]
            result, address, name = future.result()
            workers.setdefault(address, {"device": name, "tasks": 0})["tasks"] += 1
            results[number] = (rows, result)
            bar.update(len(rows))
    return dict(sorted(results.items())), workers


def write_synthesised(layout: RunLayout, store: zarr.Group, table: pd.DataFrame,
                      results: dict[int, tuple[list[int], Synthesised]], settings: VisualiseSettings) -> pd.DataFrame:
    """The PNG of every synthesised image and units.csv (best probe values from the stored activations)."""
    table = table.copy()
    for column in ("initial", "reached", "max_gradient", "image_std"):
        table[column] = np.nan
    table["flat"] = False
    table["image"] = ""
    for rows, result in results.values():
        for position, row in enumerate(rows):
            kind, layer = table.at[row, "kind"], table.at[row, "layer"]
            index, copy = int(table.at[row, "index"]), int(table.at[row, "copy"])
            path = (layout.visualise_unit_image(layer, index, copy) if kind == "unit"
                    else layout.visualise_class_image(index, copy))
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(result.images[position]).save(path)
            table.loc[row, ["initial", "reached", "max_gradient", "image_std"]] = (
                float(result.initial[position]), float(result.reached[position]),
                float(result.max_gradient[position]), float(result.image_std[position]))
            table.at[row, "flat"] = bool(result.flat[position])
            table.at[row, "image"] = str(path.relative_to(layout.root))
    table["objective"] = [settings.objective if k == "unit" else "logit" for k in table["kind"]]
    table["param"], table["steps"] = settings.param, settings.steps
    table["best_probe"], table["best_probe_image"] = np.nan, -1
    for layer, rows in table[table["kind"] == "unit"].groupby("layer"):
        if layer not in store.attrs["layers"]:
            continue  # a unit_pairs layer that was not extracted: no probe activations to compare with
        best = probe_best(store, layer, sorted(set(rows["index"].astype(int))), settings.objective)
        table.loc[rows.index, "best_probe"] = [best[int(u)][0] for u in rows["index"]]
        table.loc[rows.index, "best_probe_image"] = [best[int(u)][1] for u in rows["index"]]
    table["exceeds_probe"] = table["reached"] > table["best_probe"]
    table = table[UNIT_COLUMNS]
    table.to_csv(layout.visualise_units_csv, index=False, float_format="%.6g")
    return table


def write_dreams(layout: RunLayout, dreams: list[tuple[int | None, Path]], dreamed: list[Dreamed],
                 layer: str | None, probe: ProbeSet) -> pd.DataFrame:
    """Each deep dream as a PNG (the image, then the dream) and dream.csv (one row per image and octave)."""
    rows = []
    for number, ((index, path), result) in enumerate(zip(dreams, dreamed)):
        original = Image.open(path).convert("RGB").resize(result.image.shape[1::-1], Image.BILINEAR)
        picture = np.concatenate([np.asarray(original), np.full((result.image.shape[0], 4, 3), 255, np.uint8),
                                  result.image], axis=1)
        out = layout.visualise_dream_image(number, str(layer))
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(out)
        source = probe.image_ids[index] if index is not None else str(path)
        rows += [{"dream": number, "source": source, "image_index": -1 if index is None else index, "layer": layer,
                  "octave": octave, "size": size, "start": begin, "end": end, "seconds": result.seconds,
                  "image": str(out.relative_to(layout.root))}
                 for octave, (size, begin, end) in enumerate(zip(result.sizes, result.start, result.end))]
    table = pd.DataFrame(rows, columns=["dream", "source", "image_index", "layer", "octave", "size", "start", "end",
                                        "seconds", "image"])
    table.to_csv(layout.visualise_dream_csv, index=False, float_format="%.6g")
    return table


def write_viewer(layout: RunLayout, store: zarr.Group, probe: ProbeSet, viewed: list[tuple[int | None, Path]],
                 layers: list[str], settings: VisualiseSettings, preprocessing: Preprocessing) -> pd.DataFrame:
    """Per viewed image and layer: the map grid, the overlay of its strongest units, and a viewer.csv row."""
    rows = []
    for index, path in viewed:
        assert index is not None
        image = load_images([str(path)], preprocessing)[0].permute(1, 2, 0).numpy()
        for layer in layers:
            maps = store[layer]["maps"][index].astype(np.float32)  # (U, h, w)
            scales = tile_scales(maps, settings.viewer.normalise)
            grid_picture, grid = map_grid(maps, scales)
            strongest = strongest_units(maps, settings.viewer.overlay_units)
            maps_png, overlay_png = layout.visualise_viewer_maps(index, layer), layout.visualise_viewer_overlay(index, layer)
            maps_png.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grid_picture).save(maps_png)
            Image.fromarray(overlay_picture(image, maps, strongest)).save(overlay_png)
            rows.append({"image_index": index, "image_id": probe.image_ids[index], "layer": layer,
                         "units": len(maps), "columns": grid.columns, "zoom": grid.zoom,
                         "map_height": grid.map_shape[0], "map_width": grid.map_shape[1], "gap": grid.gap,
                         "normalise": settings.viewer.normalise, "scales": json.dumps(scales.tolist()),
                         "black_tiles": int((scales <= 0).sum()), "strongest": json.dumps(strongest),
                         "maps_png": str(maps_png.relative_to(layout.root)),
                         "overlay_png": str(overlay_png.relative_to(layout.root))})
    columns = ["image_index", "image_id", "layer", "units", "columns", "zoom", "map_height", "map_width", "gap",
               "normalise", "scales", "black_tiles", "strongest", "maps_png", "overlay_png"]
    table = pd.DataFrame(rows, columns=columns)
    table.to_csv(layout.visualise_viewer_csv, index=False)
    return table


def summary(settings: VisualiseSettings, units: pd.DataFrame, dreams: pd.DataFrame, viewer: pd.DataFrame,
            results: dict[int, tuple[list[int], Synthesised]], workers: dict[str, dict[str, Any]],
            seconds: float, dream_layer: str | None) -> dict[str, Any]:
    """visualise.json: what was made, how fast, on what, and which images came out flat."""
    model_seconds = sum(result.seconds for _, result in results.values())
    flat = units[units["flat"]]
    compared = units[units["best_probe"].notna()]
    return {"settings": asdict(settings), "workers": workers, "seconds": seconds,
            "images": {"units": int((units["kind"] == "unit").sum()), "classes": int((units["kind"] == "class").sum())},
            "model_seconds": model_seconds, "seconds_per_image": model_seconds / len(units) if len(units) else None,
            "batches": len(results),
            "flat": [{"kind": r.kind, "layer": r.layer, "index": int(r.index), "reason": r.reason}
                     for r in flat.itertuples()],
            "exceeds_probe": {"compared": len(compared), "exceeding": int(compared["exceeds_probe"].sum())},
            "dream": {"layer": dream_layer, "images": int(dreams["dream"].nunique()) if len(dreams) else 0,
                      "raised_every_octave": bool((dreams["end"] > dreams["start"]).all()) if len(dreams) else None},
            "viewer": {"images": int(viewer["image_index"].nunique()) if len(viewer) else 0,
                       "layers": sorted(set(viewer["layer"])) if len(viewer) else []}}
