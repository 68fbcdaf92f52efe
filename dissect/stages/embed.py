"""The embed stage: a 2-D map of the probe images in one layer's feature space (t-SNE and UMAP).

It reads the features of ``embed.layer`` for the valid probe images: a vector
layer as stored, a map layer (U, h, w) averaged over space to (U,). Images
with any non-finite feature (float16 overflow gives inf) are left out with a
warning; N is the number of images kept, D the number of features. They are
read one chunk at a time into one (N, D) float32 table, the only one the stage
holds: the nearest neighbours below are found on it first, then PCA
(scikit-learn, centring the table in place) reduces them to k = min(pca_components, N - 1, D) components (N
centred rows span at most N - 1 dimensions), and the PCA features are laid out
in 2-D by t-SNE (openTSNE: PCA initialisation, learning rate N / 12,
Barnes-Hut below 10,000 points and FFT-accelerated interpolation above,
``embed.tsne_early_iterations`` + ``embed.tsne_iterations`` iterations (125 + 250), which
grows linearly with N) and UMAP (``umap.UMAP``, initialised from the first two PCA components, as
t-SNE is; 100 epochs above 10,000 points), both on one k-nearest-neighbour graph of the PCA
features (``knn_graph``: exact up to 100,000 points, openTSNE's Annoy above), found once. The
perplexity is clipped to (N - 1) / 3 (t-SNE looks at 3 * perplexity neighbours) and n_neighbors to
N - 1. Every random choice (PCA's
randomised solver, both layouts, the samples below) is seeded by
``embed.seed``, so the coordinates are byte-identical across runs; umap-learn
then runs its optimisation on one thread.

A dead or collapsed layer is something users come to find, so it never fails
the stage:

- Informative dimensions r: the number of the k PCA components whose explained
  variance exceeds ``RANK_TOLERANCE`` (1e-8) times the first's, i.e. the
  numerical rank of the centred features, counted up to k. When r < k a
  warning says so and PCA keeps r components; when r = 1 the 1-d scores get a
  zero second column (t-SNE's PCA init needs two; it changes no distance).
- No information: when the features are exactly constant over the images (all
  zero included; r = 0), or fewer than MIN_EMBED_IMAGES images have finite features,
  a warning gives the reason, and no PCA, layout, neighbour or picture is made
  (stale ones are removed): the stage writes only ``coords.parquet``, with NaN
  coordinates, ``embed.json`` and the stamp.

Outputs, in ``<out_dir>/embed/``:

- ``coords.parquet``: one row per image kept, columns image_id, label,
  tsne_x, tsne_y, umap_x, umap_y (float32; NaN when the layer carries no
  information). For a Broden probe set the label is the image's scene label,
  else its object label with the largest area (over all object mask layers),
  else its texture label, else ''; '' for a folder.
- ``scatter_tsne.png``, ``scatter_umap.png``: the layouts coloured by label
  (the 19 most frequent labels, the rest as 'other').
- ``thumbnails_tsne.png``, ``thumbnails_umap.png``: images snapped to a
  thumbnail_grid x thumbnail_grid lattice, at most one per cell (an optimal
  assignment of min(N, grid^2) images to cells, see ``grid_cells``).
- ``neighbours.png`` and ``neighbours.csv`` (query_image_id, rank,
  neighbour_image_id, distance): for ``queries`` seeded query images, their
  ``neighbours`` nearest images in the original D-dimensional features
  (Euclidean, not PCA).
- ``embed.json``: the settings, N, D, the images left out
  (invalid, and ``non_finite_images_left_out``), ``informative_dimensions``
  (r), the seconds of each step; then either ``no_information`` (the reason, a
  sentence) or the values used after clipping, PCA explained variance and the
  trustworthiness of each layout (PCA features vs 2-D coordinates on a seeded
  sample of at most ``trustworthiness_sample`` images).
- the stage's stamp, written last (inputs: the settings, the probe set and
  the extract stage's stamp).
"""

import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import zarr
from matplotlib import colormaps
from matplotlib.figure import Figure
from omegaconf import DictConfig
from PIL import Image, ImageOps
from scipy.optimize import linear_sum_assignment
from sklearn.decomposition import PCA
from sklearn.manifold import trustworthiness
from tqdm import tqdm

from dissect.artifacts import open_activations, write_json_atomic
from dissect.broden import BrodenDataset, BrodenFormatError
from dissect.errors import DissectError
from dissect.layout import EMBED_METHOD_TITLES, EMBED_METHODS, RunLayout
from dissect.probe import open_probe_set
from dissect.settings import MIN_EMBED_IMAGES, EmbedSettings, section
from dissect.stamps import is_current, stamp_digest, start, write_stamp

log = logging.getLogger(__name__)

#: The version of this stage's output format (2: both layouts on one shared neighbour graph; 3: UMAP starts
#: from PCA, not a spectral embedding; t-SNE's FFT grid 2 units per interval; 4: t-SNE's second phase 250 iterations;
#: 5: an exact neighbour graph up to 100,000 points, UMAP 100 epochs above 10,000).
FORMAT = 5
MAX_LABELS = 19  # labels with their own colour; the rest are drawn as 'other' (20 colours in all)
THUMBNAIL_PX = 48  # side of one cell of the thumbnail maps
NEIGHBOUR_PX = 96  # side of one image of neighbours.png
TSNE_INTS_IN_INTERVAL = 2  # embedding units per FFT interval of openTSNE's t-SNE (see tsne_layout)
FEATURE_BLOCK_ROWS = 4096  # rows of the feature matrix per block of the neighbour search
EXACT_GRAPH_MAX_POINTS = 100_000  # up to this many points the k-nearest-neighbour graph is exact (see knn_graph)
GRAPH_BLOCK_ELEMENTS = 2**26  # distances per block of the exact graph search (256 MiB of float32)
UMAP_LARGE_EPOCHS = 100  # UMAP epochs above UMAP_SMALL_POINTS points (umap-learn's 200; see umap_layout)
UMAP_SMALL_POINTS = 10_000  # at or below, umap-learn's own 500 epochs
RANK_TOLERANCE = 1e-8  # a PCA component is informative when its variance exceeds this fraction of the first's


class EmbedError(DissectError):
    """The embed stage cannot run with this configuration or run directory."""


def check(cfg: DictConfig) -> None:
    """Refuse bad embed settings before any stage runs."""
    section(cfg.embed, EmbedSettings)


def run(cfg: DictConfig) -> Path:
    """Project ``embed.layer`` for every valid probe image and draw the maps; return ``<out_dir>/embed``."""
    layout = RunLayout(Path(cfg.out_dir))
    settings = section(cfg.embed, EmbedSettings)
    out = layout.embed_dir
    inputs = {"settings": asdict(settings), "probe_set": str(cfg.dataset.root),
              "extract": stamp_digest(layout.stamp("extract"), "extract")}
    if is_current(layout.stamp("embed"), inputs, FORMAT, "embed"):
        return out
    store = open_activations(layout.root)
    seconds: dict[str, float] = {}
    with timed("read features", seconds):
        features, rows = read_features(store, settings.layer)
    n_valid, n_features = features.shape
    if n_valid < MIN_EMBED_IMAGES or n_features < 2:
        raise EmbedError(f"embed needs at least {MIN_EMBED_IMAGES} valid images and 2 features; layer "
                         f"{settings.layer!r} has {n_valid} valid images and {n_features} features")
    start(layout, "embed")
    out.mkdir(parents=True, exist_ok=True)
    features, rows = finite_rows(features, rows, settings.layer)
    n_images = len(features)
    image_ids = [str(i) for i in store["image_ids"][:][rows]]
    paths = probe_paths(cfg.dataset, image_ids)
    with timed("labels", seconds):
        labels = probe_labels(cfg.dataset, image_ids)
    layer_kind = store.attrs["layers"][settings.layer]["kind"]
    facts = {
        "settings": asdict(settings),
        "layer_kind": "vector" if layer_kind == "vector" else "map, averaged over space",
        "images": n_images,
        "invalid_images_left_out": int(store["valid"].shape[0] - n_valid),
        "non_finite_images_left_out": n_valid - n_images,
        "features": n_features,
    }
    reason = no_information(features, n_valid, settings.layer)
    if reason is not None:
        log.warning("embed: %s", reason)
        write_no_information(layout, image_ids, labels)
        write_summary(layout.embed_json, facts | {"informative_dimensions": 0, "no_information": reason}, seconds)
        write_stamp(layout.stamp("embed"), inputs, FORMAT)
        return out
    used = used_settings(settings, n_images, n_features)
    with timed("neighbours", seconds):
        queries = choose_queries(n_images, used["queries"], settings.seed)
        neighbours, distances = nearest_neighbours(features, queries, used["neighbours"])
    with timed("pca", seconds):
        reduced, explained = pca_features(features, used["pca_components"], settings.seed)  # centres it in place
    informative = reduced.shape[1]
    if informative < used["pca_components"]:
        log.warning("embed: layer %s has only %d informative dimensions (PCA components with more than %g of the "
                    "first's variance), so PCA keeps %d of its %d components", settings.layer, informative,
                    RANK_TOLERANCE, informative, used["pca_components"])
    reduced = at_least_two_columns(reduced)
    layouts = {}
    with timed("knn graph", seconds):
        graph = knn_graph(reduced, graph_size(n_images, used["perplexity"], used["n_neighbors"]), settings.seed)
    with timed("tsne", seconds):
        layouts["tsne"] = tsne_layout(reduced, used["perplexity"], settings.seed, graph,
                                      TsnePhases.of(settings))
    with timed("umap", seconds):
        layouts["umap"] = umap_layout(reduced, used["n_neighbors"], settings.min_dist, settings.seed, graph)
    with timed("trustworthiness", seconds):
        trust = trustworthiness_scores(reduced, layouts, used["trustworthiness_sample"],
                                       used["trustworthiness_neighbors"], settings.seed)
    del features, reduced
    write_coords(layout.embed_coords, image_ids, labels, layouts)
    write_neighbours(layout.embed_neighbours_csv, image_ids, queries, neighbours, distances)
    with timed("pictures", seconds):
        draw_pictures(layout, paths, image_ids, labels, layouts, queries, neighbours, distances, settings)
    write_summary(layout.embed_json, facts | {
        "used": used,
        "informative_dimensions": informative,
        "pca": {"components": informative, "explained_variance_ratio": explained.tolist(),
                "explained_variance_total": float(explained.sum())},
        "trustworthiness": trust | {
            "computed_on": (f"PCA features ({informative} components) vs the 2-D coordinates, "
                            f"on a random sample of {used['trustworthiness_sample']} images "
                            f"(seed {settings.seed}), {used['trustworthiness_neighbors']} neighbours")},
        "neighbours_space": f"original layer features ({n_features}-d), Euclidean",
    }, seconds)
    write_stamp(layout.stamp("embed"), inputs, FORMAT)
    log.info("embed: wrote %s (%d images, %d features; trustworthiness t-SNE %.3f, UMAP %.3f)",
             out, n_images, n_features, trust["tsne"], trust["umap"])
    return out


@contextmanager
def timed(step: str, seconds: dict[str, float]) -> Iterator[None]:
    """Time a step into ``seconds[step]`` and log it when it ends."""
    log.info("embed: %s ...", step)
    started = time.perf_counter()
    yield
    seconds[step] = time.perf_counter() - started
    log.info("embed: %s took %.1f s", step, seconds[step])


def used_settings(settings: EmbedSettings, n_images: int, n_features: int) -> dict[str, Any]:
    """The values actually used for N images of D features (each setting clipped to what N and D allow)."""
    used = {
        "pca_components": min(settings.pca_components, n_images - 1, n_features),
        "perplexity": min(settings.perplexity, (n_images - 1) / 3),
        "n_neighbors": min(settings.n_neighbors, n_images - 1),
        "trustworthiness_sample": min(settings.trustworthiness_sample, n_images),
        "queries": min(settings.queries, n_images),
        "neighbours": min(settings.neighbours, n_images - 1),
    }
    # sklearn.manifold.trustworthiness needs n_neighbors < n_samples / 2
    used["trustworthiness_neighbors"] = min(settings.trustworthiness_neighbors,
                                            math.ceil(used["trustworthiness_sample"] / 2) - 1)
    for key, value in used.items():
        if value != getattr(settings, key):
            log.warning("embed: %s=%s is clipped to %s for %d images of %d features",
                        key, getattr(settings, key), value, n_images, n_features)
    return used


def read_features(store: zarr.Group, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """A layer's features for the valid images: ((N, D) float32, (N,) their rows in the store).

    A vector layer's (N_all, D) float16 activations are read as they are; a map
    layer's (N_all, U, h, w) maps are averaged over (h, w) in float32, so D = U.
    Read one chunk of images at a time into the one (N, D) table.
    """
    layers = store.attrs["layers"]
    if layer not in layers:
        raise EmbedError(f"embed.layer={layer!r} was not extracted; the store holds {store.attrs['layer_order']}. "
                         f"Add it to layers=[...] and run the extract stage, or choose one of those")
    is_map = layers[layer]["kind"] == "map"
    array = store[layer]["maps" if is_map else "activations"]
    valid = store["valid"][:]
    step = array.chunks[0]
    features = np.empty((int(valid.sum()), array.shape[1]), dtype=np.float32)
    filled = 0
    for first in tqdm(range(0, array.shape[0], step), desc=f"embed: read {layer}", unit="chunk"):
        keep = valid[first:first + step]
        block = array[first:first + step][keep].astype(np.float32)
        features[filled:filled + len(block)] = block.mean(axis=(2, 3)) if is_map else block
        filled += len(block)
    return features, np.flatnonzero(valid)


def finite_rows(features: np.ndarray, rows: np.ndarray, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features and their (N,) store rows, less the images with any non-finite feature (with a warning)."""
    finite = np.isfinite(features).all(axis=1)
    if finite.all():
        return features, rows
    log.warning("embed: %d of %d images have non-finite features in layer %s (float16 overflow gives inf); "
                "they are left out", int((~finite).sum()), len(finite), layer)
    return features[finite], rows[finite]


def no_information(features: np.ndarray, n_valid: int, layer: str) -> str | None:
    """Why the (N, D) features kept of n_valid images carry no information (a sentence), or None when they do."""
    n_images, n_features = features.shape
    if n_images < MIN_EMBED_IMAGES:
        return (f"Layer {layer} carries no information: only {n_images} of its {n_valid} valid images have finite "
                f"features, fewer than the {MIN_EMBED_IMAGES} a map needs; no PCA, layout or picture is made.")
    if (features == features[0]).all():
        zero = " (all zero)" if not features.any() else ""
        return (f"Layer {layer} carries no information: its {n_images} x {n_features} features are constant over "
                f"the images{zero}, a dead or collapsed layer (the audit tells which units); no PCA, layout or "
                "picture is made.")
    return None


def pca_features(features: np.ndarray, n_components: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) float32 -> ((N, r) float32 PCA scores, (r,) explained variance ratios) of the r informative
    components among the first n_components (see the module docstring); the features must not be constant.

    The features are centred in place (``copy=False``: the same scores as a
    centred copy, without a second (N, D) table): use the raw features before.
    """
    pca = PCA(n_components=n_components, random_state=seed, copy=False)
    reduced = pca.fit_transform(features).astype(np.float32)
    informative = int((pca.explained_variance_ > RANK_TOLERANCE * pca.explained_variance_[0]).sum())
    return reduced[:, :informative], pca.explained_variance_ratio_[:informative]


def at_least_two_columns(reduced: np.ndarray) -> np.ndarray:
    """(N, r) -> (N, max(r, 2)): zero columns added, which change no distance; t-SNE's PCA init needs two."""
    return np.pad(reduced, ((0, 0), (0, max(0, 2 - reduced.shape[1]))))


@dataclass(frozen=True)
class KnnGraph:
    """Each point's k nearest other points in the PCA features, nearest first (itself left out).

    indices (N, k) int64 rows, distances (N, k) float32 Euclidean.
    """

    indices: np.ndarray
    distances: np.ndarray

    def first(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The first k columns of (indices, distances)."""
        return self.indices[:, :k], self.distances[:, :k]


def tsne_neighbours(n_points: int, perplexity: float) -> int:
    """Neighbours per point t-SNE's affinities use: 3 x perplexity (openTSNE's default), at most N - 1."""
    return min(n_points - 1, int(3 * perplexity))


def graph_size(n_points: int, perplexity: float, n_neighbors: int) -> int:
    """Neighbours per point both layouts need: t-SNE's (``tsne_neighbours``), UMAP's n_neighbors - 1 others."""
    return min(n_points - 1, max(tsne_neighbours(n_points, perplexity), n_neighbors - 1))


def knn_graph(reduced: np.ndarray, k: int, seed: int) -> KnnGraph:
    """(N, r) PCA features -> their k-nearest-neighbour graph, found once for both layouts.

    Exact (``exact_knn_graph``) up to ``EXACT_GRAPH_MAX_POINTS`` (100,000)
    points; above, where the exact search grows as N^2, openTSNE's Annoy
    (seeded random-projection forests, 50 trees). On benchmarks/embed.py's
    50,000 points (2 cores) the exact graph took 11.9-15.7 s and Annoy 14.3-36.5 s
    (its per-point queries), with a recall of 0.991 of the exact neighbours.
    UMAP takes the same graph instead of building its own with pynndescent,
    whose search took 55 s at 50,000 points and its numba compilation 30-60 s
    per process on this machine.
    """
    if len(reduced) <= EXACT_GRAPH_MAX_POINTS:
        return exact_knn_graph(reduced, k)
    from openTSNE.affinity import get_knn_index  # imported here: no other stage needs it

    index = get_knn_index(reduced, "annoy", k=k, metric="euclidean", n_jobs=os.cpu_count() or 1, random_state=seed)
    indices, distances = index.build()
    return KnnGraph(np.asarray(indices, dtype=np.int64), np.asarray(distances, dtype=np.float32))


def exact_knn_graph(reduced: np.ndarray, k: int) -> KnnGraph:
    """(N, r) -> each point's k nearest other points by Euclidean distance, exactly; ties go to the lower row.

    A block of rows at a time (``GRAPH_BLOCK_ELEMENTS`` distances): the
    candidates are the k smallest of |y|^2 - 2 x.y over all N points y (one
    matrix product and a top-k, torch on every core), then their distances
    are recomputed from the differences x - y (so no cancellation error
    remains in them) and sorted.
    """
    points = torch.from_numpy(np.ascontiguousarray(reduced, dtype=np.float32))
    n_points = len(points)
    squared_norms = (points * points).sum(dim=1)
    rows = max(1, GRAPH_BLOCK_ELEMENTS // n_points)
    indices = np.empty((n_points, k), dtype=np.int64)
    distances = np.empty((n_points, k), dtype=np.float32)
    for first in range(0, n_points, rows):
        block = points[first:first + rows]
        own = torch.arange(len(block))
        ranking = torch.addmm(squared_norms[None, :], block, points.T, alpha=-2)  # (rows, N)
        ranking[own, own + first] = torch.inf
        candidates = torch.topk(ranking, k, dim=1, largest=False, sorted=False).indices.sort(dim=1).values
        squared = ((block[:, None, :] - points[candidates]) ** 2).sum(dim=2)  # (rows, k)
        squared, order = torch.sort(squared, dim=1, stable=True)
        indices[first:first + len(block)] = torch.gather(candidates, 1, order).numpy()
        distances[first:first + len(block)] = squared.sqrt().numpy()
    return KnnGraph(indices, distances)


@dataclass(frozen=True)
class TsnePhases:
    """Iterations of t-SNE's two phases: early exaggeration (12, openTSNE's), then none."""

    early: int
    late: int

    @staticmethod
    def of(embed_settings: Any) -> "TsnePhases":
        """The phases an ``embed`` config section (``EmbedSettings`` or the YAML's section) asks for."""
        return TsnePhases(int(embed_settings.tsne_early_iterations), int(embed_settings.tsne_iterations))


def tsne_layout(reduced: np.ndarray, perplexity: float, seed: int, graph: KnnGraph,
                phases: TsnePhases) -> np.ndarray:
    """(N, r) -> (N, 2) float32 t-SNE coordinates (openTSNE: PCA init, learning rate 'auto', BH or FFT by N).

    The affinities come from the first 3 x perplexity neighbours of ``graph``
    (openTSNE's own default). Seeded, the coordinates are the same for any
    number of threads (checked), so every core is used. Above 10,000 points
    the FFT grid has ``TSNE_INTS_IN_INTERVAL`` (2) units of the embedding per
    interval, not openTSNE's 1: it only matters once the layout spans more than
    100 units (below, openTSNE keeps its minimum of 50 intervals), and on
    63,305 Broden-scale images (a layout 234 units wide) it halved t-SNE's time,
    168.5 -> 83.7 s, with trustworthiness 0.956 -> 0.955.

    ``phases`` (config ``embed.tsne_early_iterations``, ``embed.tsne_iterations``)
    default to 125 and 250, not openTSNE's 250 and 500; the learning rate N / 12
    (Belkina et al., Nat. Commun. 2019) lets both phases converge sooner. On
    benchmarks/embed.py's 50,000 mixture points the KL divergence fell only
    3.66 -> 3.62 over the last 250 of 500 late iterations and trustworthiness
    was 0.9847 at 250 against 0.9842 at 500 (10,000 points: 0.9863 against
    0.9864); 125 early iterations instead of 250 took t-SNE from 41.5 to 24.9 s
    there at trustworthiness 0.9844 -> 0.9845, and on the 63,305 generated
    Broden-scale images (classifier.fc1) from 75.2 to 43.5 s at 0.9545 -> 0.9536
    (README, "The representation map").
    """
    from openTSNE import TSNE
    from openTSNE.affinity import PerplexityBasedNN
    from openTSNE.nearest_neighbors import PrecomputedNeighbors

    neighbours = PrecomputedNeighbors(*graph.first(tsne_neighbours(len(reduced), perplexity)))
    affinities = PerplexityBasedNN(perplexity=perplexity, knn_index=neighbours, n_jobs=os.cpu_count() or 1,
                                   random_state=seed)
    tsne = TSNE(n_components=2, perplexity=perplexity, initialization="pca", learning_rate="auto",
                ints_in_interval=TSNE_INTS_IN_INTERVAL, early_exaggeration_iter=phases.early,
                n_iter=phases.late, n_jobs=os.cpu_count() or 1,
                random_state=seed, verbose=False)
    return np.asarray(tsne.fit(reduced, affinities=affinities), dtype=np.float32)


def umap_layout(reduced: np.ndarray, n_neighbors: int, min_dist: float, seed: int, graph: KnnGraph) -> np.ndarray:
    """(N, r) -> (N, 2) float32 UMAP coordinates; single-threaded, as umap-learn is with a random_state.

    UMAP's neighbourhoods are each point itself (distance 0, as umap-learn
    expects first) and its first n_neighbors - 1 neighbours of ``graph``.
    The layout starts from the first two PCA components (``init="pca"``), not
    umap-learn's default spectral embedding of the graph: on 63,305 generated
    Broden-scale images (classifier.fc1, a graph of 91 components) the
    spectral start took 97 of UMAP's 139 s in ARPACK, and PCA's start gave
    36.8 s with trustworthiness 0.979 against 0.929 (8,000 images: 11.1 against
    16.1 s, 0.995 against 0.993), as Kobak and Linderman (Nat. Biotechnol.
    2021) found PCA starts keep global structure as well as spectral ones.
    Above ``UMAP_SMALL_POINTS`` (10,000) points it optimises for
    ``UMAP_LARGE_EPOCHS`` (100) epochs, not umap-learn's 200 (``umap_epochs``).
    """
    import umap  # imported here: it takes seconds (numba), and no other stage needs it

    indices, distances = graph.first(n_neighbors - 1)
    own = np.arange(len(reduced))[:, None]
    precomputed = (np.hstack([own, indices]), np.hstack([np.zeros_like(own, dtype=np.float32), distances]))
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist, random_state=seed, n_jobs=1,
                        init="pca", precomputed_knn=precomputed, n_epochs=umap_epochs(len(reduced)))
    with warnings.catch_warnings():  # a precomputed graph has no search index, so no later transform()
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]")
        return reducer.fit_transform(reduced).astype(np.float32)


def umap_epochs(n_points: int) -> int | None:
    """UMAP's epochs for N points: umap-learn's own (None: 500) up to 10,000, ``UMAP_LARGE_EPOCHS`` above.

    Its single-threaded optimisation grows with N x epochs and took 26.4 of
    UMAP's 38.9 s on benchmarks/embed.py's 50,000 points. Halving umap-learn's
    200 epochs there gave trustworthiness 0.9809 against 0.9810 in 12.4 s
    against 26.0 s; on the 63,305 generated Broden-scale images
    (classifier.fc1) 0.950 against 0.954, 15.2 s against 47.7 s.
    """
    return None if n_points <= UMAP_SMALL_POINTS else UMAP_LARGE_EPOCHS


def trustworthiness_scores(reduced: np.ndarray, layouts: dict[str, np.ndarray], sample: int, n_neighbors: int,
                           seed: int) -> dict[str, float]:
    """Trustworthiness of each (N, 2) layout against the (N, k) PCA features, on one seeded sample of images."""
    picked = np.sort(np.random.default_rng(seed).choice(len(reduced), size=sample, replace=False))
    return {method: float(trustworthiness(reduced[picked], coords[picked], n_neighbors=n_neighbors))
            for method, coords in layouts.items()}


def choose_queries(n_images: int, count: int, seed: int) -> np.ndarray:
    """(count,) distinct sorted image rows, the same for the same seed."""
    return np.sort(np.random.default_rng(seed).choice(n_images, size=count, replace=False))


def nearest_neighbours(features: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows to each query row, itself left out, by Euclidean distance over all D features.

    features (N, D), queries (Q,) -> (indices (Q, k) int64, distances (Q, k)
    float64), nearest first; ties go to the lower row. Distances are computed in
    float64 as |x|^2 + |q|^2 - 2 x.q, a block of rows at a time.
    """
    points = features[queries].astype(np.float64)
    squared = np.empty((len(queries), len(features)))
    for first in range(0, len(features), FEATURE_BLOCK_ROWS):
        block = features[first:first + FEATURE_BLOCK_ROWS].astype(np.float64)
        squared[:, first:first + len(block)] = (
            (block**2).sum(axis=1)[None, :] + (points**2).sum(axis=1)[:, None] - 2 * points @ block.T)
    squared = np.maximum(squared, 0)
    squared[np.arange(len(queries)), queries] = np.inf
    order = np.argsort(squared, axis=1, kind="stable")[:, :k]
    return order, np.sqrt(np.take_along_axis(squared, order, axis=1))


def probe_paths(dataset: DictConfig, image_ids: list[str]) -> list[Path]:
    """The image file of each image id, from the probe set ``dataset`` (which must hold every id)."""
    probe = open_probe_set(dataset)
    path_of = dict(zip(probe.image_ids, probe.image_paths))
    missing = [image_id for image_id in image_ids if image_id not in path_of]
    if missing:
        raise EmbedError(f"the probe set at dataset.root={dataset.root} does not hold {len(missing)} of the "
                         f"extracted images (e.g. {missing[0]!r}); it must be the probe set that was extracted")
    return [path_of[image_id] for image_id in image_ids]


def probe_labels(dataset: DictConfig, image_ids: list[str]) -> list[str]:
    """One label name per image id ('' when none); see the module docstring for the rule."""
    if dataset.kind != "broden":
        return [""] * len(image_ids)
    broden = BrodenDataset(str(dataset.root))
    position = {image_id: i for i, image_id in enumerate(broden.image_ids)}
    names = broden.label_names
    labels, unreadable = [], 0
    for image_id in tqdm(image_ids, desc="embed: labels", unit="img"):
        number, readable = broden_label(broden, position[image_id])
        labels.append(names[number] if number else "")
        unreadable += not readable
    if unreadable:
        log.warning("embed: the object masks of %d images could not be read; their labels skip objects", unreadable)
    return labels


def broden_label(broden: BrodenDataset, i: int) -> tuple[int, bool]:
    """(label number of image i, 0 for none; whether its object masks could be read).

    Its first scene label, else the object label covering the most mask pixels
    (summed over the object mask layers; ties to the lower number), else its
    first texture label.
    """
    scenes = broden.image_labels(i, "scene")
    if scenes:
        return scenes[0], True
    readable = True
    try:
        areas = np.bincount(broden.pixel_labels(i, "object").ravel(), minlength=1)
    except BrodenFormatError:
        areas, readable = np.zeros(1, np.int64), False
    areas[0] = 0
    if areas.any():
        return int(areas.argmax()), readable
    textures = broden.image_labels(i, "texture")
    return (textures[0] if textures else 0), readable


def pictures(layout: RunLayout) -> list[Path]:
    """Every picture of the stage: the scatter plots and thumbnail maps of each method, neighbours.png."""
    return [layout.embed_picture(kind, method) for kind in ("scatter", "thumbnails") for method in EMBED_METHODS] + [
        layout.embed_neighbours_png]


def write_no_information(layout: RunLayout, image_ids: list[str], labels: list[str]) -> None:
    """coords.parquet with NaN coordinates for a layer without information; remove stale neighbours and pictures."""
    nowhere = np.full((len(image_ids), 2), np.nan, np.float32)
    write_coords(layout.embed_coords, image_ids, labels, {method: nowhere for method in EMBED_METHODS})
    for path in (layout.embed_neighbours_csv, *pictures(layout)):
        path.unlink(missing_ok=True)


def write_summary(path: Path, summary: dict[str, Any], seconds: dict[str, float]) -> None:
    """embed.json: ``summary``, the seconds of each step, library versions."""
    write_json_atomic(path, summary | {
        "seconds": {step: round(value, 3) for step, value in seconds.items()},
        "versions": {name: version(name) for name in ("scikit-learn", "umap-learn", "numpy")},
    })


def write_coords(path: Path, image_ids: list[str], labels: list[str], layouts: dict[str, np.ndarray]) -> None:
    """coords.parquet: image_id, label, then x and y of each layout."""
    columns: dict[str, Any] = {"image_id": image_ids, "label": labels}
    for method, coords in layouts.items():
        columns[f"{method}_x"], columns[f"{method}_y"] = coords[:, 0], coords[:, 1]
    pd.DataFrame(columns).to_parquet(path, index=False)


def write_neighbours(path: Path, image_ids: list[str], queries: np.ndarray, neighbours: np.ndarray,
                     distances: np.ndarray) -> None:
    """neighbours.csv: query_image_id, rank (1 = nearest), neighbour_image_id, distance."""
    n_queries, k = neighbours.shape
    pd.DataFrame({
        "query_image_id": np.repeat([image_ids[q] for q in queries], k),
        "rank": np.tile(np.arange(1, k + 1), n_queries),
        "neighbour_image_id": [image_ids[j] for j in neighbours.ravel()],
        "distance": distances.ravel(),
    }).to_csv(path, index=False, float_format="%.9g")


def grid_cells(coords: np.ndarray, grid: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Snap a 2-D layout to a grid x grid lattice with at most one point per cell.

    coords (N, 2) -> (points (M,) rows of coords, cells (M,) cell numbers
    row * grid + column, row 0 at the top), M = min(N, grid^2); when N > grid^2
    a seeded random subset of grid^2 points is placed. Coordinates are scaled
    to [0, 1] per axis, and the assignment of points to cell centres minimises
    the summed squared distance (``scipy.optimize.linear_sum_assignment``).
    """
    n_cells = grid * grid
    points = np.arange(len(coords))
    if len(coords) > n_cells:
        points = np.sort(np.random.default_rng(seed).choice(len(coords), size=n_cells, replace=False))
    xy = coords[points].astype(np.float64)
    low, high = xy.min(axis=0), xy.max(axis=0)
    xy = (xy - low) / np.where(high > low, high - low, 1.0)
    row, column = np.divmod(np.arange(n_cells), grid)
    centres = np.stack([(column + 0.5) / grid, 1 - (row + 0.5) / grid], axis=1)
    cost = ((xy[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
    assigned_points, cells = linear_sum_assignment(cost)
    return points[assigned_points], cells


def load_thumbnail(path: Path, size: int) -> np.ndarray:
    """An image's centre square resized to (size, size, 3) uint8; mid-grey when it cannot be read."""
    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.fit(image.convert("RGB"), (size, size), Image.BILINEAR))
    except (OSError, ValueError, SyntaxError):  # PIL raises all three on bad files
        return np.full((size, size, 3), 128, np.uint8)


def draw_pictures(layout: RunLayout, paths: list[Path], image_ids: list[str], labels: list[str],
                  layouts: dict[str, np.ndarray], queries: np.ndarray, neighbours: np.ndarray,
                  distances: np.ndarray, settings: EmbedSettings) -> None:
    """Write the scatter plots, the thumbnail maps and neighbours.png."""
    for method, coords in layouts.items():
        title = f"{EMBED_METHOD_TITLES[method]} of {settings.layer}"
        save_scatter(layout.embed_picture("scatter", method), coords, labels, title)
        points, cells = grid_cells(coords, settings.thumbnail_grid, settings.seed)
        thumbnails = [load_thumbnail(paths[p], THUMBNAIL_PX)
                      for p in tqdm(points, desc=f"embed: {method} thumbnails", unit="img")]
        mosaic = thumbnail_mosaic(thumbnails, cells, settings.thumbnail_grid, THUMBNAIL_PX)
        grid = settings.thumbnail_grid
        save_mosaic(layout.embed_picture("thumbnails", method), mosaic,
                    f"{title}: {len(points)} images on a {grid}x{grid} grid")
    save_neighbours(layout.embed_neighbours_png, paths, image_ids, queries, neighbours, distances)


def thumbnail_mosaic(thumbnails: list[np.ndarray], cells: np.ndarray, grid: int, size: int) -> np.ndarray:
    """M (size, size, 3) thumbnails placed at cells (M,) -> (grid * size, grid * size, 3) uint8, white elsewhere."""
    mosaic = np.full((grid * size, grid * size, 3), 255, np.uint8)
    for thumbnail, cell in zip(thumbnails, cells):
        row, column = divmod(int(cell), grid)
        mosaic[row * size:(row + 1) * size, column * size:(column + 1) * size] = thumbnail
    return mosaic


def label_groups(labels: list[str]) -> tuple[list[str], np.ndarray]:
    """(legend names, (N,) index of each image's name): the MAX_LABELS most frequent labels, then 'other'.

    '' is shown as '(no label)'; ties in frequency go to the name first in sorted order.
    """
    shown = ["(no label)" if label == "" else label for label in labels]
    counts = pd.Series(shown).value_counts()
    ranked = sorted(counts.index, key=lambda name: (-counts[name], name))
    names = ranked[:MAX_LABELS] + (["other"] if len(ranked) > MAX_LABELS else [])
    index = {name: i for i, name in enumerate(names)}
    return names, np.array([index.get(name, len(names) - 1) for name in shown])


def save_scatter(path: Path, coords: np.ndarray, labels: list[str], title: str) -> None:
    """A scatter plot of (N, 2) coords coloured by label, with a legend of label (count)."""
    names, groups = label_groups(labels)
    palette = colormaps["tab20"]
    size = float(np.clip(20000 / len(coords), 1, 30))
    figure = Figure(figsize=(9, 7))
    axes = figure.subplots()
    for g, name in enumerate(names):
        mine = groups == g
        colour = (0.6, 0.6, 0.6, 1.0) if name == "other" else palette(g)
        axes.scatter(coords[mine, 0], coords[mine, 1], s=size, color=colour, alpha=0.8, linewidths=0,
                     label=f"{name} ({int(mine.sum())})")
    axes.set_title(f"{title} ({len(coords)} images)")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, markerscale=max(1.0, 5 / size**0.5),
                frameon=False)
    figure.savefig(path, dpi=110, bbox_inches="tight")


def save_mosaic(path: Path, mosaic: np.ndarray, title: str) -> None:
    """A (H, W, 3) thumbnail mosaic at one figure pixel per mosaic pixel, under a title strip."""
    dpi, title_px = 100, 30
    height, width = mosaic.shape[:2]
    figure = Figure(figsize=(width / dpi, (height + title_px) / dpi), dpi=dpi)
    axes = figure.add_axes((0, 0, 1, height / (height + title_px)))
    axes.imshow(mosaic, interpolation="nearest")
    axes.axis("off")
    figure.text(0.5, 1 - 0.5 * title_px / (height + title_px), title, ha="center", va="center", fontsize=10)
    figure.savefig(path, dpi=dpi)


def save_neighbours(path: Path, paths: list[Path], image_ids: list[str], queries: np.ndarray,
                    neighbours: np.ndarray, distances: np.ndarray) -> None:
    """One row per query: the query image, then its neighbours (nearest first) with their distances."""
    n_queries, k = neighbours.shape
    figure = Figure(figsize=(1.6 * (k + 1), 1.8 * n_queries + 0.4))
    axes = figure.subplots(n_queries, k + 1, squeeze=False)
    for row, query in enumerate(queries):
        cells = [(int(query), f"query\n{short(image_ids[query])}")] + [
            (int(j), f"{rank + 1}: d={distances[row, rank]:.3g}\n{short(image_ids[j])}")
            for rank, j in enumerate(neighbours[row])]
        for column, (image, caption) in enumerate(cells):
            axes[row, column].imshow(load_thumbnail(paths[image], NEIGHBOUR_PX))
            axes[row, column].set_title(caption, fontsize=6, fontweight="bold" if column == 0 else "normal")
            axes[row, column].axis("off")
    figure.suptitle("Nearest neighbours in the original feature space (Euclidean)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def short(text: str, length: int = 22) -> str:
    """text, shortened from the left to at most ``length`` characters."""
    return text if len(text) <= length else "…" + text[-(length - 1):]
