"""Reader for data sets in the Broden format (Bau et al., Network Dissection).

A Broden directory holds

- ``index.csv``: one row per image, columns ``INDEX_COLUMNS``. ``image`` is a
  path under ``images/``; ``ih, iw`` the image size; ``sh, sw`` the mask size.
  Pixel-category cells (color, object, part, material) hold ``;``-separated
  mask PNG names under ``images/`` (one file per layer) or are empty; the
  image-category cells (scene, texture) hold ``;``-separated label numbers.
- mask PNGs: the label number of a pixel is ``R + 256 * G``; 0 means unlabelled.
- ``label.csv``: ``number,name,category,frequency,coverage,syns``, numbers
  1..L; the category cell lists per-category image counts, e.g.
  ``material(36);object(3)``.
- ``category.csv``: ``name,first,last,count,frequency``.
- ``c_<category>.csv``: ``code,number,name,frequency,coverage``, a dense
  per-category code for each global label number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dissect.errors import DataError

CATEGORIES = ("color", "object", "part", "material", "scene", "texture")
PIXEL_CATEGORIES = ("color", "object", "part", "material")
IMAGE_CATEGORIES = ("scene", "texture")
INDEX_COLUMNS = ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "part", "material", "scene", "texture"]
LABEL_COLUMNS = ["number", "name", "category", "frequency", "coverage"]
CATEGORY_COLUMNS = ["name", "first", "last", "count", "frequency"]
CODE_COLUMNS = ["code", "number", "name", "frequency", "coverage"]

_CATEGORY_COUNT = re.compile(r"^([a-z_]+)\((\d+)\)$")


class BrodenFormatError(DataError):
    """A Broden file is missing or malformed; the message names the file, the row and what was expected."""


def read_csv_table(path: Path, required: list[str]) -> pd.DataFrame:
    """Read a CSV file as strings (empty cells -> ''), checking that the header has the ``required`` columns."""
    if not path.is_file():
        raise BrodenFormatError(f"{path} does not exist; a Broden directory needs it")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise BrodenFormatError(f"{path} is not a readable CSV file ({error})") from error
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise BrodenFormatError(
            f"{path} has header {list(table.columns)}, which lacks the columns {missing}; "
            f"the header must contain {required}"
        )
    return table


def parse_int_column(table: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """The integer values of ``table[column]``, shape (rows,); a non-integer cell raises naming its row."""
    values = table[column].tolist()
    for row, value in enumerate(values):
        if not value.strip().isdigit():
            raise BrodenFormatError(
                f"{path} line {row + 2}: column '{column}' is {value!r}, expected a non-negative integer"
            )
    return np.array([int(value) for value in values], dtype=np.int64)


def parse_category_counts(cell: str) -> dict[str, int]:
    """Parse a label.csv category cell like ``material(36);object(3)`` into ``{'material': 36, 'object': 3}``."""
    counts: dict[str, int] = {}
    for part in cell.split(";"):
        match = _CATEGORY_COUNT.match(part.strip())
        if match is None or match.group(1) not in CATEGORIES:
            raise ValueError(f"category entry {part!r} is not of the form name(count) with name in {CATEGORIES}")
        counts[match.group(1)] = int(match.group(2))
    return counts


def primary_category(counts: dict[str, int]) -> str:
    """The category with the largest image count (``parse_category_counts``); ties go to the one listed first."""
    return max(counts, key=lambda name: counts[name])


def decode_label_png(path: Path) -> np.ndarray:
    """Decode a Broden mask PNG into label numbers R + 256 * G, shape (h, w), int32.

    Raises BrodenFormatError naming the file if it is missing, undecodable or not RGB(A).
    """
    if not path.is_file():
        raise BrodenFormatError(f"mask file {path} does not exist")
    try:
        with Image.open(path) as image:
            mode = image.mode
            pixels = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise BrodenFormatError(f"mask file {path} cannot be decoded as an image ({error})") from error
    if mode not in ("RGB", "RGBA"):
        raise BrodenFormatError(f"mask file {path} has mode {mode}; expected an RGB or RGBA PNG")
    return pixels[:, :, 0].astype(np.int32) + 256 * pixels[:, :, 1].astype(np.int32)


def split_cell(cell: str) -> list[str]:
    """The non-empty ``;``-separated entries of an index.csv cell."""
    return [entry.strip() for entry in cell.split(";") if entry.strip()]


class BrodenDataset:
    """Random access to the images, masks and labels of a Broden directory.

    ``labels`` is a DataFrame indexed by label number (1..L) with columns
    ``name``, ``category`` (primary category: largest count in the label.csv
    category cell), ``coverage`` (float) and ``frequency`` (int);
    ``category_counts[number]`` is that cell parsed, e.g. ``{'material': 36, 'object': 3}``.
    ``splits[i]`` is the split (train/val) of image i.
    ``categories`` is category.csv indexed by name; ``codes[category]`` is
    c_<category>.csv indexed by code.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise BrodenFormatError(f"Broden directory {self.root} does not exist or is not a directory")
        index_path = self.root / "index.csv"
        index = read_csv_table(index_path, INDEX_COLUMNS)
        self.image_ids: list[str] = index["image"].tolist()
        self.splits: list[str] = index["split"].tolist()
        self._sizes = np.stack([parse_int_column(index, column, index_path) for column in ("ih", "iw", "sh", "sw")], axis=1)
        self._cells: dict[str, list[str]] = {category: index[category].tolist() for category in CATEGORIES}
        self.labels = self._read_labels()
        self.categories = self._read_categories()
        self.codes: dict[str, pd.DataFrame] = {name: self._read_codes(name) for name in self.categories.index}

    def _read_labels(self) -> pd.DataFrame:
        """label.csv as a DataFrame indexed by number 1..L (columns name, category, coverage, frequency)."""
        path = self.root / "label.csv"
        table = read_csv_table(path, LABEL_COLUMNS)
        numbers = parse_int_column(table, "number", path)
        if not np.array_equal(np.sort(numbers), np.arange(1, len(numbers) + 1)):
            raise BrodenFormatError(f"{path}: label numbers must be 1..{len(numbers)} without gaps or repeats")
        self.category_counts: dict[int, dict[str, int]] = {}
        for row, (number, cell) in enumerate(zip(numbers.tolist(), table["category"].tolist())):
            try:
                self.category_counts[number] = parse_category_counts(cell)
            except ValueError as error:
                raise BrodenFormatError(f"{path} line {row + 2}: {error}") from error
        primaries = [primary_category(self.category_counts[number]) for number in numbers.tolist()]
        try:
            coverage = table["coverage"].astype(float).to_numpy()
        except ValueError as error:
            raise BrodenFormatError(f"{path}: column 'coverage' must hold numbers ({error})") from error
        labels = pd.DataFrame(
            {
                "name": table["name"].tolist(),
                "category": primaries,
                "coverage": coverage,
                "frequency": parse_int_column(table, "frequency", path),
            },
            index=pd.Index(numbers, name="number"),
        )
        return labels.sort_index()

    def _read_categories(self) -> pd.DataFrame:
        """category.csv indexed by category name (columns first, last, count, frequency as int)."""
        path = self.root / "category.csv"
        table = read_csv_table(path, CATEGORY_COLUMNS)
        unknown = [name for name in table["name"] if name not in CATEGORIES]
        if unknown:
            raise BrodenFormatError(f"{path} names the categories {unknown}; allowed are {CATEGORIES}")
        columns = {column: parse_int_column(table, column, path) for column in CATEGORY_COLUMNS[1:]}
        return pd.DataFrame(columns, index=pd.Index(table["name"].tolist(), name="name"))

    def _read_codes(self, category: str) -> pd.DataFrame:
        """c_<category>.csv indexed by code (columns number, name, frequency, coverage)."""
        path = self.root / f"c_{category}.csv"
        table = read_csv_table(path, CODE_COLUMNS)
        codes = parse_int_column(table, "code", path)
        try:
            coverage = table["coverage"].astype(float).to_numpy()
        except ValueError as error:
            raise BrodenFormatError(f"{path}: column 'coverage' must hold numbers ({error})") from error
        return pd.DataFrame(
            {
                "number": parse_int_column(table, "number", path),
                "name": table["name"].tolist(),
                "frequency": parse_int_column(table, "frequency", path),
                "coverage": coverage,
            },
            index=pd.Index(codes, name="code"),
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    def _check_index(self, i: int) -> None:
        if not 0 <= i < len(self):
            raise IndexError(f"image index {i} is out of range; the data set has images 0..{len(self) - 1}")

    def _where(self, i: int) -> str:
        """Where image ``i`` is described, for error messages."""
        return f"{self.root / 'index.csv'} line {i + 2} (image {i}, {self.image_ids[i]})"

    def image_path(self, i: int) -> Path:
        """Path of image ``i`` (root/images/<image>)."""
        self._check_index(i)
        return self.root / "images" / self.image_ids[i]

    def mask_size(self, i: int) -> tuple[int, int]:
        """Mask size (sh, sw) of image ``i``."""
        self._check_index(i)
        return int(self._sizes[i, 2]), int(self._sizes[i, 3])

    def image_size(self, i: int) -> tuple[int, int]:
        """Image size (ih, iw) of image ``i`` as listed in index.csv."""
        self._check_index(i)
        return int(self._sizes[i, 0]), int(self._sizes[i, 1])

    @property
    def label_names(self) -> list[str]:
        """Label names indexed by label number; entry 0 is '-' (unlabelled)."""
        return ["-"] + self.labels["name"].tolist()

    def category_of(self, number: int) -> str:
        """Primary category of label ``number`` (1..L)."""
        if number not in self.labels.index:
            raise KeyError(f"label number {number} is not in label.csv; numbers are 1..{len(self.labels)}")
        return str(self.labels.at[number, "category"])

    def has_category(self, i: int, category: str) -> bool:
        """Whether image ``i`` is annotated in ``category`` (its index.csv cell is non-empty)."""
        self._check_index(i)
        if category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r}; allowed are {CATEGORIES}")
        return bool(split_cell(self._cells[category][i]))

    def mask_files(self, i: int, category: str) -> list[str]:
        """Mask PNG names (relative to images/) of image ``i`` in a pixel category, one per layer."""
        self._check_index(i)
        if category not in PIXEL_CATEGORIES:
            raise ValueError(f"mask_files needs a pixel category {PIXEL_CATEGORIES}, got {category!r}")
        return split_cell(self._cells[category][i])

    def pixel_labels(self, i: int, category: str) -> np.ndarray:
        """Label numbers of image ``i`` in a pixel category, shape (layers, sh, sw), int32.

        One layer per mask file in the cell; shape (0, sh, sw) when the cell is empty.
        """
        self._check_index(i)
        if category not in PIXEL_CATEGORIES:
            raise ValueError(f"pixel_labels needs a pixel category {PIXEL_CATEGORIES}, got {category!r}")
        size = self.mask_size(i)
        layers = []
        for name in self.mask_files(i, category):
            try:
                layer = decode_label_png(self.root / "images" / name)
            except BrodenFormatError as error:
                raise BrodenFormatError(f"{self._where(i)}, {category}: {error}") from error
            if layer.shape != size:
                raise BrodenFormatError(
                    f"{self._where(i)}, {category}: mask file {self.root / 'images' / name} has size "
                    f"{layer.shape}, expected (sh, sw) = {size}"
                )
            layers.append(layer)
        if not layers:
            return np.zeros((0, *size), dtype=np.int32)
        return np.stack(layers)

    def image_labels(self, i: int, category: str) -> list[int]:
        """Whole-image label numbers of image ``i`` in ``category`` (scene or texture); [] when none."""
        self._check_index(i)
        if category not in IMAGE_CATEGORIES:
            raise ValueError(f"image_labels needs an image category {IMAGE_CATEGORIES}, got {category!r}")
        entries = split_cell(self._cells[category][i])
        for entry in entries:
            if not entry.isdigit():
                raise BrodenFormatError(
                    f"{self._where(i)}: {category} cell entry {entry!r} is not a label number"
                )
        return [int(entry) for entry in entries]


@dataclass(frozen=True)
class ImageConcepts:
    """The concepts of one image: label numbers (k,), their masks (k, P) bool, annotated categories (n_categories,)."""

    labels: np.ndarray
    masks: np.ndarray
    annotated: np.ndarray


def image_label_layers(broden: BrodenDataset, i: int, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Image i's pixel labels, (layers, sh*sw) int32 (every mask layer of every pixel category, 0 = none),
    and its whole-image labels (scene, texture), (k,) int64 sorted and distinct.

    Raises BrodenFormatError naming the file and row for an unreadable mask or a
    label number outside label.csv.
    """
    sh, sw = broden.mask_size(i)
    layers = [broden.pixel_labels(i, category) for category in PIXEL_CATEGORIES]
    stacked = np.concatenate([layer.reshape(len(layer), sh * sw) for layer in layers])
    whole_labels = np.array(sorted({n for c in IMAGE_CATEGORIES for n in broden.image_labels(i, c)}), dtype=np.int64)
    outside = [stacked.max(initial=0) > n_labels, stacked.min(initial=0) < 0,
               whole_labels.max(initial=0) > n_labels, whole_labels.min(initial=0) < 0]
    if any(outside):
        bad = np.union1d(stacked[(stacked > n_labels) | (stacked < 0)],
                         whole_labels[(whole_labels > n_labels) | (whole_labels < 0)])
        raise BrodenFormatError(f"{broden.root / 'index.csv'} image {i} ({broden.image_ids[i]}): label number(s) "
                                f"{bad.tolist()} are not in label.csv (allowed 1..{n_labels})")
    return stacked, whole_labels


def image_concepts(broden: BrodenDataset, i: int, n_labels: int) -> ImageConcepts:
    """Decode image i's masks into one boolean mask per label present (label 0 ignored).

    Raises BrodenFormatError as ``image_label_layers``.
    """
    stacked, whole_labels = image_label_layers(broden, i, n_labels)
    pixel_labels = np.unique(stacked)
    labels = np.union1d(pixel_labels[pixel_labels > 0], whole_labels).astype(np.int64)
    masks = (stacked[:, None, :] == labels[None, :, None]).any(axis=0)
    masks[np.isin(labels, whole_labels)] = True
    annotated = np.array([broden.has_category(i, c) for c in CATEGORIES])
    return ImageConcepts(labels, masks, annotated)
