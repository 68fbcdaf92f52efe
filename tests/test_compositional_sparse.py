"""The compositional search on sparse concept masks equals a dense brute-force search, on a planted case with
300 labels in the six categories (no model, no Broden files: the masks and the unit's fired pixels are drawn)."""

import numpy as np
import pytest

from dissect.broden import CATEGORIES
from dissect.settings import CompositionalSettings
from dissect.stages import compositional
from dissect.stages.compositional import AND, AND_NOT, OR, FiredGroups, Formula, MaskFiles

#: Concepts per category (color, object, part, material, scene, texture): 300 in all.
PER_CATEGORY = (11, 120, 80, 20, 50, 19)
#: Share of images annotating each category.
ANNOTATED = (1.0, 0.9, 0.6, 0.7, 0.8, 0.5)
SIDE = 12  # 144 pixels: three words, the last one padded


def planted(seed: int = 0, n_images: int = 60):
    """Dense concept masks (N, C, P) bool, annotated (N, K) bool, categories (C,), and a unit's fired (N, P) bool:
    (object 0 OR object 1) AND NOT part 0, with a few stray pixels (concepts drawn with Zipf-like popularity)."""
    rng = np.random.default_rng(seed)
    categories = np.repeat(np.arange(len(CATEGORIES)), PER_CATEGORY)
    firsts = np.concatenate([[0], np.cumsum(PER_CATEGORY)])
    masks = np.zeros((n_images, len(categories), SIDE * SIDE), dtype=bool)
    annotated = rng.random((n_images, len(CATEGORIES))) < np.array(ANNOTATED)
    for i in range(n_images):
        for k, name in enumerate(CATEGORIES):
            if not annotated[i, k]:
                continue
            weights = 1.0 / np.arange(1, PER_CATEGORY[k] + 1)
            picks = rng.choice(PER_CATEGORY[k], size=1 if name in ("scene", "texture") else rng.integers(1, 5),
                               replace=False, p=weights / weights.sum())
            for c in firsts[k] + picks:
                if name in ("scene", "texture"):
                    masks[i, c] = True
                    continue
                grid = np.zeros((SIDE, SIDE), dtype=bool)
                r, q = rng.integers(0, SIDE - 2, size=2)
                grid[r:r + rng.integers(2, 8), q:q + rng.integers(2, 8)] = True
                masks[i, c] = grid.ravel()
    obj, part = firsts[1], firsts[2]
    fired = (masks[:, obj] | masks[:, obj + 1]) & ~masks[:, part]
    fired |= rng.random(fired.shape) < 0.01
    return masks, annotated, categories, fired


def sparse(tmp_path, masks: np.ndarray, annotated: np.ndarray, categories: np.ndarray):
    """The stage's sparse files of dense masks (what build_concept_masks writes), opened as ConceptMasks."""
    files = MaskFiles(*(str(tmp_path / f"{name}.npy") for name in
                        ("sample", "annotated", "offsets", "concepts", "pixels", "words")))
    words = -(-masks.shape[2] // 64)
    present = [np.flatnonzero(masks[i].any(axis=1)) for i in range(len(masks))]
    np.save(files.sample, np.arange(len(masks)))
    np.save(files.annotated, annotated)
    np.save(files.offsets, np.concatenate([[0], np.cumsum([len(p) for p in present])]))
    np.save(files.concepts, np.concatenate(present).astype(np.int32))
    np.save(files.pixels, np.concatenate([masks[i, p].sum(axis=1) for i, p in enumerate(present)]))
    np.save(files.words, np.concatenate([compositional.pack_masks(masks[i, p], words) for i, p in enumerate(present)]))
    return compositional.ConceptMasks(files, categories)


def grouped(fired: np.ndarray, concept_masks) -> FiredGroups:
    """The unit's fired pixels grouped image by image, as fired_groups does."""
    words = concept_masks.words()
    parts = []
    for r in range(len(fired)):
        pixels = np.flatnonzero(fired[r])
        if not pixels.size:
            continue
        lo, hi = concept_masks.offsets[r], concept_masks.offsets[r + 1]
        _, sizes, groups, concepts = compositional.image_groups(pixels, np.zeros(len(pixels), np.int64),
                                                                words[lo:hi], concept_masks.concepts[lo:hi])
        parts.append(FiredGroups(np.full(len(sizes), r), sizes, groups, concepts))
    return FiredGroups.join(parts)


def dense_iou(formula: Formula, masks, annotated, categories, fired) -> float:
    """IoU of a formula pixel by pixel over the images annotating every category of its concepts."""
    value = masks[:, formula.terms[0]].copy()
    for op, term in zip(formula.ops, formula.terms[1:]):
        value = value | masks[:, term] if op == OR else value & masks[:, term] if op == AND else \
            value & ~masks[:, term]
    kept = annotated[:, sorted({int(categories[t]) for t in formula.terms})].all(axis=1)
    inter = int((fired & value)[kept].sum())
    union = int((fired | value)[kept].sum())
    return inter / union if union else 0.0


def dense_search(masks, annotated, categories, fired, settings) -> list[tuple[Formula, float]]:
    """Mu and Andreas's beam search with every IoU counted densely; everything explored, best first."""
    def score(item):
        return compositional.ranking(item[1] - settings.length_penalty * (item[0].length - 1), item[0])

    pool = {Formula((c,)): dense_iou(Formula((c,)), masks, annotated, categories, fired)
            for c in range(len(categories))}
    beam = [f for f, _ in sorted(pool.items(), key=score)[:settings.beam]]
    for _ in range(settings.max_length - 1):
        candidates = {}
        for formula in beam:
            for c in range(len(categories)):
                if c in formula.terms:
                    continue
                for op in (OR, AND, AND_NOT):
                    extension = formula.extend(op, c)
                    candidates[extension] = pool.get(extension) or dense_iou(extension, masks, annotated,
                                                                               categories, fired)
        pool.update(candidates)
        beam = [f for f, _ in sorted({f: pool[f] for f in [*beam, *candidates]}.items(), key=score)[:settings.beam]]
    return sorted(pool.items(), key=score)


@pytest.mark.parametrize("beam, max_length, length_penalty", [(5, 3, 0.0), (3, 3, 0.01), (2, 2, 0.0)])
def test_the_sparse_search_explores_and_ranks_as_a_dense_brute_force_one(tmp_path, beam, max_length,
                                                                        length_penalty):
    masks, annotated, categories, fired = planted()
    concept_masks = sparse(tmp_path, masks, annotated, categories)
    settings = CompositionalSettings(beam=beam, max_length=max_length, length_penalty=length_penalty, runner_ups=4,
                                     units_per_task=1, max_images=0, sample_seed=0)
    explored = compositional.search_unit(grouped(fired, concept_masks), concept_masks,
                                         compositional.FormulaCounts(concept_masks), settings)
    expected = dense_search(masks, annotated, categories, fired, settings)
    assert len(explored) == len(expected)
    assert list(explored) == expected  # the same formulas, IoUs (exact: the same integer ratios) and order
    row = compositional.unit_row(0, compositional.shortlist(explored, settings.runner_ups), [str(c) for c in
                                 range(len(categories))], list(range(1, len(categories) + 1)), settings.runner_ups)
    assert row == compositional.unit_row(0, expected, [str(c) for c in range(len(categories))],
                                         list(range(1, len(categories) + 1)), settings.runner_ups)
    if max_length >= 3:
        planted_formula = Formula((11, 12), (OR,)).extend(AND_NOT, 131)  # (object 0 OR object 1) AND NOT part 0
        assert explored[0][1] >= dense_iou(planted_formula, masks, annotated, categories, fired) > 0.9


def test_groups_hold_every_fired_pixel_once_with_the_concepts_covering_it(tmp_path):
    masks, annotated, categories, fired = planted(seed=1, n_images=20)
    concept_masks = sparse(tmp_path, masks, annotated, categories)
    groups = grouped(fired, concept_masks)
    assert groups.pixels.sum() == fired.sum()
    # |M AND c| per image from the groups equals the dense count
    counted = np.zeros((len(fired), len(categories)), dtype=np.int64)
    np.add.at(counted, (groups.images[groups.entry_groups], groups.entry_concepts), groups.pixels[groups.entry_groups])
    np.testing.assert_array_equal(counted, (fired[:, None, :] & masks).sum(axis=2))


def test_the_search_sample_is_seeded_sorted_and_only_of_valid_images():
    valid = np.ones(1000, dtype=bool)
    valid[::7] = False

    def settings(max_images, seed=0):
        return CompositionalSettings(beam=5, max_length=3, length_penalty=0.0, runner_ups=4, units_per_task=64,
                                     max_images=max_images, sample_seed=seed)

    sample = compositional.search_sample(valid, settings(100))
    assert len(sample) == 100 and np.all(np.diff(sample) > 0) and valid[sample].all()
    np.testing.assert_array_equal(sample, compositional.search_sample(valid, settings(100)))
    assert not np.array_equal(sample, compositional.search_sample(valid, settings(100, seed=1)))
    for everything in (0, None, 10_000):
        np.testing.assert_array_equal(compositional.search_sample(valid, settings(everything)), np.flatnonzero(valid))
