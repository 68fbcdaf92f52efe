"""Per-unit thresholds against numpy.quantile."""

import numpy as np
import pytest

from conftest import write_activation_store
from dissect.artifacts import read_thresholds
from dissect.errors import ArtifactError
from dissect.layout import RunLayout
from dissect.errors import ConfigError
from dissect.stages.thresholds import quantile_rank, run


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
