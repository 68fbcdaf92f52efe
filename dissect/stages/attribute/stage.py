"""The attribute stage: its inputs and stamp, the model passes it will make, its run on the cluster, its summary.

What runs where. This process does what is cheap and global: it reads the
settings, loads the model (``load_seeded``) to check the ReLU-only methods, build
the pair table (scores, predicted classes, Grad-CAM layers) and find the
randomisation cascade, and it writes maps.zarr, the tables, the strips,
attribute.json and the stamp. The model work runs as dask tasks on the run's
cluster (``dissect.cluster.dask_client``; by default one in-process worker):

- one task per method and pair batch (``pair_batches`` of the whole table, so
  the same batches as one in-process ``compute_maps``), for the methods not
  yet complete in maps.zarr; each returns the batch's stored form
  (``stored_form``), which this process writes into maps.zarr as it arrives
  (batches cut at layer changes need not align with the Zarr chunks, so no
  task writes). A method is marked complete when its last batch is written,
  so a killed run resumes at the first incomplete method;
- one task per randomisation step and method (``randomised_maps``): each
  re-initialises the cascade from the seed up to its step, so it needs no
  earlier step; this process computes the Spearman correlations against the
  trained maps read back from maps.zarr.

The images of each pair batch (and of the randomisation pairs) are scattered
once and shared by every method's task. Workers load the model from its
config (``dissect.stages.attribute.worker``), once per worker process, on
their own device (``attribute.device=auto``: the worker's GPU when it has
one); an in-process worker is handed this process's model instead. Every
random draw is seeded per piece (LIME per image with ``attribute.seed``, the
randomised weights with ``attribute.seed``, weights that no checkpoint sets
with ``attribute.seed`` at load), so the maps and tables do not depend on
which worker ran which piece, or in which order; they equal an in-process
run's wherever the workers compute like this process (same device type and
library versions). The device defaults of the costly keys follow this
process's device (a warning says so when the workers' differ).
``seconds`` per method in maps.zarr and attribute.json is the model time of
its tasks summed over the workers; attribute.json also lists the workers,
their device and how many tasks each ran.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import zarr
from distributed import Client, Future, as_completed
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from dissect.artifacts import open_activations, write_json_atomic
from dissect.broden import BrodenDataset
from dissect.cluster import check_worker_paths, dask_client
from dissect.devices import pick_device
from dissect.layout import RunLayout
from dissect.probe import Preprocessing, open_probe_set
from dissect.stages.attribute.checks import (
    RANDOMISATION_COLUMNS,
    agreement_table,
    cascade_stops,
    correlation_row,
    randomisation_cascade,
)
from dissect.stages.attribute.errors import AttributionError
from dissect.stages.attribute.guided_relu import other_activations
from dissect.stages.attribute.methods import (
    RELU_ONLY_METHODS,
    MAP_CONVENTIONS,
    PairBatch,
    model_passes,
    pair_batches,
)
from dissect.stages.attribute.model import (
    PreparedModel,
    prepare_model,
)
from dissect.stages.attribute.pairs import (
    build_pairs,
    load_images,
)
from dissect.stages.attribute.settings import (
    DEVICE_DEFAULTS,
    AttributeSettings,
    read_settings,
)
from dissect.stages.attribute.strips import (
    write_strips,
)
from dissect.stages.attribute.worker import (
    ModelSpec,
    load_seeded,
    maps_task,
    randomised_task,
    share_model,
    worker_device,
)
from dissect.stamps import canonical, is_current, optional_digest, start, write_stamp

log = logging.getLogger(__name__)


#: The version of this stage's output format.
FORMAT = 1


def drop_relu_only_methods(settings: AttributeSettings, model: PreparedModel, example: torch.Tensor,
                           all_methods: bool) -> AttributeSettings:
    """``settings`` without the ReLU-only methods when the model has activations they are not defined for.

    The guided rules replace the backward pass of ReLU, DeepLIFT's Rescale
    rule is applied to ReLU and max pooling, and LRP's rules assume a ReLU
    network (``Method.relu_only``). With ``methods: all`` they are left out
    with one warning; asked for by name, they stop the stage.
    """
    relu_only = [m for m in settings.methods if m in RELU_ONLY_METHODS]
    others = other_activations(model, example) if relu_only else {}
    if not others:
        return settings
    found = ", ".join(f"{name} ({calls} calls)" for name, calls in others.items())
    if not all_methods:
        raise AttributionError(f"the methods {relu_only} are defined for ReLU networks only, and the model also "
                               f"applies {found}; leave them out of attribute.methods")
    log.warning("attribute: leaving out %s: their rules are defined for ReLU networks only, and the model also "
                "applies %s", ", ".join(relu_only), found)
    return replace(settings, methods=tuple(m for m in settings.methods if m not in RELU_ONLY_METHODS))


def cost_sentence(settings: AttributeSettings, pairs: pd.DataFrame, input_size: int) -> str:
    """How many model passes the stage is about to make, for the log (forward and backward, one image each)."""
    per_pair = [model_passes(method, settings.method_settings(), input_size) for method in settings.methods]
    forward, backward = (sum(p[k] for p in per_pair) for k in (0, 1))
    checked = min(settings.randomisation_pairs, len(pairs)) * settings.randomisation_steps
    return (f"{len(pairs)} pairs x {len(settings.methods)} methods: {len(pairs) * forward:,} forward and "
            f"{len(pairs) * backward:,} backward passes of one image, then the randomisation check "
            f"({min(settings.randomisation_pairs, len(pairs))} pairs x {settings.randomisation_steps} steps): "
            f"{checked * forward:,} and {checked * backward:,} more")


def stage_inputs(cfg: DictConfig, layout: RunLayout, settings: AttributeSettings,
                 description: dict[str, Any]) -> dict[str, Any]:
    """What the outputs depend on (``dissect.stamps``), upstream tally and topk stamps included."""
    layers = [str(layer) for layer in cfg.layers]
    return canonical({"attribute": asdict(settings), "model": description, "dataset": str(cfg.dataset.root),
                      "layers": layers, "iou_threshold": float(cfg.tally.iou_threshold),
                      "upstream": {layer: {stage: optional_digest(layout.stamp(stage, layer))
                                           for stage in ("tally", "topk")} for layer in layers}})


def open_maps(layout: RunLayout, key: dict[str, Any]) -> zarr.Group:
    """maps.zarr for these inputs: kept when they match (finished methods are resumed), else started over."""
    out_dir, path = layout.attribute_dir, layout.attribute_maps
    if path.exists() and zarr.open_group(path, mode="r").attrs.get("fingerprint") != key:
        log.info("attribute: the inputs changed since %s was written; starting over", out_dir)
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        group = zarr.open_group(path, mode="w")
        group.attrs.update({"fingerprint": key, "complete": [], "seconds": {}})
    return zarr.open_group(path, mode="a")


def create_method(group: zarr.Group, method: str, pairs: int, size: int, batch_size: int
                  ) -> tuple[zarr.Array, zarr.Array]:
    """(Re)create ``method``'s arrays in maps.zarr: (pairs, S, S) float16 in chunks of batch_size pairs, scale (pairs,)."""
    chunk = (max(1, min(batch_size, pairs)), size, size)
    return (group.create_array(method, shape=(pairs, size, size), dtype="float16", chunks=chunk, overwrite=True),
            group.require_group("scale").create_array(method, shape=(pairs,), dtype="float32", overwrite=True))


def mark_complete(group: zarr.Group, methods: tuple[str, ...], method: str, seconds: float) -> None:
    """Record in maps.zarr that every map of ``method`` is written (``complete`` kept in the order of ``methods``)."""
    complete = {*group.attrs["complete"], method}
    group.attrs.update({"complete": [m for m in methods if m in complete],
                        "seconds": {**group.attrs["seconds"], method: seconds}})


def randomisation_pairs(settings: AttributeSettings, pairs: int) -> np.ndarray:
    """The indices of the pairs the randomisation check recomputes: up to randomisation_pairs, evenly spread."""
    if settings.randomisation_pairs == 0:
        return np.zeros(0, dtype=int)
    return np.unique(np.linspace(0, pairs - 1, min(settings.randomisation_pairs, pairs)).round()).astype(int)


def model_spec(cfg: DictConfig, settings: AttributeSettings, checkpoint: str | None) -> ModelSpec:
    """What the workers load: the model config with the checkpoint resolved here (``checkpoint``, absolute)."""
    config = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(config, dict)
    return ModelSpec({**config, "checkpoint": checkpoint}, str(cfg.attribute.device), settings.seed)


def prepare_workers(client: Client, spec: ModelSpec, model: PreparedModel, device: torch.device) -> dict[str, str]:
    """Each worker's device (address -> device); checks the paths the tasks read, hands an in-process worker the model.

    ``model`` on ``device`` is this process's prepared model of ``spec``.
    """
    found = client.run(worker_device, spec.device)
    if os.getpid() in {pid for pid, _ in found.values()}:
        share_model(spec, model, device)
    checkpoint = spec.config.get("checkpoint")
    check_worker_paths(client, [checkpoint] if checkpoint else [])
    return {address: name for address, (_, name) in found.items()}


def compute_on_cluster(client: Client, spec: ModelSpec, maps: zarr.Group, pairs: pd.DataFrame, images: torch.Tensor,
                       settings: AttributeSettings, preprocessing: Preprocessing, chosen: np.ndarray,
                       cascade: list[str], devices: dict[str, str]
                       ) -> tuple[dict[str, dict[str, Any]], dict[tuple[int, str], np.ndarray]]:
    """The maps of the methods not complete in maps.zarr, written as they arrive, and the randomised maps.

    ``images`` (P, 3, S, S) uint8 are those of ``pairs``; ``chosen`` the pairs
    of the randomisation check, ``cascade`` its modules; ``devices`` each
    worker's device (``prepare_workers``). Returns per worker address its
    device and the tasks it ran, and the (len(chosen), S, S) float16
    randomised maps by (step, method). Every task runs even when one fails;
    the first error is raised at the end, with the finished methods marked
    complete.
    """
    method_settings = settings.method_settings()
    todo = [m for m in settings.methods if m not in maps.attrs["complete"]]
    batches = pair_batches(pairs, settings.batch_size)
    arrays = {method: create_method(maps, method, len(pairs), images.shape[-1], settings.batch_size)
              for method in todo}
    batch_images = client.scatter([images[b.start:b.stop].clone() for b in batches], hash=False) if todo else []
    map_tasks: dict[Future, tuple[str, PairBatch]] = {}
    for method in todo:
        for batch, batch_future in zip(batches, batch_images):
            map_tasks[client.submit(maps_task, spec, method, pairs.iloc[batch.start:batch.stop], batch_future,
                                    method_settings, preprocessing, pure=False)] = (method, batch)
    random_tasks: dict[Future, tuple[int, str]] = {}
    if len(chosen):
        subset, subset_images = pairs.iloc[chosen].reset_index(drop=True), client.scatter(images[chosen], hash=False)
        for step, upto in enumerate(cascade_stops(len(cascade), settings.randomisation_steps), 1):
            for method in settings.methods:
                random_tasks[client.submit(randomised_task, spec, method, cascade, upto, subset, subset_images,
                                           method_settings, preprocessing, pure=False)] = (step, method)
    log.info("attribute: %d tasks on %d worker(s)", len(map_tasks) + len(random_tasks), len(devices))
    remaining = Counter(method for method, _ in map_tasks.values())
    seconds: Counter[str] = Counter()
    workers: dict[str, dict[str, Any]] = {address: {"device": name, "tasks": 0} for address, name in devices.items()}
    randomised: dict[tuple[int, str], np.ndarray] = {}
    first_error: BaseException | None = None
    with tqdm(total=len(todo) * len(pairs) + len(random_tasks) * len(chosen), desc="attribute", unit="map") as bar:
        for future in as_completed([*map_tasks, *random_tasks]):
            rows = map_tasks[future][1].stop - map_tasks[future][1].start if future in map_tasks else len(chosen)
            if future.status == "error":
                first_error = first_error or future.exception()
            else:
                piece = future.result()
                workers.setdefault(piece.worker, {"device": piece.device, "tasks": 0})["tasks"] += 1
                if future in map_tasks:
                    method, batch = map_tasks[future]
                    values, scales = arrays[method]
                    values[batch.start:batch.stop], scales[batch.start:batch.stop] = piece.values, piece.scales
                    seconds[method] += piece.seconds
                    remaining[method] -= 1
                    if remaining[method] == 0:
                        mark_complete(maps, settings.methods, method, seconds[method])
                else:
                    randomised[random_tasks[future]] = piece.values
            future.release()
            bar.update(rows)
    if first_error is not None:
        raise first_error
    return dict(sorted(workers.items())), randomised


def check(cfg: DictConfig) -> None:
    """Refuse bad attribute settings before any stage runs."""
    if "attribute" not in cfg:
        raise AttributionError("the config has no attribute section; add it to conf/config.yaml (see README)")
    read_settings(cfg.attribute, pick_device(str(cfg.attribute.get("device", "auto")), "attribute.device").type)


def run(cfg: DictConfig) -> Path:
    """Attribution maps, strips, agreement and randomisation checks for the selected units and classes."""
    check(cfg)
    device = pick_device(str(cfg.attribute.device), "attribute.device")
    settings, filled = read_settings(cfg.attribute, device.type)
    if filled:
        log.info("attribute on %s: %s (attribute.%s.%s; set a key to override)", device.type,
                 ", ".join(f"{key}={value}" for key, value in filled.items()), DEVICE_DEFAULTS,
                 "cuda" if device.type == "cuda" else "cpu")
    layout = RunLayout(Path(cfg.out_dir))
    run_dir, out_dir = layout.root, layout.attribute_dir
    store = open_activations(run_dir)
    probe = open_probe_set(cfg.dataset)
    if list(store["image_ids"][:]) != probe.image_ids:
        raise AttributionError(f"the activations in {run_dir} were extracted from other images than {probe.root}")
    loaded = load_seeded(cfg.model, settings.seed)
    preprocessing = Preprocessing(loaded.input_size, loaded.mean, loaded.std)
    valid = store["valid"][:]
    first = int(np.flatnonzero(valid)[0])
    example = preprocessing.normalise(load_images([probe.image_paths[first]], preprocessing)).to(device)
    model = prepare_model(loaded.module.to(device))
    settings = drop_relu_only_methods(settings, model, example, cfg.attribute.methods == "all")
    key = stage_inputs(cfg, layout, settings, loaded.description)
    if is_current(layout.stamp("attribute"), key, FORMAT, "attribute"):
        return out_dir
    pairs, images = build_pairs(layout, cfg, settings, model, preprocessing, probe.image_paths, probe.image_ids,
                                valid, example, device)
    log.info("attribute: %s", cost_sentence(settings, pairs, loaded.input_size))
    chosen = randomisation_pairs(settings, len(pairs))
    cascade = randomisation_cascade(model, images[chosen], preprocessing, device) if len(chosen) else []
    start(layout, "attribute")
    maps = open_maps(layout, key)
    pairs.to_csv(layout.attribute_pairs_csv, index=False)
    spec = model_spec(cfg, settings, loaded.description["checkpoint"])
    with dask_client(cfg.cluster) as client:
        devices = prepare_workers(client, spec, model, device)
        if filled and {torch.device(name).type for name in devices.values()} != {device.type}:
            log.warning("attribute: the workers run on %s but this process on %s, so %s took the %s defaults; "
                        "set them to override", ", ".join(sorted(set(devices.values()))), device.type,
                        ", ".join(filled), device.type)
        workers, randomised = compute_on_cluster(client, spec, maps, pairs, images, settings, preprocessing, chosen,
                                                 cascade, devices)
    write_strips(layout, pairs, images, maps, settings.methods)
    agreement = None
    if cfg.dataset.kind == "broden" and (pairs["kind"] == "unit").any():
        agreement = agreement_table(layout, BrodenDataset(probe.root), pairs, maps, settings.methods,
                                    loaded.input_size)
        agreement.to_csv(layout.attribute_agreement_csv, index=False, float_format="%.6f")
    randomisation = None
    if len(chosen):
        trained = {m: np.stack([maps[m][p] for p in chosen]) for m in settings.methods}
        rows = [correlation_row(step, upto, cascade, method, trained[method], randomised[step, method])
                for step, upto in enumerate(cascade_stops(len(cascade), settings.randomisation_steps), 1)
                for method in settings.methods]
        randomisation = pd.DataFrame.from_records(rows, columns=RANDOMISATION_COLUMNS)
        randomisation.to_csv(layout.attribute_randomisation_csv, index=False, float_format="%.6f")
    device_names = sorted({entry["device"] for entry in workers.values() if entry["tasks"]}) or [str(device)]
    write_json_atomic(layout.attribute_json, summary(settings, pairs, maps, agreement, randomisation,
                                                     ", ".join(device_names), workers))
    write_stamp(layout.stamp("attribute"), key, FORMAT)
    return out_dir


def summary(settings: AttributeSettings, pairs: pd.DataFrame, maps: zarr.Group,
            agreement: pd.DataFrame | None, randomisation: pd.DataFrame | None, device: torch.device | str,
            workers: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """attribute.json: what was run, on what, how fast, and what the trust checks say per method.

    ``device``: the workers' device(s); ``workers``: per worker address its device and the tasks it ran.
    """
    seconds = dict(maps.attrs["seconds"])
    methods: dict[str, dict[str, Any]] = {}
    for method in settings.methods:
        entry: dict[str, Any] = {"map": MAP_CONVENTIONS[method], "seconds": seconds.get(method),
                                 "pairs_per_second": len(pairs) / seconds[method] if seconds.get(method) else None}
        if agreement is not None and len(agreement):
            rows = agreement[(agreement["method"] == method) & agreement["inside_share"].notna()]
            entry["agreement"] = {"units": len(rows), "mean_inside_share": _mean(rows["inside_share"]),
                                  "mean_chance_share": _mean(rows["chance_share"])}
        if randomisation is not None:
            rows = randomisation[randomisation["method"] == method]
            final = float(rows.loc[rows["step"].idxmax(), "spearman_mean"])
            entry["randomisation"] = {"final_spearman": None if math.isnan(final) else final,
                                      "flagged": final > settings.max_correlation}
        methods[method] = entry
    flagged = [m for m, entry in methods.items() if entry.get("randomisation", {}).get("flagged")]
    return {"settings": asdict(settings), "device": str(device), "workers": workers or {},
            "pairs": {"unit": int((pairs["kind"] == "unit").sum()), "class": int((pairs["kind"] == "class").sum())},
            "units": int(pairs[pairs["kind"] == "unit"][["layer", "target"]].drop_duplicates().shape[0]),
            "methods": methods, "max_correlation": settings.max_correlation, "flagged_methods": flagged,
            "flag_meaning": "the maps barely change when every layer's weights are randomised, so they do not "
                            "reflect what the model learned (Adebayo et al. 2018)"}


def _mean(values: pd.Series) -> float | None:
    return float(values.mean()) if len(values) else None
