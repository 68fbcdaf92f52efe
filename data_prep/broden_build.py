"""The shared half of every Broden-format generator: writing one image, the tables, and a resumable build.

A generator supplies a picklable ``build_image(i, images_dir) -> ImageRecord``
(a module-level function bound with ``functools.partial``) that renders image
``i`` and writes its files with ``write_image_files``; ``build`` runs it for
every image and writes the tables.

Resumable builds (``build``): the work goes into ``<root>.partial``. Images are
built in chunks of ``chunk_size`` consecutive numbers, in a process pool of
``workers`` (in the calling process when ``workers == 1``). After a chunk's
images are written, the chunk's records (index.csv rows and label shares) are
written atomically to ``<root>.partial/.build/chunks/<chunk>.json``, so a record
file exists only for a chunk whose files are all complete. A killed build keeps
its finished chunks: a rerun with the same parameters (``.build/params.json``:
the generator's parameters plus the chunk size) builds only the chunks without
a record; a leftover ``.partial`` with other parameters (or none) is deleted
with a log line and the build starts over. When all chunks are done the tables
and ``synthetic.json`` are written, ``.build`` is removed and ``<root>.partial``
is renamed to ``<root>``, so ``<root>`` exists only when complete.

Statistics follow the Broden conventions: ``frequency`` = number of images in
which a label appears; ``coverage`` = sum over those images of the share of
mask pixels carrying the label (1.0 per image for scene/texture);
category.csv ``frequency`` = sum of the label frequencies of the category,
``first``/``last`` = smallest/largest label number; c_<category>.csv codes
follow label-number order; labels that do not occur are listed with count 0.
"""

from __future__ import annotations

import csv
import functools
import json
import multiprocessing
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from dissect.broden import CATEGORIES, INDEX_COLUMNS

JPEG_SUBSAMPLING = 0
"""4:4:4 chroma (no subsampling), so colours stay true up to region edges."""
PARAMS_FILE = "synthetic.json"
WORK_DIR = ".build"
CHUNK_SIZE = 64


@dataclass(frozen=True)
class ImageRecord:
    """What the build keeps of one written image: its index.csv row and its label statistics."""

    row: dict[str, str]
    shares: dict[tuple[int, str], float]
    """(label number, category) -> share of the mask pixels carrying the label (1.0 for whole-image labels)."""


def image_stem(i: int, n_images: int) -> str:
    """File name stem of image ``i``: the number zero-padded to at least 6 digits."""
    return f"{i:0{max(6, len(str(n_images - 1)))}d}"


def write_label_png(path: Path, layer: np.ndarray, compress_level: int | None = None) -> None:
    """Write a (h, w) label map as a Broden mask PNG (R = number % 256, G = number // 256, B = 0).

    ``compress_level`` 0..9 (zlib); None keeps PIL's default (6).
    """
    rgb = np.zeros((*layer.shape, 3), np.uint8)
    rgb[:, :, 0] = layer % 256
    rgb[:, :, 1] = layer // 256
    if compress_level is None:
        Image.fromarray(rgb).save(path)
    else:
        Image.fromarray(rgb).save(path, compress_level=compress_level)


def label_shares(layers: np.ndarray) -> dict[int, float]:
    """Share of mask pixels carrying each non-zero label in any of the layers (layers, h, w)."""
    pixels = layers.shape[1] * layers.shape[2]
    return {int(label): float((layers == label).any(axis=0).sum() / pixels) for label in np.unique(layers) if label}


def write_image_files(images_dir: Path, stem: str, split: str, image: np.ndarray, masks: dict[str, np.ndarray],
                      image_labels: dict[str, list[int]], jpeg_quality: int = 95,
                      png_compress_level: int | None = None) -> ImageRecord:
    """Write ``<stem>.jpg`` and the mask PNGs of one rendered image and return its record.

    ``image`` (S, S, 3) uint8; ``masks[category]`` (layers, s, s) int for each pixel category (0 layers:
    no file, empty cell; one file ``<stem>_<category>.png`` per layer, ``<stem>_part_<k>.png`` for part
    layer k); ``image_labels[category]`` the whole-image label numbers of scene and texture.
    """
    Image.fromarray(image).save(images_dir / f"{stem}.jpg", quality=jpeg_quality, subsampling=JPEG_SUBSAMPLING)
    side = masks["color"].shape[1:]
    row = {"image": f"{stem}.jpg", "split": split, "ih": str(image.shape[0]), "iw": str(image.shape[1]),
           "sh": str(side[0]), "sw": str(side[1])}
    shares: dict[tuple[int, str], float] = {}
    for category, layers in masks.items():
        if category == "part":
            names = [f"{stem}_part_{k + 1}.png" for k in range(len(layers))]
        else:
            names = [f"{stem}_{category}.png" for _ in range(len(layers))]
        for name, layer in zip(names, layers):
            write_label_png(images_dir / name, layer, png_compress_level)
        row[category] = ";".join(names)
        shares.update({(label, category): share for label, share in label_shares(layers).items()})
    for category, numbers in image_labels.items():
        row[category] = ";".join(str(number) for number in numbers)
        shares.update({(number, category): 1.0 for number in numbers})
    return ImageRecord(row, shares)


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    """Write a CSV file with '\\n' line ends."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_tables(root: Path, records: list[ImageRecord], labels: tuple[tuple[str, str], ...] | list[tuple[str, str]]
                 ) -> None:
    """Write index.csv, label.csv, category.csv and c_<category>.csv for the records (in image order).

    ``labels[k]`` is the (name, category) of label number k + 1; a category without labels gets no
    category.csv row and no c_<category>.csv.
    """
    write_csv(root / "index.csv", INDEX_COLUMNS, [[r.row[c] for c in INDEX_COLUMNS] for r in records])
    frequency = np.zeros(len(labels) + 1, np.int64)
    coverage = np.zeros(len(labels) + 1, np.float64)
    for record in records:
        for (number, _), share in record.shares.items():
            frequency[number] += 1
            coverage[number] += share
    label_rows = []
    code_rows: dict[str, list[list[object]]] = {category: [] for category in CATEGORIES}
    for k, (name, category) in enumerate(labels):
        number = k + 1
        label_rows.append(
            [number, name, f"{category}({frequency[number]})", frequency[number], f"{coverage[number]:f}", ""]
        )
        code = len(code_rows[category]) + 1
        code_rows[category].append([code, number, name, frequency[number], f"{coverage[number]:f}"])
    write_csv(root / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"], label_rows)
    category_rows = []
    for category in CATEGORIES:
        numbers = [row[1] for row in code_rows[category]]
        if not numbers:
            continue
        category_rows.append([category, min(numbers), max(numbers), len(numbers), int(frequency[numbers].sum())])
        write_csv(root / f"c_{category}.csv", ["code", "number", "name", "frequency", "coverage"], code_rows[category])
    write_csv(root / "category.csv", ["name", "first", "last", "count", "frequency"], category_rows)


def params_match(root: Path, params: dict) -> bool:
    """Whether ``root`` holds a finished build (index.csv and synthetic.json) with exactly these parameters."""
    params_path = Path(root) / PARAMS_FILE
    if not (Path(root) / "index.csv").is_file() or not params_path.is_file():
        return False
    return json.loads(params_path.read_text()) == params


def log(line: str) -> None:
    """One line of build progress on stderr (beside tqdm's bar)."""
    print(line, file=sys.stderr, flush=True)


def chunk_path(work: Path, chunk: int) -> Path:
    """Where the records of chunk ``chunk`` are kept."""
    return work / "chunks" / f"{chunk:06d}.json"


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON to a temporary name and rename it, so ``path`` is complete or absent."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def load_chunk(path: Path) -> list[ImageRecord]:
    """The records of one chunk file."""
    return [ImageRecord(entry["row"], {(int(n), str(c)): float(s) for n, c, s in entry["shares"]})
            for entry in json.loads(path.read_text())]


def build_chunk(chunk: int, build_image: Callable[[int, Path], ImageRecord], n_images: int, chunk_size: int,
                partial: Path) -> tuple[int, list[ImageRecord]]:
    """Build the images of one chunk, then write its record file; returns (chunk, records)."""
    images_dir = partial / "images"
    records = [build_image(i, images_dir) for i in range(chunk * chunk_size, min(n_images, (chunk + 1) * chunk_size))]
    write_json_atomic(chunk_path(partial / WORK_DIR, chunk),
                      [{"row": r.row, "shares": [[n, c, s] for (n, c), s in r.shares.items()]} for r in records])
    return chunk, records


def prepare_partial(partial: Path, work_params: dict) -> None:
    """Keep a leftover ``partial`` built with ``work_params``; otherwise start it afresh (saying why)."""
    params_path = partial / WORK_DIR / "params.json"
    if partial.exists():
        previous = json.loads(params_path.read_text()) if params_path.is_file() else None
        if previous == work_params:
            return
        why = f"other parameters {previous}" if previous is not None else "no build parameters"
        log(f"{partial} holds an unfinished build with {why}; starting over")
        shutil.rmtree(partial)
    (partial / "images").mkdir(parents=True)
    (partial / WORK_DIR / "chunks").mkdir(parents=True)
    write_json_atomic(params_path, work_params)


def build(root: Path, n_images: int, params: dict, build_image: Callable[[int, Path], ImageRecord],
          labels: tuple[tuple[str, str], ...] | list[tuple[str, str]], workers: int = 2,
          chunk_size: int = CHUNK_SIZE) -> Path:
    """Build images 0..n_images-1 with ``build_image`` into ``root`` (which must not exist) and return ``root``.

    ``params`` is written to synthetic.json and, with the chunk size, decides whether a leftover
    ``<root>.partial`` is resumed (see the module docstring).
    """
    root = Path(root)
    if root.exists():
        params_path = root / PARAMS_FILE
        built = f"a build with {json.loads(params_path.read_text())}" if params_path.is_file() else "other files"
        raise FileExistsError(f"{root} already exists and holds {built}; delete it or choose another output directory")
    partial = root.parent / f"{root.name}.partial"
    prepare_partial(partial, {"params": params, "chunk_size": chunk_size})
    work = partial / WORK_DIR
    n_chunks = -(-n_images // chunk_size)
    records: dict[int, list[ImageRecord]] = {}
    for chunk in range(n_chunks):
        if chunk_path(work, chunk).is_file():
            records[chunk] = load_chunk(chunk_path(work, chunk))
    todo = [chunk for chunk in range(n_chunks) if chunk not in records]
    done = sum(len(r) for r in records.values())
    if records:
        log(f"resuming {partial}: {done} of {n_images} images already built, {len(todo)} chunks to go")
    job = functools.partial(build_chunk, build_image=build_image, n_images=n_images, chunk_size=chunk_size,
                            partial=partial)
    progress = tqdm(total=n_images, initial=done, unit="img", desc=f"building {root.name}", smoothing=0.1)
    pool = multiprocessing.Pool(workers) if workers > 1 and len(todo) > 1 else None
    try:
        results = pool.imap_unordered(job, todo) if pool else map(job, todo)
        for chunk, chunk_records in results:
            records[chunk] = chunk_records
            progress.update(len(chunk_records))
    finally:
        progress.close()
        if pool:
            pool.terminate()
            pool.join()
    write_tables(partial, [r for chunk in range(n_chunks) for r in records[chunk]], labels)
    (partial / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")
    shutil.rmtree(work)
    partial.rename(root)
    return root
