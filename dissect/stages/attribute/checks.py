"""The trust checks: concept agreement of unit maps and the parameter-randomisation check."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import scipy.stats
import torch
import zarr
from tqdm import tqdm

from dissect.broden import IMAGE_CATEGORIES, PIXEL_CATEGORIES, BrodenDataset
from dissect.layout import RunLayout
from dissect.probe import Preprocessing
from dissect.stages.attribute.errors import AttributionError
from dissect.stages.attribute.methods import (
    MethodSettings,
    compute_maps,
    read_maps,
    stored_form,
)
from dissect.stages.attribute.model import (
    PreparedModel,
    forward_order,
)


def positive_share_inside(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(P, S, S) maps, (P, S, S) bool masks -> (P,) share of the positive mass inside the mask (nan: no mass)."""
    positive = np.clip(maps.astype(np.float64), 0, None).reshape(len(maps), -1)
    total = positive.sum(axis=1)
    inside = (positive * masks.reshape(len(masks), -1)).sum(axis=1)
    return np.divide(inside, total, out=np.full(len(maps), np.nan), where=total > 0)


def spearman_abs(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(P, S, S) x 2 -> (P,) Spearman rank correlation of |first| and |second| per pair (ties: average ranks).

    The question is whether ``first``'s ranking survives in ``second``: nan
    where ``first`` is constant (it has no ranking), 0 where only ``second`` is.
    """
    ranks = [scipy.stats.rankdata(np.abs(m.astype(np.float64)).reshape(len(m), -1), axis=1) for m in (first, second)]
    centred = [r - r.mean(axis=1, keepdims=True) for r in ranks]
    norms = [np.sqrt((c * c).sum(axis=1)) for c in centred]
    product = norms[0] * norms[1]
    correlation = np.divide((centred[0] * centred[1]).sum(axis=1), product, out=np.zeros(len(first)),
                            where=product > 0)
    return np.where(norms[0] > 0, correlation, np.nan)


def cascade_modules(model: PreparedModel, example: torch.Tensor) -> list[str]:
    """Modules with their own parameters and a ``reset_parameters``, from the last called to the first."""
    modules = dict(model.net.named_modules())
    return [name for name in reversed(forward_order(model, example))
            if hasattr(modules[name], "reset_parameters") and list(modules[name].parameters(recurse=False))]


def randomisation_cascade(model: PreparedModel, images: torch.Tensor, preprocessing: Preprocessing,
                          device: torch.device) -> list[str]:
    """``cascade_modules`` on the first of the (P, 3, S, S) uint8 images; AttributionError when there is none."""
    cascade = cascade_modules(model, preprocessing.normalise(images[:1].to(device)))
    if not cascade:
        raise AttributionError("the model has no module with parameters and reset_parameters to randomise")
    return cascade


#: The columns of randomisation.csv, one row per step and method.
RANDOMISATION_COLUMNS = ["step", "randomised", "deepest", "method", "spearman_mean", "spearman_std", "pairs"]


def cascade_stops(modules: int, steps: int) -> list[int]:
    """How many modules of a cascade of ``modules`` are re-initialised after each of ``min(steps, modules)`` steps."""
    stages = min(steps, modules)
    return [math.ceil(step * modules / stages) for step in range(1, stages + 1)]


def randomised_model(model: PreparedModel, cascade: list[str], upto: int, seed: int,
                     device: torch.device) -> PreparedModel:
    """A copy of ``model`` whose first ``upto`` cascade modules are re-initialised, in cascade order.

    torch's generator is seeded with ``seed`` first and only ``reset_parameters``
    draws from it, so the weights after ``upto`` modules are the same whether
    the earlier steps ran before in this process, in another process, or not at all.
    """
    random_model = copy.deepcopy(model)
    modules = dict(random_model.net.named_modules())
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for name in cascade[:upto]:
            modules[name].reset_parameters()
    return random_model


def randomised_maps(model: PreparedModel, cascade: list[str], upto: int, pairs: pd.DataFrame, images: torch.Tensor,
                    method: str, settings: MethodSettings, preprocessing: Preprocessing, batch_size: int,
                    device: torch.device) -> np.ndarray:
    """(P, 3, S, S) uint8 images of ``pairs`` -> (P, S, S) float16 stored maps of the model randomised up to ``upto``."""
    random_model = randomised_model(model, cascade, upto, settings.seed, device)
    return stored_form(compute_maps(random_model, pairs, images, method, settings, preprocessing, batch_size,
                                    device))[0]


def correlation_row(step: int, upto: int, cascade: list[str], method: str, trained: np.ndarray,
                    randomised: np.ndarray) -> tuple[int, int, str, str, float, float, int]:
    """The randomisation.csv row of one step and method from (P, S, S) trained and randomised stored maps."""
    correlation = spearman_abs(trained, randomised)
    defined = correlation[~np.isnan(correlation)]
    return (step, upto, cascade[upto - 1], method, float(defined.mean()) if len(defined) else float("nan"),
            float(defined.std()) if len(defined) else float("nan"), len(defined))


def randomisation_check(model: PreparedModel, pairs: pd.DataFrame, images: torch.Tensor,
                        trained: dict[str, np.ndarray], settings: MethodSettings, preprocessing: Preprocessing,
                        batch_size: int, steps: int, device: torch.device) -> pd.DataFrame:
    """Cascading parameter randomisation: Spearman correlation of trained and randomised maps per method and step.

    ``trained[method]`` (P, S, S) are the stored (``stored_form``) maps of ``pairs``.
    Returns rows step, randomised (modules re-initialised so far), deepest (the
    earliest-called of them), method, spearman_mean, spearman_std, pairs (those
    whose trained map is not constant, over which mean and std are taken).
    Runs in this process; the stage runs each (step, method) as a task of its
    own (``dissect.stages.attribute.worker``) with the same result.
    """
    cascade = randomisation_cascade(model, images, preprocessing, device)
    rows = []
    for step, upto in enumerate(tqdm(cascade_stops(len(cascade), steps), desc="randomisation", unit="step"), 1):
        for method, trained_maps in trained.items():
            maps = randomised_maps(model, cascade, upto, pairs, images, method, settings, preprocessing, batch_size,
                                   device)
            rows.append(correlation_row(step, upto, cascade, method, trained_maps, maps))
    return pd.DataFrame.from_records(rows, columns=RANDOMISATION_COLUMNS)


def concept_mask(broden: BrodenDataset, index: int, number: int, category: str, size: int) -> np.ndarray:
    """(size, size) bool: where image ``index`` shows label ``number``, its mask resampled by nearest neighbour."""
    if category in IMAGE_CATEGORIES:
        present = number in broden.image_labels(index, category)
        return np.full((size, size), present)
    sh, sw = broden.mask_size(index)
    mask = np.zeros((sh, sw), dtype=bool)
    for pixel_category in PIXEL_CATEGORIES:
        mask |= (broden.pixel_labels(index, pixel_category) == number).any(axis=0)
    rows = np.minimum(((np.arange(size) + 0.5) * sh / size).astype(int), sh - 1)
    columns = np.minimum(((np.arange(size) + 0.5) * sw / size).astype(int), sw - 1)
    return mask[np.ix_(rows, columns)]


def agreement_table(layout: RunLayout, broden: BrodenDataset, pairs: pd.DataFrame, maps: zarr.Group,
                    methods: tuple[str, ...], size: int) -> pd.DataFrame:
    """Per selected unit and method: its concept's share of the positive map mass against the chance share.

    ``maps`` is maps.zarr, holding the maps of every pair of ``pairs``; a unit's pairs are consecutive.
    """
    rows = []
    units = pairs[pairs["kind"] == "unit"]
    for (layer, unit), group in units.groupby(["layer", "target"], sort=False):
        if not layout.tally_csv(layer).exists():
            continue
        tally = pd.read_csv(layout.tally_csv(layer), keep_default_na=False).set_index("unit")
        concepts = pd.read_csv(layout.concepts_csv(layer), keep_default_na=False)
        label, category = tally.at[unit, "label"], tally.at[unit, "category"]
        match = concepts[(concepts["name"] == label) & (concepts["category"] == category)]
        number = int(match["number"].iat[0])
        masks = np.stack([concept_mask(broden, int(i), number, category, size) for i in group["image_index"]])
        for method, method_maps in read_maps(maps, methods, group).items():
            share = positive_share_inside(method_maps, masks)
            used = ~np.isnan(share)
            inside = float(share[used].mean()) if used.any() else float("nan")
            chance = float(masks[used].mean()) if used.any() else float("nan")
            rows.append((layer, int(unit), label, category, float(tally.at[unit, "iou"]), method, int(used.sum()),
                         inside, chance, inside / chance if chance > 0 else float("nan")))
    return pd.DataFrame.from_records(rows, columns=["layer", "unit", "label", "category", "iou", "method", "images",
                                                    "inside_share", "chance_share", "ratio"])
