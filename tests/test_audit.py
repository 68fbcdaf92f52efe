"""The audit stage against hand-made dead units and numpy; filter grids, smoothness, comparison, demo, report."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.ndimage
import torch
import torchvision
import zarr
from omegaconf import OmegaConf
from PIL import Image

from conftest import tiny_overrides, write_activation_store, write_image_folder
from data_prep.synthetic_broden import generate
from dissect.stages import audit, extract
from dissect.artifacts import read_json, write_json_atomic
from dissect.errors import ConfigError
from dissect.compare import compare, main
from dissect.tools.audit_demo import DemoSettings, run_demo
from dissect.layout import RunLayout
from dissect.stamps import write_stamp
from reports import audit_section

DEAD_UNITS = [1, 6, 20]


@pytest.fixture(scope="module")
def dead_run(tmp_path_factory, tiny_checkpoint):
    """A tiny SmallCNN whose conv4 units DEAD_UNITS have zero weights and bias -1, extracted and audited.

    The other conv4 units get bias +1, so that none of them is dead by chance.
    """
    base = tmp_path_factory.mktemp("dead")
    state = torch.load(tiny_checkpoint, weights_only=True)
    state["features.conv4.bias"][:] = 1
    state["features.conv4.weight"][DEAD_UNITS] = 0
    state["features.conv4.bias"][DEAD_UNITS] = -1
    torch.save(state, base / "dead.pt")
    probe = write_image_folder(base / "images", n_images=24, size=64)
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=tiny_overrides(probe, base / "run", base / "dead.pt"))
    extract.run(cfg)
    audit.run(cfg)
    return base / "run", cfg


def test_units_made_dead_by_hand_are_exactly_the_dead_units(dead_run):
    run_dir, _ = dead_run
    layout = RunLayout(run_dir)
    units = pd.read_csv(layout.audit_units_csv)
    assert units.columns.tolist() == ["layer", "unit", "firing_rate", "mean", "max", "zero_share", "dead",
                                      "nearly_dead", "always_on"]
    conv4 = units[units["layer"] == "features.conv4"].set_index("unit")
    assert conv4.index[conv4["dead"]].tolist() == DEAD_UNITS
    # the recorded conv output (before the ReLU) of a dead unit is its bias, -1, everywhere
    assert (conv4.loc[DEAD_UNITS, ["mean", "max"]] == -1).all().all()
    assert (conv4.loc[DEAD_UNITS, "zero_share"] == 1).all()
    summary = read_json(layout.audit_json)
    assert summary["layers"]["features.conv4"]["dead"] == len(DEAD_UNITS)
    assert summary["layers"]["features.conv4"]["dead_share"] == len(DEAD_UNITS) / 32
    weights = pd.read_csv(layout.audit_weights_csv).set_index("layer")
    assert weights.loc["features.conv4", "near_zero_share"] == len(DEAD_UNITS) / 32
    assert weights.loc["features.conv3", "near_zero_share"] == 0
    assert weights.index.tolist() == ["features.conv1", "features.conv2", "features.conv3", "features.conv4",
                                      "classifier.fc1", "classifier.fc2"]


def test_unit_figures_equal_numpy_on_the_stored_arrays_of_a_real_extract(dead_run):
    run_dir, cfg = dead_run
    layout = RunLayout(run_dir)
    units = pd.read_csv(layout.audit_units_csv)
    layers = pd.read_csv(layout.audit_layers_csv).set_index("layer")
    store = zarr.open_group(layout.activations, mode="r")
    for layer in cfg.layers:
        group = store[layer]
        values = (group["maps"][:] if "maps" in group else group["activations"][:][..., None, None]).astype(np.float64)
        table = units[units["layer"] == layer]
        fires = values.max(axis=(2, 3)) > 0
        np.testing.assert_allclose(table["firing_rate"], fires.mean(axis=0))
        np.testing.assert_allclose(table["mean"], values.mean(axis=(0, 2, 3)), rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(table["max"], values.max(axis=(0, 2, 3)))
        np.testing.assert_allclose(table["zero_share"], (values <= 0).mean(axis=(0, 2, 3)))
        np.testing.assert_allclose(layers.loc[layer, "sparsity"], (values <= 0).mean())
        if "maxima" in group:
            np.testing.assert_array_equal(fires, group["maxima"][:] > 0)


def test_hand_made_store_flags_and_histogram_equal_numpy_with_invalid_images_left_out(tmp_path, compose_config,
                                                                                      tiny_checkpoint):
    rng = np.random.default_rng(0)
    n = 150
    maps = rng.normal(size=(n, 5, 3, 3))
    maps[:, 0] = -np.abs(maps[:, 0])          # dead
    maps[:, 1] = -1.0
    maps[4, 1, 2, 2] = 0.5                   # fires on one image of 147: nearly dead at 0.01
    maps[:, 2] = np.abs(maps[:, 2]) + 0.1    # always on
    maps[:, 3, 0, 0] = 0.0                   # zero (not positive) at 1/9 of positions: not always on
    valid = np.ones(n, bool)
    valid[[0, 50, 149]] = False
    maps[~valid] = 7.0                       # must not count
    write_activation_store(tmp_path, [f"i{k}" for k in range(n)], {"a<b>&c": maps}, valid)
    overrides = tiny_overrides(tmp_path, tmp_path, tiny_checkpoint)
    cfg = compose_config(overrides + ["layers=['a<b>&c']", "audit.histogram_bins=10"])
    audit.run(cfg)
    layout = RunLayout(tmp_path)
    units = pd.read_csv(layout.audit_units_csv)
    stored = maps.astype(np.float16).astype(np.float64)[valid]
    fires = (stored.max(axis=(2, 3)) > 0).mean(axis=0)
    zero = (stored <= 0).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(units["firing_rate"], fires)
    np.testing.assert_allclose(units["mean"], stored.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_array_equal(units["max"], stored.max(axis=(0, 2, 3)))
    np.testing.assert_allclose(units["zero_share"], zero)
    assert units["dead"].tolist() == [True, False, False, False, False]
    assert units["nearly_dead"].tolist() == [False, True, False, False, False]
    assert units["always_on"].tolist() == (1 - zero > 0.99).tolist() == [False, False, True, False, False]
    summary = read_json(layout.audit_json)["layers"]["a<b>&c"]
    assert summary["firing_rate_histogram"]["counts"] == np.histogram(fires, bins=10, range=(0, 1))[0].tolist()
    assert summary["valid_images"] == n - 3
    assert layout.firing_rates_png("a<b>&c").exists()
    html = audit_section.render(tmp_path, tmp_path / "report")
    assert "a&lt;b&gt;&amp;c" in html and "a<b>&c" not in html
    assert "<li>a&lt;b&gt;&amp;c (1 of 5): 0</li>" in html  # no cards for this layer: plain unit numbers


def test_a_finished_audit_is_skipped_and_new_settings_redo_it(dead_run, compose_config, tiny_checkpoint):
    run_dir, cfg = dead_run
    layout = RunLayout(run_dir)
    summary = layout.audit_json
    written = {path: path.stat().st_mtime_ns for path in (summary, layout.stamp("audit"))}
    audit.run(cfg)
    assert {path: path.stat().st_mtime_ns for path in written} == written
    audit.run(OmegaConf.merge(cfg, {"audit": {"histogram_bins": 4}}))
    assert len(read_json(summary)["layers"]["features.conv4"]["firing_rate_histogram"]["counts"]) == 4
    with pytest.raises(audit.AuditError, match="audit with the model config used for extract"):
        audit.run(compose_config(tiny_overrides(run_dir, run_dir, tiny_checkpoint) + ["audit.histogram_bins=3"]))
    with pytest.raises(ConfigError, match=r"audit.nearly_dead_share=1.5 is not allowed; it must be a share in \[0, 1\]"):
        audit.run(compose_config(tiny_overrides(run_dir, run_dir, tiny_checkpoint) + ["audit.nearly_dead_share=1.5"]))
    with pytest.raises(audit.AuditError, match=r"\['features.conv9'\] cannot be audited; the store holds"):
        audit.run(compose_config(tiny_overrides(run_dir, run_dir, tiny_checkpoint) + ["layers=[features.conv9]"]))


def test_report_section_links_dead_units_to_their_cards(dead_run, tmp_path):
    run_dir, _ = dead_run
    assert audit_section.render(tmp_path, tmp_path / "report") is None
    layout = RunLayout(run_dir)
    # the layer was dissected (its tally finished): it has cards
    write_stamp(layout.stamp("tally", "features.conv4"), {"written_by": "test_audit"}, 1)
    html = audit_section.render(run_dir, run_dir / "report")
    for unit in DEAD_UNITS:
        assert f"href='layer-features.conv4.html#unit-features.conv4-{unit}'" in html
    for image in (layout.first_layer_filters_png, layout.firing_rates_png("features.conv4")):
        assert f"src='{Path(os.path.relpath(image, layout.report_dir)).as_posix()}'" in html
    assert "src='../audit/first_layer_filters.png'" in html
    assert "class='section'" in html and "class='data'" in html
    first = read_json(layout.audit_json)["first_layer"]
    assert f"class='{'verdict-bad' if first['noisy'] else 'verdict-ok'}'" in html


def test_alexnet_first_layer_grid_has_64_tiles_each_its_own_filter_scaled(tmp_path):
    model = torchvision.models.alexnet(weights=None)
    name, filters = audit.first_conv(model)
    assert name == "features.0" and filters.shape == (64, 3, 11, 11)
    grid = audit.filter_grid(filters)
    assert grid.shape == (8 * 12 + 1, 8 * 12 + 1, 3)
    labels, n_tiles = scipy.ndimage.label(~(grid == 1).all(axis=2))
    assert n_tiles == 64
    for i, box in enumerate(scipy.ndimage.find_objects(labels)):
        tile = grid[box]
        assert tile.shape == (11, 11, 3)
        w = filters[i].transpose(1, 2, 0)
        np.testing.assert_allclose(tile, (w - w.min()) / (w.max() - w.min()))
    audit.save_filter_grid(grid, tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as image:
        assert image.size == (97 * 6, 97 * 6)  # enlarged 6x to reach 512 px


def test_smoothness_tells_a_gaussian_blob_from_white_noise():
    y, x = np.mgrid[:11, :11] - 5.0
    blob = np.exp(-(x**2 + y**2) / (2 * 2.0**2))
    blobs = np.stack([np.stack([blob, 0.5 * blob, -blob])] * 4)
    noise = np.random.default_rng(0).normal(size=(64, 3, 11, 11))
    blob_share, noise_share = audit.high_frequency_share(blobs), audit.high_frequency_share(noise)
    assert (blob_share < 0.01).all()
    white = audit.high_frequency_mask(11, 11).mean()  # share of the frequency grid above the cut
    above = sum(a * a + b * b > (11 / 4) ** 2 for a in range(-5, 6) for b in range(-5, 6))  # k/11 cycles/px
    assert above == 100 and white == pytest.approx(above / 121) and abs(np.median(noise_share) - white) < 0.05
    assert not audit.first_layer_summary("blob", blobs)["noisy"]
    assert audit.first_layer_summary("noise", noise)["noisy"]
    # a cosine puts all its energy at its own frequency: above the cut (3/11) or below it (2/11)
    for cycles, expected in ((3, 1.0), (2, 0.0)):
        wave = np.cos(2 * np.pi * cycles * x / 11)[None, None]
        assert audit.high_frequency_share(wave)[0] == pytest.approx(expected, abs=1e-12)


def fake_audit(run_dir, dead: dict[str, list[bool]], noisy: bool):
    """A run directory (its extract stamp) with a finished audit on disk with the given dead flags per layer."""
    layout = RunLayout(run_dir)
    write_stamp(layout.stamp("extract"), {"written_by": "test_audit fake_audit"}, 1)
    layout.audit_dir.mkdir(parents=True)
    rows = [{"layer": layer, "unit": u, "firing_rate": 0.0 if d else 0.5, "mean": 0.0, "max": 0.0,
             "zero_share": 0.5, "dead": d, "nearly_dead": False, "always_on": False}
            for layer, flags in dead.items() for u, d in enumerate(flags)]
    pd.DataFrame(rows).to_csv(layout.audit_units_csv, index=False)
    first = {"layer": "conv1", "noisy": noisy, "high_frequency_share_median": 0.7 if noisy else 0.2,
             "white_noise_share": 0.8}
    write_json_atomic(layout.audit_json, {"first_layer": first, "layer_order": list(dead),
                                          "thresholds": {"dead_share_warning": 0.4}})
    write_stamp(layout.stamp("audit"), {"written_by": "test_audit fake_audit"}, audit.FORMAT)
    return run_dir


def test_compare_counts_units_that_died_and_came_back(tmp_path, capsys):
    runs = [
        fake_audit(tmp_path / "a", {"c": [False, False, True, False], "f": [False, False]}, noisy=False),
        fake_audit(tmp_path / "b", {"c": [True, False, False, True], "f": [False, False]}, noisy=False),
        fake_audit(tmp_path / "c", {"c": [True, True, True, True], "f": [True, False]}, noisy=True),
    ]
    comparison = compare(runs, ["a", "b", "c"])
    table = comparison.audit
    c, f = table[table["layer"] == "c"], table[table["layer"] == "f"]
    assert c["dead"].tolist() == [1, 2, 4] and c["units"].tolist() == [4, 4, 4]
    assert c["died"].tolist()[1:] == [2, 2] and c["came_back"].tolist()[1:] == [1, 0]
    assert c["died"].isna().tolist() == [True, False, False]
    assert c["compared_with"].isna().tolist() == [True, False, False] and c["compared_with"].tolist()[1:] == ["a", "b"]
    assert f["died"].tolist()[1:] == [0, 1] and f["came_back"].tolist()[1:] == [0, 0]
    assert c["dead_share"].tolist() == [0.25, 0.5, 1.0]
    remarks = comparison.remarks
    assert len(remarks) == 2 and remarks[0].startswith("c looks unhealthy: 100% of its c units are dead")
    assert remarks[1].startswith("c has noisy first-layer filters")
    healthy = fake_audit(tmp_path / "d", {"c": [False, True, False, False], "f": [False, False]}, noisy=False)
    assert main([str(runs[0]), str(healthy), "--names", "a,d", "--out", str(tmp_path / "out")]) == 0
    written = pd.read_csv(tmp_path / "out" / "audit.csv")
    assert written["run"].tolist() == ["a", "d", "a", "d"] and written["layer"].tolist() == ["c", "c", "f", "f"]
    assert written["died"].tolist()[1::2] == [1, 0] and written["came_back"].tolist()[1::2] == [1, 0]
    assert "no run looks unhealthy: every dead share is below its audit's warning level (40%)" in capsys.readouterr().out
    assert main([str(runs[0]), str(runs[1]), "--names", "a"]) == 2
    assert main([str(runs[0]), str(tmp_path), "--out", str(tmp_path / "out2")]) == 2
    assert not (tmp_path / "out2").exists()


def test_a_far_too_high_learning_rate_leaves_more_dead_units(tmp_path):
    data = generate(tmp_path / "broden", n_images=320, size=64, seed=0, workers=2)
    settings = DemoSettings(data, tmp_path / "demo", lrs=(3e-3, 0.3), epochs=2, n_images=320, size=64, seed=0,
                            batch_size=32)
    table, remarks, run_dirs = run_demo(settings)
    totals = table.groupby("run")[["dead", "units"]].sum()
    dead_share = totals["dead"] / totals["units"]  # measured: 0.066 at lr 0.003, 0.51 at lr 0.3
    assert dead_share["lr-0.3"] > 0.4 and dead_share["lr-0.3"] > dead_share["lr-0.003"] + 0.3
    assert remarks[0].startswith("lr-0.3 looks unhealthy")
    assert not read_json(RunLayout(run_dirs[1]).audit_json)["verdict"]["healthy"]


def test_block_wise_unit_tally_equals_numpy_on_the_whole_array(tmp_path, compose_config):
    from dissect.cluster import dask_client

    rng = np.random.default_rng(5)
    n = 61
    maps = rng.normal(scale=3.0, size=(n, 4, 3, 2))
    maps[:, 1] = np.minimum(maps[:, 1], 0)       # never positive
    maps[rng.random(maps.shape) < 0.2] = 0.0     # exact zeros count as zero
    vector = rng.normal(size=(n, 5))
    valid = rng.random(n) > 0.2
    valid[14:21] = False                         # a whole chunk (7 images) without a valid image
    write_activation_store(tmp_path, [f"i{i}" for i in range(n)], {"conv": maps}, valid)
    store = zarr.open_group(RunLayout(tmp_path).activations, mode="a")
    store.require_group("fc").create_array("activations", data=vector.astype(np.float16), chunks=(7, 5))
    store.attrs["layers"] = {**store.attrs["layers"], "fc": {"kind": "vector", "shape": [5], "module": "Linear"}}
    expected = {"conv": maps.astype(np.float16).astype(np.float64)[valid].reshape(int(valid.sum()), 4, 6),
                "fc": vector.astype(np.float16).astype(np.float64)[valid][..., None]}
    chunk_mib = 7 * 4 * 6 * 2 / 2**20  # one chunk of conv's maps
    with dask_client(compose_config([]).cluster) as client:
        for block_mib in (0.0, 3 * chunk_mib, 32.0):  # one chunk per block, three (fc: 14), the whole array
            tallies = audit.layer_tallies(client, str(RunLayout(tmp_path).activations), ["conv", "fc"], block_mib)
            for layer, values in expected.items():
                tally = tallies[layer]
                assert (tally.images, tally.positions) == (int(valid.sum()), values.shape[2])
                np.testing.assert_array_equal(tally.fired, (values.max(axis=2) > 0).sum(axis=0))
                # float16 values are multiples of 2**-24 and these sums stay far below 2**29: exact in any order
                np.testing.assert_array_equal(tally.total, values.sum(axis=(0, 2)))
                np.testing.assert_array_equal(tally.maximum, values.max(axis=(0, 2)))
                np.testing.assert_array_equal(tally.zeros, (values <= 0).sum(axis=(0, 2)))
    assert tallies["conv"].fired[1] == 0


@pytest.mark.slow  # two worker processes: about 11 s
def test_audit_on_two_worker_processes_writes_the_same_tables_as_in_process(dead_run, tmp_path, two_workers,
                                                                            monkeypatch):
    import shutil

    from conftest import on_cluster

    run_dir, cfg = dead_run
    copies = {name: tmp_path / name for name in ("here", "there")}
    for copy in copies.values():
        shutil.copytree(run_dir, copy)
        shutil.rmtree(RunLayout(copy).audit_dir)
    audit.run(OmegaConf.merge(cfg, {"out_dir": str(copies["here"])}))  # in-process, default blocks
    monkeypatch.setattr(audit, "BLOCK_MIB", 0.0)  # one chunk per block: many partial tallies summed
    audit.run(on_cluster(cfg, two_workers, out_dir=str(copies["there"])))
    here, there = RunLayout(copies["here"]), RunLayout(copies["there"])
    assert zarr.open_group(here.activations, mode="r")["features.conv4"]["maps"].chunks[0] < 24
    for name in ("audit_units_csv", "audit_layers_csv", "audit_weights_csv", "audit_json"):
        assert getattr(here, name).read_bytes() == getattr(there, name).read_bytes(), name
    assert here.stamp("audit").read_bytes() == there.stamp("audit").read_bytes()
