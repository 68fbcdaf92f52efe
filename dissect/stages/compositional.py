"""The compositional stage: each unit's best formula of concepts (OR, AND, AND NOT), found by beam search.

Network dissection labels a unit with the one concept whose masks best match
its fired pixels. Mu and Andreas (NeurIPS 2020, "Compositional Explanations of
Neurons") search logical formulas of concepts instead, scored by the same IoU.
This stage does that for every unit of every dissected map layer:

- M_u is the tally's unit mask: the stored map upsampled bilinearly to the mask
  resolution, > T_u (thresholds stage); a concept's mask is the union of its
  pixels over the image's mask layers (scene and texture labels cover the image).
- A formula is ``c1 op c2 op c3 ...`` applied left to right, ``op`` one of OR,
  AND, AND NOT (``(c1 OR c2) AND NOT c3``); a concept appears once at most.
- Its IoU is |M_u AND F| / |M_u OR F|, each count summed over the images where
  every category of the formula's concepts is annotated (and that the tally
  could read). For one concept that is the tally's rule exactly whenever every
  image holding the concept annotates its primary category (the tally counts
  |M_u| over the images annotating that category, and the concept wherever it
  is), so length-1 scores equal the tally's IoU then.
- Beam search as Mu and Andreas: the beam starts with the ``beam`` best single
  concepts; each round extends every formula of the beam by every concept and
  operator, and the best ``beam`` of the beam and its extensions go on, up to
  ``max_length`` concepts. Formulas are ranked by IoU minus ``length_penalty``
  per concept beyond the first, ties to the shorter, then the lower concept
  numbers. The best formula seen is the unit's; the next ``runner_ups`` are kept.

How it is fast. Concept masks are bit-packed once per probe set into
``compositional/concept_bits.npy`` ((C, N, W) uint64, memory-mapped), so the
size of a formula's mask in every image is a popcount of a few ANDs and ORs.
A unit fires on few pixels (0.5% at the standard quantile), so everything that
involves M_u is computed at its fired pixels only: a (fired, C') membership
table of the C' concepts present in the images where the unit fires gives |M_u AND F op c| for every concept c at once as one matrix
product, and |F op c| follows from |F|, |c| and |F AND c| (|F OR c| = |F| + |c|
- |F AND c|, |F AND NOT c| = |F| - |F AND c|), with the per-image counts of |F
AND c| cached per formula and shared by the units of a task. Units are spread
over the run's dask workers in groups of ``units_per_task``.

Outputs per map layer in ``layers/<layer>/``: ``compositional.csv`` (unit,
formula: readable text, formula_json: the machine form ``[number, [op,
number], ...]`` of label numbers, iou, length, single_label and single_iou:
the best single concept under the same rule, gain = iou - single_iou,
runner_ups: JSON list of {formula, iou}), ``compositional.json`` (summary: how
often a formula beats the single label and by how much) and the layer's stamp.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from distributed import as_completed
from omegaconf import DictConfig
from tqdm import tqdm

from dissect.artifacts import concept_probe_set, map_layers, open_activations, read_thresholds, write_json_atomic
from dissect.broden import CATEGORIES, BrodenDataset, BrodenFormatError, image_concepts
from dissect.cluster import check_worker_paths, dask_client, worker_count
from dissect.layout import RunLayout
from dissect.settings import CompositionalSettings, section
from dissect.stamps import is_current, stamp_digest, start, write_stamp
from dissect.upsample import fired_masks, float32_below

log = logging.getLogger(__name__)

#: The version of this stage's output format.
FORMAT = 1
#: Operators, by their index in a Formula.
OPERATORS = ("or", "and", "and not")
OR, AND, AND_NOT = range(3)
#: Images per task when the concept masks are bit-packed.
PACK_BLOCK_IMAGES = 256
#: Formulas whose per-image counts a task keeps (each (C + 1, N) int64).
CACHE_FORMULAS = 128
#: Images per step when counting a formula AND every concept (bounds the (C, images, W) temporary).
COUNT_BLOCK_IMAGES = 512


@dataclass(frozen=True)
class Formula:
    """Concept columns ``terms`` joined left to right by ``ops`` (indices into OPERATORS, one fewer)."""

    terms: tuple[int, ...]
    ops: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        return len(self.terms)

    def extend(self, op: int, term: int) -> Formula:
        return Formula((*self.terms, term), (*self.ops, op))

    def text(self, names: list[str]) -> str:
        """Readable form, e.g. ``(water OR river) AND NOT blue``."""
        out = names[self.terms[0]]
        for i, (op, term) in enumerate(zip(self.ops, self.terms[1:])):
            out = f"({out})" if i else out
            out = f"{out} {OPERATORS[op].upper()} {names[term]}"
        return out

    def machine(self, numbers: list[int]) -> list[Any]:
        """``[number, [op, number], ...]`` with Broden label numbers."""
        return [numbers[self.terms[0]], *[[OPERATORS[op], numbers[t]] for op, t in zip(self.ops, self.terms[1:])]]

    def sort_key(self) -> tuple:
        return self.length, self.terms, self.ops


@dataclass
class ConceptMasks:
    """Bit-packed concept masks of the probe set.

    bits: (C, N, W) uint64, bit p of word w = pixel 64 w + p of the image's mask
    (row-major at its mask resolution); annotated: (N, K) bool, categories the
    image annotates (all False for an image the tally could not read);
    categories: (C,) category index of each concept.
    """

    bits: np.ndarray
    annotated: np.ndarray
    categories: np.ndarray

    def __post_init__(self) -> None:
        self.image_counts = popcount(self.bits)  # (C, N) pixels of each concept per image
        self._restrictions: dict[frozenset[int], np.ndarray] = {}

    def restriction(self, categories: frozenset[int]) -> np.ndarray:
        """(N,) float64: 1 for the images annotating every category in ``categories``."""
        if categories not in self._restrictions:
            self._restrictions[categories] = self.annotated[:, sorted(categories)].all(axis=1).astype(np.float64)
        return self._restrictions[categories]

    def formula_categories(self, formula: Formula) -> frozenset[int]:
        return frozenset(int(self.categories[t]) for t in formula.terms)

    def formula_bits(self, formula: Formula) -> np.ndarray:
        """(N, W) uint64 mask of the formula in every image (padding bits stay 0)."""
        out = self.bits[formula.terms[0]].copy()
        for op, term in zip(formula.ops, formula.terms[1:]):
            if op == OR:
                out |= self.bits[term]
            elif op == AND:
                out &= self.bits[term]
            else:
                out &= ~self.bits[term]
        return out


def popcount(words: np.ndarray) -> np.ndarray:
    """(..., W) uint64 -> (...,) int64 set bits."""
    return np.bitwise_count(words).sum(axis=-1, dtype=np.int64)


class FormulaCounts:
    """Per-image counts of formulas, and of each formula AND every concept, cached (LRU)."""

    def __init__(self, masks: ConceptMasks, size: int = CACHE_FORMULAS) -> None:
        self.masks = masks
        self.size = size
        self._cache: OrderedDict[Formula, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def get(self, formula: Formula) -> tuple[np.ndarray, np.ndarray]:
        """((N,) pixels of F per image, (C, N) pixels of F AND c per image), int64."""
        if formula in self._cache:
            self._cache.move_to_end(formula)
            return self._cache[formula]
        bits = self.masks.formula_bits(formula)
        per_image = popcount(bits)
        present = np.flatnonzero(per_image)  # |F AND c| is 0 in the images F does not touch
        with_all = np.zeros((len(self.masks.bits), len(per_image)), dtype=np.int64)
        for first in range(0, len(present), COUNT_BLOCK_IMAGES):
            images = present[first:first + COUNT_BLOCK_IMAGES]
            with_all[:, images] = popcount(self.masks.bits[:, images] & bits[images][None])
        value = per_image, with_all
        self._cache[formula] = value
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return value


@dataclass
class FiredPixels:
    """Where one unit fires: image (n,) int64 and pixel (n,) int64 within the image's mask."""

    images: np.ndarray
    pixels: np.ndarray


def membership(fired: FiredPixels, bits: np.ndarray, concepts: np.ndarray) -> np.ndarray:
    """(n, P) float32: 1 where concept ``concepts[p]`` covers fired pixel j (bits: (C, N, W))."""
    words = bits[concepts[:, None], fired.images[None, :], (fired.pixels >> 6)[None, :]]  # (P, n)
    return ((words >> (fired.pixels & 63).astype(np.uint64)) & np.uint64(1)).T.astype(np.float32)


def ranking(score: float, formula: Formula) -> tuple:
    return -score, formula.sort_key()


@dataclass
class SetTerms:
    """What a formula's extensions need that depends only on its category set S, per candidate concept c.

    weights: (K, n) float32, 1 at the fired pixels of images annotating S and category k;
    restriction: (C, N) float64, R_{S ∪ {cat(c)}} per candidate; concept_fired: (C,) |M AND c|;
    unit_size: (C,) |M|; concept_size: (C,) |c|, all counted over R_{S ∪ {cat(c)}}.
    """

    weights: np.ndarray
    restriction: np.ndarray
    concept_fired: np.ndarray
    unit_size: np.ndarray
    concept_size: np.ndarray


class UnitSearch:
    """One unit's fired pixels against the concept masks: the beam search and its scores."""

    def __init__(self, fired: FiredPixels, masks: ConceptMasks, counts: FormulaCounts) -> None:
        self.fired, self.masks, self.counts = fired, masks, counts
        n_concepts, n_images = masks.image_counts.shape
        # only concepts present in an image where the unit fires can share a fired pixel with it
        self.present = np.flatnonzero((masks.image_counts[:, np.unique(fired.images)] > 0).any(axis=1))
        self.member = membership(fired, masks.bits, self.present)  # (n, P) over the present concepts
        self.column_of = np.full(n_concepts, -1)
        self.column_of[self.present] = np.arange(len(self.present))
        self.fired_per_image = np.bincount(fired.images, minlength=n_images).astype(np.float64)
        self.columns = np.arange(n_concepts)
        self._terms: dict[frozenset[int], SetTerms] = {}

    def fired_counts(self, weights: np.ndarray) -> np.ndarray:
        """(K, n) weights of the fired pixels -> (K, C) weighted counts of each concept's fired pixels."""
        out = np.zeros((len(weights), len(self.columns)), dtype=np.float64)
        out[:, self.present] = weights @ self.member
        return out

    def values(self, formula: Formula) -> np.ndarray:
        """(n,) float32 0/1: the formula at each fired pixel."""
        def column(term: int) -> np.ndarray:
            index = self.column_of[term]
            return self.member[:, index] > 0 if index >= 0 else np.zeros(len(self.member), dtype=bool)

        out = column(formula.terms[0])
        for op, term in zip(formula.ops, formula.terms[1:]):
            out = out | column(term) if op == OR else out & column(term) if op == AND else out & ~column(term)
        return out.astype(np.float32)

    def terms(self, categories: frozenset[int]) -> SetTerms:
        if categories not in self._terms:
            masks, k_of = self.masks, self.masks.categories
            rows = np.stack([masks.restriction(categories | {k}) for k in range(len(CATEGORIES))])  # (K, N)
            weights = rows[:, self.fired.images].astype(np.float32)
            picked = rows[k_of]
            self._terms[categories] = SetTerms(
                weights, picked, self.fired_counts(weights)[k_of, self.columns], (rows @ self.fired_per_image)[k_of],
                (masks.image_counts * picked).sum(axis=1))
        return self._terms[categories]

    def singles(self) -> dict[Formula, float]:
        """IoU of every single concept (each over the images annotating its category)."""
        terms = self.terms(frozenset())
        scores = ious(terms.concept_fired, terms.unit_size, terms.concept_size)
        return {Formula((int(c),)): float(scores[c]) for c in self.columns}

    def extensions(self, formula: Formula) -> dict[Formula, float]:
        """IoU of ``formula op c`` for every concept c not in the formula and every operator."""
        terms = self.terms(self.masks.formula_categories(formula))
        k_of = self.masks.categories
        values = self.values(formula)  # (n,) 0/1
        both_fired = self.fired_counts(terms.weights * values)[k_of, self.columns]  # |M AND F AND c|
        formula_fired = (terms.weights @ values)[k_of]  # |M AND F|
        formula_per_image, with_all = self.counts.get(formula)
        both = (with_all * terms.restriction).sum(axis=1)  # |F AND c|
        formula_size = terms.restriction @ formula_per_image  # |F|
        scores = {OR: ious(formula_fired + terms.concept_fired - both_fired, terms.unit_size,
                           formula_size + terms.concept_size - both),
                  AND: ious(both_fired, terms.unit_size, both),
                  AND_NOT: ious(formula_fired - both_fired, terms.unit_size, formula_size - both)}
        used = set(formula.terms)
        return {formula.extend(op, int(c)): float(column[c]) for c in self.columns if c not in used
                for op, column in scores.items()}


def search_unit(fired: FiredPixels, masks: ConceptMasks, counts: FormulaCounts,
                settings: CompositionalSettings) -> list[tuple[Formula, float]]:
    """Beam search for one unit; every formula explored with its IoU, best first (by penalised score)."""
    search = UnitSearch(fired, masks, counts)
    pool = search.singles()

    def score(item: tuple[Formula, float]) -> tuple:
        return ranking(item[1] - settings.length_penalty * (item[0].length - 1), item[0])

    beam = [f for f, _ in sorted(pool.items(), key=score)[:settings.beam]]
    for _ in range(settings.max_length - 1):
        candidates: dict[Formula, float] = {}
        for formula in beam:
            candidates.update(search.extensions(formula))
        pool.update(candidates)
        ranked = sorted({f: pool[f] for f in [*beam, *candidates]}.items(), key=score)
        beam = [f for f, _ in ranked[:settings.beam]]
    return sorted(pool.items(), key=score)


def ious(intersection: np.ndarray, unit_size: np.ndarray, formula_size: np.ndarray) -> np.ndarray:
    """(C,) IoU from (C,) exact counts (float arrays holding integers); 0 where the union is empty."""
    inter = np.round(intersection)
    union = unit_size + formula_size - inter
    return np.divide(inter, union, out=np.zeros_like(union), where=union > 0)


# ------------------------------------------------------------------ the masks


def pack_block(broden_root: str, bits_path: str, start: int, stop: int, strict: bool) -> tuple[np.ndarray, list]:
    """Bit-pack the concept masks of images start..stop into the shared npy (runs on a dask worker).

    Returns (stop - start, K) annotated categories and the (image, reason) of images whose masks could not be read.
    """
    broden = BrodenDataset(broden_root)
    bits = np.load(bits_path, mmap_mode="r+")
    n_labels, words = len(broden.labels), bits.shape[2]
    annotated = np.zeros((stop - start, len(CATEGORIES)), dtype=bool)
    skipped = []
    for j, i in enumerate(range(start, stop)):
        try:
            concepts = image_concepts(broden, i, n_labels)
        except BrodenFormatError as error:
            if strict:
                raise
            skipped.append((i, str(error)))
            continue
        packed = np.packbits(concepts.masks, axis=1, bitorder="little")
        padded = np.zeros((len(packed), words * 8), dtype=np.uint8)
        padded[:, :packed.shape[1]] = packed
        bits[concepts.labels - 1, i] = padded.view("<u8")
        annotated[j] = concepts.annotated
    bits.flush()
    return annotated, skipped


def build_concept_masks(cfg: DictConfig, layout: RunLayout, broden: BrodenDataset, valid: np.ndarray) -> None:
    """Write concept_bits.npy and annotated.npy for the probe set, unless current (their stamp)."""
    inputs = {"probe_set": str(broden.root), "labels": len(broden.labels),
              "image_ids": hashlib.sha256("\n".join(broden.image_ids).encode()).hexdigest()[:16],
              "valid": hashlib.sha256(np.packbits(valid).tobytes()).hexdigest()[:16],
              "strict": bool(cfg.tally.strict)}
    if is_current(layout.stamp("compositional"), inputs, FORMAT, "compositional concept masks"):
        return
    start(layout, "compositional")
    started = time.perf_counter()
    n_images = len(broden)
    pixels = max(h * w for h, w in (broden.mask_size(i) for i in range(n_images)))
    layout.concept_bits.parent.mkdir(parents=True, exist_ok=True)
    bits = np.lib.format.open_memmap(layout.concept_bits, mode="w+", dtype="<u8",
                                     shape=(len(broden.labels), n_images, math.ceil(pixels / 64)))
    del bits
    annotated = np.zeros((n_images, len(CATEGORIES)), dtype=bool)
    skipped: list = []
    with dask_client(cfg.cluster) as client:
        check_worker_paths(client, [broden.root], writable=[layout.concept_bits])
        block_of = {client.submit(pack_block, str(broden.root), str(layout.concept_bits), s,
                                  min(s + PACK_BLOCK_IMAGES, n_images), bool(cfg.tally.strict), pure=False): s
                    for s in range(0, n_images, PACK_BLOCK_IMAGES)}
        with tqdm(total=n_images, desc="compositional: pack masks", unit="img") as bar:
            for future in as_completed(list(block_of)):
                first = block_of[future]
                rows, block_skipped = future.result()
                annotated[first:first + len(rows)] = rows
                skipped += block_skipped
                bar.update(len(rows))
    annotated[~valid] = False
    if skipped:
        log.warning("compositional: %d images left out for unreadable masks (as in the tally)", len(skipped))
    np.save(layout.image_annotations, annotated)
    write_stamp(layout.stamp("compositional"), inputs, FORMAT)
    log.info("compositional: packed the concept masks of %d images in %.1f s", n_images, time.perf_counter() - started)


def open_concept_masks(bits_path: str, annotated_path: str, categories: np.ndarray) -> ConceptMasks:
    return ConceptMasks(np.load(bits_path, mmap_mode="r"), np.load(annotated_path), categories)


# ------------------------------------------------------------------- the units


def fired_pixels(store_path: str, layer: str, units: list[int], thresholds: np.ndarray,
                 mask_sizes: np.ndarray) -> list[FiredPixels]:
    """Where each of ``units`` fires over the valid probe images (the tally's masks), image by image."""
    store = zarr.open_group(store_path, mode="r")
    maps = store[layer]["maps"]
    valid = store["valid"][:]
    maxima = store[layer]["maxima"].oindex[:, units]
    below = float32_below(thresholds[units])
    found: list[tuple[list, list]] = [([], []) for _ in units]
    step = maps.chunks[0]
    for first in range(0, maps.shape[0], step):
        block = maps.oindex[first:first + step, units]
        for j in range(len(block)):
            i = first + j
            active = np.flatnonzero(maxima[i] > thresholds[units])
            if not valid[i] or active.size == 0:
                continue
            size = (int(mask_sizes[i, 0]), int(mask_sizes[i, 1]))
            masks = fired_masks(block[j, active], below[active], size)
            for a, mask in zip(active, masks):
                pixels = np.flatnonzero(mask)
                found[a][0].append(np.full(len(pixels), i, dtype=np.int64))
                found[a][1].append(pixels.astype(np.int64))
    return [FiredPixels(np.concatenate(im) if im else np.zeros(0, np.int64),
                        np.concatenate(px) if px else np.zeros(0, np.int64)) for im, px in found]


@dataclass(frozen=True)
class SearchJob:
    """What a worker needs to search a group of units of one layer; every field pickles."""

    store: str
    bits: str
    annotated: str
    layer: str
    thresholds: np.ndarray
    categories: np.ndarray
    mask_sizes: np.ndarray
    settings: CompositionalSettings


def search_units(job: SearchJob, units: list[int]) -> list[list[tuple[Formula, float]]]:
    """The explored formulas (best first) of each unit of a group (runs on a dask worker)."""
    masks = open_concept_masks(job.bits, job.annotated, job.categories)
    counts = FormulaCounts(masks)
    return [search_unit(fired, masks, counts, job.settings)
            for fired in fired_pixels(job.store, job.layer, units, job.thresholds, job.mask_sizes)]


def runner_ups(explored: list[tuple[Formula, float]], count: int) -> list[tuple[Formula, float]]:
    """The next ``count`` formulas after the best, leaving out those that only append terms to a formula
    already listed (or the best) without changing its IoU (``F AND NOT c`` for a c that F never touches)."""
    kept: list[tuple[Formula, float]] = []
    shown = [explored[0]]
    for formula, value in explored[1:]:
        if len(kept) == count:
            break
        if any(value == v and formula.terms[:f.length] == f.terms and formula.ops[:f.length - 1] == f.ops
               for f, v in shown):
            continue
        kept.append((formula, value))
        shown.append((formula, value))
    return kept


def unit_row(unit: int, explored: list[tuple[Formula, float]], names: list[str], numbers: list[int],
             count: int) -> dict[str, Any]:
    """One row of compositional.csv."""
    best, best_iou = explored[0]
    single, single_iou = next((f, v) for f, v in explored if f.length == 1)
    return {"unit": unit, "formula": best.text(names), "formula_json": json.dumps(best.machine(numbers)),
            "iou": best_iou, "length": best.length, "single_label": single.text(names), "single_iou": single_iou,
            "gain": best_iou - single_iou,
            "runner_ups": json.dumps([{"formula": f.text(names), "iou": round(v, 6)}
                                      for f, v in runner_ups(explored, count)])}


def layer_summary(layer: str, table: pd.DataFrame, settings: CompositionalSettings) -> dict[str, Any]:
    """How often formulas beat single labels in a layer, and by how much."""
    better = table[table["gain"] > 0]
    return {"layer": layer, "units": len(table), "settings": settings.__dict__,
            "formula_beats_single": len(better),
            "mean_gain": float(better["gain"].mean()) if len(better) else 0.0,
            "median_relative_gain": float((better["gain"] / better["single_iou"].where(better["single_iou"] > 0))
                                          .median()) if len(better) else 0.0,
            "length_counts": {str(k): int(v) for k, v in table["length"].value_counts().sort_index().items()},
            "mean_iou": float(table["iou"].mean()), "mean_single_iou": float(table["single_iou"].mean())}


def check(cfg: DictConfig) -> None:
    """Refuse bad compositional settings before any stage runs."""
    section(cfg.compositional, CompositionalSettings)


def run(cfg: DictConfig) -> Path:
    """Search formulas for every unit of every map layer of ``cfg.layers`` not done with these settings."""
    check(cfg)
    settings = section(cfg.compositional, CompositionalSettings)
    layout = RunLayout(Path(cfg.out_dir))
    store = open_activations(layout.root)
    broden = concept_probe_set(cfg.dataset, store, layout.root, "the compositional stage")
    todo = {}
    for layer in map_layers(store, [str(name) for name in cfg.layers]):
        inputs = {"settings": settings.__dict__, "tally": stamp_digest(layout.stamp("tally", layer), "tally")}
        if not is_current(layout.stamp("compositional", layer), inputs, FORMAT, f"compositional of {layer}"):
            todo[layer] = inputs
    if not todo:
        return layout.root
    build_concept_masks(cfg, layout, broden, store["valid"][:])
    categories = np.array([CATEGORIES.index(broden.category_of(n)) for n in range(1, len(broden.labels) + 1)])
    names = list(broden.label_names[1:len(broden.labels) + 1])
    numbers = list(range(1, len(broden.labels) + 1))
    mask_sizes = np.array([broden.mask_size(i) for i in range(len(broden))])
    with dask_client(cfg.cluster) as client:
        check_worker_paths(client, [layout.activations, layout.concept_bits, layout.image_annotations])
        for layer, inputs in todo.items():
            job = SearchJob(str(layout.activations), str(layout.concept_bits), str(layout.image_annotations), layer,
                            read_thresholds(layout, layer), categories, mask_sizes, settings)
            n_units = store[layer]["maps"].shape[1]
            per_task = max(1, min(settings.units_per_task, math.ceil(n_units / worker_count(client))))
            groups = {client.submit(search_units, job, list(range(s, min(s + per_task, n_units))), pure=False): s
                      for s in range(0, n_units, per_task)}
            rows: dict[int, dict[str, Any]] = {}
            with tqdm(total=n_units, desc=f"compositional {layer}", unit="unit") as bar:
                for future in as_completed(list(groups)):
                    first = groups[future]
                    for offset, explored in enumerate(future.result()):
                        rows[first + offset] = unit_row(first + offset, explored, names, numbers,
                                                        settings.runner_ups)
                    bar.update(len(future.result()))
                    future.release()
            table = pd.DataFrame([rows[u] for u in range(n_units)])
            start(layout, "compositional", layer)
            table.to_csv(layout.compositional_csv(layer), index=False, float_format="%.6f")
            summary = layer_summary(layer, table, settings)
            write_json_atomic(layout.compositional_json(layer), summary)
            write_stamp(layout.stamp("compositional", layer), inputs, FORMAT)
            log.info("compositional %s: a formula beats the single label for %d of %d units (mean gain %.3f)",
                     layer, summary["formula_beats_single"], n_units, summary["mean_gain"])
    return layout.root
