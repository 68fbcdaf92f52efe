"""BrodenDataset on a tiny hand-written Broden directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dissect.broden import BrodenDataset, BrodenFormatError

N_LABELS = 300
NAMED = {
    1: ("red-c", "color(2)"),
    2: ("blue-c", "color(1)"),
    3: ("car", "object(2)"),
    4: ("wheel", "part(1)"),
    5: ("door", "part(1)"),
    6: ("fabric", "material(36);object(3)"),
    7: ("street", "scene(1)"),
    8: ("striped", "texture(1)"),
    9: ("dotted", "texture(1)"),
    10: ("glass", "object(2);material(5)"),
    11: ("tie", "part(4);object(4)"),
    300: ("far", "object(1)"),
}
INDEX = """image,split,ih,iw,sh,sw,color,object,part,material,scene,texture
a/img0.jpg,train,4,6,2,3,a/img0_color.png,a/img0_object.png,a/img0_part_1.png;a/img0_part_2.png,,7,
a/img1.jpg,val,4,6,2,3,a/img1_color.png,,,,,8;9
"""


def write_rg_png(path: Path, red: list[list[int]], green: list[list[int]]) -> None:
    """Write an RGB PNG with the given R and G channels (B = 0)."""
    rgb = np.zeros((len(red), len(red[0]), 3), np.uint8)
    rgb[:, :, 0] = red
    rgb[:, :, 1] = green
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def write_broden(root: Path, index: str = INDEX) -> Path:
    """A two-image Broden directory with hand-written masks; returns root."""
    images = root / "images" / "a"
    images.mkdir(parents=True)
    (root / "index.csv").write_text(index)
    rows = ["number,name,category,frequency,coverage,syns"]
    for number in range(1, N_LABELS + 1):
        name, category = NAMED.get(number, (f"label{number}", "object(0)"))
        rows.append(f"{number},{name},{category},1,0.5,")
    (root / "label.csv").write_text("\n".join(rows) + "\n")
    (root / "category.csv").write_text("name,first,last,count,frequency\ncolor,1,2,2,3\nobject,3,300,2,4\n")
    (root / "c_color.csv").write_text("code,number,name,frequency,coverage\n1,1,red-c,2,0.5\n2,2,blue-c,1,0.25\n")
    (root / "c_object.csv").write_text("code,number,name,frequency,coverage\n1,3,car,2,0.5\n2,300,far,1,0.1\n")
    for name in ("img0", "img1"):
        Image.new("RGB", (6, 4), (10, 20, 30)).save(images / f"{name}.jpg")
    write_rg_png(images / "img0_color.png", [[1, 1, 0], [2, 0, 0]], [[0, 0, 0], [0, 0, 0]])
    # label 300 = 44 + 256 * 1
    write_rg_png(images / "img0_object.png", [[3, 3, 0], [0, 44, 44]], [[0, 0, 0], [0, 1, 1]])
    write_rg_png(images / "img0_part_1.png", [[4, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]])
    write_rg_png(images / "img0_part_2.png", [[0, 5, 0], [0, 0, 5]], [[0, 0, 0], [0, 0, 0]])
    write_rg_png(images / "img1_color.png", [[2, 2, 2], [1, 1, 1]], [[0, 0, 0], [0, 0, 0]])
    return root


def test_decodes_hand_written_masks(tmp_path: Path) -> None:
    data = BrodenDataset(write_broden(tmp_path))
    assert len(data) == 2
    assert data.image_ids == ["a/img0.jpg", "a/img1.jpg"]
    assert data.splits == ["train", "val"]
    assert data.image_path(1) == tmp_path / "images" / "a" / "img1.jpg"
    assert data.mask_size(0) == (2, 3)
    assert data.image_size(0) == (4, 6)
    assert data.mask_files(0, "part") == ["a/img0_part_1.png", "a/img0_part_2.png"]

    color = data.pixel_labels(0, "color")
    assert color.dtype == np.int32
    np.testing.assert_array_equal(color, [[[1, 1, 0], [2, 0, 0]]])
    np.testing.assert_array_equal(data.pixel_labels(0, "object"), [[[3, 3, 0], [0, 300, 300]]])
    np.testing.assert_array_equal(data.pixel_labels(0, "part"), [[[4, 0, 0], [0, 0, 0]], [[0, 5, 0], [0, 0, 5]]])
    assert data.pixel_labels(0, "material").shape == (0, 2, 3)
    assert data.pixel_labels(1, "part").shape == (0, 2, 3)
    np.testing.assert_array_equal(data.pixel_labels(1, "color"), [[[2, 2, 2], [1, 1, 1]]])

    assert data.image_labels(0, "scene") == [7]
    assert data.image_labels(0, "texture") == []
    assert data.image_labels(1, "texture") == [8, 9]
    assert [data.has_category(0, c) for c in ("color", "part", "material", "scene", "texture")] == [
        True, True, False, True, False,
    ]


def test_labels_and_primary_category(tmp_path: Path) -> None:
    data = BrodenDataset(write_broden(tmp_path))
    assert len(data.label_names) == N_LABELS + 1
    assert data.label_names[:4] == ["-", "red-c", "blue-c", "car"]
    assert data.label_names[300] == "far"
    assert data.category_of(6) == "material"  # material(36);object(3)
    assert data.category_of(10) == "material"  # object(2);material(5): larger count listed second
    assert data.category_of(11) == "part"  # part(4);object(4): tie goes to the first listed
    assert data.category_of(300) == "object"
    assert data.category_counts[6] == {"material": 36, "object": 3}
    assert data.labels.loc[1, "frequency"] == 1 and data.labels.loc[1, "coverage"] == 0.5
    assert list(data.categories.index) == ["color", "object"]
    assert data.categories.loc["object", "last"] == 300
    assert data.codes["object"].loc[2, "number"] == 300
    with pytest.raises(KeyError, match="label number 301"):
        data.category_of(301)


def test_wrong_calls_name_what_is_allowed(tmp_path: Path) -> None:
    data = BrodenDataset(write_broden(tmp_path))
    with pytest.raises(ValueError, match="pixel category"):
        data.pixel_labels(0, "scene")
    with pytest.raises(ValueError, match="image category"):
        data.image_labels(0, "object")
    with pytest.raises(IndexError, match="0..1"):
        data.pixel_labels(2, "color")


def test_malformed_header(tmp_path: Path) -> None:
    root = write_broden(tmp_path, INDEX.replace("image,split,", "img,split,", 1))
    with pytest.raises(BrodenFormatError, match=r"index\.csv has header .* lacks the columns \['image'\]"):
        BrodenDataset(root)


def test_missing_directory_and_index(tmp_path: Path) -> None:
    with pytest.raises(BrodenFormatError, match="does not exist or is not a directory"):
        BrodenDataset(tmp_path / "nowhere")
    root = write_broden(tmp_path / "broden")
    (root / "index.csv").unlink()
    with pytest.raises(BrodenFormatError, match=r"index\.csv does not exist"):
        BrodenDataset(root)


def test_bad_category_cell(tmp_path: Path) -> None:
    root = write_broden(tmp_path)
    text = (root / "label.csv").read_text().replace("color(2)", "colour(2)", 1)
    (root / "label.csv").write_text(text)
    with pytest.raises(BrodenFormatError, match=r"label\.csv line 2: category entry 'colour\(2\)'"):
        BrodenDataset(root)


def test_missing_and_wrongly_sized_masks_name_file_and_row(tmp_path: Path) -> None:
    root = write_broden(tmp_path)
    (root / "images" / "a" / "img0_part_2.png").unlink()
    write_rg_png(root / "images" / "a" / "img1_color.png", [[1, 1], [1, 1]], [[0, 0], [0, 0]])
    data = BrodenDataset(root)
    with pytest.raises(BrodenFormatError, match=r"line 2 \(image 0, a/img0\.jpg\), part: mask file .*img0_part_2\.png does not exist"):
        data.pixel_labels(0, "part")
    with pytest.raises(BrodenFormatError, match=r"line 3 .*img1_color\.png has size \(2, 2\), expected \(sh, sw\) = \(2, 3\)"):
        data.pixel_labels(1, "color")
