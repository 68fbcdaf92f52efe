"""The probe set's mask cache: it decodes back to the masks, is rebuilt for a changed probe set, is never half
built, keeps unreadable masks' errors; and the tally on it equals the reference with mixed mask sizes."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import write_activation_store
from data_prep.synthetic_broden import generate
from dissect import mask_cache
from dissect.artifacts import read_thresholds
from dissect.broden import BrodenDataset, BrodenFormatError, image_concepts
from dissect.errors import ConfigError
from dissect.layout import RunLayout
from dissect.mask_cache import MaskCache, cache_name, ensure_mask_cache
from dissect.stages import tally, thresholds
from reference_tally import reference_counts
from test_tally import hand_broden, label_png, pixels


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    """16 generated images at 64 px (colour, object, parts, material, scene or texture)."""
    return generate(tmp_path_factory.mktemp("cache") / "broden", n_images=16, size=64, seed=5, workers=1)


def decoded(cache: MaskCache, i: int) -> dict[int, np.ndarray]:
    """{label: (P,) bool mask} of image i, read back from the cache's classes and whole-image labels."""
    classes = cache.pixel_classes(i)
    size = len(classes)
    masks = {}
    for row in np.unique(classes):
        for label in cache.class_labels[row][cache.class_labels[row] > 0].tolist():
            masks[label] = masks.get(label, np.zeros(size, bool)) | (classes == row)
    for label in cache.image_whole_labels(i).tolist():
        masks[label] = np.ones(size, bool)
    return masks


def assert_decodes_to_image_concepts(broden: BrodenDataset, cache: MaskCache) -> None:
    for i in range(len(broden)):
        concepts = image_concepts(broden, i, len(broden.labels))
        masks = decoded(cache, i)
        assert sorted(masks) == concepts.labels.tolist(), i
        for label, mask in zip(concepts.labels.tolist(), concepts.masks):
            np.testing.assert_array_equal(masks[label], mask, err_msg=f"image {i}, label {label}")
        np.testing.assert_array_equal(cache.annotated[i], concepts.annotated)
        assert cache.mask_size(i) == broden.mask_size(i)


def test_the_cache_decodes_back_to_the_masks_of_image_concepts(probe, tmp_path):
    broden = BrodenDataset(probe)
    cache = MaskCache(ensure_mask_cache(broden, tmp_path / "cache"))
    assert cache.errors == {} and cache.n_labels == len(broden.labels)
    assert_decodes_to_image_concepts(broden, cache)
    truth = cache.truth(np.arange(len(broden)))
    expected = np.zeros(len(broden.labels) + 1, np.int64)
    for i in range(len(broden)):
        concepts = image_concepts(broden, i, len(broden.labels))
        expected[concepts.labels] += concepts.masks.sum(axis=1)
    np.testing.assert_array_equal(truth, expected)


def test_a_label_in_two_layers_and_a_whole_image_label_on_pixels_count_once(tmp_path):
    root = hand_broden(tmp_path / "broden")
    index = (root / "index.csv").read_text().replace("im0_part_1.png,", "im0_part_1.png;im0_part_2.png,")
    (root / "index.csv").write_text(index)
    label_png(root / "images/im0_part_2.png", 3 * pixels((1, 1), (2, 2)))       # wheel again, one pixel shared
    label_png(root / "images/im0_object.png", 2 * pixels((0, 0), (0, 1)) + 4 * pixels((3, 3)))  # meadow (scene)
    broden = BrodenDataset(root)
    cache = MaskCache(ensure_mask_cache(broden, tmp_path / "cache"))
    assert_decodes_to_image_concepts(broden, cache)
    np.testing.assert_array_equal(cache.truth(np.array([0])), [0, 4, 2, 3, 16])


def test_a_changed_probe_set_gets_a_new_cache_and_the_old_one_is_removed(probe, tmp_path):
    root = shutil.copytree(probe, tmp_path / "broden")
    cache_root = tmp_path / "cache"
    first = ensure_mask_cache(BrodenDataset(root), cache_root)
    built = (first / "pixel_class.npy").stat().st_mtime_ns
    assert ensure_mask_cache(BrodenDataset(root), cache_root) == first  # current: not rebuilt
    assert (first / "pixel_class.npy").stat().st_mtime_ns == built
    lines = (root / "index.csv").read_text().splitlines(keepends=True)
    (root / "index.csv").write_text("".join(lines[:1] + lines[2:]))  # the first image dropped
    broden = BrodenDataset(root)
    second = ensure_mask_cache(broden, cache_root)
    assert second != first and second.name == cache_name(broden) and not first.exists()
    assert len(MaskCache(second).sizes) == len(broden) == 15
    assert_decodes_to_image_concepts(broden, MaskCache(second))


def test_an_interrupted_build_leaves_no_cache_that_looks_complete(probe, tmp_path, monkeypatch):
    broden = BrodenDataset(probe)
    cache_root = tmp_path / "cache"
    final = cache_root / cache_name(broden)
    decode = mask_cache.image_label_layers

    def interrupted(dataset, i, n_labels):
        if i == 10:
            (building,) = cache_root.glob(".building-*")
            assert not final.exists() and not (building / "meta.json").exists()
            raise KeyboardInterrupt
        return decode(dataset, i, n_labels)

    monkeypatch.setattr(mask_cache, "image_label_layers", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_mask_cache(broden, cache_root)
    assert not final.exists() and not list(cache_root.glob("*/meta.json"))
    monkeypatch.setattr(mask_cache, "image_label_layers", decode)
    assert_decodes_to_image_concepts(broden, MaskCache(ensure_mask_cache(broden, cache_root)))


def test_unreadable_masks_keep_the_error_of_image_concepts_and_the_tally_skips_or_stops(probe, tmp_path):
    root = shutil.copytree(probe, tmp_path / "broden")
    index = pd.read_csv(root / "index.csv", dtype=str, keep_default_na=False)
    corrupt, foreign = index.index[index["object"] != ""][[2, 5]]
    (root / "images" / index.loc[corrupt, "object"].split(";")[0]).write_bytes(b"not a PNG at all")
    label_png(root / "images" / index.loc[foreign, "object"].split(";")[0], np.full((32, 32), 999))  # not in label.csv
    broden = BrodenDataset(root)
    expected = {}
    for i in (corrupt, foreign):
        with pytest.raises(BrodenFormatError) as error:
            image_concepts(broden, i, len(broden.labels))
        expected[i] = str(error.value)
    assert "cannot be decoded" in expected[corrupt] and "999" in expected[foreign]
    cache_path = ensure_mask_cache(broden, tmp_path / "cache")
    assert MaskCache(cache_path).errors == expected
    maps = np.random.default_rng(0).normal(size=(len(broden), 3, 4, 4))
    run_dir = write_activation_store(tmp_path / "run", broden.image_ids, {"conv": maps})
    args = (str(RunLayout(run_dir).activations), str(cache_path), ["conv"], {"conv": np.full(3, 1.0)}, 0, len(broden))
    block = tally.tally_block(*args, strict=False)
    assert block["skipped"] == sorted(expected.items())
    with pytest.raises(BrodenFormatError) as error:
        tally.tally_block(*args, strict=True)
    assert str(error.value) == expected[corrupt]


def test_the_tally_equals_the_reference_when_mask_sizes_differ(probe, tmp_path, compose_config):
    root = shutil.copytree(probe, tmp_path / "broden")
    index = pd.read_csv(root / "index.csv", dtype=str, keep_default_na=False)
    for i in range(0, len(index), 3):  # every third image's masks at 48 x 40 instead of 32 x 32
        for category in ("color", "object", "part", "material"):
            for name in index.loc[i, category].split(";") if index.loc[i, category] else []:
                with Image.open(root / "images" / name) as mask:
                    mask.convert("RGB").resize((40, 48), Image.NEAREST).save(root / "images" / name)
        index.loc[i, ["sh", "sw"]] = ["48", "40"]
    index.to_csv(root / "index.csv", index=False)
    broden = BrodenDataset(root)
    maps = np.maximum(np.random.default_rng(1).normal(size=(len(broden), 6, 5, 7)), 0)  # ReLU'd: ties at 0
    run_dir = write_activation_store(tmp_path / "run", broden.image_ids, {"conv": maps})
    layout = RunLayout(run_dir)
    cfg = compose_config([f"out_dir={run_dir}", "layers=[conv]", f"dataset.root={root}", "thresholds.quantile=0.05",
                          "tally.block_images=5", "stages=[thresholds,tally]"])
    thresholds.run(cfg)
    tally.run(cfg)
    found = {"conv": read_thresholds(layout, "conv")}
    expected = reference_counts(layout.activations, root, ["conv"], found)
    cache = ensure_mask_cache(broden, Path(cfg.tally.mask_cache))
    block = tally.tally_block(str(layout.activations), str(cache), ["conv"], found, 0, len(broden), False)
    for key, counts in expected.items():
        np.testing.assert_array_equal(block[key], counts, err_msg=key)
    assert expected["intersection/conv"][:, 1:].sum() > 0


def test_an_unwritable_cache_folder_is_a_config_error_naming_the_key(probe, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="tally.mask_cache"):
        ensure_mask_cache(BrodenDataset(probe), tmp_path / "file" / "cache")


@pytest.mark.slow  # two worker processes: about 5 s
def test_a_build_on_two_worker_processes_writes_the_same_files(probe, tmp_path, two_workers, monkeypatch):
    from distributed import Client

    broden = BrodenDataset(probe)
    monkeypatch.setattr(mask_cache, "BUILD_BLOCK_IMAGES", 5)  # several tasks, finishing in any order
    here = ensure_mask_cache(broden, tmp_path / "here")
    with Client(two_workers) as client:
        there = ensure_mask_cache(broden, tmp_path / "there", client)
    for name in ("pixel_class.npy", "class_labels.npy", "class_pixels.npy", "whole_labels.npy", "meta.json"):
        assert (here / name).read_bytes() == (there / name).read_bytes(), name
    with np.load(here / "offsets.npz") as first, np.load(there / "offsets.npz") as second:
        for key in first.files:
            np.testing.assert_array_equal(first[key], second[key], err_msg=key)


@pytest.mark.parametrize("top", [1, 50, 1 << 20, 1 << 40])  # table, table at the limit, sorting beyond it
def test_dense_ranks_equal_numpy_unique_inverse(top):
    values = np.random.default_rng(top % 97).integers(0, top, size=5000, dtype=np.int64)
    values[:2] = [0, top - 1]
    expected = np.unique(values, return_inverse=True)[1].reshape(-1)
    assert np.array_equal(mask_cache.dense_ranks(values), expected)
    assert mask_cache.dense_ranks(np.zeros(0, dtype=np.int64)).shape == (0,)
