"""The procedural Broden-like generator (demo and broden-scale profiles): planted truth, coverage, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_prep import broden_like
from data_prep.__main__ import main as data_prep_main
from data_prep.broden_like import DEMO_COVERAGE_BOUND, catalogue, generate, is_complete, plan_image, render
from data_prep.synthetic_broden import COLORS
from data_prep.verify_broden import verify
from broden_counts import label_statistics
from dissect.broden import CATEGORIES, IMAGE_CATEGORIES, PIXEL_CATEGORIES, BrodenDataset, image_concepts

N_IMAGES = 300
SIZE = 96
SEED = 5
BRODEN_COUNTS = {"color": 11, "object": 580, "part": 230, "material": 30, "scene": 470, "texture": 47}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 300-image broden-scale set at 96 px."""
    return generate(tmp_path_factory.mktemp("bl") / "broden", "broden-scale", n_images=N_IMAGES, size=SIZE,
                    seed=SEED, workers=2)


def all_files(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_reader_returns_the_re_rendered_masks_and_labels(built: Path) -> None:
    """Images re-rendered from their plans give exactly the masks and labels the reader decodes."""
    data = BrodenDataset(built)
    assert len(data) == N_IMAGES
    n_labels = len(data.labels)
    kinds = set()
    for i in range(0, N_IMAGES, 10):
        plan = plan_image("broden-scale", SEED, i, SIZE)
        image, masks, image_labels = render(plan)
        assert data.mask_size(i) == (SIZE // 2, SIZE // 2) and data.image_size(i) == (SIZE, SIZE)
        for category in PIXEL_CATEGORIES:
            np.testing.assert_array_equal(data.pixel_labels(i, category), masks[category])
            assert data.has_category(i, category) == (len(masks[category]) > 0)
        for category in IMAGE_CATEGORIES:
            assert data.image_labels(i, category) == image_labels[category]
        concepts = image_concepts(data, i, n_labels)
        stacked = np.concatenate([masks[c].reshape(len(masks[c]), (SIZE // 2) ** 2) for c in PIXEL_CATEGORIES])
        for number, mask in zip(concepts.labels, concepts.masks):
            whole = any(number in image_labels[c] for c in IMAGE_CATEGORIES)
            np.testing.assert_array_equal(mask, True if whole else (stacked == number).any(axis=0))
        jpeg = np.asarray(Image.open(data.image_path(i)), dtype=np.float64)
        assert np.abs(jpeg - image).mean() < 8  # JPEG quality 90, 4:4:4, of an image with pixel noise
        colour = masks["color"][0]
        sampled = jpeg[1::2, 1::2]  # mask pixel j shows image pixel 2j + 1 (nearest neighbour at half size)
        for number in set(np.unique(colour).tolist()) - {0}:
            if (colour == number).sum() >= 50:
                rgb = COLORS[data.label_names[number]]
                assert np.abs(sampled[colour == number].mean(axis=0) - rgb).max() < 25
        kinds.add("scene" if plan.scene is not None else "texture")
        if plan.scene is not None:
            cat = catalogue("broden-scale")
            assert image_labels["scene"] == [cat.first_number["scene"] + plan.scene.cls]
            drawn = {cat.first_number["object"] + o.cls for o in plan.scene.objects}
            assert set(np.unique(masks["object"]).tolist()) - {0} <= drawn
        else:
            assert [data.has_category(i, c) for c in ("object", "part", "material")] == [False] * 3
    assert kinds == {"scene", "texture"}


def test_category_counts_are_the_catalogue(built: Path) -> None:
    data = BrodenDataset(built)
    cat = catalogue("broden-scale")
    assert data.categories["count"].to_dict() == BRODEN_COUNTS
    assert {c: len(data.codes[c]) for c in CATEGORIES} == BRODEN_COUNTS
    assert {c: cat.count(c) for c in CATEGORIES} == BRODEN_COUNTS
    assert list(zip(data.labels["name"], [c for _, c in cat.labels])) == list(cat.labels)
    assert data.labels["name"].is_unique
    # a part is named after its object, and only that object's pixels carry it
    for obj, numbers in zip(cat.objects, cat.part_numbers):
        assert [cat.labels[n - 1][0] for n in numbers] == [f"{obj.name}-{p}" for p in obj.parts]
    demo = catalogue("demo")
    assert {c: demo.count(c) for c in CATEGORIES} == {"color": 11, "object": 24, "part": 12, "material": 24,
                                                       "scene": 32, "texture": 10}


def test_parts_lie_inside_their_objects(built: Path) -> None:
    data = BrodenDataset(built)
    cat = catalogue("broden-scale")
    owner = {n: cat.first_number["object"] + k for k, numbers in enumerate(cat.part_numbers) for n in numbers}
    checked = 0
    for i in range(N_IMAGES):
        parts = data.pixel_labels(i, "part")
        if not len(parts):
            continue
        objects = data.pixel_labels(i, "object")[0]
        for layer in parts:
            for number in set(np.unique(layer).tolist()) - {0}:
                assert (objects[layer == number] == owner[number]).all()
                checked += 1
    assert checked > 10


def test_label_frequencies_match_the_index(built: Path) -> None:
    """label.csv frequency and coverage equal counts made independently from the index and the masks."""
    data = BrodenDataset(built)
    frequency, coverage = label_statistics(data)
    assert data.labels["frequency"].tolist() == frequency[1:].tolist()
    np.testing.assert_allclose(data.labels["coverage"].to_numpy(), coverage[1:], atol=1e-5)
    for category in CATEGORIES:
        numbers = data.codes[category]["number"].to_numpy()
        assert data.categories.loc[category, "frequency"] == frequency[numbers].sum()
    assert {data.splits[i] for i in range(4, N_IMAGES, 5)} == {"val"}


def test_broden_scale_has_a_long_tail(built: Path) -> None:
    """Most concepts cover well under 1% of all pixels; a few common ones cover more."""
    labels = BrodenDataset(built).labels
    share = labels["coverage"] / N_IMAGES
    assert (share < 0.01).mean() > 0.9
    for category in ("object", "scene"):
        in_category = share[labels["category"] == category]
        assert in_category.median() < 0.002
        assert in_category.max() > 10 * in_category.median()


def test_demo_coverage_stays_under_the_bound() -> None:
    """No demo concept covers more than DEMO_COVERAGE_BOUND of all mask pixels (whole-image labels: 1 per image)."""
    cat = catalogue("demo")
    n = 1000
    coverage = np.zeros(len(cat.labels) + 1)
    for i in range(n):
        _, masks, image_labels = render(plan_image("demo", 0, i, 64))
        for layers in masks.values():
            for number in set(np.unique(layers).tolist()) - {0}:
                coverage[number] += (layers == number).any(axis=0).mean()
        for numbers in image_labels.values():
            coverage[numbers] += 1.0
    share = coverage[1:] / n
    assert share.max() <= DEMO_COVERAGE_BOUND
    assert (share > 0).all()  # every demo concept occurs


def test_verify_passes_and_is_complete_checks_the_parameters(built: Path) -> None:
    assert verify(built) == []
    assert json.loads((built / "synthetic.json").read_text()) == {
        "version": 1, "profile": "broden-scale", "n_images": N_IMAGES, "size": SIZE, "seed": SEED}
    assert is_complete(built, "broden-scale", N_IMAGES, SIZE, SEED)
    assert not is_complete(built, "demo", N_IMAGES, SIZE, SEED)
    assert not is_complete(built, "broden-scale", N_IMAGES, SIZE, SEED + 1)
    assert not (built / ".build").exists()


def test_builds_are_deterministic_per_seed(tmp_path: Path) -> None:
    first = generate(tmp_path / "a", "demo", n_images=30, size=64, seed=1, workers=2, chunk_size=8)
    again = generate(tmp_path / "b", "demo", n_images=30, size=64, seed=1, workers=1, chunk_size=16)
    other = generate(tmp_path / "c", "demo", n_images=30, size=64, seed=2, workers=2, chunk_size=8)
    assert all_files(again) == all_files(first)
    assert (other / "index.csv").read_text() != (first / "index.csv").read_text()
    assert all_files(other) != all_files(first)


class Killed(Exception):
    """Stands for a build killed half way."""


def counting_render(monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> list[int]:
    """Patch broden_like.render to record the image numbers it renders (raising Killed at ``fail_at``)."""
    rendered: list[int] = []
    original = render  # the real one, imported before any patch

    def render_counted(plan):
        if plan.index == fail_at:
            raise Killed(f"killed at image {plan.index}")
        rendered.append(plan.index)
        return original(plan)

    monkeypatch.setattr(broden_like, "render", render_counted)
    return rendered


def test_a_killed_build_resumes_without_redoing_finished_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capfd: pytest.CaptureFixture) -> None:
    settings = dict(n_images=40, size=48, seed=3, workers=1, chunk_size=8)
    reference = generate(tmp_path / "reference", "demo", **settings)
    root = tmp_path / "broden"
    counting_render(monkeypatch, fail_at=21)
    with pytest.raises(Killed):
        generate(root, "demo", **settings)
    partial = tmp_path / "broden.partial"
    assert not root.exists() and len(list((partial / ".build" / "chunks").glob("*.json"))) == 2
    (partial / "images" / "000017.jpg").write_bytes(b"half written")  # chunk 2 was cut off mid-way
    rendered = counting_render(monkeypatch)
    capfd.readouterr()
    generate(root, "demo", **settings)
    assert "16 of 40 images already built" in capfd.readouterr().err
    assert sorted(rendered) == list(range(16, 40))
    assert all_files(root) == all_files(reference)
    assert not partial.exists()


def test_a_leftover_build_with_other_parameters_starts_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capfd: pytest.CaptureFixture) -> None:
    root = tmp_path / "broden"
    counting_render(monkeypatch, fail_at=10)
    with pytest.raises(Killed):
        generate(root, "demo", n_images=20, size=48, seed=0, workers=1, chunk_size=8)
    rendered = counting_render(monkeypatch)
    capfd.readouterr()
    generate(root, "demo", n_images=20, size=48, seed=1, workers=1, chunk_size=8)
    assert "holds an unfinished build with other parameters" in capfd.readouterr().err
    assert sorted(rendered) == list(range(20))
    fresh = generate(tmp_path / "fresh", "demo", n_images=20, size=48, seed=1, workers=1, chunk_size=8)
    assert all_files(root) == all_files(fresh)


def test_cli_builds_demo_by_default_and_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    args = ["synthetic", "--out", str(out), "--n-images", "12", "--size", "32", "--workers", "1"]
    assert data_prep_main(args) == 0
    assert json.loads((out / "synthetic.json").read_text())["profile"] == "demo"
    assert len(pd.read_csv(out / "index.csv")) == 12
    assert data_prep_main(args) == 0
    assert "already complete" in capsys.readouterr().out
    for bad, expected in ((["--profile", "huge"], "unknown profile 'huge'; allowed are demo, broden-scale, basic"),
                          (["--n-images", "0"], "n_images must be at least 1, got 0"),
                          (["--workers", "0"], "workers must be at least 1, got 0"),
                          (["--size", "8"], "size must be at least 16 pixels, got 8")):
        assert data_prep_main(["synthetic", "--out", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert err.strip() == f"error: {expected}"
    assert not (tmp_path / "bad").exists()
