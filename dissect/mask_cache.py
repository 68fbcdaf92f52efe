"""The decoded concept masks of a Broden-format probe set, kept once per probe set and memory-mapped.

Decoding the mask PNGs is most of the work of reading a probe set's concepts, and
it is the same for every layer, run and model. ``ensure_mask_cache`` decodes
them once into ``<cache root>/<probe-set folder name>-<digest>/`` (the digest
covers the resolved probe-set path, the size and modification time of its
``index.csv`` and ``label.csv``, and ``FORMAT``; a changed probe set gets a new
folder and the stale one is removed). Rewriting mask PNGs in place without
touching ``index.csv`` is not noticed: delete the cache folder then. The probe
set itself may be read-only.

The compact form: each pixel of image i belongs to one *class*, the set of pixel
labels (label numbers of every mask layer, each once) it carries, numbered per
image. Whole-image labels (scene, texture) are kept apart and taken out of the
classes, since they cover every pixel anyway. Files (N images, C classes in all):

- ``pixel_class.npy`` (sum of sh*sw,) uint16 (uint32 for masks over 65,536
  pixels): the class of each pixel, image after image, row-major; image i's
  pixels start at ``pixel_offset[i]``;
- ``class_labels.npy`` (C, S) int32: the labels of each class, 0-padded (S = the
  most labels any pixel has); image i's classes are rows ``class_offset[i]`` to
  ``class_offset[i + 1]``, and ``class_pixels.npy`` (C,) int64 their pixel counts;
- ``whole_labels.npy``: the whole-image labels, image i's from ``whole_offset[i]``;
- ``offsets.npz``: ``pixel_offset``, ``class_offset``, ``whole_offset`` (N+1,)
  int64, ``sizes`` (N, 2) the mask size (sh, sw), ``annotated`` (N, n_categories)
  bool (the image's cell of that category is non-empty);
- ``meta.json``: the format, probe set, label count and the images whose masks
  could not be read, with the reason (such an image has no classes).

The cache is built in a hidden folder beside its place and renamed into place
when whole, so a killed build never leaves a cache that looks complete (a killed
build's hidden ``.building-*`` folder may be deleted), and two runs building the
same cache at once both end with one whole copy. Decoding runs in tasks on the
run's dask workers when a client is given; only the building process writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from distributed import Client
from tqdm import tqdm

from dissect.broden import CATEGORIES, BrodenDataset, BrodenFormatError, image_label_layers
from dissect.cluster import results_in_window
from dissect.errors import ConfigError

log = logging.getLogger(__name__)

#: The version of the cache's layout; a new one builds new caches.
FORMAT = 1
#: Images per decoding task of a build.
BUILD_BLOCK_IMAGES = 256
#: ``dense_ranks`` ranks values below this through a table (1 MiB of bools), larger ones by sorting.
DENSE_RANK_LIMIT = 1 << 20
#: Held by the one decoding task of this process that runs (``decode_images``).
_DECODING = threading.Lock()


def cache_name(broden: BrodenDataset) -> str:
    """``<probe-set folder name>-<16 hex digits>`` naming the cache of the probe set as it is now."""
    root = broden.root.resolve()
    files = {name: [(root / name).stat().st_size, (root / name).stat().st_mtime_ns]
             for name in ("index.csv", "label.csv")}
    digest = hashlib.sha256(json.dumps({"format": FORMAT, "root": str(root), "files": files},
                                       sort_keys=True).encode()).hexdigest()
    return f"{root.name}-{digest[:16]}"


def ensure_mask_cache(broden: BrodenDataset, cache_root: Path, client: Client | None = None) -> Path:
    """The folder of ``broden``'s mask cache under ``cache_root``, decoding the masks first if it is missing
    (on the workers of a dask ``client``, if given)."""
    path = cache_root / cache_name(broden)
    if (path / "meta.json").is_file():
        return path
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".building-{path.name}-", dir=cache_root))
    except OSError as error:
        raise ConfigError(f"the mask cache folder {cache_root} cannot be written ({error}); set tally.mask_cache "
                          "to a folder this process can write") from error
    try:
        build(broden, building, client)
        try:
            building.rename(path)
        except OSError:
            if not (path / "meta.json").is_file():
                raise
            log.info("mask cache: %s was built meanwhile by another run; using it", path)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    for stale in cache_root.glob(f"{broden.root.resolve().name}-*"):
        if stale != path and _cached_root(stale) == str(broden.root.resolve()):
            log.info("mask cache: removing %s, the cache of an earlier version of %s", stale, broden.root)
            shutil.rmtree(stale, ignore_errors=True)
    return path


def _cached_root(path: Path) -> str | None:
    try:
        return json.loads((path / "meta.json").read_text())["root"]
    except (OSError, ValueError, KeyError):
        return None


def dense_ranks(values: np.ndarray) -> np.ndarray:
    """(P,) non-negative int64 -> (P,) int64 rank of each value among the distinct values (``np.unique``'s inverse).

    Values below ``DENSE_RANK_LIMIT`` are ranked through a table of the values
    present (no sort: about 10x faster on a 112 x 112 mask); larger ones by ``np.unique``.
    """
    top = int(values.max(initial=0)) + 1
    if top > DENSE_RANK_LIMIT:
        return np.unique(values, return_inverse=True)[1].reshape(-1).astype(np.int64)
    present = np.zeros(top, dtype=bool)
    present[values] = True
    return (np.cumsum(present) - 1)[values]


def image_classes(stacked: np.ndarray, whole_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(layers, P) pixel labels, (k,) whole-image labels -> (P,) class of each pixel, (classes, width) int32 labels.

    Pixels with equal labels in every layer share a class; classes are numbered in the order of their
    labels, layer by layer. A class's row lists its labels other than 0 and the whole-image ones, each
    once, ascending, 0-padded on the left; ``width`` is the most labels of any class.
    """
    key = np.zeros(stacked.shape[1], dtype=np.int64)  # the rank of each pixel's labels among the distinct ones
    for layer in stacked:
        key = dense_ranks(key * (int(layer.max(initial=0)) + 1) + layer)
    first = np.empty(int(key.max(initial=-1)) + 1, dtype=np.int64)
    first[key] = np.arange(len(key))  # one pixel of each class (any: its labels are the class's)
    table = stacked.T[first].astype(np.int32)  # (classes, layers)
    table[np.isin(table, whole_labels)] = 0
    table.sort(axis=1)
    table[:, 1:][table[:, 1:] == table[:, :-1]] = 0  # each label once
    table.sort(axis=1)
    return key, table[:, table.shape[1] - int((table > 0).sum(axis=1).max(initial=0)):]


def decode_images(broden: BrodenDataset, first: int, stop: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray] | str]:
    """For images first..stop (a task of the build): (pixel classes (P,), class labels (classes, width),
    whole-image labels (k,)) as ``image_classes`` gives them, or the reason why the image's masks cannot be read.

    One such task runs at a time in a process (``_DECODING``): the work is many small steps that hold
    the GIL, and two threads of one process decoding at once were slower than one.
    """
    with _DECODING:
        return [_decode_image(broden, i) for i in range(first, stop)]


def _decode_image(broden: BrodenDataset, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """``decode_images`` of image i."""
    try:
        stacked, whole_labels = image_label_layers(broden, i, len(broden.labels))
    except BrodenFormatError as error:
        return str(error)
    pixel_class, table = image_classes(stacked, whole_labels)
    return pixel_class, table, whole_labels


def build(broden: BrodenDataset, folder: Path, client: Client | None = None) -> None:
    """Decode every mask of ``broden`` into the files of the cache, in ``folder`` (see the module docstring).

    With a dask ``client``, tasks of ``BUILD_BLOCK_IMAGES`` images decode on its workers; this process
    alone writes the files.
    """
    n_images, n_labels = len(broden), len(broden.labels)
    sizes = np.array([broden.mask_size(i) for i in range(n_images)], dtype=np.int64).reshape(n_images, 2)
    pixel_offset = np.r_[0, np.cumsum(sizes[:, 0] * sizes[:, 1])]
    dtype = np.uint16 if (sizes[:, 0] * sizes[:, 1]).max(initial=0) <= 1 << 16 else np.uint32
    class_tables: list[np.ndarray] = [np.zeros((0, 0), dtype=np.int32)] * n_images
    class_pixels: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * n_images
    whole: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * n_images
    errors: dict[int, str] = {}
    with tqdm(total=n_images, desc="mask cache", unit="img") as bar, \
            npy_pieces(folder / "pixel_class.npy", dtype, int(pixel_offset[-1])) as write_pixels:
        for first, decoded in _decoded_blocks(broden, client):
            for i, image in enumerate(decoded, start=first):
                if isinstance(image, str):
                    errors[i] = image
                    continue
                write_pixels(int(pixel_offset[i]), image[0])
                class_tables[i], whole[i] = image[1], image[2]
                class_pixels[i] = np.bincount(image[0], minlength=len(image[1]))
            bar.update(len(decoded))
    width = max((table.shape[1] for table in class_tables), default=0)
    class_labels = np.zeros((sum(len(table) for table in class_tables), width), dtype=np.int32)
    class_offset = np.r_[0, np.cumsum([len(table) for table in class_tables])]
    for i, table in enumerate(class_tables):
        class_labels[class_offset[i]:class_offset[i + 1], width - table.shape[1]:] = table
    np.save(folder / "class_labels.npy", class_labels)
    np.save(folder / "class_pixels.npy", np.concatenate([np.zeros(0, np.int64), *class_pixels]).astype(np.int64))
    np.save(folder / "whole_labels.npy", np.concatenate([np.zeros(0, np.int64), *whole]).astype(np.int64))
    annotated = np.array([[broden.has_category(i, c) for c in CATEGORIES] for i in range(n_images)],
                         dtype=bool).reshape(n_images, len(CATEGORIES))
    np.savez(folder / "offsets.npz", pixel_offset=pixel_offset, class_offset=class_offset,
             whole_offset=np.r_[0, np.cumsum([len(w) for w in whole])], sizes=sizes, annotated=annotated)
    (folder / "meta.json").write_text(json.dumps({
        "format": FORMAT, "root": str(broden.root.resolve()), "images": n_images, "labels": n_labels,
        "errors": {str(i): reason for i, reason in errors.items()}}, indent=1))


@contextmanager
def npy_pieces(path: Path, dtype: type[np.generic], length: int) -> Iterator[Callable[[int, np.ndarray], None]]:
    """Write the (length,) ``dtype`` .npy file ``path`` piece by piece: yields ``write(start, values)``.

    Positioned writes (``os.pwrite``) rather than a memory map: a map's written
    pages count in this process's resident memory until it is closed, where
    written pages stay in the page cache only (the 63k Broden-scale set's 1.6 GB
    of pixel classes: the build on its own peaked at 2.37 GB resident through a
    map, 0.91 GB so, in the same 56-59 s). Never-written pieces read as zeros.
    """
    dtype_ = np.dtype(dtype)
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": np.lib.format.dtype_to_descr(dtype_),
                                                    "fortran_order": False, "shape": (length,)})
        file.flush()
        header = file.tell()
        file.truncate(header + length * dtype_.itemsize)

        def write(start: int, values: np.ndarray) -> None:
            data = memoryview(np.ascontiguousarray(values, dtype=dtype_)).cast("B")
            position = header + start * dtype_.itemsize
            while data:
                written = os.pwrite(file.fileno(), data, position)
                data, position = data[written:], position + written

        yield write


def _decoded_blocks(broden: BrodenDataset, client: Client | None) -> Iterator[tuple[int, list]]:
    """(first image, ``decode_images`` of its block) for every block, here or on the client's workers."""
    starts = range(0, len(broden), BUILD_BLOCK_IMAGES)
    if client is None:
        for first in starts:
            yield first, decode_images(broden, first, min(first + BUILD_BLOCK_IMAGES, len(broden)))
        return
    shared = client.scatter(broden, broadcast=True)
    calls = [(shared, first, min(first + BUILD_BLOCK_IMAGES, len(broden))) for first in starts]
    for number, decoded in results_in_window(client, decode_images, calls):
        yield starts[number], decoded


class MaskCache:
    """A built mask cache, read-only; ``pixel_class`` is memory-mapped, the small arrays are loaded.

    Attributes as the files of the module docstring, plus ``n_labels`` and ``errors`` (image -> reason).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta = json.loads((self.path / "meta.json").read_text())
        if meta["format"] != FORMAT:
            raise ValueError(f"{self.path} is a mask cache of format {meta['format']}, expected {FORMAT}")
        self.n_labels: int = meta["labels"]
        self.errors: dict[int, str] = {int(i): reason for i, reason in meta["errors"].items()}
        self.pixel_class = np.load(self.path / "pixel_class.npy", mmap_mode="r")
        self.class_labels = np.load(self.path / "class_labels.npy")
        self.class_pixels = np.load(self.path / "class_pixels.npy")
        self.whole_labels = np.load(self.path / "whole_labels.npy")
        with np.load(self.path / "offsets.npz") as offsets:
            self.pixel_offset = offsets["pixel_offset"]
            self.class_offset = offsets["class_offset"]
            self.whole_offset = offsets["whole_offset"]
            self.sizes = offsets["sizes"]
            self.annotated = offsets["annotated"]

    def mask_size(self, i: int) -> tuple[int, int]:
        """(sh, sw) of image i."""
        return int(self.sizes[i, 0]), int(self.sizes[i, 1])

    def pixel_classes(self, i: int) -> np.ndarray:
        """(sh * sw,) global class (row of ``class_labels``) of each pixel of image i."""
        local = self.pixel_class[self.pixel_offset[i]:self.pixel_offset[i + 1]]
        return local.astype(np.int64) + self.class_offset[i]

    def image_whole_labels(self, i: int) -> np.ndarray:
        """(k,) int64 whole-image labels of image i."""
        return self.whole_labels[self.whole_offset[i]:self.whole_offset[i + 1]]

    def truth(self, images: np.ndarray) -> np.ndarray:
        """(L+1,) int64 pixels of each label summed over ``images`` (whole-image labels cover every pixel)."""
        counts = np.zeros(self.n_labels + 1, dtype=np.int64)
        for i in images.tolist():
            rows = slice(self.class_offset[i], self.class_offset[i + 1])
            pixels = np.broadcast_to(self.class_pixels[rows, None], self.class_labels[rows].shape)
            counts += np.bincount(self.class_labels[rows].ravel(), weights=pixels.ravel(),
                                  minlength=self.n_labels + 1).astype(np.int64)
            counts[self.image_whole_labels(i)] += int(self.sizes[i, 0] * self.sizes[i, 1])
        counts[0] = 0
        return counts
