"""The synthetic Broden generator: planted truth read back through BrodenDataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.synthetic_broden import (
    COLORS,
    LABEL_NUMBER,
    LABELS,
    SCENES,
    generate,
    is_complete,
    plan_image,
    render,
)
from data_prep.verify_broden import verify
from broden_counts import label_statistics
from dissect.broden import IMAGE_CATEGORIES, PIXEL_CATEGORIES, BrodenDataset

N_IMAGES = 40
SIZE = 64
SEED = 3


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("syn") / "broden", n_images=N_IMAGES, size=SIZE, seed=SEED, workers=2)


def all_files(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_reader_returns_planted_masks_and_labels(built: Path) -> None:
    data = BrodenDataset(built)
    assert len(data) == N_IMAGES
    for i in range(N_IMAGES):
        image, masks, image_labels = render(plan_image(SEED, i, SIZE))
        assert data.mask_size(i) == (SIZE // 2, SIZE // 2)
        for category in PIXEL_CATEGORIES:
            np.testing.assert_array_equal(data.pixel_labels(i, category), masks[category])
            assert data.has_category(i, category) == (len(masks[category]) > 0)
        for category in IMAGE_CATEGORIES:
            assert data.image_labels(i, category) == image_labels[category]
        jpeg = np.asarray(Image.open(data.image_path(i)), dtype=np.float64)
        assert np.abs(jpeg - image).mean() < 4.5  # JPEG at quality 95, 4:4:4, stays close to the rendered image


def test_every_image_has_one_whole_image_label_from_its_plan(built: Path) -> None:
    data = BrodenDataset(built)
    kinds = []
    for i in range(N_IMAGES):
        plan = plan_image(SEED, i, SIZE)
        scene, texture = data.image_labels(i, "scene"), data.image_labels(i, "texture")
        assert len(scene) + len(texture) == 1
        if plan.scene is not None:
            assert scene == [LABEL_NUMBER[plan.scene.name]]
            assert data.category_of(scene[0]) == "scene"
            assert data.has_category(i, "object") and data.has_category(i, "material")
            kinds.append("scene")
        else:
            assert texture == [LABEL_NUMBER[plan.texture.name]]
            assert not any(data.has_category(i, c) for c in ("object", "part", "material", "scene"))
            kinds.append("texture")
        assert data.splits[i] == ("val" if i % 5 == 4 else "train")
    assert 0 < kinds.count("texture") < kinds.count("scene")


# A point well inside each object (offset from its centre in units of its scale) and the part colour there.
INTERIOR = {
    "ball": (0.0, 0.0, 0),
    "box": (0.0, 0.0, 0),
    "pyramid": (0.0, 0.15, 0),
    "house": (-0.25, 0.2, 0),  # wall
    "tree": (0.0, -0.15, 1),  # crown
    "car": (0.0, -0.05, 0),  # body
}


def test_geometry_of_the_plan_shows_in_masks_and_pixels(built: Path) -> None:
    """A point inside the last-drawn object carries its label and its colour, in the masks and the JPEG."""
    data = BrodenDataset(built)
    side = SIZE // 2
    checked = 0
    for i in range(N_IMAGES):
        plan = plan_image(SEED, i, SIZE)
        if plan.scene is None:
            continue
        top_name, bottom_name = SCENES[plan.scene.name]
        material = data.pixel_labels(i, "material")[0]
        assert material[-1, 0] in (0, LABEL_NUMBER[bottom_name])  # bottom-left corner: ground or an object
        if top_name == "sky":
            assert LABEL_NUMBER["sky"] in data.pixel_labels(i, "object")[0, 0, :]
        else:
            assert LABEL_NUMBER[top_name] in material[0, :]
        obj = plan.scene.objects[-1]
        dx, dy, colour_index = INTERIOR[obj.name]
        px, py = obj.cx + dx * obj.scale, obj.cy + dy * obj.scale
        if not (0.05 < px < 0.95 and 0.05 < py < 0.95):
            continue
        colour = obj.colors[colour_index]
        row, col = int(py * side), int(px * side)
        assert data.pixel_labels(i, "object")[0, row, col] == LABEL_NUMBER[obj.name]
        assert data.pixel_labels(i, "color")[0, row, col] == LABEL_NUMBER[colour]
        jpeg = np.asarray(Image.open(data.image_path(i)), dtype=np.float64)
        y, x = int(py * SIZE), int(px * SIZE)
        assert np.abs(jpeg[y - 1 : y + 2, x - 1 : x + 2].mean(axis=(0, 1)) - COLORS[colour]).max() < 20
        checked += 1
    assert checked >= N_IMAGES // 2


def test_colour_masks_agree_with_texture_pixels(built: Path) -> None:
    """In texture images the mean JPEG colour of each colour mask is that colour's RGB value."""
    data = BrodenDataset(built)
    checked = 0
    for i in range(N_IMAGES):
        if not data.image_labels(i, "texture"):
            continue
        jpeg = np.asarray(Image.open(data.image_path(i)), dtype=np.float64)
        rows = np.floor((np.arange(SIZE // 2) + 0.5) * 2).astype(int)
        sampled = jpeg[rows][:, rows]
        colour = data.pixel_labels(i, "color")[0]
        assert set(np.unique(colour).tolist()) == {LABEL_NUMBER[c] for c in plan_image(SEED, i, SIZE).texture.colors}
        for number in np.unique(colour):
            name = LABELS[number - 1][0]
            assert np.abs(sampled[colour == number].mean(axis=0) - COLORS[name]).max() < 25
        checked += 1
    assert checked > 0


def test_label_statistics_match_the_masks(built: Path) -> None:
    data = BrodenDataset(built)
    frequency, coverage = label_statistics(data)
    assert data.labels["frequency"].tolist() == frequency[1:].tolist()
    np.testing.assert_allclose(data.labels["coverage"].to_numpy(), coverage[1:], atol=1e-6)
    assert [(name, data.category_of(k + 1)) for k, (name, _) in enumerate(LABELS)] == list(LABELS)
    assert data.categories.loc["part", "frequency"] == frequency[[LABEL_NUMBER[p] for p in ("wall", "roof", "door", "trunk", "crown", "body", "wheel")]].sum()


def test_verify_finds_no_problem(built: Path) -> None:
    assert verify(built) == []
    assert is_complete(built, N_IMAGES, SIZE, SEED)
    assert not is_complete(built, N_IMAGES, SIZE, SEED + 1)


def test_builds_are_deterministic_per_seed(built: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", n_images=N_IMAGES, size=SIZE, seed=SEED, workers=1)
    assert all_files(again) == all_files(built)
    other = generate(tmp_path / "other", n_images=N_IMAGES, size=SIZE, seed=SEED + 1, workers=2)
    assert all_files(other) != all_files(built)
    assert (other / "index.csv").read_text() != (built / "index.csv").read_text()


def test_partial_build_is_redone_and_finished_build_refused(tmp_path: Path) -> None:
    root = tmp_path / "broden"
    leftover = tmp_path / "broden.partial"
    (leftover / "images").mkdir(parents=True)
    (leftover / "images" / "stale.png").write_bytes(b"stale")
    generate(root, n_images=3, size=32, seed=0, workers=1)
    assert not leftover.exists()
    assert not (root / "images" / "stale.png").exists()
    assert len(BrodenDataset(root)) == 3
    with pytest.raises(FileExistsError, match="already exists and holds a build with .*'n_images': 3"):
        generate(root, n_images=4, size=32, seed=0, workers=1)


def test_mask_size_for_odd_image_size() -> None:
    image, masks, _ = render(plan_image(0, 1, 227))
    assert image.shape == (227, 227, 3)
    assert all(m.shape[1:] == (113, 113) for m in masks.values())
