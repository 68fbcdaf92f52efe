"""Converters to Broden format: tiny hand-built data sets in every layout, read back through BrodenDataset.

Expected values are computed by hand from what is planted. The nearest-neighbour
rule of the masks: mask pixel j takes source row floor((j + 0.5) * H / sh).
For a 56-pixel side converted at --size 224 (mask side 112) that is j // 2, so
a planted region doubles along that side; with --size keep (mask side H / 2)
mask pixel j takes source pixel 2j + 1, so a region [a, b) becomes
[ceil((a - 1) / 2), ceil((b - 1) / 2)).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_prep.__main__ import main as data_prep_main
from data_prep.convert.writer import WORK_DIR
from data_prep.verify_broden import verify
from dissect.broden import BrodenDataset


def convert(*args: str | Path) -> int:
    """Run ``python -m data_prep convert ARGS`` in this process; return its exit code."""
    return data_prep_main(["convert", *[str(arg) for arg in args]])


def save_rgb(path: Path, height: int, width: int, value: int = 90) -> None:
    """A flat grey RGB image of (height, width)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(path)


def save_mask(path: Path, mask: np.ndarray, mode: str = "L") -> None:
    """A class-index mask PNG (mode L or I;16)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint16 if mode == "I;16" else np.uint8)).save(path)


def labels_of(data: BrodenDataset) -> dict[str, tuple[int, str, int, float]]:
    """name -> (number, primary category, frequency, coverage) from label.csv."""
    return {row["name"]: (int(number), row["category"], int(row["frequency"]), float(row["coverage"]))
            for number, row in data.labels.iterrows()}


def all_files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under root."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- semantic: a home-made set ------------------------------------------------------------------

def home_made_set(root: Path) -> Path:
    """Two images with class-index masks and a class table.

    a.png (56 x 56, train): lesion (1) rows 8..23 all columns; scar (3) rows 40..55, columns 10..29.
    val/b.jpg (56 high, 84 wide, val): vessel (2) rows 0..27, columns 0..41 (I;16 mask); lesion (1) rows 28..55,
    columns 42..83.
    """
    a = np.zeros((56, 56), np.uint8)
    a[8:24, :] = 1
    a[40:56, 10:30] = 3
    save_rgb(root / "images" / "a.png", 56, 56)
    save_mask(root / "masks" / "a.png", a)
    b = np.zeros((56, 84), np.uint16)
    b[0:28, 0:42] = 2
    b[28:56, 42:84] = 1
    save_rgb(root / "images" / "val" / "b.jpg", 56, 84)
    save_mask(root / "masks" / "val" / "b.png", b, "I;16")
    (root / "classes.csv").write_text("index,name,category\n1,lesion,object\n2,vessel,part\n3,scar,material\n"
                                      "4,cyst,object\n")
    (root / "scenes.csv").write_text("image,labels\na.png,clinic\nval/b,clinic;ward\n")
    return root


def test_semantic_home_made_set_gives_back_the_planted_labels_and_pixel_counts(tmp_path: Path, capsys) -> None:
    src = home_made_set(tmp_path / "src")
    out = tmp_path / "out"
    assert convert("semantic", src, "--out", out, "--classes", src / "classes.csv", "--size", "224",
                   "--image-labels", src / "scenes.csv", "--image-label-category", "scene") == 0
    assert "converted 2 images with 6 labels" in capsys.readouterr().out
    assert verify(out) == []
    data = BrodenDataset(out)
    # numbering: by category (object, part, material, scene), table order inside, image labels sorted
    # a: lesion 32 x 112 = 3584 px, scar 32 x 40 = 1280; b: vessel 56 x 56 = 3136, lesion 56 x 56 = 3136
    # (b's columns: floor((k + 0.5) * 84 / 112) < 42 for k = 0..55); mask size 112 x 112 = 12544 px
    pixels = 112 * 112
    assert labels_of(data) == {
        "lesion": (1, "object", 2, pytest.approx((3584 + 3136) / pixels, abs=1e-6)),
        "cyst": (2, "object", 0, 0.0),
        "vessel": (3, "part", 1, pytest.approx(3136 / pixels, abs=1e-6)),
        "scar": (4, "material", 1, pytest.approx(1280 / pixels, abs=1e-6)),
        "clinic": (5, "scene", 2, 2.0),
        "ward": (6, "scene", 1, 1.0),
    }
    assert data.image_ids == ["a.jpg", "val/b.jpg"] and data.splits == ["train", "val"]
    assert [data.image_size(i) for i in range(2)] == [(224, 224)] * 2
    assert [data.mask_size(i) for i in range(2)] == [(112, 112)] * 2
    expected_a_object = np.zeros((112, 112), np.int32)
    expected_a_object[16:48, :] = 1
    expected_a_material = np.zeros((112, 112), np.int32)
    expected_a_material[80:112, 20:60] = 4
    np.testing.assert_array_equal(data.pixel_labels(0, "object"), expected_a_object[None])
    np.testing.assert_array_equal(data.pixel_labels(0, "material"), expected_a_material[None])
    assert data.pixel_labels(0, "part").shape == (0, 112, 112) and not data.has_category(0, "part")
    b_object, b_part = data.pixel_labels(1, "object")[0], data.pixel_labels(1, "part")[0]
    assert (b_object == 1).sum() == 3136 and (b_object[56:, 56:] == 1).all() and b_object[:56].sum() == 0
    assert (b_part == 3).sum() == 3136 and (b_part[:56, :56] == 3).all()
    assert data.image_labels(0, "scene") == [5] and data.image_labels(1, "scene") == [5, 6]
    with Image.open(data.image_path(1)) as image:
        assert image.size == (224, 224)
    assert (out / "skipped.csv").read_text() == "file,reason\n"


# --- semantic: ADE20K, Pascal VOC, Cityscapes -----------------------------------------------------

def test_ade20k_layout_with_object_info_table(tmp_path: Path) -> None:
    src = tmp_path / "ADEChallengeData2016"
    mask = np.zeros((30, 40), np.uint8)
    mask[0:10, :] = 2      # building;edifice -> "building": mask rows 0..4, 5 x 20 = 100 px
    mask[10:30, 4:] = 1    # wall: mask rows 5..14, columns 2..19: 10 x 18 = 180 px (columns 0..3 are "other")
    save_rgb(src / "images" / "training" / "ADE_train_00000001.jpg", 30, 40)
    save_mask(src / "annotations" / "training" / "ADE_train_00000001.png", mask)
    save_rgb(src / "images" / "validation" / "ADE_val_00000001.jpg", 30, 40)
    save_mask(src / "annotations" / "validation" / "ADE_val_00000001.png", np.full((30, 40), 3, np.uint8))
    (src / "objectInfo150.csv").write_text("Idx,Ratio,Train,Val,Name\n1,0.1576,11664,1172,wall\n"
                                           "2,0.1072,6046,612,building;edifice\n3,0.0878,8265,796,sky\n")
    out = tmp_path / "out"
    assert convert("semantic", src, "--out", out, "--size", "keep", "--workers", "1") == 0
    assert verify(out) == []
    data = BrodenDataset(out)
    assert labels_of(data) == {"wall": (1, "object", 1, pytest.approx(180 / 300, abs=1e-6)),
                               "building": (2, "object", 1, pytest.approx(100 / 300, abs=1e-6)),
                               "sky": (3, "object", 1, 1.0)}
    assert data.image_ids == ["training/ADE_train_00000001.jpg", "validation/ADE_val_00000001.jpg"]
    assert data.splits == ["train", "val"] and data.image_size(0) == (30, 40) and data.mask_size(0) == (15, 20)
    expected = np.zeros((15, 20), np.int32)
    expected[0:5, :] = 2
    expected[5:15, 2:] = 1
    np.testing.assert_array_equal(data.pixel_labels(0, "object"), expected[None])


def voc_palette() -> list[int]:
    """Pascal VOC's colour map (bit-interleaved), 256 RGB triples flattened."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def test_pascal_voc_palette_png_is_read_as_indices(tmp_path: Path) -> None:
    src = tmp_path / "VOC2012"
    indices = np.zeros((20, 24), np.uint8)
    indices[4:16, 6:18] = 15   # person: mask rows 2..7, columns 3..8: 6 x 6 = 36 px
    indices[3, 5:19] = 255     # boundary around it: unlabelled
    indices[16, 5:19] = 255
    mask = Image.frombytes("P", (24, 20), indices.tobytes())
    mask.putpalette(voc_palette())
    (src / "SegmentationClass").mkdir(parents=True)
    mask.save(src / "SegmentationClass" / "2007_000032.png")
    save_rgb(src / "JPEGImages" / "2007_000032.jpg", 20, 24)
    out = tmp_path / "out"
    assert convert("semantic", src, "--out", out, "--classes", "voc", "--images", "JPEGImages",
                   "--masks", "SegmentationClass", "--size", "keep", "--workers", "1") == 0
    assert verify(out) == []
    data = BrodenDataset(out)
    assert len(data.labels) == 20 and data.labels.at[15, "name"] == "person"
    assert labels_of(data)["person"] == (15, "object", 1, pytest.approx(36 / 120, abs=1e-6))
    assert labels_of(data)["cat"] == (8, "object", 0, 0.0)
    expected = np.zeros((10, 12), np.int32)
    expected[2:8, 3:9] = 15
    np.testing.assert_array_equal(data.pixel_labels(0, "object"), expected[None])


def test_cityscapes_label_ids_with_suffixes(tmp_path: Path) -> None:
    src = tmp_path / "cityscapes"
    stem = "frankfurt_000000_000294"
    ids = np.full((16, 32), 1, np.uint8)   # ego vehicle: unlabelled
    ids[0:6, :] = 23                        # sky: mask rows 0..2 -> 3 x 16 = 48 px
    ids[6:12, 0:16] = 26                    # car: mask rows 3..5, columns 0..7 -> 24 px
    ids[6:12, 16:] = 7                      # road: 24 px
    save_rgb(src / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png", 16, 32)
    save_mask(src / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelIds.png", ids)
    save_rgb(src / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_color.png", 16, 32)   # not a mask: ignored
    out = tmp_path / "out"
    assert convert("semantic", src, "--out", out, "--classes", "cityscapes", "--images", "leftImg8bit",
                   "--masks", "gtFine", "--image-suffix", "_leftImg8bit", "--mask-suffix", "_gtFine_labelIds",
                   "--size", "keep", "--workers", "1") == 0
    assert verify(out) == []
    data = BrodenDataset(out)
    labels = labels_of(data)
    assert labels["road"] == (1, "object", 1, pytest.approx(24 / 128, abs=1e-6))
    assert labels["sky"] == (17, "object", 1, pytest.approx(48 / 128, abs=1e-6))
    assert labels["car"] == (20, "object", 1, pytest.approx(24 / 128, abs=1e-6))
    assert data.image_ids == [f"val/frankfurt/{stem}.jpg"] and data.splits == ["val"]
    assert (out / "skipped.csv").read_text() == "file,reason\n"


# --- COCO panoptic --------------------------------------------------------------------------------

def coco_set(root: Path) -> Path:
    """One 24 x 32 image with two segments: a person (thing, id 5) and grass (stuff, id 300 = R 44 + 256 G 1)."""
    rgb = np.zeros((24, 32, 3), np.uint8)
    rgb[0:12, 0:16] = (5, 0, 0)     # person: mask rows 0..5, columns 0..7: 48 px
    rgb[12:24, :] = (44, 1, 0)      # grass: mask rows 6..11: 6 x 16 = 96 px
    (root / "annotations" / "panoptic_val2017").mkdir(parents=True)
    Image.fromarray(rgb).save(root / "annotations" / "panoptic_val2017" / "000000000139.png")
    save_rgb(root / "val2017" / "000000000139.jpg", 24, 32)
    panoptic = {
        "images": [{"id": 139, "file_name": "000000000139.jpg", "height": 24, "width": 32}],
        "annotations": [{"image_id": 139, "file_name": "000000000139.png", "segments_info": [
            {"id": 5, "category_id": 1, "iscrowd": 0, "area": 192},
            {"id": 300, "category_id": 193, "iscrowd": 0, "area": 384}]}],
        "categories": [{"id": 1, "name": "person", "supercategory": "person", "isthing": 1},
                       {"id": 187, "name": "sky-other-merged", "supercategory": "sky", "isthing": 0},
                       {"id": 193, "name": "grass-merged", "supercategory": "plant", "isthing": 0}],
    }
    path = root / "annotations" / "panoptic_val2017.json"
    path.write_text(json.dumps(panoptic))
    return path


def test_coco_panoptic_things_are_objects_and_stuff_follows_the_mapping(tmp_path: Path) -> None:
    panoptic = coco_set(tmp_path / "coco")
    out = tmp_path / "out"
    assert convert("coco-panoptic", panoptic, "--out", out, "--size", "keep", "--workers", "1") == 0
    assert verify(out) == []
    data = BrodenDataset(out)
    assert labels_of(data) == {"person": (1, "object", 1, pytest.approx(48 / 192, abs=1e-6)),
                               "sky-other-merged": (2, "object", 0, 0.0),   # DEFAULT_STUFF_CATEGORIES: object
                               "grass-merged": (3, "material", 1, pytest.approx(96 / 192, abs=1e-6))}
    assert data.image_ids == ["000000000139.jpg"] and data.splits == ["val"]
    person = np.zeros((12, 16), np.int32)
    person[0:6, 0:8] = 1
    np.testing.assert_array_equal(data.pixel_labels(0, "object"), person[None])
    grass = np.zeros((12, 16), np.int32)
    grass[6:, :] = 3
    np.testing.assert_array_equal(data.pixel_labels(0, "material"), grass[None])

    overrides = tmp_path / "categories.csv"
    overrides.write_text("name,category\ngrass-merged,scene\n")
    out2 = tmp_path / "out2"
    assert convert("coco-panoptic", panoptic, "--out", out2, "--size", "keep", "--categories", overrides) == 0
    assert verify(out2) == []
    data = BrodenDataset(out2)
    assert labels_of(data)["grass-merged"] == (3, "scene", 1, 1.0)
    assert data.image_labels(0, "scene") == [3] and not data.has_category(0, "material")


# --- bad input, --strict, resume ------------------------------------------------------------------

def bad_set(root: Path) -> Path:
    """a: good; b: mask 10 x 10 for a 20 x 20 image; c: class 9 not in the table; d: image bytes are garbage."""
    for name in "abcd":
        save_rgb(root / "images" / f"{name}.png", 20, 20)
        save_mask(root / "masks" / f"{name}.png", np.ones((20, 20), np.uint8))
    save_mask(root / "masks" / "b.png", np.ones((10, 10), np.uint8))
    save_mask(root / "masks" / "c.png", np.full((20, 20), 9, np.uint8))
    (root / "images" / "d.png").write_bytes(b"not a png at all")
    (root / "classes.csv").write_text("index,name\n1,thing\n")
    return root


def test_bad_inputs_are_skipped_and_listed_or_stop_with_strict(tmp_path: Path, capsys) -> None:
    src = bad_set(tmp_path / "src")
    out = tmp_path / "out"
    assert convert("semantic", src, "--out", out, "--classes", src / "classes.csv", "--size", "keep") == 0
    line = capsys.readouterr().out.strip()
    assert line == f"converted 1 images with 1 labels into {out}, skipped 3 (listed in {out / 'skipped.csv'})"
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped["file"].tolist() == [str(src / "images" / "d.png"), str(src / "masks" / "b.png"),
                                        str(src / "masks" / "c.png")]
    assert "cannot read the image" in skipped["reason"][0]
    assert "mask size 10x10 (WxH) differs from the image size 20x20" in skipped["reason"][1]
    assert skipped["reason"][2] == "class indices [9] are not in the class table"
    assert verify(out) == [] and BrodenDataset(out).image_ids == ["a.jpg"]

    strict = tmp_path / "strict"
    assert convert("semantic", src, "--out", strict, "--classes", src / "classes.csv", "--size", "keep",
                   "--strict", "--workers", "1") == 2
    stderr = capsys.readouterr().err.strip()   # tqdm's bar, then the one error line
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [stderr.splitlines()[-1]]
    assert errors[0].startswith(f"error: bad input {src / 'masks' / 'b.png'}: mask size 10x10")
    assert (strict / WORK_DIR / "records" / "a.json").is_file() and not (strict / "index.csv").exists()
    assert convert("semantic", src, "--out", strict, "--classes", src / "classes.csv", "--size", "keep") == 0
    assert "(1 already converted earlier)" in capsys.readouterr().out
    assert all_files(strict) == all_files(out)


def test_an_interrupted_conversion_resumes_to_the_one_shot_result(tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    for i in range(6):
        rng = np.random.default_rng(i)
        path = src / "images" / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(path)
        save_mask(src / "masks" / f"img{i}.png", rng.integers(0, 3, (32, 48)))
    (src / "classes.csv").write_text("index,name,category\n1,left,object\n2,right,material\n")
    one_shot = tmp_path / "one_shot"
    assert convert("semantic", src, "--out", one_shot, "--classes", src / "classes.csv") == 0

    part = tmp_path / "part"            # a first run that saw half the images, then a killed one
    for sub in ("images", "masks"):
        (part / sub).mkdir(parents=True)
        for i in range(3):
            shutil.copy(src / sub / f"img{i}.png", part / sub / f"img{i}.png")
    resumed = tmp_path / "resumed"
    assert convert("semantic", part, "--out", resumed, "--classes", src / "classes.csv") == 0
    (resumed / "index.csv").unlink()                                   # killed before the tables
    (resumed / WORK_DIR / "records" / "img1.json").unlink()            # ... and in the middle of img1
    (resumed / "images" / "img1.tmp123.jpg").write_bytes(b"half a jpeg")
    capsys.readouterr()
    assert convert("semantic", src, "--out", resumed, "--classes", src / "classes.csv") == 0
    assert "converted 6 images (2 already converted earlier)" in capsys.readouterr().out
    assert not list(resumed.rglob("*.tmp*")), "leftover temporary files are removed"
    assert all_files(resumed) == all_files(one_shot)

    other = src / "other_classes.csv"
    other.write_text("index,name,category\n1,left,object\n2,right,object\n")
    assert convert("semantic", src, "--out", resumed, "--classes", other) == 1
    assert "holds a conversion with other settings" in capsys.readouterr().err


# --- a planted-detector dissection on a converted set --------------------------------------------

def planted_semantic_set(root: Path, n_images: int = 40, size: int = 224) -> Path:
    """Grey images with a small red rectangle (rust), a small yellow disc (pollen), a green band (leaf), pixel noise.

    Colours are the generator's red-c, yellow-c and green-c, which PlantedDetectors' colour units look for.
    """
    from data_prep.synthetic_broden import COLORS

    y, x = np.mgrid[0:size, 0:size]
    for i in range(n_images):
        rng = np.random.default_rng(100 + i)
        mask = np.zeros((size, size), np.uint8)
        mask[int(rng.integers(150, 180)):, :] = 3
        top, left = rng.integers(10, 100, size=2)
        h, w = rng.integers(12, 24, size=2)
        mask[top:top + h, left:left + w] = 1
        cy, cx, r = rng.integers(40, 140), rng.integers(130, 190), rng.integers(6, 12)
        mask[(y - cy) ** 2 + (x - cx) ** 2 <= r * r] = 2
        palette = np.array([COLORS["grey-c"], COLORS["red-c"], COLORS["yellow-c"], COLORS["green-c"]], np.float32)
        rgb = palette[mask] + rng.normal(0, 6, (size, size, 3))
        path = root / "images" / f"photo_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8)).save(path)
        save_mask(root / "masks" / f"photo_{i:03d}.png", mask)
    (root / "classes.csv").write_text("index,name,category\n1,rust,object\n2,pollen,object\n3,leaf,material\n")
    return root


def test_planted_detectors_on_a_converted_set_are_labelled_with_the_converted_names(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR
    from dissect.layout import RunLayout
    from dissect.pipeline import run_pipeline

    src = planted_semantic_set(tmp_path / "src")
    probe = tmp_path / "probe"
    assert convert("semantic", src, "--out", probe, "--classes", src / "classes.csv", "--size", "224") == 0
    overrides = ["model=default", "model.name=planted", "model.module._target_=planted_models.PlantedDetectors",
                 "~model.module.num_classes", "+model.module.colors=[red-c,yellow-c]", "+model.module.stripes=false",
                 "model.checkpoint=null", "model.input_size=224", "model.mean=[0,0,0]", "model.std=[1,1,1]",
                 "layers=[units]", "dataset=broden", f"dataset.root={probe}", f"out_dir={tmp_path / 'run'}",
                 "stages=[extract,thresholds,tally]"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    run_pipeline(cfg)
    layout = RunLayout(tmp_path / "run")
    table = pd.read_csv(layout.tally_csv("units"))
    iou = np.load(layout.iou_npy("units"))
    print(table[["unit", "label", "iou", "category"]], iou)
    assert pd.read_csv(layout.concepts_csv("units"))["name"].tolist() == ["rust", "pollen", "leaf"]
    assert table["label"].tolist() == ["rust", "pollen"]
    assert table["category"].tolist() == ["object", "object"]
    assert (table["iou"] > 0.2).all()
    runner_up = np.sort(iou, axis=1)[:, -2]
    assert (table["iou"].to_numpy() > 5 * runner_up).all()
