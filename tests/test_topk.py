"""Receptive fields and the top-k order."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torchvision
import zarr
from conftest import CONF_DIR, on_cluster, tiny_overrides
from hydra import compose, initialize_config_dir
from torch import nn

from data_prep.synthetic_broden import generate
from dissect.artifacts import chunk_blocks, open_activations
from dissect.cluster import dask_client
from dissect.layout import RunLayout
from dissect.receptive_field import geometry_field, receptive_field
from dissect.stages import extract, thresholds, topk
from dissect.stages.topk import top_images


def test_alexnet_conv1_and_conv5_fields():
    model = torchvision.models.alexnet(weights=None).eval()
    conv1 = receptive_field(model, model.features[0], 227)
    conv5 = receptive_field(model, model.features[10], 227)
    assert (conv1.size, conv1.stride, conv1.method) == (11, 4, "geometry")
    assert (conv5.size, conv5.stride, conv5.method) == (163, 16, "geometry")
    assert conv1.offset == 5 - 2  # centre of the first 11-pixel window (5) minus the padding (2)


def test_a_stack_with_dilation_and_padding():
    stack = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2),
                          nn.MaxPool2d(2), nn.Conv2d(4, 4, 5, padding=0)).eval()
    # by hand: 1 + 2*1 = 3; + (3-1)*2*1 = 7, jump 2; + 1*2 = 9, jump 4; + 4*4 = 25, jump 4
    # offset: 0.5 + (1-1)*1 = 0.5; + (2-2)*1 = 0.5; + (0.5-0)*2 = 1.5; + (2-0)*4 = 9.5 -> minus 0.5 = 9
    field = receptive_field(stack, stack[4], 64)
    assert (field.size, field.stride, field.offset, field.method) == (25, 4, 9, "geometry")
    assert geometry_field(list(stack)) == field


def test_the_gradient_fallback_agrees_with_geometry_on_a_chain():
    stack = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1)).eval()
    for module in stack:
        if isinstance(module, nn.Conv2d):
            nn.init.constant_(module.weight, 0.1)
            nn.init.constant_(module.bias, 1.0)  # every ReLU open, so every input pixel of the field moves
    from dissect.receptive_field import gradient_field

    measured = gradient_field(stack, stack[2], 33)
    expected = geometry_field(list(stack))
    assert (measured.size, measured.stride) == (expected.size, 33 / 17)
    assert expected.size == 1 + 4 + 2 * 1


def test_top_k_by_hand_with_ties_to_the_lower_index_and_invalid_images_left_out():
    maxima = np.array([[1, 5, 2],
                       [3, 5, 2],
                       [9, 0, 2],  # invalid: would be unit 0's best
                       [3, 1, 7],
                       [0, 5, 2],
                       [7, 9, 2],  # invalid: would be unit 1's best
                       [3, 2, -1]], dtype=np.float32)
    valid = np.array([True, True, False, True, True, False, True])
    # by hand, per unit over images 0, 1, 3, 4, 6: unit 0: 3 (1, 3, 6), 1 (0), 0 (4);
    # unit 1: 5 (0, 1, 4), 2 (6), 1 (3); unit 2: 7 (3), 2 (0, 1, 4), -1 (6)
    np.testing.assert_array_equal(top_images(maxima, valid, k=3), [[1, 0, 3], [3, 1, 0], [6, 4, 1]])
    # k beyond the 5 valid images: 5 rows, never an invalid image (not even below a negative maximum)
    np.testing.assert_array_equal(top_images(maxima, valid, k=10), [[1, 0, 3], [3, 1, 0], [6, 4, 1], [0, 6, 4],
                                                                   [4, 3, 6]])


def test_stage_writes_top_k_from_the_stored_maxima(tmp_path, tiny_checkpoint):
    probe = generate(tmp_path / "broden", n_images=24, size=64, seed=2, workers=1)
    overrides = tiny_overrides(probe, tmp_path / "run", tiny_checkpoint) + [
        "dataset=default", f"dataset.root={probe}", "layers=[features.conv3]", "topk.k=5", "thresholds.quantile=0.02"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    for stage in (extract, thresholds, topk):
        stage.run(cfg)
    store = open_activations(tmp_path / "run")
    maxima = store["features.conv3"]["maxima"][:]
    layout = RunLayout(tmp_path / "run")
    table = pd.read_csv(layout.topk_csv("features.conv3"))
    valid = store["valid"][:]
    assert sorted(table["unit"].unique()) == list(range(16))
    for unit, rows in table.groupby("unit"):
        # the 5 valid images of highest maximum, ties to the lower index, by Python's sort (not numpy's)
        expected = sorted((i for i in range(len(maxima)) if valid[i]), key=lambda i: (-float(maxima[i, unit]), i))[:5]
        assert rows.sort_values("rank")["image_index"].tolist() == expected
        assert rows["rank"].tolist() == sorted(rows["rank"]) == list(range(5))
        np.testing.assert_allclose(rows["max_activation"], maxima[expected, unit], rtol=1e-3)
    maps = store["features.conv3"]["maps"][:]
    first = table.iloc[0]
    assert maps[first["image_index"], first["unit"]][first["y"], first["x"]] == maps[first["image_index"],
                                                                                    first["unit"]].max()
    assert len(list(layout.topk_strips("features.conv3").glob("unit_*.jpg"))) == 16
    assert all(layout.topk_strip("features.conv3", unit).is_file() for unit in range(16))


def python_top(maxima: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """(k', U) by Python's sort of each unit's valid images on (-maximum, index): the reference order."""
    columns = [sorted((i for i in range(len(maxima)) if valid[i]), key=lambda i: (-float(maxima[i, u]), i))[:k]
               for u in range(maxima.shape[1])]
    return np.array(columns, dtype=np.int64).reshape(maxima.shape[1], -1).T


def planted_maxima(n: int = 103, units: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """(n, units) float32 maxima with many ties and (n,) valid, some invalid images above every valid one."""
    rng = np.random.default_rng(3)
    maxima = rng.integers(0, 5, size=(n, units)).astype(np.float32)  # 5 distinct values: ties everywhere
    maxima[:, 0] = 2.0                                                # one unit ties on every image
    maxima[10:20, 1] = 9.0                                            # a tie at the top across chunks
    valid = rng.random(n) > 0.25
    valid[30:60] = False                                              # whole chunks without a valid image
    maxima[~valid, 2] = 99.0                                          # invalid images would be unit 2's best
    return maxima, valid


def test_block_wise_top_k_equals_top_images_with_planted_ties_and_invalid_images(tmp_path, compose_config):
    maxima, valid = planted_maxima()
    chunk = 3
    root = zarr.open_group(tmp_path / "store.zarr", mode="w")
    root.create_array("valid", data=valid, chunks=(chunk,))
    array = root.require_group("layer").create_array("maxima", data=maxima, chunks=(chunk, maxima.shape[1]))
    store_path = str(tmp_path / "store.zarr")
    chunk_mib = chunk * maxima.shape[1] * 4 / 2**20
    rng = np.random.default_rng(0)
    with dask_client(compose_config([]).cluster) as client:
        for k in (1, 4, 10, 200):
            expected = python_top(maxima, valid, k)
            assert expected.shape == (min(k, int(valid.sum())), maxima.shape[1])
            np.testing.assert_array_equal(top_images(maxima, valid, k), expected)
            for chunks_per_block in (1, 2, 5, 40):  # blocks of 3, 6, 15 and all 103 images: smaller and larger than k
                blocks = chunk_blocks(array, chunks_per_block * chunk_mib)
                assert [first for first, _ in blocks] == list(range(0, len(maxima), chunks_per_block * chunk))
                candidates = [topk.block_candidates(store_path, "layer", first, last, k) for first, last in blocks]
                assert all(len(values) == min(k, int(valid[first:last].sum()))
                           for (values, _), (first, last) in zip(candidates, blocks))
                arrival = rng.permutation(len(candidates))  # blocks merged in any order, as they finish
                values, indices = candidates[arrival[0]]
                for b in arrival[1:]:
                    values, indices = topk.merge_candidates(np.concatenate([values, candidates[b][0]]),
                                                            np.concatenate([indices, candidates[b][1]]), k)
                np.testing.assert_array_equal(indices, expected)
                np.testing.assert_array_equal(values, np.take_along_axis(maxima, expected, axis=0))
                staged = topk.layer_candidates(client, store_path, ["layer"], k, chunks_per_block * chunk_mib)
                np.testing.assert_array_equal(staged["layer"], expected)


@pytest.mark.slow  # two worker processes: about 6 s
def test_stage_on_two_worker_processes_writes_the_same_files_as_in_process(tmp_path, tiny_checkpoint, two_workers,
                                                                          monkeypatch):
    probe = generate(tmp_path / "broden", n_images=24, size=64, seed=2, workers=1)
    overrides = tiny_overrides(probe, tmp_path / "run", tiny_checkpoint) + [
        "dataset=default", f"dataset.root={probe}", "layers=[features.conv2,features.conv3]", "topk.k=5",
        "thresholds.quantile=0.02"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    for stage in (extract, thresholds):
        stage.run(cfg)
    shutil.copytree(tmp_path / "run", tmp_path / "cluster_run")
    topk.run(cfg)  # in-process, default blocks: one block per array
    # on the cluster with one chunk per block and two units per task, so every merge and group path is taken
    monkeypatch.setattr(topk, "BLOCK_MIB", 0.0)
    monkeypatch.setattr(topk, "MAX_UNITS_PER_TASK", 2)
    topk.run(on_cluster(cfg, two_workers, out_dir=str(tmp_path / "cluster_run")))
    here, there = RunLayout(tmp_path / "run"), RunLayout(tmp_path / "cluster_run")
    assert open_activations(tmp_path / "run")["features.conv3"]["maps"].chunks[0] < 24  # several chunks per array
    for layer in ("features.conv2", "features.conv3"):
        assert here.topk_csv(layer).read_bytes() == there.topk_csv(layer).read_bytes()
        assert here.receptive_field_json(layer).read_bytes() == there.receptive_field_json(layer).read_bytes()
        strips = sorted(path.name for path in here.topk_strips(layer).glob("unit_*.jpg"))
        assert strips == sorted(path.name for path in there.topk_strips(layer).glob("unit_*.jpg")) and strips
        for name in strips:
            assert (here.topk_strips(layer) / name).read_bytes() == (there.topk_strips(layer) / name).read_bytes()
        assert there.stamp("topk", layer).read_bytes() == here.stamp("topk", layer).read_bytes()
