"""Per-unit thresholds against numpy.quantile."""

import numpy as np
import pytest

from conftest import write_activation_store
from dissect.artifacts import read_json, read_thresholds
from dissect.errors import ArtifactError
from dissect.layout import RunLayout
from dissect.errors import ConfigError
from dissect.stages.thresholds import (KEYS, dense_top_counts, key_values, keys_at_descending, merge_top_counts,
                                       keys_of, order_keys, quantile_rank, run, sorted_top_counts)


@pytest.mark.parametrize("quantile", [0.005, 0.1, 0.5, 1e-6])
def test_thresholds_equal_numpy_quantile_over_valid_images(tmp_path, compose_config, quantile):
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(50, 4, 5, 5)) * np.array([1, 10, 0.1, 3])[None, :, None, None]
    maps[:, 3] = np.maximum(maps[:, 3], 0)  # a ReLU-like unit with many ties at 0
    valid = np.ones(50, bool)
    valid[[3, 17, 40]] = False
    maps[~valid] = 100.0  # must not count
    write_activation_store(tmp_path, [f"i{k}" for k in range(50)], {"conv": maps}, valid)
    cfg = compose_config([f"out_dir={tmp_path}", "layers=[conv]", f"thresholds.quantile={quantile}",
                          "thresholds.block_images=7"])
    run(cfg)
    stored = maps.astype(np.float16).astype(np.float32)[valid]
    expected = np.quantile(np.moveaxis(stored, 1, 0).reshape(4, -1).astype(np.float64), 1 - quantile, axis=1)
    np.testing.assert_array_equal(read_thresholds(RunLayout(tmp_path), "conv"), expected)


def test_quantile_rank_matches_numpy_interpolation_point():
    values = np.arange(1000.0)
    for quantile in (0.005, 0.3):
        lo, frac = quantile_rank(len(values), quantile)
        assert values[lo] + frac == np.quantile(values, 1 - quantile)


def test_bad_quantile_and_unknown_layer_are_refused(tmp_path, compose_config):
    write_activation_store(tmp_path, ["a", "b"], {"conv": np.zeros((2, 1, 2, 2))})
    with pytest.raises(ConfigError, match="thresholds.quantile=1.5 is not allowed; it must be strictly between 0 and 1"):
        run(compose_config([f"out_dir={tmp_path}", "layers=[conv]", "thresholds.quantile=1.5"]))
    with pytest.raises(ArtifactError, match=r"\['conv9'\] were not extracted; the store holds \['conv'\]"):
        run(compose_config([f"out_dir={tmp_path}", "layers=[conv9]"]))


def tied_long_tail_maps(rng: np.random.Generator) -> np.ndarray:
    """(60, 5, 6, 6) maps built to stress an order statistic: heavy ties, a long tail, negatives and float16 extremes."""
    maps = np.zeros((60, 5, 6, 6))
    maps[:, 0] = np.maximum(rng.normal(size=(60, 6, 6)), 0)           # ReLU: half the values tie at 0
    maps[:, 1] = np.minimum(rng.pareto(1.2, size=(60, 6, 6)) * 50, 6e4)  # a long tail, up to float16's range
    maps[:, 2] = rng.integers(0, 3, size=(60, 6, 6)).astype(float)    # three values only: ties at every rank
    maps[:, 3] = -rng.lognormal(0, 2, size=(60, 6, 6))                # all negative, spread over decades
    maps[:, 4] = rng.choice([-65504.0, -1e-7, 0.0, 1e-7, 65504.0], size=(60, 6, 6))  # subnormals and the extremes
    return maps


@pytest.mark.parametrize("quantile", [0.005, 0.1, 0.5, 0.999])
@pytest.mark.parametrize("memory_mib, method", [("1024", "top-m counts"), ("1e-6", "radix select")])
def test_both_methods_equal_numpy_quantile_on_ties_and_a_long_tail(tmp_path, compose_config, quantile, memory_mib,
                                                                   method):
    maps = tied_long_tail_maps(np.random.default_rng(4))
    valid = np.ones(60, bool)
    valid[[0, 33]] = False
    maps[~valid] = 60000.0  # must not count
    write_activation_store(tmp_path, [f"i{k}" for k in range(60)], {"conv": maps}, valid)
    run(compose_config([f"out_dir={tmp_path}", "layers=[conv]", f"thresholds.quantile={quantile}",
                        "thresholds.block_images=9", f"thresholds.memory_mib={memory_mib}"]))
    layout = RunLayout(tmp_path)
    assert read_json(layout.thresholds_json("conv"))["method"] == method
    stored = maps.astype(np.float16)[valid]
    assert np.isfinite(stored).all()
    expected = np.quantile(np.moveaxis(stored, 1, 0).reshape(5, -1).astype(np.float64), 1 - quantile, axis=1)
    # the stated bound is zero: equal to numpy to the last bit
    np.testing.assert_array_equal(read_thresholds(layout, "conv"), expected)


def test_the_budget_picks_the_method_at_the_counts_peak_and_changes_no_stamp(tmp_path, compose_config):
    maps = tied_long_tail_maps(np.random.default_rng(5))
    write_activation_store(tmp_path, [f"i{k}" for k in range(60)], {"conv": maps})
    layout = RunLayout(tmp_path)
    base = [f"out_dir={tmp_path}", "layers=[conv]", "thresholds.quantile=0.02", "thresholds.block_images=7"]
    run(compose_config(base))
    how = read_json(layout.thresholds_json("conv"))
    assert (how["method"], how["memory_mib"]) == ("top-m counts", 1024)
    m = 60 * 36 - int(np.floor(0.98 * (60 * 36 - 1)))  # order statistics from the interpolation point up
    # a merge holds two inputs of at most 5 units x m distinct values, 80 bytes per entry
    assert 0 < how["counts_peak_mib"] <= 80 * 2 * 5 * m / 2**20
    exact = read_thresholds(layout, "conv")
    stamp = layout.stamp("thresholds", "conv").read_bytes()
    run(compose_config(base + ["thresholds.memory_mib=1e-6"]))  # skipped: the budget is not an input
    assert layout.stamp("thresholds", "conv").read_bytes() == stamp
    assert read_json(layout.thresholds_json("conv"))["method"] == "top-m counts"
    for budget, method in ((how["counts_peak_mib"], "top-m counts"), (how["counts_peak_mib"] * 0.999, "radix select")):
        layout.stamp("thresholds", "conv").unlink()
        run(compose_config(base + [f"thresholds.memory_mib={budget!r}"]))
        assert read_json(layout.thresholds_json("conv"))["method"] == method
        np.testing.assert_array_equal(read_thresholds(layout, "conv"), exact)


def top_values_of(top_counts, n_units: int, m: int) -> np.ndarray:
    """(U, m) float64: each unit's m largest values, descending, spelled out from ``TopCounts``."""
    codes, counts = top_counts
    rows = []
    for unit in range(n_units):
        mine = codes // KEYS == unit
        spelled = np.repeat(key_values(codes[mine] % KEYS).astype(np.float64), counts[mine])
        rows.append(np.sort(spelled)[::-1][:m])
    return np.array(rows)


@pytest.mark.parametrize("n, m", [(0, 5), (1, 1), (60, 1), (60, 17), (60, 59), (60, 60), (60, 200)])
@pytest.mark.parametrize("top_counts", [dense_top_counts, sorted_top_counts])
def test_both_block_counts_hold_each_units_m_largest_values(n, m, top_counts):
    rng = np.random.default_rng(n * 1000 + m)
    values = rng.choice(np.float16([-65504, -2, -0.0, 0, 6e-8, 0.5, 1, 3, 7.5, 1000, 65504]), size=(4, n))
    values[1] = rng.normal(size=n).astype(np.float16)  # few ties
    expected = -np.sort(-values.astype(np.float64), axis=1)[:, :m]
    np.testing.assert_array_equal(top_values_of(top_counts(values, m), 4, m), expected)


def test_top_counts_merged_block_by_block_give_the_sorted_order_statistics():
    rng = np.random.default_rng(6)
    n_units, m = 3, 700
    values = np.float16([-65504, -2, -0.0, 0, 6e-8, 0.5, 1, 3, 7.5, 1000, 65504])
    # ties everywhere, float16's extremes; blocks smaller and larger than m, one without a valid image
    blocks = [rng.choice(values, size=(n_units, n)) for n in (0, 50, 400, 1, 900, 300)]
    merged = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    for number, block in enumerate(blocks):  # the two ways of counting a block, in turn
        merged = merge_top_counts(merged, (dense_top_counts, sorted_top_counts)[number % 2](block, m), m)
    every = np.concatenate(blocks, axis=1).astype(np.float64)
    descending = -np.sort(-every, axis=1)
    positions = np.array([0, 1, 250, m - 2, m - 1])
    keys = keys_at_descending(*merged, n_units, positions)
    np.testing.assert_array_equal(key_values(keys).astype(np.float64), descending[:, positions])


def test_order_keys_sort_like_the_float16_values_and_invert():
    values = np.arange(2**16, dtype=np.uint16).view(np.float16)
    values = values[~np.isnan(values)]
    keys = order_keys(values)
    np.testing.assert_array_equal(keys_of(values), keys)  # the table the stage reads keys through
    order = np.argsort(keys, kind="stable")
    assert (np.diff(values[order].astype(np.float64)) >= 0).all()
    back = key_values(keys)
    np.testing.assert_array_equal(back, values)  # -0.0 reads back as +0.0, which compares equal
    assert not np.signbit(key_values(order_keys(np.float16([-0.0])))).any()


def test_a_bad_memory_budget_is_one_clear_error(tmp_path, compose_config):
    write_activation_store(tmp_path, ["a", "b"], {"conv": np.zeros((2, 1, 2, 2))})
    with pytest.raises(ConfigError, match=r"thresholds.memory_mib=0.0 is not allowed; it must be a number of MiB > 0"):
        run(compose_config([f"out_dir={tmp_path}", "layers=[conv]", "thresholds.memory_mib=0"]))
