"""The tally stage: IoU by hand, a dask LocalCluster, resume, and bad masks."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import on_cluster, tiny_overrides, write_activation_store
from data_prep.synthetic_broden import generate
from dissect.stages import extract, tally, thresholds
from dissect.artifacts import read_json
from dissect.broden import BrodenFormatError
from dissect.layout import RunLayout
from dissect.stamps import write_stamp
from dissect.stages.thresholds import write_thresholds

LABELS = """number,name,category,frequency,coverage,syns
1,red-c,color(2),2,0.5,
2,ball,object(2),2,0.5,
3,wheel,part(1),1,0.1,
4,meadow,scene(1),1,1.0,
"""
INDEX = """image,split,ih,iw,sh,sw,color,object,part,material,scene,texture
im0.jpg,train,8,8,4,4,im0_color.png,im0_object.png,im0_part_1.png,,4,
im1.jpg,train,8,8,4,4,im1_color.png,im1_object.png,,,,
"""


def label_png(path: Path, labels: np.ndarray) -> None:
    """Write a (4, 4) label map as a Broden mask PNG (R + 256 * G)."""
    rgb = np.zeros((*labels.shape, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = labels % 256, labels // 256
    Image.fromarray(rgb).save(path)


def pixels(*coordinates: tuple[int, int]) -> np.ndarray:
    """A (4, 4) 0/1 map with ones at the given (row, column) coordinates."""
    out = np.zeros((4, 4), np.int64)
    for row, column in coordinates:
        out[row, column] = 1
    return out


def hand_broden(root: Path) -> Path:
    """Two images: im0 has colour, object, part and a scene label; im1 only colour and object."""
    (root / "images").mkdir(parents=True)
    (root / "index.csv").write_text(INDEX)
    (root / "label.csv").write_text(LABELS)
    (root / "category.csv").write_text("name,first,last,count,frequency\ncolor,1,1,1,2\nobject,2,2,1,2\n"
                                       "part,3,3,1,1\nscene,4,4,1,1\n")
    codes = {"color": "1,1,red-c,2,0.5", "object": "1,2,ball,2,0.5", "part": "1,3,wheel,1,0.1",
             "scene": "1,4,meadow,1,1.0"}
    for category, row in codes.items():
        (root / f"c_{category}.csv").write_text(f"code,number,name,frequency,coverage\n{row}\n")
    row0, row3 = [(0, c) for c in range(4)], [(3, c) for c in range(4)]
    label_png(root / "images/im0_color.png", 1 * pixels(*row0))                       # red: row 0
    label_png(root / "images/im0_object.png", 2 * pixels((0, 0), (0, 1), (1, 0), (1, 1)))  # ball: top-left 2x2
    label_png(root / "images/im0_part_1.png", 3 * pixels((1, 0), (1, 1)))              # wheel: 2 pixels
    label_png(root / "images/im1_color.png", 1 * pixels(*row3))                       # red: row 3
    label_png(root / "images/im1_object.png", 2 * pixels((2, 2), (2, 3), (3, 2), (3, 3)))  # ball: bottom-right
    return root


def hand_maps() -> np.ndarray:
    """(2 images, 3 units, 4, 4) maps at mask resolution (bilinear upsampling is then the identity)."""
    maps = np.zeros((2, 3, 4, 4))
    maps[0, 0] = pixels(*[(0, c) for c in range(4)])            # unit 0: row 0 of im0 ...
    maps[1, 0] = pixels(*[(3, c) for c in range(4)])            # ... and row 3 of im1
    maps[0, 1] = pixels((0, 0), (1, 0), (1, 1))                 # unit 1: 3 pixels of im0, none of im1
    maps[0, 2] = 1                                              # unit 2: all of im0 ...
    maps[1, 2] = pixels((0, 0), (0, 1))                         # ... and 2 pixels of im1
    return maps


def test_iou_equals_a_hand_computation(tmp_path, compose_config):
    broden = hand_broden(tmp_path / "broden")
    run_dir = write_activation_store(tmp_path / "run", ["im0.jpg", "im1.jpg"], {"conv": hand_maps()})
    import zarr

    layout = RunLayout(run_dir)
    write_thresholds(layout, "conv", np.full(3, 0.5), 0.005, zarr.open_group(layout.activations))
    write_stamp(layout.stamp("thresholds", "conv"), thresholds.layer_inputs(layout, 0.005), thresholds.FORMAT)
    cfg = compose_config([f"out_dir={run_dir}", "layers=[conv]", f"dataset.root={broden}"])
    tally.run(cfg)
    # truth: red 4 + 4, ball 4 + 4, wheel 2, meadow 16 (all of im0). The activation term counts only
    # images where the concept's category is annotated: part and scene only in im0.
    # unit 0 fires 4 + 4 pixels; unit 1 fires 3 (im0); unit 2 fires 16 (im0) + 2 (im1).
    expected = np.array([
        #  red            ball            wheel          meadow
        [8 / (8 + 8 - 8), 4 / (8 + 8 - 4), 0 / (4 + 2), 4 / (4 + 16 - 4)],
        [1 / (3 + 8 - 1), 3 / (3 + 8 - 3), 2 / (3 + 2 - 2), 3 / (3 + 16 - 3)],
        [4 / (18 + 8 - 4), 4 / (18 + 8 - 4), 2 / (16 + 2 - 2), 16 / (16 + 16 - 16)],
    ])
    iou = np.load(layout.iou_npy("conv"))
    np.testing.assert_allclose(iou, expected, rtol=1e-6)
    table = pd.read_csv(layout.tally_csv("conv"))
    assert table["label"].tolist() == ["red-c", "wheel", "meadow"]
    assert table["category"].tolist() == ["color", "part", "scene"]
    np.testing.assert_allclose(table["iou"], [1.0, 2 / 3, 1.0], rtol=1e-6)
    assert table["object-label"].tolist() == ["ball"] * 3
    np.testing.assert_allclose(table["object-iou"], [1 / 3, 3 / 8, 4 / 22], rtol=1e-5)
    assert table["texture-label"].isna().all()
    summary = read_json(layout.tally_json("conv"))
    assert (summary["units"], summary["detectors"], summary["unique_detectors"]) == (3, 3, 3)
    assert summary["detectors_by_category"] == {"color": 1, "object": 0, "part": 1, "material": 0, "scene": 1,
                                                "texture": 0}
    concepts = pd.read_csv(layout.concepts_csv("conv"))
    assert concepts["name"].tolist() == ["red-c", "ball", "wheel", "meadow"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_checkpoint):
    """A generated probe set (48 images, 64 px) extracted and thresholded with a tiny random SmallCNN."""
    base = tmp_path_factory.mktemp("small")
    probe = generate(base / "broden", n_images=48, size=64, seed=3, workers=1)
    overrides = tiny_overrides(probe, base / "run", tiny_checkpoint) + [
        "dataset=default", f"dataset.root={probe}", "layers=[features.conv2,features.conv3]",
        "tally.block_images=10", "thresholds.quantile=0.02"]
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    extract.run(cfg)
    thresholds.run(cfg)
    return base, cfg


def copy_run(base: Path, name: str) -> Path:
    target = base / name
    shutil.copytree(base / "run", target,
                    ignore=shutil.ignore_patterns("tally", "tally.csv", "iou.npy", "tally.stamp.json"))
    return target


@pytest.mark.slow  # two worker processes: about 5 s
def test_a_local_cluster_with_two_workers_gives_the_same_tally(small_run, two_workers):
    base, cfg = small_run
    default_dir, cluster_dir = copy_run(base, "default"), copy_run(base, "cluster")
    tally.run(OmegaConf.merge(cfg, {"out_dir": str(default_dir)}))
    tally.run(on_cluster(cfg, two_workers, out_dir=str(cluster_dir)))
    for layer in ("features.conv2", "features.conv3"):
        first = RunLayout(default_dir).tally_csv(layer).read_bytes()
        assert first == RunLayout(cluster_dir).tally_csv(layer).read_bytes()
        assert pd.read_csv(RunLayout(default_dir).tally_csv(layer))["iou"].max() > 0


def test_a_killed_tally_resumes_from_kept_blocks(small_run):
    base, cfg = small_run
    run_dir = copy_run(base, "resume")
    run_cfg = OmegaConf.merge(cfg, {"out_dir": str(run_dir)})
    layout = RunLayout(run_dir)
    tally.run(run_cfg)
    reference = layout.tally_csv("features.conv3").read_bytes()
    parts = sorted(layout.tally_parts.glob("block_*.npz"))
    assert len(parts) == 5
    kept = {p: p.stat().st_mtime_ns for p in parts[:3]}
    for lost in parts[3:]:
        lost.unlink()  # as if the run had been killed before these blocks finished
    layout.tally_csv("features.conv3").unlink()
    for layer in ("features.conv2", "features.conv3"):
        layout.stamp("tally", layer).unlink()  # a killed tally wrote no stamp
    tally.run(run_cfg)
    assert layout.tally_csv("features.conv3").read_bytes() == reference
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items())


def test_a_missing_mask_is_skipped_and_listed_or_stops_a_strict_run(small_run, tmp_path):
    base, cfg = small_run
    run_dir = copy_run(base, "badmask")
    broden = tmp_path / "broden"
    shutil.copytree(cfg.dataset.root, broden)
    index = pd.read_csv(broden / "index.csv", dtype=str, keep_default_na=False)
    victim = index.index[index["color"] != ""][5]
    (broden / "images" / index.loc[victim, "color"].split(";")[0]).unlink()
    run_cfg = OmegaConf.merge(cfg, {"out_dir": str(run_dir), "dataset": {"root": str(broden)}})
    with pytest.raises(BrodenFormatError, match=index.loc[victim, "color"].split(";")[0]):
        tally.run(OmegaConf.merge(run_cfg, {"tally": {"strict": True}}))
    layout = RunLayout(run_dir)
    assert list(layout.tally_parts.glob("block_*.npz")), "blocks finished before the error are kept"
    tally.run(run_cfg)
    skipped = pd.read_csv(layout.skipped_masks)
    assert skipped["index"].tolist() == [victim]
    assert index.loc[victim, "color"].split(";")[0] in skipped["reason"][0]
    summary = read_json(layout.tally_json("features.conv3"))
    assert (summary["images_tallied"], summary["images_skipped"]) == (47, 1)


UPSAMPLE_SHAPES = [((13, 13), (113, 113)), ((14, 14), (112, 112)), ((7, 5), (112, 56)), ((4, 4), (4, 4)),
                   ((20, 20), (7, 9)), ((1, 1), (8, 8))]


@pytest.mark.parametrize(("size_in", "size_out"), UPSAMPLE_SHAPES)
def test_upsampling_matches_torch_bilinear(size_in, size_out):
    import torch

    from dissect.upsample import upsample

    maps = np.random.default_rng(0).normal(size=(3, *size_in)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(maps)[None], size=size_out, mode="bilinear",
                                               align_corners=False)[0].numpy()
    np.testing.assert_allclose(upsample(maps, size_out), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("size_in", "size_out"), UPSAMPLE_SHAPES)
def test_fired_pixels_are_exactly_the_dense_upsampling_above_the_threshold(size_in, size_out):
    from dissect.upsample import fired_masks, fired_pixels, upsample

    rng = np.random.default_rng(1)
    maps = rng.normal(size=(40, *size_in)).astype(np.float16).astype(np.float32)  # float16 values, as stored
    maps[:5] = np.round(maps[:5])  # plateaus: many values equal to the threshold
    dense = upsample(maps, size_out).reshape(len(maps), -1)
    thresholds = np.quantile(dense, 0.97, axis=1).astype(np.float32)
    thresholds[1::2] = np.quantile(dense, 0.9)  # some maps fire in many places, some nowhere
    thresholds[::4] = dense[::4].max(axis=1)  # ties at the maximum: nothing fires
    thresholds[:5] = 1.0
    expected = dense > thresholds[:, None]
    assert 0 < expected.sum() < expected.size
    np.testing.assert_array_equal(fired_masks(maps, thresholds, size_out), expected)
    pieces = list(fired_pixels(maps, thresholds, size_out, max_cells=7))
    index = np.concatenate([i for i, _ in pieces])
    pixel = np.concatenate([p for _, p in pieces])
    assert len(np.unique(index * expected.shape[1] + pixel)) == len(index) == expected.sum()  # each pixel once


def test_float32_threshold_comparison_is_exact():
    from dissect.upsample import float32_below

    thresholds = np.array([0.1, 1 / 3, 2.0, -0.7], dtype=np.float64)
    below = float32_below(thresholds)
    for t, b in zip(thresholds, below):
        candidates = np.array([np.nextafter(np.float32(t), np.float32(d)) for d in (-1e9, 1e9)] + [np.float32(t)])
        np.testing.assert_array_equal(candidates > b, candidates.astype(np.float64) > t)
