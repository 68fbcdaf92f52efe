"""The (target, image) pairs to explain: selected units on their top images, and class images."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from PIL import Image

from dissect.layout import RunLayout
from dissect.probe import Preprocessing
from dissect.stages.attribute.errors import AttributionError
from dissect.stages.attribute.methods import (
    pair_batches,
)
from dissect.stages.attribute.model import (
    PreparedModel,
    check_grad_cam_layers,
    explained,
    forward_order,
    last_conv,
)
from dissect.stages.attribute.settings import (
    AttributeSettings,
)


class UnitChoice(Protocol):
    """The unit-selection keys shared by the ``attribute`` and ``visualise`` sections."""

    units: str
    top_units: int
    unit_label: str | None
    unit_pairs: Any


def select_units(layout: RunLayout, layers: list[str], settings: UnitChoice, iou_threshold: float,
                 section: str = "attribute") -> list[tuple[str, int]]:
    """The (layer, unit) pairs to explain (or visualise), in layer order, then by decreasing IoU (top) or unit index.

    ``top`` takes the ``top_units`` detectors (IoU > iou_threshold) of highest IoU of each tallied layer;
    ``section`` is the config section the settings come from (named in errors).
    """
    if settings.units == "none":
        return []
    if settings.units == "pairs":
        return list(settings.unit_pairs)
    selected = []
    for layer in layers:
        tally_path = layout.tally_csv(layer)
        if not tally_path.exists():
            continue
        table = pd.read_csv(tally_path, keep_default_na=False)
        if settings.units == "top":
            table = table[table["iou"] > iou_threshold].sort_values(["iou", "unit"], ascending=[False, True],
                                                                     kind="stable").head(settings.top_units)
        else:
            table = table[table["label"] == settings.unit_label].sort_values("unit", kind="stable")
        selected += [(layer, int(unit)) for unit in table["unit"]]
    if settings.units == "top" and not any(layout.tally_csv(layer).exists() for layer in layers):
        raise AttributionError(f"{section}.units=top: no layer of {layers} has a tally.csv in {layout.root}; "
                               f"run the tally and topk stages first, or set {section}.units=pairs or none")
    return selected


def unit_pair_rows(layout: RunLayout, units: list[tuple[str, int]], images_per_unit: int) -> list[dict[str, Any]]:
    """Pair rows (without pair number) of each unit's first images_per_unit top-k images (topk.csv)."""
    rows: list[dict[str, Any]] = []
    tables: dict[str, pd.DataFrame] = {}
    for layer, unit in units:
        if layer not in tables:
            path = layout.topk_csv(layer)
            if not path.exists():
                raise AttributionError(f"no top-k images of layer {layer!r} ({path} is missing); "
                                       "run the topk stage for it first")
            tables[layer] = pd.read_csv(path, keep_default_na=False)
        table = tables[layer]
        if unit not in set(table["unit"]):
            raise AttributionError(f"unit {unit} of layer {layer!r} is not in {layout.topk_csv(layer)}; "
                                   f"units are 0..{int(table['unit'].max())}")
        top = table[table["unit"] == unit].sort_values("rank")
        if len(top) < images_per_unit:
            raise AttributionError(f"attribute.images_per_unit={images_per_unit} exceeds the {len(top)} top-k images "
                                   f"stored for layer {layer!r}; lower it or rerun topk with a larger topk.k")
        rows += [{"kind": "unit", "layer": layer, "target": unit, "image_index": int(r.image_index),
                  "image_id": r.image_id, "rank": int(r.rank)} for r in top.head(images_per_unit).itertuples()]
    return rows


def class_image_indices(settings: AttributeSettings, image_ids: list[str], valid: np.ndarray) -> list[int]:
    """The probe image indices of the class maps: the first n valid images, or the listed ids."""
    if settings.class_target is None:
        return []
    if isinstance(settings.class_images, int):
        return [int(i) for i in np.flatnonzero(valid)[:settings.class_images]]
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    unknown = [image_id for image_id in settings.class_images if image_id not in position]
    if unknown:
        raise AttributionError(f"attribute.class_images names unknown image id(s) {unknown}; ids are those of "
                               f"the probe set, e.g. {image_ids[:3]}")
    return [position[image_id] for image_id in settings.class_images]


def load_images(paths: list[Path], preprocessing: Preprocessing) -> torch.Tensor:
    """(P, 3, S, S) uint8 images at the model's input size."""
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(preprocessing.load(image))
    return torch.stack(images) if images else torch.zeros(0, 3, preprocessing.input_size,
                                                          preprocessing.input_size, dtype=torch.uint8)


def scores(model: PreparedModel, pairs: pd.DataFrame, images: torch.Tensor, preprocessing: Preprocessing,
           batch_size: int, device: torch.device) -> np.ndarray:
    """(P,) the explained score of every pair: the unit's maximum, or the class output."""
    out = np.zeros(len(pairs), dtype=np.float32)
    targets = torch.tensor(pairs["target"].tolist(), dtype=torch.long)
    with torch.no_grad():
        for batch in pair_batches(pairs, batch_size):
            values = explained(model, batch.layer, None).module(
                preprocessing.normalise(images[batch.start:batch.stop].to(device)))
            if values.ndim != 2:
                raise AttributionError(f"class targets need a model whose output is (N, classes); it gives "
                                       f"{tuple(values.shape)}. Set attribute.class_target=null")
            batch_targets = targets[batch.start:batch.stop]
            if int(batch_targets.max()) >= values.shape[1]:
                what = "units" if batch.layer else "outputs"
                raise AttributionError(f"target {int(batch_targets.max())} is out of range: "
                                       f"{batch.layer or 'the model'} has {values.shape[1]} {what}")
            rows = torch.arange(batch.stop - batch.start, device=device)
            out[batch.start:batch.stop] = values[rows, batch_targets.to(device)].float().cpu().numpy()
    return out


def predicted_classes(model: PreparedModel, images: torch.Tensor, preprocessing: Preprocessing, batch_size: int,
                      device: torch.device) -> list[int]:
    """(N, 3, S, S) uint8 -> the arg-max class of each image."""
    predicted = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(preprocessing.normalise(images[start:start + batch_size].to(device)))
            if logits.ndim != 2:
                raise AttributionError(f"class targets need a model whose output is (N, classes); it gives "
                                       f"{tuple(logits.shape)}. Set attribute.class_target=null")
            predicted += logits.argmax(dim=1).tolist()
    return predicted


def build_pairs(layout: RunLayout, cfg: DictConfig, settings: AttributeSettings, model: PreparedModel,
                preprocessing: Preprocessing, image_paths: list[Path], image_ids: list[str], valid: np.ndarray,
                example: torch.Tensor, device: torch.device) -> tuple[pd.DataFrame, torch.Tensor]:
    """The pair table (see module docstring) and the (P, 3, S, S) uint8 image of every pair."""
    units = select_units(layout, [str(layer) for layer in cfg.layers], settings, float(cfg.tally.iou_threshold))
    rows = unit_pair_rows(layout, units, settings.images_per_unit)
    class_indices = class_image_indices(settings, image_ids, valid)
    if class_indices:
        class_images = load_images([image_paths[i] for i in class_indices], preprocessing)
        targets = (predicted_classes(model, class_images, preprocessing, settings.batch_size, device)
                   if settings.class_target == "predicted" else [int(settings.class_target)] * len(class_indices))
        rows += [{"kind": "class", "layer": "", "target": t, "image_index": i, "image_id": image_ids[i], "rank": r}
                 for r, (i, t) in enumerate(zip(class_indices, targets))]
    if not rows:
        raise AttributionError("nothing to explain: attribute.units=none and attribute.class_target=null")
    pairs = pd.DataFrame(rows, columns=["kind", "layer", "target", "image_index", "image_id", "rank"])
    pairs.insert(0, "pair", np.arange(len(pairs)))
    default_class_layer = last_conv(model, example) or ""
    pairs["grad_cam_layer"] = [settings.grad_cam_layer or (layer if kind == "unit" else default_class_layer)
                               for kind, layer in zip(pairs["kind"], pairs["layer"])]
    check_grad_cam_layers(pairs, forward_order(model, example))
    images = load_images([image_paths[i] for i in pairs["image_index"]], preprocessing)
    pairs["score"] = scores(model, pairs, images, preprocessing, settings.batch_size, device)
    return pairs, images
