"""The explanations stage: masks, Jaccard comparisons and deletion/insertion curves of the class maps.

It reads the attribute stage's class pairs (``attribute/pairs.csv``, kind
class) and their maps (``maps.zarr``), runs the deterministic occlusion
explainers and LIME with two seeds on each image, on a second run of each
deterministic explainer (the control) and on a Gaussian-blurred copy, and
writes what ``dissect.stages.explanations`` lists. The model work is a few
hundred forward passes per image (no backward pass), so it runs in this
process, batched, on ``attribute.device``; the dask cluster is not used.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import zarr
from omegaconf import DictConfig
from PIL import Image
from torch import nn
from torchvision.transforms.functional import gaussian_blur
from tqdm import tqdm

from dissect.artifacts import read_json, write_json_atomic
from dissect.devices import pick_device
from dissect.errors import ArtifactError
from dissect.layout import RunLayout
from dissect.probe import Preprocessing, open_probe_set
from dissect.settings import ExplanationsSettings, section
from dissect.stages.attribute import (
    MethodSettings,
    black_baseline,
    lime_maps,
    load_images,
    load_seeded,
    prepare_model,
    superpixels,
)
from dissect.stages.explanations.faithfulness import auc, deletion_insertion
from dissect.stages.explanations.masks import jaccard, overlay, resize_mask, top_segments_mask, top_share_mask
from dissect.stages.explanations.occlusion import EXPLAINER_FUNCTIONS, EXPLAINERS, Explanation, Scorer
from dissect.stamps import canonical, is_current, start, stamp_digest, write_stamp

log = logging.getLogger(__name__)

#: The version of this stage's output format.
FORMAT = 1
#: The comparison kinds, each with its own jaccard_<kind>.csv.
COMPARISONS = ("methods", "seeds", "blur", "models")
#: Columns every Jaccard table starts with.
JACCARD_COLUMNS = ["pair", "image_index", "image_id", "target", "a", "b", "jaccard", "a_pixels", "b_pixels"]
#: The name of the random map in the faithfulness tables.
RANDOM = "random"
#: LIME methods (their masks keep top superpixels rather than top pixels).
LIME = "lime"


class ExplanationError(ArtifactError):
    """The explanations cannot be made from this run directory or configuration."""


def read_settings(cfg: DictConfig) -> ExplanationsSettings:
    """The typed ``explanations`` section (bad values raise ConfigError naming the key)."""
    if "explanations" not in cfg:
        raise ExplanationError("the config has no explanations section; add it to conf/config.yaml (see README)")
    return section(cfg.explanations, ExplanationsSettings)


def compare_layout(settings: ExplanationsSettings, layout: RunLayout) -> RunLayout | None:
    """The run directory of ``compare_run`` with a finished explanations stage, or None when none is set."""
    if settings.compare_run is None:
        return None
    other = RunLayout(Path(settings.compare_run).expanduser().resolve())
    if other.root == layout.root.resolve():
        raise ExplanationError(f"explanations.compare_run={settings.compare_run!r} is this run's own directory; "
                               "name another run of the same probe images")
    if not other.stamp("explanations").is_file():
        raise ExplanationError(f"explanations.compare_run={settings.compare_run!r}: {other.stamp('explanations')} "
                               "is missing; run the attribute and explanations stages there first (or set null)")
    return other


def check(cfg: DictConfig) -> None:
    """Refuse bad explanations settings (and a compare_run without finished explanations) before any stage runs."""
    compare_layout(read_settings(cfg), RunLayout(Path(cfg.out_dir)))


def class_pairs(layout: RunLayout) -> pd.DataFrame:
    """The attribute stage's class pairs (pair, image_index, image_id, target, ...), in pair order."""
    pairs = pd.read_csv(layout.attribute_pairs_csv, keep_default_na=False)
    pairs = pairs[pairs["kind"] == "class"].reset_index(drop=True)
    if pairs.empty:
        raise ExplanationError(f"{layout.attribute_pairs_csv} has no class pairs to compare; set "
                               "attribute.class_target (predicted) and attribute.class_images >= 1 and rerun attribute")
    return pairs


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, 3, S, S) uint8 -> the same, blurred by a Gaussian of ``sigma`` pixels (kernel radius 3 sigma, reflected)."""
    radius = min(math.ceil(3 * sigma), images.shape[-1] - 1)
    return gaussian_blur(images, [2 * radius + 1] * 2, [sigma] * 2)


class CountingModel(nn.Module):
    """A model that counts the images it is called on (LIME's calls go through Captum)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += len(x)
        return self.model(x)


def lime_explanation(scorer: Scorer, image: torch.Tensor, target: int, seed: int, attribute: dict[str, Any],
                     settings: ExplanationsSettings) -> Explanation:
    """LIME on one (3, S, S) uint8 image with ``seed`` (the attribute stage's segments and samples).

    The mask is its ``lime_superpixels`` top superpixels; the heat map its coefficients.
    """
    started = time.perf_counter()
    counting = CountingModel(scorer.model)
    hwc = image.permute(1, 2, 0).numpy()[None]
    segments = superpixels(hwc, attribute["lime_segments"])
    method = MethodSettings(lime_segments=attribute["lime_segments"], lime_samples=attribute["lime_samples"],
                            batch_size=settings.batch_size, seed=seed)
    inputs = scorer.preprocessing.normalise(image[None].to(scorer.device))
    baseline = black_baseline(scorer.preprocessing, scorer.device)
    heat = lime_maps(counting, inputs, torch.tensor([target], device=scorer.device), baseline, segments,
                     method)[0].detach().float().cpu().numpy()
    mask = top_segments_mask(heat, segments[0, 0].numpy(), settings.lime_superpixels)
    scorer.calls += counting.calls
    return Explanation(mask, heat, counting.calls, time.perf_counter() - started, (), np.zeros(0), ())


def method_mask(method: str, values: np.ndarray, image: torch.Tensor, attribute: dict[str, Any],
                settings: ExplanationsSettings) -> np.ndarray:
    """The binary mask of an attribute map (S, S): LIME's top superpixels, any other map's top ``mask_share``."""
    if method == LIME:
        segments = superpixels(image.permute(1, 2, 0).numpy()[None], attribute["lime_segments"])[0, 0].numpy()
        return top_segments_mask(values, segments, settings.lime_superpixels)
    return top_share_mask(values, settings.mask_share)


def lime_name(seed: int) -> str:
    """The name of a LIME run of the stage with ``seed``."""
    return f"lime_seed{seed}"


@dataclass
class PairResult:
    """Everything the stage computed for one class pair.

    ``masks``/``heat``: name -> (S, S) of the sharp image (attribute methods,
    explainers, LIME runs; heat maps only for the explainers and LIME runs),
    ``blurred``: name -> (S, S) mask on the blurred copy, ``controls``:
    explainer -> the mask of its second run, ``runs``: explainers.csv rows,
    ``predictions``: predicted class and target probability, sharp and blurred.
    """

    masks: dict[str, np.ndarray]
    heat: dict[str, np.ndarray]
    blurred: dict[str, np.ndarray]
    controls: dict[str, np.ndarray]
    runs: list[dict[str, Any]]
    predictions: dict[str, Any]


def explain_pair(scorer: Scorer, image: torch.Tensor, blurred: torch.Tensor, target: int,
                 method_maps: dict[str, np.ndarray], attribute: dict[str, Any],
                 settings: ExplanationsSettings) -> PairResult:
    """Every mask of one (3, S, S) uint8 image and its blurred copy; ``method_maps`` its attribute maps (S, S)."""
    masks = {m: method_mask(m, values, image, attribute, settings) for m, values in method_maps.items()}
    heat: dict[str, np.ndarray] = {}
    blurred_masks: dict[str, np.ndarray] = {}
    controls: dict[str, np.ndarray] = {}
    runs = []

    def record(name: str, run: str, explanation: Explanation) -> None:
        runs.append({"explainer": name, "run": run, "model_calls": explanation.calls,
                     "seconds": explanation.seconds, "cells_kept": len(explanation.kept),
                     "mask_pixels": int(explanation.mask.sum())})

    arguments = (settings.grid_cells, settings.grid_keep, settings.statistical_lambda)
    for name in settings.explainer_names:
        if name == LIME:
            first, second = settings.lime_seeds
            for seed in (first, second):
                explanation = lime_explanation(scorer, image, target, seed, attribute, settings)
                masks[lime_name(seed)], heat[lime_name(seed)] = explanation.mask, explanation.heat
                record(lime_name(seed), "sharp", explanation)
            explanation = lime_explanation(scorer, blurred, target, first, attribute, settings)
            blurred_masks[lime_name(first)] = explanation.mask
            record(lime_name(first), "blurred", explanation)
            continue
        explain = EXPLAINER_FUNCTIONS[name]
        explanation = explain(scorer, image, target, *arguments)
        masks[name], heat[name] = explanation.mask, explanation.heat
        record(name, "sharp", explanation)
        control = explain(scorer, image, target, *arguments)
        controls[name] = control.mask
        record(name, "control", control)
        on_blurred = explain(scorer, blurred, target, *arguments)
        blurred_masks[name] = on_blurred.mask
        record(name, "blurred", on_blurred)
    logits = scorer.logits(torch.stack([image, blurred]))
    probabilities = torch.softmax(logits.double(), dim=1)[:, target]
    predictions = {"predicted_sharp": int(logits[0].argmax()), "predicted_blurred": int(logits[1].argmax()),
                   "probability_sharp": float(probabilities[0]), "probability_blurred": float(probabilities[1])}
    return PairResult(masks, heat, blurred_masks, controls, runs, predictions)


def jaccard_row(pair: pd.Series, first: str, second: str, a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """One row of a Jaccard table: the pair's identity, the two names, the index and the two masks' pixel counts."""
    return {"pair": int(pair["pair"]), "image_index": int(pair["image_index"]), "image_id": pair["image_id"],
            "target": int(pair["target"]), "a": first, "b": second, "jaccard": jaccard(a, b),
            "a_pixels": int(a.sum()), "b_pixels": int(b.sum())}


def comparison_tables(pairs: pd.DataFrame, results: list[PairResult], settings: ExplanationsSettings
                      ) -> dict[str, pd.DataFrame]:
    """The methods, seeds and blur Jaccard tables (one row per image and compared pair of masks)."""
    rows: dict[str, list[dict[str, Any]]] = {kind: [] for kind in ("methods", "seeds", "blur")}
    for (_, pair), result in zip(pairs.iterrows(), results):
        for first, second in combinations(result.masks, 2):
            rows["methods"].append(jaccard_row(pair, first, second, result.masks[first], result.masks[second]))
        if LIME in settings.explainer_names:
            a, b = (lime_name(seed) for seed in settings.lime_seeds)
            rows["seeds"].append(jaccard_row(pair, a, b, result.masks[a], result.masks[b]))
        for name, control in result.controls.items():
            rows["seeds"].append(jaccard_row(pair, name, f"{name} (run 2)", result.masks[name], control))
        for name, mask in result.blurred.items():
            rows["blur"].append({**jaccard_row(pair, name, f"{name} (blurred)", result.masks[name], mask),
                                 "blur_sigma": settings.blur_sigma, **result.predictions})
    return {kind: pd.DataFrame(values, columns=JACCARD_COLUMNS + (
        ["blur_sigma", "predicted_sharp", "predicted_blurred", "probability_sharp", "probability_blurred"]
        if kind == "blur" else [])) for kind, values in rows.items()}


def model_table(pairs: pd.DataFrame, results: list[PairResult], other: RunLayout) -> pd.DataFrame:
    """Jaccard of each mask with the same method's mask of the other run's model on the same image (by image id)."""
    other_pairs = pd.read_csv(other.explanations_pairs_csv, keep_default_na=False)
    other_masks = zarr.open_group(other.explanations_masks, mode="r")
    names = set(other_masks.array_keys())
    position = {image_id: k for k, image_id in reversed(list(enumerate(other_pairs["image_id"])))}
    label = other.root.name
    rows = []
    for (_, pair), result in zip(pairs.iterrows(), results):
        k = position.get(pair["image_id"])
        if k is None:
            continue
        for name, mask in result.masks.items():
            if name in names:
                theirs = resize_mask(other_masks[name][k], mask.shape[0])
                rows.append({**jaccard_row(pair, name, f"{name} ({label})", mask, theirs),
                             "other_target": int(other_pairs["target"].iat[k])})
    if not rows:
        log.warning("explanations: %s explains none of these images; no model comparison", other.root)
    return pd.DataFrame(rows, columns=JACCARD_COLUMNS + ["other_target"])


def summarise(table: pd.DataFrame, extremes: int = 5) -> list[dict[str, Any]]:
    """Per compared pair (a, b): images, mean Jaccard, and the ``extremes`` lowest and highest images."""
    out = []
    for (a, b), group in table.groupby(["a", "b"], sort=False):
        defined = group[group["jaccard"].notna()].sort_values(["jaccard", "pair"], kind="stable")
        entry = [{"image_id": r.image_id, "image_index": int(r.image_index), "jaccard": float(r.jaccard)}
                 for r in defined.itertuples()]
        out.append({"a": a, "b": b, "images": len(defined),
                    "mean": float(defined["jaccard"].mean()) if len(defined) else None,
                    "lowest": entry[:extremes], "highest": entry[::-1][:extremes]})
    return out


def overlay_groups(kind: str, table: pd.DataFrame, settings: ExplanationsSettings) -> pd.DataFrame:
    """The rows of a Jaccard table that get overlay pictures: per (a, b) its ``overlays`` lowest and highest.

    For the methods comparison only the explainers against LIME (the study's comparison) are drawn.
    """
    if kind == "methods":
        lime = lime_name(settings.lime_seeds[0])
        table = table[(table["b"] == lime) & table["a"].isin(EXPLAINERS)]
    chosen = []
    for _, group in table.groupby(["a", "b"], sort=False):
        ordered = group.sort_values(["jaccard", "pair"], kind="stable", na_position="first")
        chosen.append(pd.concat([ordered.head(settings.overlays), ordered.tail(settings.overlays)]).drop_duplicates())
    return pd.concat(chosen) if chosen else table.iloc[:0]


def file_name(name: str) -> str:
    """A mask name as a file-name part (spaces and brackets dropped)."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name).strip("_")


def row_masks(kind: str, row: Any, result: PairResult, other: RunLayout | None) -> tuple[np.ndarray, np.ndarray]:
    """The two (S, S) masks A and B that a row of the ``kind`` Jaccard table compares."""
    first = result.masks[row.a]
    if kind == "methods" or (kind == "seeds" and row.b in result.masks):
        return first, result.masks[row.b]
    if kind == "seeds":
        return first, result.controls[row.a]
    if kind == "blur":
        return first, result.blurred[row.a]
    assert other is not None
    other_pairs = pd.read_csv(other.explanations_pairs_csv, keep_default_na=False)
    k = int(np.flatnonzero(other_pairs["image_id"].to_numpy() == row.image_id)[0])
    return first, resize_mask(zarr.open_group(other.explanations_masks, mode="r")[row.a][k], first.shape[0])


def write_overlays(layout: RunLayout, kind: str, rows: pd.DataFrame, pairs: pd.DataFrame, images: torch.Tensor,
                   results: list[PairResult], other: RunLayout | None) -> list[dict[str, Any]]:
    """One PNG per chosen row (A red, B green, both yellow); the overlay index rows (kind, a, b, image, path)."""
    position = {int(pair): k for k, pair in enumerate(pairs["pair"])}
    index = []
    for row in rows.itertuples():
        k = position[int(row.pair)]
        first, second = row_masks(kind, row, results[k], other)
        path = layout.explanation_overlay(kind, file_name(row.a), file_name(row.b), int(row.image_index))
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(overlay(images[k].permute(1, 2, 0).numpy(), first, second)).save(path)
        index.append({"kind": kind, "a": row.a, "b": row.b, "image_id": row.image_id,
                      "image_index": int(row.image_index),
                      "jaccard": None if pd.isna(row.jaccard) else float(row.jaccard),
                      "path": path.relative_to(layout.root).as_posix()})
    return index


def random_map(seed: int, pair: int, size: int) -> np.ndarray:
    """(S, S) uniform random map of a pair, seeded by the stage's seed and the pair number."""
    return np.random.default_rng([seed, pair]).random((size, size))


def faithfulness(scorer: Scorer, pairs: pd.DataFrame, images: torch.Tensor, canvases: torch.Tensor,
                 maps: list[dict[str, np.ndarray]], settings: ExplanationsSettings
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Deletion and insertion curves of every map of every pair, and a random map's.

    ``maps[k]``: name -> (S, S) map of pair k. Returns faithfulness.csv (pair,
    image_index, image_id, target, method, deletion_auc, insertion_auc) and
    curves.csv (pair, method, curve, step, fraction, probability).
    """
    rows, curves = [], []
    fractions = np.linspace(0, 1, settings.steps + 1)
    work = [(k, name) for k in range(len(pairs)) for name in [*maps[k], RANDOM]]
    for k, name in tqdm(work, desc="deletion/insertion", unit="map"):
        pair = pairs.iloc[k]
        values = maps[k][name] if name != RANDOM else random_map(settings.seed, int(pair["pair"]), images.shape[-1])
        deletion, insertion = deletion_insertion(scorer, images[k], canvases[k], values, int(pair["target"]),
                                                 settings.steps)
        rows.append({"pair": int(pair["pair"]), "image_index": int(pair["image_index"]), "image_id": pair["image_id"],
                     "target": int(pair["target"]), "method": name, "deletion_auc": auc(deletion),
                     "insertion_auc": auc(insertion)})
        for curve, values in (("deletion", deletion), ("insertion", insertion)):
            curves += [{"pair": int(pair["pair"]), "method": name, "curve": curve, "step": step,
                        "fraction": float(fractions[step]), "probability": float(value)}
                       for step, value in enumerate(values)]
    return pd.DataFrame(rows), pd.DataFrame(curves)


def curves_figure(curves: pd.DataFrame, path: Path) -> None:
    """curves.png: the mean deletion and insertion curve of each method over the pairs (random dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, curve in zip(axes, ("deletion", "insertion")):
        mean = curves[curves["curve"] == curve].groupby(["method", "fraction"], sort=False)["probability"].mean()
        for method in curves["method"].unique():
            values = mean.loc[method]
            axis.plot(values.index, values.to_numpy(), label=method, linestyle="--" if method == RANDOM else "-",
                      color="black" if method == RANDOM else None, linewidth=1.2)
        axis.set_title(f"{curve} (mean over images)")
        axis.set_xlabel("share of pixels " + ("removed" if curve == "deletion" else "revealed"))
    axes[0].set_ylabel("probability of the explained class")
    axes[1].legend(fontsize=7, ncol=2, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def timing(runs: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per explainer on the sharp images: mean seconds and model calls per image, and LIME's seconds over its own.

    ``lime_over_explainer`` is the mean seconds of the first LIME run divided
    by the explainer's (how many times faster the explainer is than LIME).
    """
    sharp = runs[runs["run"] == "sharp"]
    means = sharp.groupby("explainer", sort=False)[["seconds", "model_calls"]].mean()
    lime = [name for name in means.index if name.startswith(LIME)]
    lime_seconds = float(means.loc[lime[0], "seconds"]) if lime else None
    return {name: {"seconds_per_image": float(row.seconds), "model_calls_per_image": float(row.model_calls),
                   "lime_over_explainer": lime_seconds / float(row.seconds) if lime_seconds and row.seconds else None}
            for name, row in means.iterrows()}


def stage_inputs(cfg: DictConfig, layout: RunLayout, settings: ExplanationsSettings, other: RunLayout | None,
                 description: dict[str, Any]) -> dict[str, Any]:
    """What the outputs depend on: the settings, the attribute stage's stamp, the other run's, the model, the data."""
    return canonical({"explanations": asdict(settings), "model": description, "dataset": str(cfg.dataset.root),
                      "attribute": stamp_digest(layout.stamp("attribute"), "attribute"),
                      "compare_run": None if other is None else {
                          "root": str(other.root), "explanations": stamp_digest(other.stamp("explanations"),
                                                                                "explanations")}})


def write_masks(layout: RunLayout, pairs: pd.DataFrame, results: list[PairResult]) -> None:
    """masks.zarr: per name a (P, S, S) bool mask array, ``heat/<name>`` (P, S, S) float32, ``blurred/<name>`` masks."""
    group = zarr.open_group(layout.explanations_masks, mode="w")
    for kind, attribute in (("", "masks"), ("heat/", "heat"), ("blurred/", "blurred")):
        for name in getattr(results[0], attribute):
            values = np.stack([getattr(result, attribute)[name] for result in results])
            target = group.require_group(kind.rstrip("/")) if kind else group
            target.create_array(name, data=values, chunks=(1, *values.shape[1:]))
    group.attrs.update({"pairs": pairs["pair"].astype(int).tolist(), "names": list(results[0].masks)})


def run(cfg: DictConfig) -> Path:
    """Masks, Jaccard comparisons, explainer timings and deletion/insertion curves of the class maps."""
    settings = read_settings(cfg)
    layout = RunLayout(Path(cfg.out_dir))
    other = compare_layout(settings, layout)
    if cfg.attribute.class_target is None:
        log.warning("explanations: attribute.class_target=null, so there are no class maps to compare; skipped "
                    "(set attribute.class_target=predicted to compare explanations)")
        return layout.explanations_dir
    if not layout.stamp("attribute").is_file():
        raise ExplanationError(f"{layout.stamp('attribute')} is missing: the attribute stage has not finished for "
                               "this run; run it first (stages=[attribute,explanations])")
    attribute = read_json(layout.attribute_json)["settings"]
    device = pick_device(str(cfg.attribute.device), "attribute.device")
    loaded = load_seeded(cfg.model, int(attribute["seed"]))
    key = stage_inputs(cfg, layout, settings, other, loaded.description)
    if is_current(layout.stamp("explanations"), key, FORMAT, "explanations"):
        return layout.explanations_dir
    preprocessing = Preprocessing(loaded.input_size, loaded.mean, loaded.std)
    pairs = class_pairs(layout)
    probe = open_probe_set(cfg.dataset)
    images = load_images([probe.image_paths[int(i)] for i in pairs["image_index"]], preprocessing)
    scorer = Scorer(prepare_model(loaded.module.to(device)), preprocessing, device, settings.batch_size)
    stored = zarr.open_group(layout.attribute_maps, mode="r")
    methods = list(stored.attrs["complete"])
    rows = pairs["pair"].astype(int).to_numpy()
    method_maps = {m: stored[m].get_orthogonal_selection((rows,)).astype(np.float32) for m in methods}
    blurred, canvases = blur(images, settings.blur_sigma), blur(images, settings.insertion_sigma)

    start(layout, "explanations")
    shutil.rmtree(layout.explanations_dir, ignore_errors=True)
    layout.explanations_dir.mkdir(parents=True)
    pairs.to_csv(layout.explanations_pairs_csv, index=False)
    results = [explain_pair(scorer, images[k], blurred[k], int(pairs["target"].iat[k]),
                            {m: values[k] for m, values in method_maps.items()}, attribute, settings)
               for k in tqdm(range(len(pairs)), desc="explainers", unit="image")]
    write_masks(layout, pairs, results)
    runs = pd.DataFrame([{"pair": int(pairs["pair"].iat[k]), "image_index": int(pairs["image_index"].iat[k]),
                          "image_id": pairs["image_id"].iat[k], "target": int(pairs["target"].iat[k]), **run}
                         for k, result in enumerate(results) for run in result.runs])
    runs.to_csv(layout.explainers_csv, index=False, float_format="%.6f")

    tables = comparison_tables(pairs, results, settings)
    if other is not None:
        tables["models"] = model_table(pairs, results, other)
    overlays = []
    for kind, table in tables.items():
        table.to_csv(layout.jaccard_csv(kind), index=False, float_format="%.6f")
        overlays += write_overlays(layout, kind, overlay_groups(kind, table, settings), pairs, images, results, other)

    maps = [{**{m: values[k] for m, values in method_maps.items()}, **result.heat}
            for k, result in enumerate(results)]
    scores, curves = faithfulness(scorer, pairs, images, canvases, maps, settings)
    scores.to_csv(layout.faithfulness_csv, index=False, float_format="%.6f")
    curves.to_csv(layout.curves_csv, index=False, float_format="%.6f")
    curves_figure(curves, layout.curves_png)
    write_json_atomic(layout.explanations_json, summary(settings, pairs, runs, tables, scores, overlays, other))
    write_stamp(layout.stamp("explanations"), key, FORMAT)
    return layout.explanations_dir


def summary(settings: ExplanationsSettings, pairs: pd.DataFrame, runs: pd.DataFrame,
            tables: dict[str, pd.DataFrame], scores: pd.DataFrame, overlays: list[dict[str, Any]],
            other: RunLayout | None) -> dict[str, Any]:
    """explanations.json: settings, explainer timings, Jaccard summaries, the control, faithfulness per method."""
    seeds = tables["seeds"]
    controls = seeds[seeds["b"].str.endswith(" (run 2)")]
    lime_rows = seeds[~seeds["b"].str.endswith(" (run 2)")]
    per_method = scores.groupby("method", sort=False)[["deletion_auc", "insertion_auc"]].mean()
    random = per_method.loc[RANDOM]
    blur = tables["blur"].drop_duplicates("pair")
    return {
        "settings": asdict(settings), "pairs": len(pairs), "compare_run": None if other is None else str(other.root),
        "explainers": timing(runs),
        "jaccard": {kind: summarise(table) for kind, table in tables.items()},
        "deterministic_control": {"rows": len(controls), "all_one": bool((controls["jaccard"] == 1).all())},
        "lime_seeds": {"rows": len(lime_rows), "below_one": int((lime_rows["jaccard"] < 1).sum())},
        "blur": {"sigma": settings.blur_sigma, "images": len(blur),
                 "prediction_changed": int((blur["predicted_sharp"] != blur["predicted_blurred"]).sum())},
        "faithfulness": {method: {"deletion_auc": float(row.deletion_auc), "insertion_auc": float(row.insertion_auc),
                                  "deletion_below_random": float(row.deletion_auc) < float(random.deletion_auc),
                                  "insertion_above_random": float(row.insertion_auc) > float(random.insertion_auc)}
                         for method, row in per_method.iterrows()},
        "faithfulness_meaning": "areas under the class probability as pixels are removed (deletion: lower is "
                                "better) or revealed on a blurred canvas (insertion: higher is better) in the "
                                "map's order, against a random map of the same image",
        "overlays": overlays,
    }
