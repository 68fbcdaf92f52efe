"""The embed stage: neighbours by brute force, planted clusters, seeded determinism, labels, grid, end to end."""

import itertools
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image
from sklearn.datasets import make_blobs
from sklearn.metrics import silhouette_score
from sklearn.neighbors import KNeighborsClassifier

from conftest import CONF_DIR, tiny_overrides, write_activation_store
from dissect.stages import embed, extract
from dissect.artifacts import read_json
from dissect.broden import BrodenDataset
from dissect.errors import ConfigError
from dissect.layout import EMBED_METHODS, RunLayout
from dissect.stamps import write_stamp
from reports import embed_section

# Measured on make_blobs(300, 64, centers=4, random_state=0..9), seed 0: silhouette of the 2-D coordinates
# 0.917-0.929 (t-SNE) and 0.932-0.959 (UMAP); 5-NN label purity 1.0 for both; trustworthiness (10
# neighbours) 0.950-0.954 (t-SNE) and 0.931-0.937 (UMAP).
MIN_SILHOUETTE = 0.8
MIN_PURITY = 0.95
# small layouts and pictures for the 40 images of the image_folder fixture
SMALL = ["embed.perplexity=5", "embed.n_neighbors=5", "embed.thumbnail_grid=4", "embed.queries=3",
         "embed.neighbours=4", "embed.trustworthiness_sample=30"]


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """300 points in 64-d around 4 planted centres, their cluster labels and both layouts of their PCA features."""
    features, clusters = make_blobs(n_samples=300, n_features=64, centers=4, random_state=0)
    reduced, _ = embed.pca_features(features.astype(np.float32), 50, seed=0)
    return reduced, clusters, layouts_of(reduced)


def layouts_of(reduced: np.ndarray) -> dict[str, np.ndarray]:
    """Both layouts of the stage's defaults (perplexity 30, 15 neighbours, seed 0) on one neighbour graph."""
    graph = embed.knn_graph(reduced, embed.graph_size(len(reduced), 30.0, 15), seed=0)
    phases = embed.TsnePhases.of(OmegaConf.load(CONF_DIR / "config.yaml").embed)
    return {"tsne": embed.tsne_layout(reduced, 30.0, 0, graph, phases), "umap": embed.umap_layout(reduced, 15, 0.1, 0, graph)}


@pytest.mark.parametrize("method", EMBED_METHODS)
def test_both_layouts_keep_planted_clusters_apart(blobs, method):
    _, clusters, layouts = blobs
    coords = layouts[method]
    assert silhouette_score(coords, clusters) >= MIN_SILHOUETTE
    knn = KNeighborsClassifier(n_neighbors=6).fit(coords, clusters)
    # each point's 5 nearest other points (the first of 6 is the point itself)
    neighbours = knn.kneighbors(coords, return_distance=False)[:, 1:]
    assert (clusters[neighbours] == clusters[:, None]).mean() >= MIN_PURITY


def test_layouts_are_byte_identical_for_the_same_seed(blobs):
    reduced, _, layouts = blobs
    again = layouts_of(reduced)
    for method in EMBED_METHODS:
        assert again[method].dtype == np.float32
        assert again[method].tobytes() == layouts[method].tobytes()


def test_trustworthiness_of_planted_clusters_is_high(blobs):
    reduced, _, layouts = blobs
    scores = embed.trustworthiness_scores(reduced, layouts, sample=200, n_neighbors=10, seed=0)
    assert set(scores) == {"tsne", "umap"}
    assert min(scores.values()) > 0.9


def test_nearest_neighbours_equal_brute_force():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(300, 40)).astype(np.float16).astype(np.float32) * 5 + 3
    queries = embed.choose_queries(len(features), 7, seed=4)
    indices, distances = embed.nearest_neighbours(features, queries, k=6)
    pairwise = np.sqrt(((features[:, None, :].astype(np.float64) - features[None, :, :]) ** 2).sum(axis=2))
    for row, query in enumerate(queries):
        order = [j for j in np.argsort(pairwise[query], kind="stable") if j != query][:6]
        np.testing.assert_array_equal(indices[row], order)
        np.testing.assert_allclose(distances[row], pairwise[query, order], rtol=1e-9)
    np.testing.assert_array_equal(queries, embed.choose_queries(len(features), 7, seed=4))
    assert len(set(queries.tolist())) == 7


def test_grid_assignment_is_optimal_and_one_image_per_cell():
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(5, 2))
    points, cells = embed.grid_cells(coords, grid=3, seed=0)
    assert sorted(points.tolist()) == list(range(5)) and len(set(cells.tolist())) == 5
    scaled = (coords - coords.min(axis=0)) / (coords.max(axis=0) - coords.min(axis=0))
    centres = np.array([[(c + 0.5) / 3, 1 - (r + 0.5) / 3] for r in range(3) for c in range(3)])
    cost = ((scaled[:, None] - centres[None]) ** 2).sum(axis=2)
    best = min(sum(cost[p, c] for p, c in enumerate(choice)) for choice in itertools.permutations(range(9), 5))
    assert cost[points, cells].sum() == pytest.approx(best)
    # more images than cells: a grid of 4 cells gets 4 distinct images, each in its own cell
    points, cells = embed.grid_cells(rng.normal(size=(30, 2)), grid=2, seed=0)
    assert len(set(points.tolist())) == 4 and sorted(cells.tolist()) == [0, 1, 2, 3]
    # points already on a lattice stay where they are (row 0 is the top: largest y)
    lattice = np.array([[x, y] for y in (1, 0) for x in (0, 1)], dtype=float)
    points, cells = embed.grid_cells(lattice, grid=2, seed=0)
    np.testing.assert_array_equal(cells[np.argsort(points)], [0, 1, 2, 3])


def mask_png(path: Path, labels: np.ndarray) -> str:
    """Write a label map as a Broden mask PNG (R + 256 * G); return its name."""
    rgb = np.zeros((*labels.shape, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = labels % 256, labels // 256
    Image.fromarray(rgb).save(path)
    return path.name


def label_broden(root: Path) -> Path:
    """Five images: a scene (with objects), objects in two layers, a texture only, nothing at all, and a
    texture with a missing object mask."""
    images = root / "images"
    images.mkdir(parents=True)
    car, tree = np.zeros((4, 4), np.int64), np.zeros((4, 4), np.int64)
    car[0, :3] = 1  # 3 pixels of car in layer 1 ...
    tree[1:3, :] = 2  # ... 8 of tree in layer 1, and 2 more of car in layer 2
    layer2 = np.zeros((4, 4), np.int64)
    layer2[3, :2] = 1
    masks = [mask_png(images / "o1.png", car + tree), mask_png(images / "o2.png", layer2)]
    rows = [f"s.jpg,train,8,8,4,4,,{masks[0]},,,3,",
            f"o.jpg,train,8,8,4,4,,{masks[0]};{masks[1]},,,,4",
            "t.jpg,train,8,8,4,4,,,,,,4",
            "n.jpg,train,8,8,4,4,,,,,,",
            "m.jpg,train,8,8,4,4,,gone.png,,,,4"]
    (root / "index.csv").write_text("image,split,ih,iw,sh,sw,color,object,part,material,scene,texture\n"
                                    + "\n".join(rows) + "\n")
    (root / "label.csv").write_text("number,name,category,frequency,coverage,syns\n1,car,object(2),2,0.3,\n"
                                    "2,tree,object(2),2,0.5,\n3,meadow,scene(1),1,1.0,\n4,striped,texture(2),2,1.0,\n")
    (root / "category.csv").write_text("name,first,last,count,frequency\nobject,1,2,2,2\nscene,3,3,1,1\n"
                                       "texture,4,4,1,3\n")
    codes = {"object": "1,1,car,2,0.3\n2,2,tree,2,0.5", "scene": "1,3,meadow,1,1.0", "texture": "1,4,striped,2,1.0"}
    for category, body in codes.items():
        (root / f"c_{category}.csv").write_text(f"code,number,name,frequency,coverage\n{body}\n")
    return root


def test_broden_labels_follow_scene_then_largest_object_then_texture(tmp_path, compose_config):
    root = label_broden(tmp_path / "broden")
    cfg = compose_config([f"dataset.root={root}"])
    # s: scene meadow wins over its objects; o: tree (8 px) beats car (3 + 2 px) over both layers and the
    # texture; t: texture only; n: nothing; m: its object mask is missing, so its texture
    assert embed.probe_labels(cfg.dataset, ["n.jpg", "s.jpg", "o.jpg", "t.jpg", "m.jpg"]) == [
        "", "meadow", "tree", "striped", "striped"]
    assert [embed.broden_label(BrodenDataset(root), i) for i in range(5)] == [
        (3, True), (2, True), (4, True), (0, True), (4, False)]


def test_a_map_layer_is_averaged_over_space_for_valid_images(tmp_path):
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(20, 3, 4, 5))
    valid = np.ones(20, bool)
    valid[[2, 11]] = False
    write_activation_store(tmp_path, [f"i{k}" for k in range(20)], {"conv": maps}, valid)
    import zarr

    features, rows = embed.read_features(zarr.open_group(RunLayout(tmp_path).activations, mode="r"), "conv")
    np.testing.assert_array_equal(rows, np.flatnonzero(valid))
    expected = maps.astype(np.float16).astype(np.float64)[valid].mean(axis=(2, 3))
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-6)


def test_an_unextracted_layer_and_bad_settings_are_refused(tmp_path, compose_config):
    write_activation_store(tmp_path, ["a", "b"], {"conv": np.zeros((2, 1, 2, 2))})
    with pytest.raises(embed.EmbedError, match=r"embed.layer='fc7' was not extracted; the store holds \['conv'\]"):
        embed.run(compose_config([f"out_dir={tmp_path}", "embed.layer=fc7"]))
    with pytest.raises(ConfigError, match=r"embed.perplexity=-1.0 is not allowed; it must be a number > 0"):
        embed.run(compose_config([f"out_dir={tmp_path}", "embed.perplexity=-1"]))
    with pytest.raises(ConfigError, match=r"embed.tsne_iterations=0 is not allowed; it must be an integer >= 1"):
        embed.run(compose_config([f"out_dir={tmp_path}", "embed.tsne_iterations=0"]))


def test_stage_end_to_end_on_a_tiny_store(tmp_path, image_folder, tiny_checkpoint, compose_config):
    run_dir = tmp_path / "run"
    cfg = compose_config(tiny_overrides(image_folder, run_dir, tiny_checkpoint) + ["embed.layer=classifier.fc1"]
                         + SMALL)
    extract.run(cfg)
    out = embed.run(cfg)
    layout = RunLayout(run_dir)
    assert out == layout.embed_dir
    coords = pd.read_parquet(layout.embed_coords)
    assert list(coords.columns) == ["image_id", "label", "tsne_x", "tsne_y", "umap_x", "umap_y"]
    assert len(coords) == 40 and (coords["label"] == "").all()
    assert coords["image_id"].tolist() == sorted(p.relative_to(image_folder).as_posix()
                                                 for p in image_folder.rglob("img*"))
    assert np.isfinite(coords[["tsne_x", "tsne_y", "umap_x", "umap_y"]].to_numpy()).all()
    table = pd.read_csv(layout.embed_neighbours_csv)
    assert len(table) == 3 * 4 and table["rank"].tolist() == [1, 2, 3, 4] * 3
    assert all(d.is_monotonic_increasing for _, d in table.groupby("query_image_id")["distance"])
    summary = read_json(layout.embed_json)
    # 40 centred rows span at most 39 dimensions
    assert (summary["images"], summary["features"], summary["used"]["pca_components"]) == (40, 128, 39)
    assert summary["used"]["perplexity"] == 5 and summary["used"]["trustworthiness_neighbors"] == 10
    assert 0 < summary["pca"]["explained_variance_total"] <= 1 + 1e-6
    assert set(summary["seconds"]) >= {"pca", "tsne", "umap", "trustworthiness", "neighbours", "pictures"}
    pictures = embed.pictures(layout)
    assert len(pictures) == 5
    for path in pictures:
        with Image.open(path) as picture:
            assert picture.size[0] > 100
    written = {path: path.stat().st_mtime_ns for path in (layout.embed_json, layout.stamp("embed"))}
    assert embed.run(cfg) == out  # complete: skipped
    assert {path: path.stat().st_mtime_ns for path in written} == written

    html = embed_section.render(run_dir, run_dir / "report")
    for path in pictures:
        assert f'src="{Path(os.path.relpath(path, layout.report_dir)).as_posix()}"' in html
    assert 'src="../embed/scatter_tsne.png"' in html
    assert html.count('loading="lazy"') == len(pictures)
    assert "perplexity" in html and f"{summary['trustworthiness']['tsne']:.3f}" in html


def test_report_section_is_absent_without_output_and_escapes_data(tmp_path):
    assert embed_section.render(tmp_path, tmp_path / "report") is None
    layout = RunLayout(tmp_path)
    layout.embed_dir.mkdir()
    settings = {"layer": "<b>fc</b>", "pca_components": 50, "perplexity": 30.0, "n_neighbors": 15, "min_dist": 0.1,
                "tsne_early_iterations": 125, "tsne_iterations": 250, "seed": 0, "trustworthiness_sample": 2000, "trustworthiness_neighbors": 10, "thumbnail_grid": 24,
                "queries": 6, "neighbours": 6}
    used = {"pca_components": 50, "perplexity": 30.0, "n_neighbors": 15, "trustworthiness_sample": 100,
            "trustworthiness_neighbors": 10, "queries": 6, "neighbours": 6}
    layout.embed_json.write_text(pd.Series({
        "settings": settings, "used": used, "layer_kind": "vector", "images": 100, "features": 64,
        "invalid_images_left_out": 0,
        "pca": {"components": 50, "explained_variance_total": 0.9, "explained_variance_ratio": [0.5, 0.4]},
        "trustworthiness": {"tsne": 0.95, "umap": 0.93, "computed_on": "PCA <features>"},
        "neighbours_space": "original", "seconds": {"tsne": 1.0, "umap": 2.0}}).to_json())
    write_stamp(layout.stamp("embed"), {"written_by": "test_embed"}, embed.FORMAT)  # the stage finished
    html = embed_section.render(tmp_path, tmp_path / "report")
    assert "&lt;b&gt;fc&lt;/b&gt;" in html and "<b>fc" not in html and "PCA &lt;features&gt;" in html


def folder_ids(image_folder: Path) -> list[str]:
    """The image ids of the image_folder fixture, in probe-set order."""
    return sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("img*"))


def embed_features(run_dir: Path, image_folder: Path, features: np.ndarray, compose_config) -> Path:
    """Run the embed stage on a store whose layer 'feat' holds the given (40, D) features of image_folder's images.

    They are stored as (40, D, 1, 1) float16 maps, which the stage averages over space back to themselves.
    """
    write_activation_store(run_dir, folder_ids(image_folder), {"feat": features[:, :, None, None]})
    return embed.run(compose_config(["dataset=folder", f"dataset.root={image_folder}", f"out_dir={run_dir}",
                                     "embed.layer=feat"] + SMALL))


def centred_rank(features: np.ndarray) -> int:
    """The rank of the (N, D) features after subtracting their mean, by numpy."""
    stored = features.astype(np.float16).astype(np.float64)
    return int(np.linalg.matrix_rank(stored - stored.mean(axis=0)))


def with_inf(features: np.ndarray, rows: list[int]) -> np.ndarray:
    """A copy of the features whose given rows are inf in one column (as float16 overflow makes them)."""
    features = features.copy()
    features[rows, 1] = np.inf
    return features


NO_INFORMATION = {
    "all zero": (np.zeros((40, 8)), 0, "its 40 x 8 features are constant over the images (all zero), a dead"),
    "constant": (np.tile(np.linspace(-2, 3, 8), (40, 1)), 0,
                 "its 40 x 8 features are constant over the images, a dead"),
    "3 finite": (with_inf(np.random.default_rng(0).normal(size=(40, 8)), list(range(3, 40))), 37,
                 "only 3 of its 40 valid images have finite features, fewer than the 4"),
}


@pytest.mark.parametrize("case", NO_INFORMATION)
def test_a_layer_without_information_ends_normally_with_nan_coordinates(case, tmp_path, image_folder,
                                                                         compose_config, caplog):
    features, non_finite, reason = NO_INFORMATION[case]
    layout = RunLayout(tmp_path)
    stale = layout.embed_picture("scatter", "tsne")
    stale.parent.mkdir()
    stale.write_bytes(b"from an earlier run")
    with caplog.at_level("WARNING", logger="dissect.stages.embed"):
        out = embed_features(tmp_path, image_folder, features, compose_config)
    warnings = [r.getMessage() for r in caplog.records if "Layer feat carries no information" in r.getMessage()]
    assert len(warnings) == 1 and reason in warnings[0]
    assert out == layout.embed_dir
    summary = read_json(layout.embed_json)
    kept = len(features) - non_finite
    if non_finite == 0:
        assert centred_rank(features) == 0
    assert summary["informative_dimensions"] == 0 and reason in summary["no_information"]
    assert (summary["images"], summary["non_finite_images_left_out"], summary["features"]) == (kept, non_finite, 8)
    assert "pca" not in summary and "trustworthiness" not in summary
    coords = pd.read_parquet(layout.embed_coords)
    assert list(coords.columns) == ["image_id", "label", "tsne_x", "tsne_y", "umap_x", "umap_y"]
    assert coords["image_id"].tolist() == folder_ids(image_folder)[:kept] and (coords["label"] == "").all()
    assert np.isnan(coords[["tsne_x", "tsne_y", "umap_x", "umap_y"]].to_numpy()).all()
    assert not any(path.exists() for path in (layout.embed_neighbours_csv, *embed.pictures(layout)))
    written = {path: path.stat().st_mtime_ns for path in (layout.embed_json, layout.stamp("embed"))}
    assert embed_features(tmp_path, image_folder, features, compose_config) == out
    assert {path: path.stat().st_mtime_ns for path in written} == written  # complete: skipped

    html = embed_section.render(tmp_path, tmp_path / "report")
    assert "<h2>Representation map</h2>" in html and "Layer feat carries no information" in html
    assert reason in html and "<img" not in html and "<table" not in html


def test_features_of_rank_one_are_laid_out_on_one_pca_component(tmp_path, image_folder, compose_config, caplog):
    # every image's features are a multiple of one integer vector plus an offset: exact in float16
    features = 5 + np.arange(40.0)[:, None] * np.array([1, -2, 3, 0, 1, 2, -3, 1])
    features = with_inf(features, [7, 19])
    finite = np.isfinite(features).all(axis=1)
    with caplog.at_level("WARNING", logger="dissect.stages.embed"):
        embed_features(tmp_path, image_folder, features, compose_config)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("has only 1 informative dimensions" in m and "PCA keeps 1 of its 8 components" in m
               for m in messages) == 1
    assert sum("2 of 40 images have non-finite features in layer feat" in m for m in messages) == 1
    layout = RunLayout(tmp_path)
    summary = read_json(layout.embed_json)
    assert summary["informative_dimensions"] == centred_rank(features[finite]) == 1
    assert (summary["images"], summary["non_finite_images_left_out"], summary["pca"]["components"]) == (38, 2, 1)
    coords = pd.read_parquet(layout.embed_coords)
    assert coords["image_id"].tolist() == [i for i, keep in zip(folder_ids(image_folder), finite) if keep]
    assert np.isfinite(coords[["tsne_x", "tsne_y", "umap_x", "umap_y"]].to_numpy()).all()
    assert all(path.is_file() for path in (layout.embed_neighbours_csv, *embed.pictures(layout)))
    html = embed_section.render(tmp_path, tmp_path / "report")
    assert "PCA keeps only 1 of the 8 components asked" in html and "2 images with non-finite features" in html


def brute_force_neighbours(points: np.ndarray, k: int) -> np.ndarray:
    """(N, d) -> (N, k) each point's k nearest other points by float64 pairwise distances."""
    squared = ((points[:, None, :].astype(np.float64) - points[None, :, :]) ** 2).sum(axis=2)
    np.fill_diagonal(squared, np.inf)
    return np.argsort(squared, axis=1, kind="stable")[:, :k]


def test_knn_graph_is_exact_with_ties_to_the_lower_row_and_close_with_annoy_above_the_limit(monkeypatch):
    rng = np.random.default_rng(5)
    points = rng.normal(size=(1500, 12)).astype(np.float32)
    points[7] = points[9] = points[3]  # three copies: a tie at distance 0
    monkeypatch.setattr(embed, "GRAPH_BLOCK_ELEMENTS", 1500 * 64)  # 64 rows a block: the blocks' seams are tested
    graph = embed.knn_graph(points, 20, seed=0)
    assert graph.indices.shape == graph.distances.shape == (1500, 20)
    truth = brute_force_neighbours(points, 20)
    np.testing.assert_array_equal(graph.indices, truth)
    assert graph.indices[3, :2].tolist() == [7, 9] and graph.indices[9, :2].tolist() == [3, 7]
    assert (graph.distances[[3, 7, 9], :2] == 0).all()
    expected = np.sqrt(((points[:, None, :].astype(np.float64) - points[truth]) ** 2).sum(axis=2))
    np.testing.assert_allclose(graph.distances, expected, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(embed, "EXACT_GRAPH_MAX_POINTS", 1000)  # Annoy: approximate
    found = embed.knn_graph(points, 15, seed=0).indices
    recall = np.mean([len(set(a) & set(b)) / 15 for a, b in zip(found, truth[:, :15])])
    assert 0.95 <= recall < 1


def test_umap_takes_the_shared_graph_without_building_its_own(monkeypatch):
    """Above 4,096 points umap-learn would search neighbours itself (pynndescent); given the graph, it never does."""
    import umap.umap_

    def refuse(*args, **kwargs):
        raise AssertionError("UMAP searched for neighbours itself")

    monkeypatch.setattr(umap.umap_, "nearest_neighbors", refuse)
    features, clusters = make_blobs(n_samples=4500, n_features=8, centers=4, random_state=1)
    reduced = features.astype(np.float32)
    coords = embed.umap_layout(reduced, 15, 0.1, 0, embed.knn_graph(reduced, 14, seed=0))
    assert coords.shape == (4500, 2) and np.isfinite(coords).all()
    assert silhouette_score(coords, clusters) >= MIN_SILHOUETTE
