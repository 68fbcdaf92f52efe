"""verify() reports planted defects of a Broden directory, naming the files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.synthetic_broden import generate
from data_prep.verify_broden import verify
from dissect.broden import BrodenDataset


def test_reports_missing_mask_and_unknown_label(tmp_path: Path) -> None:
    root = generate(tmp_path / "broden", n_images=6, size=32, seed=1, workers=1)
    data = BrodenDataset(root)
    missing = root / "images" / data.mask_files(1, "object")[0]
    missing.unlink()
    planted = root / "images" / data.mask_files(2, "color")[0]
    rgb = np.array(Image.open(planted))
    rgb[0, 0] = (999 % 256, 999 // 256, 0)  # label 999; the set has 39 labels
    Image.fromarray(rgb).save(planted)

    problems = verify(root)

    assert len(problems) == 2, problems
    assert "line 3" in problems[0] and str(missing) in problems[0] and "does not exist" in problems[0]
    assert "line 4" in problems[1] and str(planted) in problems[1] and "[999]" in problems[1]


def test_reports_table_inconsistencies_and_broken_image(tmp_path: Path) -> None:
    root = generate(tmp_path / "broden", n_images=3, size=32, seed=1, workers=1)
    category = (root / "category.csv").read_text().replace("part,19,25,7,", "part,19,26,7,")
    (root / "category.csv").write_text(category)
    codes = (root / "c_texture.csv").read_text() + "6,40,woven,0,0.000000\n"
    (root / "c_texture.csv").write_text(codes)
    image = root / "images" / BrodenDataset(root).image_ids[0]
    image.write_bytes(image.read_bytes()[:100])

    problems = verify(root)

    expected = [
        "category.csv row part: first, last, count are (19, 26, 7), but",
        "c_texture.csv lists label numbers [40] that are not in label.csv",
        "category.csv row texture: first, last, count are (35, 39, 5), but",
        "c_texture.csv holds label numbers [35, 36, 37, 38, 39, 40], but label.csv lists category texture for",
        f"{image} cannot be decoded",
    ]
    assert len(problems) == len(expected), problems
    for problem, text in zip(problems, expected):
        assert text in problem


def test_unreadable_tables_give_one_problem(tmp_path: Path) -> None:
    assert verify(tmp_path / "absent") == [f"Broden directory {tmp_path / 'absent'} does not exist or is not a directory"]
