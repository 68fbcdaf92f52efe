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
- Its IoU is |M_u AND F| / |M_u OR F|, each count summed over the searched
  images where every category of the formula's concepts is annotated (and that
  the tally could read). For one concept that is the tally's rule exactly
  whenever every image holding the concept annotates its primary category and
  every valid image is searched (the tally counts |M_u| over the images
  annotating that category, and the concept wherever it is), so length-1
  scores equal the tally's IoU then.
- The searched images: every valid image of the probe set, or, when there are
  more than ``max_images``, a seeded uniform random sample of that many
  (``sample_seed``); the counts over them are exact, the sample is recorded in
  ``compositional.json`` and is part of the stamps. It bounds the stage's time
  and memory on a large probe set such as Broden (63,305 images), where the
  masks alone take longer to decode than the stage's share of the pipeline.
- Beam search as Mu and Andreas: the beam starts with the ``beam`` best single
  concepts; each round extends every formula of the beam by every concept and
  operator, and the best ``beam`` of the beam and its extensions go on, up to
  ``max_length`` concepts. Formulas are ranked by IoU minus ``length_penalty``
  per concept beyond the first, ties to the shorter, then the lower concept
  numbers. The best formula seen is the unit's; the next ``runner_ups`` are kept.
  Every concept and operator is scored in every round (nothing is pruned): once
  a formula's totals below are known, that is arithmetic on (C,) vectors.

How it is fast, and why memory does not grow with the concepts or the images.
The concept masks of the searched images are bit-packed once, sparsely: only
the (image, concept) pairs present are stored, image-major (the pairs of image
r are rows offsets[r]:offsets[r + 1]; each row holds the concept, its pixel
count and its packed mask, memory-mapped). Everything that involves a unit is
computed from where it fires, and its fired pixels are grouped, per image, by
the set of concepts that cover them (pixels of a group are alike for every
formula), so a unit is a few groups per fired image and their concepts:
|M_u AND (F op c)| for every c is one weighted bincount over those. What a
formula needs beside the unit: |F| and, for every concept c, |F AND c|, each
summed over the images annotating the formula's categories and c's
(|F OR c| = |F| + |c| - |F AND c|, |F AND NOT c| = |F| - |F AND c|): a
popcount over the pairs of the images F touches, kept as two small vectors
per formula and shared by every unit a worker process searches. Work is cut
twice per layer: where the units fire, in blocks of sampled images (each map
chunk read once for all units), then the search, in groups of at most
``units_per_task`` units.

Outputs per map layer in ``layers/<layer>/``: ``compositional.csv`` (unit,
formula: readable text, formula_json: the machine form ``[number, [op,
number], ...]`` of label numbers, iou, length, single_label and single_iou:
the best single concept under the same rule, gain = iou - single_iou,
runner_ups: JSON list of {formula, iou}), ``compositional.json`` (summary: how
often a formula beats the single label and by how much, and the searched
images) and the layer's stamp.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import zarr
from omegaconf import DictConfig
from tqdm import tqdm

from dissect.artifacts import concept_probe_set, map_layers, open_activations, read_thresholds, write_json_atomic
from dissect.broden import CATEGORIES, BrodenDataset, BrodenFormatError, image_concepts
from dissect.cluster import check_worker_paths, dask_client, results_in_window
from dissect.layout import RunLayout
from dissect.settings import CompositionalSettings, section
from dissect.stamps import is_current, stamp_digest, start, write_stamp
from dissect.upsample import fired_masks, float32_below

log = logging.getLogger(__name__)

#: The version of this stage's output format.
FORMAT = 2
#: Operators, by their index in a Formula.
OPERATORS = ("or", "and", "and not")
OR, AND, AND_NOT = range(3)
#: Images per task when the concept masks are bit-packed, and when finding where the units fire.
PACK_BLOCK_IMAGES = 256
#: Formulas whose totals a worker process keeps (each two small vectors: (K,) and (C,) float64).
CACHE_FORMULAS = 8192
#: The largest concept-mask file whose memory map a worker process keeps open (its pages count as resident once
#: read); a larger one is mapped afresh for each formula, so that the process does not hold all of it.
WORDS_KEPT_MIB = 512
#: (image, concept) pairs per step when counting a formula AND every concept (bounds the (pairs, W) temporaries).
COUNT_BLOCK_PAIRS = 8192


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

    def prefix(self) -> Formula:
        """The formula without its last term (a formula of length 2 or more)."""
        return Formula(self.terms[:-1], self.ops[:-1])

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


def popcount(words: np.ndarray) -> np.ndarray:
    """(..., W) uint64 -> (...,) int64 set bits."""
    return np.bitwise_count(words).sum(axis=-1, dtype=np.int64)


def pair_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenated ranges starts[i] .. starts[i] + lengths[i] (int64)."""
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(int(ends[-1]) if len(ends) else 0)


# ------------------------------------------------------------------ the masks


@dataclass(frozen=True)
class MaskFiles:
    """Where the sparse concept masks of a run are (RunLayout's paths as strings; every field pickles)."""

    sample: str
    annotated: str
    offsets: str
    concepts: str
    pixels: str
    words: str

    @classmethod
    def of(cls, layout: RunLayout) -> MaskFiles:
        return cls(str(layout.concept_sample), str(layout.image_annotations), str(layout.pair_offsets),
                   str(layout.pair_concepts), str(layout.pair_pixels), str(layout.pair_words))

    def paths(self) -> list[Path]:
        return [Path(p) for p in (self.sample, self.annotated, self.offsets, self.concepts, self.pixels, self.words)]


class ConceptMasks:
    """The sparse bit-packed concept masks of the n searched images: only the (image, concept) pairs present.

    The pairs of searched image r are rows offsets[r]:offsets[r + 1] ((n + 1,) int64) of ``concepts`` ((P,)
    concept column = label number - 1, ascending within an image), ``pixels`` ((P,) int64, the pixels it
    covers) and of the memory-mapped words ((P, W) uint64, bit p of word w = pixel 64 w + p of the image's
    mask, row-major at its mask resolution; padding bits 0). sample: (n,) probe-set index of each searched
    image; annotated: (n, K) bool, categories the image annotates (all False for an image the tally could not
    read); categories: (C,) category index of each concept.
    """

    def __init__(self, files: MaskFiles, categories: np.ndarray) -> None:
        self.files = files
        self.sample = np.load(files.sample)
        self.annotated = np.load(files.annotated)
        self.offsets = np.load(files.offsets)
        self.concepts = np.load(files.concepts).astype(np.int64)
        self.pixels = np.load(files.pixels)
        self.categories = np.asarray(categories)
        self.n_concepts = len(self.categories)
        self.pair_images = np.repeat(np.arange(len(self.sample)), np.diff(self.offsets))
        self.pair_categories = self.categories[self.concepts]
        self.by_concept = np.argsort(self.concepts, kind="stable")  # pairs of each concept, images ascending
        self.concept_offsets = np.searchsorted(self.concepts[self.by_concept], np.arange(self.n_concepts + 1))
        self._words: np.ndarray | None = None
        self._rows: dict[frozenset[int], np.ndarray] = {}
        self._concept_sizes: dict[frozenset[int], np.ndarray] = {}

    def words(self) -> np.ndarray:
        """(P, W) uint64, read-only, memory-mapped: one map kept while the file is at most WORDS_KEPT_MIB, else a
        fresh map per call (the pages a caller reads then leave the process's resident memory with its map)."""
        if self._words is not None:
            return self._words
        words = np.load(self.files.words, mmap_mode="r")
        if words.nbytes <= WORDS_KEPT_MIB * 2**20:
            self._words = words
        return words

    def rows(self, categories: frozenset[int]) -> np.ndarray:
        """(K, n) bool: row k marks the searched images annotating every category in ``categories`` and k."""
        if categories not in self._rows:
            every = self.annotated[:, sorted(categories)].all(axis=1)
            self._rows[categories] = self.annotated.T & every[None]
        return self._rows[categories]

    def concept_sizes(self, categories: frozenset[int]) -> np.ndarray:
        """(C,) float64: |c| summed over the images annotating ``categories`` and c's category."""
        if categories not in self._concept_sizes:
            kept = self.rows(categories)[self.pair_categories, self.pair_images]
            self._concept_sizes[categories] = np.bincount(self.concepts, weights=self.pixels * kept,
                                                          minlength=self.n_concepts)
        return self._concept_sizes[categories]

    def formula_categories(self, formula: Formula) -> frozenset[int]:
        return frozenset(int(self.categories[t]) for t in formula.terms)

    def concept_pairs(self, term: int) -> np.ndarray:
        """(p,) int64 pair rows of concept ``term``, images ascending."""
        return self.by_concept[self.concept_offsets[term]:self.concept_offsets[term + 1]]

    def formula_masks(self, formula: Formula, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(m,) searched images where the formula covers a pixel (ascending) and its (m, W) uint64 masks there."""
        pairs = self.concept_pairs(formula.terms[0])
        images, masks = self.pair_images[pairs], words[pairs]
        for op, term in zip(formula.ops, formula.terms[1:]):
            pairs = self.concept_pairs(term)
            other = self.pair_images[pairs]
            if op == OR:
                union = np.union1d(images, other)
                joined = np.zeros((len(union), masks.shape[1]), dtype=np.uint64)
                joined[np.searchsorted(union, images)] = masks
                joined[np.searchsorted(union, other)] |= words[pairs]
                images, masks = union, joined
            else:
                _, mine, theirs = np.intersect1d(images, other, assume_unique=True, return_indices=True)
                if op == AND:
                    images, masks = images[mine], masks[mine] & words[pairs[theirs]]
                else:
                    masks[mine] &= ~words[pairs[theirs]]
        touched = popcount(masks) > 0
        return images[touched], masks[touched]


@dataclass(frozen=True)
class FormulaTotals:
    """What a formula's extensions need beside the unit, over the images annotating its categories S and ...

    formula_size: (K,) |F| (... and category k); with_concept: (C,) |F AND c| (... and c's category); float64.
    """

    formula_size: np.ndarray
    with_concept: np.ndarray


class FormulaCounts:
    """Formulas' totals, cached (LRU, thread-safe) and shared by every unit a worker process searches."""

    def __init__(self, masks: ConceptMasks, size: int = CACHE_FORMULAS) -> None:
        self.masks = masks
        self.size = size
        self._cache: OrderedDict[Formula, FormulaTotals] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, formula: Formula) -> FormulaTotals:
        with self._lock:
            if formula in self._cache:
                self._cache.move_to_end(formula)
                return self._cache[formula]
        value = self.count(formula)
        with self._lock:
            self._cache[formula] = value
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return value

    def count(self, formula: Formula) -> FormulaTotals:
        """The formula's totals: a popcount over the pairs of the images it touches (|F AND c| = 0 elsewhere)."""
        masks = self.masks
        rows = masks.rows(masks.formula_categories(formula))
        words = masks.words()
        images, bits = masks.formula_masks(formula, words)
        formula_size = (rows[:, images] @ popcount(bits)).astype(np.float64)
        starts, lengths = masks.offsets[images], np.diff(masks.offsets)[images]
        ends = np.cumsum(lengths)
        with_concept = np.zeros(masks.n_concepts)
        first = 0
        while first < len(images):
            stop = max(first + 1, int(np.searchsorted(ends, (ends[first - 1] if first else 0) + COUNT_BLOCK_PAIRS,
                                                      side="right")))
            pairs = pair_ranges(starts[first:stop], lengths[first:stop])
            local = np.repeat(np.arange(first, stop), lengths[first:stop])
            inter = popcount(words[pairs] & bits[local])
            kept = rows[masks.pair_categories[pairs], images[local]]
            with_concept += np.bincount(masks.concepts[pairs], weights=inter * kept, minlength=masks.n_concepts)
            first = stop
        return FormulaTotals(formula_size, with_concept)


_SHARED: dict[tuple, tuple[ConceptMasks, FormulaCounts]] = {}
_SHARED_LOCK = threading.Lock()


def shared_masks(files: MaskFiles, categories: np.ndarray) -> tuple[ConceptMasks, FormulaCounts]:
    """The concept masks and formula cache of this worker process for ``files`` (kept for the last masks only)."""
    stat = os.stat(files.words)
    key = (files, stat.st_mtime_ns, stat.st_size, tuple(np.asarray(categories).tolist()))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED.clear()
            masks = ConceptMasks(files, categories)
            _SHARED[key] = masks, FormulaCounts(masks)
        return _SHARED[key]


# ------------------------------------------------------------ where units fire


@dataclass
class FiredGroups:
    """Where one unit fires: its fired pixels grouped by searched image and by the concepts that cover them.

    images: (G,) searched-image row of each group; pixels: (G,) int64 fired pixels in it; the concepts of the
    groups as entries (group, concept): entry_groups (E,), entry_concepts (E,), int64.
    """

    images: np.ndarray
    pixels: np.ndarray
    entry_groups: np.ndarray
    entry_concepts: np.ndarray

    @classmethod
    def join(cls, parts: list[FiredGroups]) -> FiredGroups:
        firsts = np.cumsum([0] + [len(p.images) for p in parts[:-1]])
        return cls(np.concatenate([p.images for p in parts] or [np.zeros(0, np.int64)]),
                   np.concatenate([p.pixels for p in parts] or [np.zeros(0, np.int64)]),
                   np.concatenate([p.entry_groups + f for p, f in zip(parts, firsts)] or [np.zeros(0, np.int64)]),
                   np.concatenate([p.entry_concepts for p in parts] or [np.zeros(0, np.int64)]))


def image_groups(pixels: np.ndarray, owners: np.ndarray, words: np.ndarray, concepts: np.ndarray) -> tuple:
    """Group one image's fired pixels by (owner, set of concepts covering them).

    pixels, owners: (n,) pixel and owning unit of each fired pixel; words: (k, W) the image's pair masks,
    concepts: (k,) their concepts. Returns (owner (G,), size (G,), entry_groups (E,), entry_concepts (E,)).
    """
    member = (words[:, pixels >> 6] >> (pixels & 63).astype(np.uint64)) & np.uint64(1)  # (k, n)
    shifts = np.arange(64, dtype=np.uint64)[:, None]
    keys = [np.bitwise_or.reduce(member[w:w + 64] << shifts[:len(member[w:w + 64])], axis=0)
            for w in range(0, len(member), 64)]
    order = np.lexsort([*keys, owners])
    change = owners[order][1:] != owners[order][:-1]
    for key in keys:
        change |= key[order][1:] != key[order][:-1]
    starts = np.flatnonzero(np.concatenate([[True], change]))
    sizes = np.diff(np.append(starts, len(order)))
    first = order[starts]
    covered = np.flatnonzero(member[:, first])  # (pair, group) of each covered group, pair-major
    pair, group = covered // len(first), covered % len(first)
    return owners[first], sizes, group, concepts[pair]


def fired_groups(store_path: str, layer: str, units: list[int], thresholds: np.ndarray, mask_sizes: np.ndarray,
                 masks: ConceptMasks, rows: range) -> list[FiredGroups]:
    """Where each of ``units`` fires in the searched images ``rows`` (the tally's masks), grouped.

    thresholds: (U,) of the layer; mask_sizes: (N, 2) of the probe set. Each map chunk is read once.
    """
    store = zarr.open_group(store_path, mode="r")
    maps, maxima = store[layer]["maps"], store[layer]["maxima"]
    unit_thresholds = thresholds[units]
    below = float32_below(unit_thresholds)
    words = masks.words()
    images = masks.sample[rows.start:rows.stop]
    found: list[tuple] = []
    n_groups = 0
    step, columns = maps.chunks[0], np.asarray(units)
    for chunk in np.unique(images // step):
        at = np.flatnonzero(images // step == chunk)
        first = int(chunk) * step
        block, tops = maps[first:first + step], maxima[first:first + step]  # whole chunks: faster than oindex
        for local in at:
            i, r = int(images[local]), rows.start + int(local)
            active = np.flatnonzero(tops[i - first, columns] > unit_thresholds)
            if active.size == 0:
                continue
            size = (int(mask_sizes[i, 0]), int(mask_sizes[i, 1]))
            fired = np.flatnonzero(fired_masks(block[i - first, columns[active]], below[active], size))
            if fired.size == 0:
                continue
            owner = fired // (size[0] * size[1])
            pixels = fired - owner * (size[0] * size[1])
            lo, hi = masks.offsets[r], masks.offsets[r + 1]
            owners, sizes, groups, concepts = image_groups(pixels, active[owner], words[lo:hi],
                                                           masks.concepts[lo:hi])
            found.append((owners, sizes, np.full(len(sizes), r), groups + n_groups, concepts))
            n_groups += len(sizes)
    if not found:
        empty = np.zeros(0, np.int64)
        return [FiredGroups(empty, empty, empty, empty) for _ in units]
    owners, sizes, at_image, groups, concepts = (np.concatenate(column) for column in zip(*found))
    by_unit = np.argsort(owners, kind="stable")
    renumber = np.empty_like(by_unit)
    renumber[by_unit] = np.arange(len(by_unit))
    entry_groups = renumber[groups]
    by_group = np.argsort(entry_groups, kind="stable")
    entry_groups, concepts = entry_groups[by_group], concepts[by_group]
    group_bounds = np.searchsorted(owners[by_unit], np.arange(len(units) + 1))
    entry_bounds = np.searchsorted(entry_groups, group_bounds)
    out = []
    for u in range(len(units)):
        g0, g1, e0, e1 = group_bounds[u], group_bounds[u + 1], entry_bounds[u], entry_bounds[u + 1]
        out.append(FiredGroups(at_image[by_unit[g0:g1]], sizes[by_unit[g0:g1]], entry_groups[e0:e1] - g0,
                               concepts[e0:e1]))
    return out


# ------------------------------------------------------------------ the search


@dataclass
class SetTerms:
    """What a unit's extensions of formulas over the category set S need, per candidate concept c.

    weighted: (K, G) pixels of each group where its image annotates S and category k; unit_size: (C,) |M|;
    entry_weights: (E,) pixels of the entry's group where its image annotates S and c's category;
    concept_fired: (C,) |M AND c|; all counted over the images annotating S and c's category.
    """

    weighted: np.ndarray
    unit_size: np.ndarray
    entry_weights: np.ndarray
    concept_fired: np.ndarray


class UnitSearch:
    """One unit's fired groups against the concept masks: the beam search's scores."""

    def __init__(self, fired: FiredGroups, masks: ConceptMasks, counts: FormulaCounts) -> None:
        self.fired, self.masks, self.counts = fired, masks, counts
        order = np.argsort(fired.entry_concepts, kind="stable")
        self.groups_by_concept = fired.entry_groups[order]
        self.concept_offsets = np.searchsorted(fired.entry_concepts[order], np.arange(masks.n_concepts + 1))
        self._terms: dict[frozenset[int], SetTerms] = {}

    def terms(self, categories: frozenset[int]) -> SetTerms:
        if categories not in self._terms:
            fired, k_of = self.fired, self.masks.categories
            at = self.masks.rows(categories)[:, fired.images]  # (K, G)
            weighted = at * fired.pixels.astype(np.float64)
            entry_weights = weighted[k_of[fired.entry_concepts], fired.entry_groups]
            self._terms[categories] = SetTerms(
                weighted, weighted.sum(axis=1)[k_of], entry_weights,
                np.bincount(fired.entry_concepts, weights=entry_weights, minlength=self.masks.n_concepts))
        return self._terms[categories]

    def values(self, formula: Formula) -> np.ndarray:
        """(G,) bool: the formula on each group."""
        def column(term: int) -> np.ndarray:
            out = np.zeros(len(self.fired.images), dtype=bool)
            out[self.groups_by_concept[self.concept_offsets[term]:self.concept_offsets[term + 1]]] = True
            return out

        out = column(formula.terms[0])
        for op, term in zip(formula.ops, formula.terms[1:]):
            out = out | column(term) if op == OR else out & column(term) if op == AND else out & ~column(term)
        return out

    def singles(self) -> np.ndarray:
        """(C,) IoU of every single concept (each over the images annotating its category)."""
        terms = self.terms(frozenset())
        return ious(terms.concept_fired, terms.unit_size, self.masks.concept_sizes(frozenset()))

    def extensions(self, formula: Formula) -> np.ndarray:
        """(3, C) IoU of ``formula op c`` for every operator op and concept c (meaningless for c in the formula)."""
        categories = self.masks.formula_categories(formula)
        terms, k_of = self.terms(categories), self.masks.categories
        values = self.values(formula)
        both_fired = np.bincount(self.fired.entry_concepts, weights=terms.entry_weights * values[self.fired.entry_groups],
                                 minlength=self.masks.n_concepts)  # |M AND F AND c|
        formula_fired = (terms.weighted @ values)[k_of]  # |M AND F|
        totals = self.counts.get(formula)
        both, formula_size = totals.with_concept, totals.formula_size[k_of]  # |F AND c|, |F|
        concept_size = self.masks.concept_sizes(categories)
        return np.stack([ious(formula_fired + terms.concept_fired - both_fired, terms.unit_size,
                              formula_size + concept_size - both),
                         ious(both_fired, terms.unit_size, both),
                         ious(formula_fired - both_fired, terms.unit_size, formula_size - both)])


def ious(intersection: np.ndarray, unit_size: np.ndarray, formula_size: np.ndarray) -> np.ndarray:
    """(C,) IoU from (C,) exact counts (float arrays holding integers); 0 where the union is empty."""
    inter = np.round(intersection)
    union = unit_size + formula_size - inter
    return np.divide(inter, union, out=np.zeros_like(union), where=union > 0)


def rank_order(values: np.ndarray, lengths: np.ndarray, terms: np.ndarray, ops: np.ndarray,
               length_penalty: float) -> np.ndarray:
    """Indices of formulas best first: IoU ``values`` minus the penalty per extra concept, descending, then
    shorter, then lower terms, then lower ops (``ranking``). terms: (n, L), ops: (n, L - 1), padded with -1."""
    scores = values - length_penalty * (lengths - 1)
    keys = [*ops.T[::-1], *terms.T[::-1], lengths, -scores]
    return np.lexsort(keys)


def ranking(score: float, formula: Formula) -> tuple:
    return -score, formula.sort_key()


class Explored:
    """Every formula a unit's search scored, with its IoU, best first (as ``rank_order``), made lazily.

    Blocks of formulas share a parent: (parent or None for the singles, (m,) ops, (m,) terms, (m,) IoU).
    Iterating yields (Formula, IoU) pairs; ``len`` counts the formulas.
    """

    def __init__(self, max_length: int, length_penalty: float) -> None:
        self.max_length, self.length_penalty = max_length, length_penalty
        self.blocks: list[tuple[Formula | None, np.ndarray, np.ndarray, np.ndarray]] = []
        self._arrays: tuple[np.ndarray, ...] | None = None

    def add(self, parent: Formula | None, ops: np.ndarray, terms: np.ndarray, values: np.ndarray) -> None:
        self.blocks.append((parent, ops, terms, values))
        self._arrays = None

    def arrays(self) -> tuple[np.ndarray, ...]:
        """(values, lengths, terms (n, L), ops (n, L - 1)) in rank order."""
        if self._arrays is None:
            n = sum(len(b[3]) for b in self.blocks)
            width = self.max_length
            terms = np.full((n, width), -1, dtype=np.int64)
            ops = np.full((n, max(width - 1, 1)), -1, dtype=np.int64)
            lengths = np.zeros(n, dtype=np.int64)
            first = 0
            for parent, block_ops, block_terms, _ in self.blocks:
                stop = first + len(block_terms)
                depth = parent.length if parent else 0
                if parent:
                    terms[first:stop, :depth] = parent.terms
                    ops[first:stop, :depth - 1] = parent.ops
                    ops[first:stop, depth - 1] = block_ops
                terms[first:stop, depth] = block_terms
                lengths[first:stop] = depth + 1
                first = stop
            values = np.concatenate([b[3] for b in self.blocks])
            order = rank_order(values, lengths, terms, ops, self.length_penalty)
            self._arrays = values[order], lengths[order], terms[order], ops[order]
        return self._arrays

    def __len__(self) -> int:
        return len(self.arrays()[0])

    def __getitem__(self, index: int) -> tuple[Formula, float]:
        values, lengths, terms, ops = self.arrays()
        length = int(lengths[index])
        return (Formula(tuple(int(t) for t in terms[index, :length]), tuple(int(o) for o in ops[index, :length - 1])),
                float(values[index]))

    def __iter__(self) -> Iterator[tuple[Formula, float]]:
        return (self[i] for i in range(len(self)))


def next_beam(beam: list[tuple[Formula, float]], extended: list[tuple[Formula, np.ndarray]],
              size: int, length_penalty: float) -> list[tuple[Formula, float]]:
    """The best ``size`` of the beam and the valid extensions ((3, C) IoU per formula of the beam)."""
    in_beam = {f for f, _ in beam}
    # a formula of the beam that extends another is among the extensions already
    kept = [(f, v) for f, v in beam if f.length == 1 or f.prefix() not in in_beam]
    parents, op_of, term_of, value_of = [], [], [], []
    for p, (parent, table) in enumerate(extended):
        valid = np.ones(table.shape[1], dtype=bool)
        valid[list(parent.terms)] = False
        terms = np.flatnonzero(valid)
        for op in range(len(OPERATORS)):
            parents.append(np.full(len(terms), p))
            op_of.append(np.full(len(terms), op))
            term_of.append(terms)
            value_of.append(table[op, terms])
    parent_of, op_of, term_of, value_of = (np.concatenate(a) if a else np.zeros(0) for a in
                                           (parents, op_of, term_of, value_of))
    parent_length = np.array([f.length for f, _ in extended])[parent_of.astype(np.int64)] if len(parent_of) else \
        np.zeros(0, np.int64)
    scores = value_of - length_penalty * parent_length
    if len(scores) > size:  # every extension tied with the size-th best or better, the rest cannot make it
        picked = np.flatnonzero(scores >= np.partition(scores, len(scores) - size)[len(scores) - size])
    else:
        picked = np.arange(len(scores))
    width = max([f.length for f, _ in beam] + [f.length + 1 for f, _ in extended])
    n = len(kept) + len(picked)
    terms = np.full((n, width), -1, dtype=np.int64)
    ops = np.full((n, max(width - 1, 1)), -1, dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    values = np.zeros(n)
    for j, (f, v) in enumerate(kept):
        terms[j, :f.length], ops[j, :f.length - 1], lengths[j], values[j] = f.terms, f.ops, f.length, v
    for j, c in enumerate(picked, start=len(kept)):
        parent = extended[int(parent_of[c])][0]
        terms[j, :parent.length + 1] = (*parent.terms, int(term_of[c]))
        ops[j, :parent.length] = (*parent.ops, int(op_of[c]))
        lengths[j], values[j] = parent.length + 1, value_of[c]
    out = []
    for j in rank_order(values, lengths, terms, ops, length_penalty)[:size]:
        length = int(lengths[j])
        out.append((Formula(tuple(int(t) for t in terms[j, :length]), tuple(int(o) for o in ops[j, :length - 1])),
                    float(values[j])))
    return out


def search_unit(fired: FiredGroups, masks: ConceptMasks, counts: FormulaCounts,
                settings: CompositionalSettings) -> Explored:
    """Beam search for one unit; every formula explored with its IoU, best first (by penalised score)."""
    search = UnitSearch(fired, masks, counts)
    explored = Explored(settings.max_length, settings.length_penalty)
    singles = search.singles()
    columns = np.arange(masks.n_concepts)
    explored.add(None, np.full(len(columns), -1), columns, singles)
    order = rank_order(singles, np.ones(len(columns), dtype=np.int64), columns[:, None],
                       np.full((len(columns), 1), -1), settings.length_penalty)
    beam = [(Formula((int(c),)), float(singles[c])) for c in order[:settings.beam]]
    done: set[Formula] = set()
    for _ in range(settings.max_length - 1):
        extended = []
        for formula, _ in beam:
            table = search.extensions(formula)
            extended.append((formula, table))
            if formula not in done:
                done.add(formula)
                valid = np.ones(len(columns), dtype=bool)
                valid[list(formula.terms)] = False
                for op in range(len(OPERATORS)):
                    explored.add(formula, np.full(int(valid.sum()), op), columns[valid], table[op, valid])
        beam = next_beam(beam, extended, settings.beam, settings.length_penalty)
    return explored


def runner_ups(explored, count: int) -> list[tuple[Formula, float]]:
    """The next ``count`` formulas after the best, leaving out those that only append terms to a formula
    already listed (or the best) without changing its IoU (``F AND NOT c`` for a c that F never touches)."""
    kept: list[tuple[Formula, float]] = []
    shown: list[tuple[Formula, float]] = []
    for formula, value in explored:
        if not shown:
            shown.append((formula, value))
            continue
        if len(kept) == count:
            break
        if any(value == v and formula.terms[:f.length] == f.terms and formula.ops[:f.length - 1] == f.ops
               for f, v in shown):
            continue
        kept.append((formula, value))
        shown.append((formula, value))
    return kept


def shortlist(explored: Explored, count: int) -> list[tuple[Formula, float]]:
    """What ``unit_row`` reads of the explored formulas, in their order: the best, its ``count`` runner-ups and
    the best single concept (``unit_row`` of the shortlist equals ``unit_row`` of everything explored)."""
    listed = [explored[0], *runner_ups(explored, count)]
    if all(f.length > 1 for f, _ in listed):
        lengths = explored.arrays()[1]
        single = explored[int(np.flatnonzero(lengths == 1)[0])]
        listed.append(single)  # after every runner-up: a single ranked before the last would be one
    return listed


# ------------------------------------------------------------ packing masks


def search_sample(valid: np.ndarray, settings: CompositionalSettings) -> np.ndarray:
    """(n,) int64 ascending: the probe-set images searched, every valid one or a seeded sample of max_images."""
    images = np.flatnonzero(valid)
    if settings.max_images and len(images) > settings.max_images:
        rng = np.random.default_rng(settings.sample_seed)
        images = np.sort(rng.choice(images, settings.max_images, replace=False))
    return images.astype(np.int64)


def sample_digest(sample: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(sample, dtype="<i8").tobytes()).hexdigest()[:16]


def pack_masks(masks: np.ndarray, words: int) -> np.ndarray:
    """(k, P) bool masks of one image -> (k, words) uint64, bit p of word w = pixel 64 w + p (padding bits 0)."""
    packed = np.packbits(masks, axis=1, bitorder="little")
    padded = np.zeros((len(packed), words * 8), dtype=np.uint8)
    padded[:, :packed.shape[1]] = packed
    return padded.view("<u8")


def pack_block(broden_root: str, part: str, images: np.ndarray, words: int, strict: bool) -> tuple[np.ndarray, list]:
    """Bit-pack the concept masks of ``images`` into the part file ``part`` (.npz; runs on a dask worker).

    Returns (len(images), K) annotated categories and the (image, reason) of images whose masks could not be read.
    """
    broden = BrodenDataset(broden_root)
    n_labels = len(broden.labels)
    annotated = np.zeros((len(images), len(CATEGORIES)), dtype=bool)
    counts = np.zeros(len(images), dtype=np.int64)
    concepts, pixels, packed_words, skipped = [], [], [], []
    for j, i in enumerate(images.tolist()):
        try:
            found = image_concepts(broden, i, n_labels)
        except BrodenFormatError as error:
            if strict:
                raise
            skipped.append((i, str(error)))
            continue
        counts[j] = len(found.labels)
        concepts.append(found.labels - 1)
        pixels.append(found.masks.sum(axis=1))
        packed_words.append(pack_masks(found.masks, words))
        annotated[j] = found.annotated
    np.savez(part, counts=counts, concepts=np.concatenate(concepts or [np.zeros(0, np.int64)]).astype(np.int32),
             pixels=np.concatenate(pixels or [np.zeros(0, np.int64)]).astype(np.int64),
             words=np.concatenate(packed_words or [np.zeros((0, words), "<u8")]))
    return annotated, skipped


def build_concept_masks(cfg: DictConfig, layout: RunLayout, broden: BrodenDataset, valid: np.ndarray,
                        sample: np.ndarray) -> None:
    """Write the sparse concept masks of the searched images ``sample`` (see MaskFiles), unless current."""
    inputs = {"probe_set": str(broden.root), "labels": len(broden.labels),
              "image_ids": hashlib.sha256("\n".join(broden.image_ids).encode()).hexdigest()[:16],
              "valid": hashlib.sha256(np.packbits(valid).tobytes()).hexdigest()[:16],
              "sample": sample_digest(sample), "strict": bool(cfg.tally.strict)}
    if is_current(layout.stamp("compositional"), inputs, FORMAT, "compositional concept masks"):
        return
    start(layout, "compositional")
    started = time.perf_counter()
    pixels = max([h * w for h, w in (broden.mask_size(int(i)) for i in sample)] or [1])
    words = math.ceil(pixels / 64)
    shutil.rmtree(layout.pack_parts, ignore_errors=True)
    layout.pack_parts.mkdir(parents=True)
    blocks = range(0, len(sample), PACK_BLOCK_IMAGES)
    parts = [layout.pack_parts / f"block_{b:07d}.npz" for b in range(len(blocks))]
    annotated = np.zeros((len(sample), len(CATEGORIES)), dtype=bool)
    skipped: list = []
    with dask_client(cfg.cluster) as client:
        check_worker_paths(client, [broden.root], writable=[layout.pack_parts])
        calls = [(str(broden.root), str(part), sample[s:s + PACK_BLOCK_IMAGES], words, bool(cfg.tally.strict))
                 for s, part in zip(blocks, parts)]
        with tqdm(total=len(sample), desc="compositional: pack masks", unit="img") as bar:
            for number, (rows, block_skipped) in results_in_window(client, pack_block, calls):
                first = blocks[number]
                annotated[first:first + len(rows)] = rows
                skipped += block_skipped
                bar.update(len(rows))
    counts = []
    for part in parts:
        with np.load(part) as block:
            counts.append(block["counts"])
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(counts or [np.zeros(0, np.int64)]))]).astype(np.int64)
    concepts, pair_pixels = [], []
    if offsets[-1] == 0:  # no concept in any searched image: nothing to map
        np.save(layout.pair_words, np.zeros((0, words), dtype="<u8"))
    else:
        pair_words = np.lib.format.open_memmap(layout.pair_words, mode="w+", dtype="<u8",
                                               shape=(int(offsets[-1]), words))
        first = 0
        for part in parts:
            with np.load(part) as block:
                pair_words[first:first + len(block["concepts"])] = block["words"]
                first += len(block["concepts"])
                concepts.append(block["concepts"])
                pair_pixels.append(block["pixels"])
        pair_words.flush()
        del pair_words
    np.save(layout.pair_concepts, np.concatenate(concepts or [np.zeros(0, np.int32)]).astype(np.int32))
    np.save(layout.pair_pixels, np.concatenate(pair_pixels or [np.zeros(0, np.int64)]).astype(np.int64))
    np.save(layout.pair_offsets, offsets)
    np.save(layout.concept_sample, sample)
    np.save(layout.image_annotations, annotated)
    shutil.rmtree(layout.pack_parts)
    if skipped:
        log.warning("compositional: %d images left out for unreadable masks (as in the tally)", len(skipped))
    write_stamp(layout.stamp("compositional"), inputs, FORMAT)
    log.info("compositional: packed the concept masks of %d images in %.1f s (%d image-concept pairs, %.0f MiB)",
             len(sample), time.perf_counter() - started, offsets[-1], offsets[-1] * words * 8 / 2**20)


# ------------------------------------------------------------------- the units


@dataclass(frozen=True)
class SearchJob:
    """What a worker needs to search units of one layer; every field pickles."""

    store: str
    masks: MaskFiles
    layer: str
    thresholds: np.ndarray
    categories: np.ndarray
    mask_sizes: np.ndarray
    settings: CompositionalSettings


def find_fired(job: SearchJob, units: list[int], first: int, stop: int) -> list[FiredGroups]:
    """Where ``units`` fire in the searched images first..stop (runs on a dask worker)."""
    masks, _ = shared_masks(job.masks, job.categories)
    return fired_groups(job.store, job.layer, units, job.thresholds, job.mask_sizes, masks, range(first, stop))


def search_fired(job: SearchJob, fired: list[FiredGroups]) -> list[Explored]:
    masks, counts = shared_masks(job.masks, job.categories)
    return [search_unit(groups, masks, counts, job.settings) for groups in fired]


def search_units(job: SearchJob, units: list[int]) -> list[Explored]:
    """The explored formulas (best first) of each of ``units``, over every searched image, in this process."""
    masks, _ = shared_masks(job.masks, job.categories)
    return search_fired(job, find_fired(job, units, 0, len(masks.sample)))


def shortlist_fired(job: SearchJob, fired: list[FiredGroups]) -> list[list[tuple[Formula, float]]]:
    """What ``unit_row`` needs of each unit's search (runs on a dask worker)."""
    return [shortlist(explored, job.settings.runner_ups) for explored in search_fired(job, fired)]


def unit_row(unit: int, explored, names: list[str], numbers: list[int], count: int) -> dict[str, Any]:
    """One row of compositional.csv, from the explored formulas best first (or their ``shortlist``)."""
    best, best_iou = explored[0]
    single, single_iou = next((f, v) for f, v in explored if f.length == 1)
    return {"unit": unit, "formula": best.text(names), "formula_json": json.dumps(best.machine(numbers)),
            "iou": best_iou, "length": best.length, "single_label": single.text(names), "single_iou": single_iou,
            "gain": best_iou - single_iou,
            "runner_ups": json.dumps([{"formula": f.text(names), "iou": round(v, 6)}
                                      for f, v in runner_ups(explored, count)])}


def layer_summary(layer: str, table: pd.DataFrame, settings: CompositionalSettings,
                  images: dict[str, Any]) -> dict[str, Any]:
    """How often formulas beat single labels in a layer, and by how much; ``images``: what was searched."""
    better = table[table["gain"] > 0]
    return {"layer": layer, "units": len(table), "settings": settings.__dict__, "images": images,
            "formula_beats_single": len(better),
            "mean_gain": float(better["gain"].mean()) if len(better) else 0.0,
            "median_relative_gain": float((better["gain"] / better["single_iou"].where(better["single_iou"] > 0))
                                          .median()) if len(better) else 0.0,
            "length_counts": {str(k): int(v) for k, v in table["length"].value_counts().sort_index().items()},
            "mean_iou": float(table["iou"].mean()), "mean_single_iou": float(table["single_iou"].mean())}


def check(cfg: DictConfig) -> None:
    """Refuse bad compositional settings before any stage runs."""
    section(cfg.compositional, CompositionalSettings)


def search_layer(client, job: SearchJob, n_units: int, n_images: int, names: list[str],
                 numbers: list[int]) -> pd.DataFrame:
    """compositional.csv of one layer: where its units fire (by blocks of images), then their search."""
    units = list(range(n_units))
    starts = list(range(0, n_images, PACK_BLOCK_IMAGES))
    found: dict[int, list[FiredGroups]] = {}
    with tqdm(total=n_images, desc=f"compositional {job.layer}: where units fire", unit="img") as bar:
        calls = [(job, units, s, min(s + PACK_BLOCK_IMAGES, n_images)) for s in starts]
        for number, groups_of_block in results_in_window(client, find_fired, calls):
            found[starts[number]] = groups_of_block
            bar.update(min(PACK_BLOCK_IMAGES, n_images - starts[number]))
    fired = [FiredGroups.join([found[s][u] for s in sorted(found)]) for u in units]
    del found
    threads = max(1, sum(client.nthreads().values()))
    per_task = max(1, min(job.settings.units_per_task, math.ceil(n_units / (2 * threads))))
    firsts = list(range(0, n_units, per_task))
    rows: dict[int, dict[str, Any]] = {}
    with tqdm(total=n_units, desc=f"compositional {job.layer}", unit="unit") as bar:
        for number, shortlists in results_in_window(client, shortlist_fired,
                                                    ((job, fired[s:s + per_task]) for s in firsts)):
            first = firsts[number]
            for offset, listed in enumerate(shortlists):
                rows[first + offset] = unit_row(first + offset, listed, names, numbers, job.settings.runner_ups)
                fired[first + offset] = None  # type: ignore[call-overload]
            bar.update(len(shortlists))
    return pd.DataFrame([rows[u] for u in units])


def run(cfg: DictConfig) -> Path:
    """Search formulas for every unit of every map layer of ``cfg.layers`` not done with these settings."""
    check(cfg)
    settings = section(cfg.compositional, CompositionalSettings)
    layout = RunLayout(Path(cfg.out_dir))
    store = open_activations(layout.root)
    broden = concept_probe_set(cfg.dataset, store, layout.root, "the compositional stage")
    valid = store["valid"][:]
    sample = search_sample(valid, settings)
    images = {"probe_set": len(broden), "valid": int(valid.sum()), "searched": len(sample),
              "sampled": bool(len(sample) < valid.sum()), "sample_seed": settings.sample_seed,
              "sample_digest": sample_digest(sample)}
    todo = {}
    for layer in map_layers(store, [str(name) for name in cfg.layers]):
        inputs = {"settings": settings.__dict__, "tally": stamp_digest(layout.stamp("tally", layer), "tally"),
                  "sample": images["sample_digest"]}
        if not is_current(layout.stamp("compositional", layer), inputs, FORMAT, f"compositional of {layer}"):
            todo[layer] = inputs
    if not todo:
        return layout.root
    if images["sampled"]:
        log.info("compositional: searching a seeded sample of %d of the %d valid images (compositional.max_images)",
                 len(sample), images["valid"])
    build_concept_masks(cfg, layout, broden, valid, sample)
    categories = np.array([CATEGORIES.index(broden.category_of(n)) for n in range(1, len(broden.labels) + 1)])
    names = list(broden.label_names[1:len(broden.labels) + 1])
    numbers = list(range(1, len(broden.labels) + 1))
    mask_sizes = np.array([broden.mask_size(i) for i in range(len(broden))])
    files = MaskFiles.of(layout)
    with dask_client(cfg.cluster) as client:
        check_worker_paths(client, [layout.activations, *files.paths()])
        for layer, inputs in todo.items():
            started = time.perf_counter()
            job = SearchJob(str(layout.activations), files, layer, read_thresholds(layout, layer), categories,
                            mask_sizes, settings)
            n_units = store[layer]["maps"].shape[1]
            table = search_layer(client, job, n_units, len(sample), names, numbers)
            start(layout, "compositional", layer)
            table.to_csv(layout.compositional_csv(layer), index=False, float_format="%.6f")
            summary = layer_summary(layer, table, settings, images)
            write_json_atomic(layout.compositional_json(layer), summary)
            write_stamp(layout.stamp("compositional", layer), inputs, FORMAT)
            log.info("compositional %s: a formula beats the single label for %d of %d units (mean gain %.3f), "
                     "%.1f s", layer, summary["formula_beats_single"], n_units, summary["mean_gain"],
                     time.perf_counter() - started)
    return layout.root
