"""The attribute stage: its inputs and stamp, the model passes it will make, its run and summary."""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import zarr
from omegaconf import DictConfig
from tqdm import tqdm

from dissect.artifacts import open_activations, write_json_atomic
from dissect.broden import BrodenDataset
from dissect.devices import pick_device
from dissect.layout import RunLayout
from dissect.models import load_model
from dissect.probe import Preprocessing, open_probe_set
from dissect.stages.attribute.checks import (
    agreement_table,
    randomisation_check,
)
from dissect.stages.attribute.errors import AttributionError
from dissect.stages.attribute.guided_relu import other_activations
from dissect.stages.attribute.methods import (
    GUIDED_METHODS,
    MAP_CONVENTIONS,
    MethodSettings,
    compute_maps,
    model_passes,
    pair_batches,
    stored_form,
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
from dissect.stamps import canonical, is_current, optional_digest, start, write_stamp

log = logging.getLogger(__name__)


#: The version of this stage's output format.
FORMAT = 1


def drop_undefined_guided_methods(settings: AttributeSettings, model: PreparedModel, example: torch.Tensor,
                                   all_methods: bool) -> AttributeSettings:
    """``settings`` without the guided methods when the model has activations they are not defined for.

    The guided rules replace the backward pass of ReLU only. With
    ``methods: all`` they are left out with one warning; asked for by name,
    they stop the stage.
    """
    guided = [m for m in settings.methods if m in GUIDED_METHODS]
    others = other_activations(model, example) if guided else {}
    if not others:
        return settings
    found = ", ".join(f"{name} ({calls} calls)" for name, calls in others.items())
    if not all_methods:
        raise AttributionError(f"the guided methods {guided} are defined for ReLU only, and the model also applies "
                               f"{found}; leave them out of attribute.methods")
    log.warning("attribute: leaving out %s: the guided rules are defined for ReLU only, and the model also "
                "applies %s", ", ".join(guided), found)
    return replace(settings, methods=tuple(m for m in settings.methods if m not in GUIDED_METHODS))


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


def write_method(group: zarr.Group, method: str, model: PreparedModel, pairs: pd.DataFrame, images: torch.Tensor,
                 settings: MethodSettings, preprocessing: Preprocessing, device: torch.device, progress: tqdm) -> None:
    """Compute one method's maps batch by batch into maps.zarr (``stored_form``), then mark the method complete."""
    size = images.shape[-1]
    chunk = (max(1, min(settings.batch_size, len(pairs))), size, size)
    values = group.create_array(method, shape=(len(pairs), size, size), dtype="float16", chunks=chunk, overwrite=True)
    scales = group.require_group("scale").create_array(method, shape=(len(pairs),), dtype="float32", overwrite=True)
    started = time.perf_counter()
    for batch in pair_batches(pairs, settings.batch_size):
        rows = slice(batch.start, batch.stop)
        values[rows], scales[rows] = stored_form(compute_maps(model, pairs.iloc[rows], images[rows], method, settings,
                                                              preprocessing, settings.batch_size, device, progress))
    group.attrs.update({"complete": [*group.attrs["complete"], method],
                        "seconds": {**group.attrs["seconds"], method: time.perf_counter() - started}})


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
    loaded = load_model(cfg.model)
    preprocessing = Preprocessing(loaded.input_size, loaded.mean, loaded.std)
    valid = store["valid"][:]
    first = int(np.flatnonzero(valid)[0])
    example = preprocessing.normalise(load_images([probe.image_paths[first]], preprocessing)).to(device)
    model = prepare_model(loaded.module.to(device))
    settings = drop_undefined_guided_methods(settings, model, example, cfg.attribute.methods == "all")
    key = stage_inputs(cfg, layout, settings, loaded.description)
    if is_current(layout.stamp("attribute"), key, FORMAT, "attribute"):
        return out_dir
    pairs, images = build_pairs(layout, cfg, settings, model, preprocessing, probe.image_paths, probe.image_ids,
                                valid, example, device)
    log.info("attribute: %s", cost_sentence(settings, pairs, loaded.input_size))
    start(layout, "attribute")
    maps = open_maps(layout, key)
    pairs.to_csv(layout.attribute_pairs_csv, index=False)
    method_settings = settings.method_settings()
    todo = [m for m in settings.methods if m not in maps.attrs["complete"]]
    with tqdm(total=len(todo) * len(pairs), desc="attribute", unit="map") as progress:
        for method in todo:
            progress.set_postfix_str(method)
            write_method(maps, method, model, pairs, images, method_settings, preprocessing, device, progress)
    write_strips(layout, pairs, images, maps, settings.methods)
    agreement = None
    if cfg.dataset.kind == "broden" and (pairs["kind"] == "unit").any():
        agreement = agreement_table(layout, BrodenDataset(probe.root), pairs, maps, settings.methods,
                                    loaded.input_size)
        agreement.to_csv(layout.attribute_agreement_csv, index=False, float_format="%.6f")
    randomisation = None
    if settings.randomisation_pairs > 0:
        chosen = np.unique(np.linspace(0, len(pairs) - 1, min(settings.randomisation_pairs, len(pairs))).round()
                           ).astype(int)
        subset = pairs.iloc[chosen].reset_index(drop=True)
        randomisation = randomisation_check(model, subset, images[chosen],
                                            {m: np.stack([maps[m][p] for p in chosen]) for m in settings.methods},
                                            method_settings, preprocessing, settings.batch_size,
                                            settings.randomisation_steps, device)
        randomisation.to_csv(layout.attribute_randomisation_csv, index=False, float_format="%.6f")
    write_json_atomic(layout.attribute_json, summary(settings, pairs, maps, agreement, randomisation, device))
    write_stamp(layout.stamp("attribute"), key, FORMAT)
    return out_dir


def summary(settings: AttributeSettings, pairs: pd.DataFrame, maps: zarr.Group,
            agreement: pd.DataFrame | None, randomisation: pd.DataFrame | None, device: torch.device
            ) -> dict[str, Any]:
    """attribute.json: what was run, how fast, and what the trust checks say per method."""
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
    return {"settings": asdict(settings), "device": str(device), "pairs": {"unit": int((pairs["kind"] == "unit").sum()),
                                                                 "class": int((pairs["kind"] == "class").sum())},
            "units": int(pairs[pairs["kind"] == "unit"][["layer", "target"]].drop_duplicates().shape[0]),
            "methods": methods, "max_correlation": settings.max_correlation, "flagged_methods": flagged,
            "flag_meaning": "the maps barely change when every layer's weights are randomised, so they do not "
                            "reflect what the model learned (Adebayo et al. 2018)"}


def _mean(values: pd.Series) -> float | None:
    return float(values.mean()) if len(values) else None
