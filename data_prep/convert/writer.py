"""The shared half of every converter: label numbering, per-image conversion and the Broden tables.

A source layout module (``semantic``, ``coco_panoptic``) turns its input into

- ``SourceClass`` entries: the values found in its masks (class index, COCO
  category id) with a name and a Broden category;
- ``ConvertItem`` entries: one image, its mask file and what ``decode`` needs;
- a ``decode(item) -> (H, W) int64`` function giving the source class of every
  pixel at the image's resolution (a module-level function, so a process pool
  can pickle it).

``plan_labels`` numbers the labels once, from the class table and the
image-label names only (never from the images), so a resumed or extended
conversion numbers them the same way: grouped by category in Broden order
(color, object, part, material, scene, texture), within a category in
class-table order, image labels sorted by name. Every class of the table is
listed in label.csv, with count 0 when it never occurs.

``convert_image`` writes one image: the JPEG (resized to ``size`` x ``size``
with bilinear filtering, or kept), one mask PNG per pixel category that has a
labelled pixel (``<key>_<category>.png``, label number ``R + 256 * G``), at
half the image resolution, sampled by nearest neighbour from the full-
resolution class map (mask pixel (j, k) takes source pixel
``(floor((j + 0.5) * H / sh), floor((k + 0.5) * W / sw))``), and a record
(``.convert/records/<key>.json``: the index.csv row and the label shares). All
three are written to a temporary name and renamed, the record last, so a record
exists only for a complete image. Classes of an image category (scene,
texture) in the class table become whole-image labels of every image in which
they have a pixel.

``run_conversion`` converts the images that have no record yet (a process
pool of ``workers``), then writes the tables from all records: index.csv in
key order, label.csv / category.csv / c_<category>.csv as
``data_prep.broden_build.write_tables`` does (frequency = images with the
label, coverage = sum of the per-image shares of mask pixels, 1.0 per image for
whole-image labels), and skipped.csv (``file,reason``) of bad inputs.
"""

from __future__ import annotations

import csv
import functools
import json
import multiprocessing
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_prep.broden_build import (
    JPEG_SUBSAMPLING,
    ImageRecord,
    label_shares,
    write_csv,
    write_label_png,
    write_tables,
)
from dissect.broden import CATEGORIES, IMAGE_CATEGORIES, PIXEL_CATEGORIES

WORK_DIR = ".convert"
PARAMS_FILE = "params.json"
SKIPPED_FILE = "skipped.csv"
FORMAT_VERSION = 1


class ConvertError(Exception):
    """A conversion that cannot go on; the message is one line naming the file and what is wrong."""


class StrictStop(ConvertError):
    """A bad input met with --strict: ``bad input <file>: <reason>``."""


class BadInput(Exception):
    """One image's input is unusable (wrong size, unknown class, ...); it is skipped (an error with --strict)."""


@dataclass(frozen=True)
class SourceClass:
    """A value of the source masks (class index or category id) with its label name and Broden category."""

    index: int
    name: str
    category: str = "object"


@dataclass(frozen=True)
class ConvertItem:
    """One source image: ``key`` names its outputs (``images/<key>.jpg``), ``extra`` is what ``decode`` needs."""

    key: str
    image: Path
    mask: Path
    split: str
    image_labels: tuple[int, ...] = ()
    """Whole-image label numbers from the image-label CSV."""
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Skipped:
    """A file left out, and why (one line)."""

    file: str
    reason: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", " ".join(self.reason.split()))


@dataclass(frozen=True)
class LabelPlan:
    """The numbering of every label: ``labels[k]`` is the (name, category) of label number k + 1."""

    labels: tuple[tuple[str, str], ...]
    number_of: dict[int, int]
    """Source class index -> label number."""
    ignore: frozenset[int]
    """Source values that mean unlabelled."""
    image_label_number: dict[str, int]
    """Image-label name -> label number."""

    def category_of(self, number: int) -> str:
        """Category of label ``number`` (1..L)."""
        return self.labels[number - 1][1]


def unique_names(classes: list[SourceClass]) -> list[SourceClass]:
    """The classes with repeated (name, category) pairs renamed ``<name>-<index>`` (the first keeps its name)."""
    seen: set[tuple[str, str]] = set()
    result = []
    for entry in classes:
        name = entry.name
        if (name, entry.category) in seen:
            name = f"{name}-{entry.index}"
        seen.add((name, entry.category))
        result.append(SourceClass(entry.index, name, entry.category))
    return result


def plan_labels(classes: list[SourceClass], ignore: set[int] | frozenset[int], image_label_names: list[str],
                image_label_category: str = "scene") -> LabelPlan:
    """Number the classes (grouped by category, table order inside) and then the image labels (sorted)."""
    classes = unique_names([entry for entry in classes if entry.index not in ignore])
    labels: list[tuple[str, str]] = []
    number_of: dict[int, int] = {}
    image_label_number: dict[str, int] = {}
    for category in CATEGORIES:
        for entry in classes:
            if entry.category == category:
                labels.append((entry.name, category))
                number_of[entry.index] = len(labels)
        if category == image_label_category:
            for name in sorted(set(image_label_names)):
                labels.append((name, category))
                image_label_number[name] = len(labels)
    return LabelPlan(tuple(labels), number_of, frozenset(ignore), image_label_number)


def read_category_overrides(path: Path) -> dict[str, str]:
    """A ``name,category`` CSV (header required) -> {name: category}; raises ConvertError naming the line."""
    table = read_rows(path, ["name", "category"])
    overrides = {}
    for line, row in table:
        category = row["category"].strip()
        if category not in CATEGORIES:
            raise ConvertError(f"{path} line {line}: category {category!r} is not one of {', '.join(CATEGORIES)}")
        overrides[row["name"].strip()] = category
    return overrides


def apply_overrides(classes: list[SourceClass], overrides: dict[str, str], source: Path) -> list[SourceClass]:
    """The classes with the categories of ``overrides`` (by name); a name not in the classes raises ConvertError."""
    unknown = sorted(set(overrides) - {entry.name for entry in classes})
    if unknown:
        raise ConvertError(f"--categories names {unknown}, which are not classes of {source}")
    return [SourceClass(e.index, e.name, overrides.get(e.name, e.category)) for e in classes]


def read_rows(path: Path, required: list[str]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV file (comma or tab separated) with the ``required`` columns (any case)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise ConvertError(f"{path} cannot be read ({error})") from error
    lines = text.splitlines()
    if not lines:
        raise ConvertError(f"{path} is empty; it needs a header with the columns {required}")
    delimiter = "\t" if lines[0].count("\t") > lines[0].count(",") else ","
    reader = csv.DictReader(lines, delimiter=delimiter)
    header = {name.strip().lower(): name for name in reader.fieldnames or []}
    missing = [name for name in required if name not in header]
    if missing:
        raise ConvertError(f"{path} has the header {reader.fieldnames}, which lacks the columns {missing}")
    rows = []
    for line, row in enumerate(reader, start=2):
        rows.append((line, {key: (row[original] or "") for key, original in header.items()}))
    return rows


def read_image_labels(path: Path) -> dict[str, list[str]]:
    """An ``image,labels`` CSV -> {image: [label names]}; labels are ``;``-separated, empty cells allowed."""
    result: dict[str, list[str]] = {}
    for _, row in read_rows(path, ["image", "labels"]):
        names = [name.strip() for name in row["labels"].split(";") if name.strip()]
        result.setdefault(row["image"].strip(), []).extend(names)
    return result


def attach_image_labels(items: list[ConvertItem], labels: dict[str, list[str]], plan: LabelPlan,
                        names_of: Callable[[ConvertItem], list[str]], source: Path) -> tuple[list[ConvertItem],
                                                                                          list[Skipped]]:
    """Items with their whole-image label numbers; rows naming no item are returned as Skipped.

    ``names_of(item)`` lists the names an image-label row may use for the item (e.g. its path and its key).
    """
    by_name = {name: item.key for item in items for name in names_of(item)}
    numbers: dict[str, set[int]] = {}
    skipped = []
    for image, names in labels.items():
        key = by_name.get(image)
        if key is None:
            skipped.append(Skipped(str(source), f"image-labels row {image!r} names no image of the source"))
            continue
        numbers.setdefault(key, set()).update(plan.image_label_number[name] for name in names)
    result = [ConvertItem(item.key, item.image, item.mask, item.split, tuple(sorted(numbers.get(item.key, ()))),
                          item.extra) for item in items]
    return result, skipped


def nearest_resize(class_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour sample an (H, W) map at ``shape`` = (h, w): pixel j takes row floor((j + 0.5) * H / h)."""
    height, width = class_map.shape
    rows = np.floor((np.arange(shape[0]) + 0.5) * height / shape[0]).astype(np.int64)
    cols = np.floor((np.arange(shape[1]) + 0.5) * width / shape[1]).astype(np.int64)
    return class_map[rows[:, None], cols[None, :]]


def record_path(out: Path, key: str) -> Path:
    """Where the record of image ``key`` is kept."""
    return out / WORK_DIR / "records" / f"{key}.json"


def temporary(path: Path) -> Path:
    """A temporary name next to ``path`` with the same suffix (so PIL picks the format)."""
    return path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")


TEMPORARY_NAME = re.compile(r"\.tmp\d+\.[A-Za-z]+$")


def remove_temporary_files(out: Path) -> None:
    """Delete the temporary files a killed conversion left behind (``<stem>.tmp<pid>.<suffix>``)."""
    for folder in (out / "images", out / WORK_DIR):
        for path in folder.rglob("*.tmp*"):
            if path.is_file() and TEMPORARY_NAME.search(path.name):
                path.unlink()


def save_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` and rename tmp to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    write(tmp)
    os.replace(tmp, path)


def load_rgb(path: Path) -> Image.Image:
    """The image at ``path`` decoded as RGB; raises BadInput when it cannot be read."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:
        raise BadInput(f"cannot read the image ({type(error).__name__}: {error})") from error


def convert_image(item: ConvertItem, decode: Callable[[ConvertItem], np.ndarray], plan: LabelPlan,
                  size: int | None, out: Path) -> ImageRecord | Skipped:
    """Convert one image (see the module docstring); a bad input comes back as Skipped, nothing written."""
    try:
        image = load_rgb(item.image)
    except BadInput as error:
        return Skipped(str(item.image), str(error))
    try:
        class_map = decode(item)
    except BadInput as error:
        return Skipped(str(item.mask), str(error))
    except (OSError, ValueError, SyntaxError) as error:
        return Skipped(str(item.mask), f"cannot read the mask ({type(error).__name__}: {error})")
    if class_map.shape != (image.height, image.width):
        return Skipped(str(item.mask), f"mask size {class_map.shape[1]}x{class_map.shape[0]} (WxH) differs from "
                                       f"the image size {image.width}x{image.height} of {item.image}")
    values = np.unique(class_map).tolist()
    unknown = [v for v in values if v not in plan.ignore and v not in plan.number_of]
    if unknown:
        return Skipped(str(item.mask), f"class indices {unknown} are not in the class table")
    ih, iw = (size, size) if size else (image.height, image.width)
    sh, sw = ih // 2, iw // 2
    small = nearest_resize(class_map, (sh, sw))
    present, inverse = np.unique(small, return_inverse=True)
    numbers = np.array([plan.number_of.get(int(v), 0) for v in present], dtype=np.int64)
    number_map = numbers[inverse.reshape(small.shape)]
    category_map = np.array(["-"] + [category for _, category in plan.labels])[number_map]
    stem = item.key
    row = {"image": f"{stem}.jpg", "split": item.split, "ih": str(ih), "iw": str(iw), "sh": str(sh), "sw": str(sw)}
    shares: dict[tuple[int, str], float] = {}
    layers: dict[str, np.ndarray] = {}
    for category in PIXEL_CATEGORIES:
        layer = np.where(category_map == category, number_map, 0)
        row[category] = f"{stem}_{category}.png" if layer.any() else ""
        if layer.any():
            layers[category] = layer
            shares.update({(n, category): s for n, s in label_shares(layer[None]).items()})
    whole = {category: set() for category in IMAGE_CATEGORIES}
    for value in values:
        number = plan.number_of.get(value, 0)
        if number and plan.category_of(number) in IMAGE_CATEGORIES:
            whole[plan.category_of(number)].add(number)
    for number in item.image_labels:
        whole[plan.category_of(number)].add(number)
    for category, found in whole.items():
        row[category] = ";".join(str(n) for n in sorted(found))
        shares.update({(n, category): 1.0 for n in found})
    if size:
        image = image.resize((iw, ih), Image.BILINEAR)
    images_dir = out / "images"
    save_atomic(images_dir / row["image"], lambda tmp: image.save(tmp, quality=95, subsampling=JPEG_SUBSAMPLING))
    for category, layer in layers.items():
        save_atomic(images_dir / row[category], functools.partial(write_label_png, layer=layer))
    record = {"row": row, "shares": [[n, c, s] for (n, c), s in sorted(shares.items())]}
    save_atomic(record_path(out, item.key), lambda tmp: tmp.write_text(json.dumps(record)))
    return ImageRecord(row, shares)


def load_record(path: Path) -> ImageRecord:
    """An ImageRecord from its JSON file."""
    data = json.loads(path.read_text())
    return ImageRecord(data["row"], {(int(n), str(c)): float(s) for n, c, s in data["shares"]})


@dataclass(frozen=True)
class Summary:
    """What a conversion did."""

    converted: int
    """Images converted in this run."""
    reused: int
    """Images already converted by an earlier (interrupted) run."""
    skipped: list[Skipped]
    labels: int

    def line(self, out: Path) -> str:
        """The one-line summary printed by the command."""
        total = self.converted + self.reused
        reused = f" ({self.reused} already converted earlier)" if self.reused else ""
        skipped = f", skipped {len(self.skipped)} (listed in {out / SKIPPED_FILE})" if self.skipped else ""
        return f"converted {total} images{reused} with {self.labels} labels into {out}{skipped}"


def check_params(out: Path, params: dict) -> None:
    """Record the conversion settings in ``out`` or, when ``out`` holds another conversion, raise ConvertError."""
    path = out / WORK_DIR / PARAMS_FILE
    if path.is_file():
        if json.loads(path.read_text()) != params:
            raise ConvertError(f"{out} holds a conversion with other settings ({path}); "
                               f"delete it or choose another --out")
        return
    if out.exists() and any(out.iterdir()):
        raise ConvertError(f"{out} exists and is not a conversion output; delete it or choose another --out")
    save_atomic(path, lambda tmp: tmp.write_text(json.dumps(params, indent=2) + "\n"))


def run_conversion(items: list[ConvertItem], decode: Callable[[ConvertItem], np.ndarray], plan: LabelPlan,
                   out: Path, size: int | None, params: dict, skipped: list[Skipped] | None = None,
                   strict: bool = False, workers: int = 2) -> Summary:
    """Convert the items that have no record yet, then write the tables and skipped.csv (see the module docstring).

    ``skipped``: bad inputs the layout module found before conversion. With ``strict`` the first bad input
    raises ConvertError (``<file>: <reason>``); what was converted before stays and a later run reuses it.
    """
    out = Path(out)
    skipped = list(skipped or [])
    if strict and skipped:
        raise StrictStop(f"bad input {skipped[0].file}: {skipped[0].reason}")
    check_params(out, {"version": FORMAT_VERSION, "size": size, "labels": [list(label) for label in plan.labels],
                       **params})
    todo = [item for item in items if not record_path(out, item.key).is_file()]
    job = functools.partial(convert_image, decode=decode, plan=plan, size=size, out=out)
    progress = tqdm(total=len(todo), unit="img", desc=f"converting into {out.name}")
    pool = multiprocessing.Pool(workers) if workers > 1 and len(todo) > 1 else None
    converted = 0
    try:
        results = pool.imap_unordered(job, todo, chunksize=4) if pool else map(job, todo)
        for result in results:
            progress.update()
            if isinstance(result, Skipped):
                if strict:
                    raise StrictStop(f"bad input {result.file}: {result.reason} (--strict; the images converted "
                                     f"so far are kept, a rerun continues)")
                skipped.append(result)
            else:
                converted += 1
    finally:
        progress.close()
        if pool:
            pool.terminate()
            pool.join()
    remove_temporary_files(out)
    records = []
    for item in sorted(items, key=lambda item: item.key):
        path = record_path(out, item.key)
        if path.is_file():
            records.append(load_record(path))
    if not records:
        raise ConvertError(f"no image could be converted into {out}"
                           + (f"; first problem: {skipped[0].file}: {skipped[0].reason}" if skipped else ""))
    write_csv(out / SKIPPED_FILE, ["file", "reason"], sorted([s.file, s.reason] for s in skipped))
    write_tables(out, records, plan.labels)
    return Summary(converted=converted, reused=len(items) - len(todo),
                   skipped=skipped, labels=len(plan.labels))
