"""Semantic-segmentation layouts: a folder of images, a folder of per-pixel class-index masks, a class table.

``SRC/<images>/`` holds the images (any depth; .jpg, .png, ...), ``SRC/<masks>/``
the masks: PNG files whose pixel values are class indices (mode L, I or I;16; a
palette PNG (mode P, Pascal VOC) is read as its palette indices; an RGB PNG only
when its three channels are equal). An image and a mask belong together when
their paths relative to their folders are equal once the extension and the
optional ``image_suffix`` / ``mask_suffix`` are removed (Cityscapes:
``_leftImg8bit`` / ``_gtFine_labelIds``); that common path is the image's key.
The split is ``val`` when the key's first folder is ``val`` or ``validation``,
otherwise ``train``.

The class table is a CSV (comma or tab separated) with the columns
``index,name`` and optionally ``category`` (a Broden category; default
``object``), or ADE20K's ``objectInfo150.csv`` (columns Idx, Ratio, Train, Val,
Name; a name holding several ``;``-separated names gives its first), or a
built-in table (``voc``, ``cityscapes``). Values in ``ignore`` mean unlabelled
(default 0; the built-in tables bring their own). A mask value that is neither
ignored nor in the table makes the image a bad input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.convert.writer import BadInput, ConvertError, ConvertItem, Skipped, SourceClass, read_rows
from dissect.broden import CATEGORIES
from dissect.probe import IMAGE_SUFFIXES

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
CITYSCAPES_CLASSES = ("road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge",
                      "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky",
                      "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle")
BUILTIN_TABLES: dict[str, tuple[list[SourceClass], frozenset[int]]] = {
    # Pascal VOC 2012 SegmentationClass: 1..20; 0 (background) and 255 (boundary) are unlabelled.
    "voc": ([SourceClass(k + 1, name) for k, name in enumerate(VOC_CLASSES)], frozenset({0, 255})),
    # Cityscapes *_gtFine_labelIds.png: label ids 7..33; ids 0..6 (unlabeled, ego vehicle, rectification border,
    # out of roi, static, dynamic, ground) are unlabelled.
    "cityscapes": ([SourceClass(k + 7, name) for k, name in enumerate(CITYSCAPES_CLASSES)], frozenset(range(7))),
}
ADE_TABLE = "objectInfo150.csv"


def read_class_table(path: Path) -> list[SourceClass]:
    """The classes of a class-table CSV (``index,name[,category]`` or ADE20K's ``Idx,...,Name``)."""
    try:
        rows = read_rows(path, ["index", "name"])
        index_column = "index"
    except ConvertError:
        rows = read_rows(path, ["idx", "name"])
        index_column = "idx"
    classes: list[SourceClass] = []
    seen: set[int] = set()
    for line, row in rows:
        cell = row[index_column].strip()
        if not cell.isdigit():
            raise ConvertError(f"{path} line {line}: class index {cell!r} is not a non-negative integer")
        names = [name.strip() for name in row["name"].split(";") if name.strip()]
        if not names:
            raise ConvertError(f"{path} line {line}: the class has no name")
        category = row.get("category", "").strip() or "object"
        if category not in CATEGORIES:
            raise ConvertError(f"{path} line {line}: category {category!r} is not one of {', '.join(CATEGORIES)}")
        if int(cell) in seen:
            raise ConvertError(f"{path} line {line}: class index {cell} is listed twice")
        seen.add(int(cell))
        classes.append(SourceClass(int(cell), names[0], category))
    if not classes:
        raise ConvertError(f"{path} lists no classes")
    return classes


def class_table(src: Path, classes: str | None, ignore: list[int] | None) -> tuple[list[SourceClass], frozenset[int]]:
    """(classes, ignored values) from ``--classes`` (a CSV path or a built-in name) and ``--ignore-index``.

    Without ``--classes`` the table is ``SRC/objectInfo150.csv`` (ADE20K) when present.
    """
    if classes in BUILTIN_TABLES:
        table, default_ignore = BUILTIN_TABLES[classes]
        return table, frozenset(ignore) if ignore is not None else default_ignore
    if classes is None:
        path = src / ADE_TABLE
        if not path.is_file():
            raise ConvertError(f"no class table: give --classes CSV (columns index,name[,category]) or one of "
                               f"{', '.join(BUILTIN_TABLES)}; {path} does not exist")
    else:
        path = Path(classes)
    return read_class_table(path), frozenset(ignore if ignore is not None else [0])


def strip_key(path: Path, root: Path, suffix: str) -> str | None:
    """The key of a file: its path under ``root`` without extension and without ``suffix``; None without the suffix."""
    relative = path.relative_to(root).with_suffix("").as_posix()
    if suffix:
        if not relative.endswith(suffix):
            return None
        relative = relative[: -len(suffix)]
    return relative


def split_of(key: str) -> str:
    """``val`` when the key's first folder is val or validation, else ``train``."""
    first = key.split("/")[0].lower() if "/" in key else ""
    return "val" if first in ("val", "validation") else "train"


def find_items(src: Path, images: str = "images", masks: str | None = None, image_suffix: str = "",
               mask_suffix: str = "") -> tuple[list[ConvertItem], list[Skipped]]:
    """Pair the images and masks of ``src`` (see the module docstring); unpaired files come back as Skipped.

    ``masks`` defaults to ``masks``, or ``annotations`` (ADE20K) when there is no ``masks`` folder.
    """
    images_dir = src / images
    if masks is None:
        masks = "masks" if (src / "masks").is_dir() or not (src / "annotations").is_dir() else "annotations"
    masks_dir = src / masks
    for folder, option in ((images_dir, "--images"), (masks_dir, "--masks")):
        if not folder.is_dir():
            raise ConvertError(f"{folder} is not a folder; name the folder with {option}")
    skipped: list[Skipped] = []
    mask_of: dict[str, Path] = {}
    for path in sorted(p for p in masks_dir.rglob("*.png") if p.is_file()):
        key = strip_key(path, masks_dir, mask_suffix)
        if key is not None:
            mask_of[key] = path
    items: list[ConvertItem] = []
    seen: set[str] = set()
    for path in sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        key = strip_key(path, images_dir, image_suffix)
        if key is None:
            continue
        if ";" in key or "," in key:
            skipped.append(Skipped(str(path), "the file name contains ';' or ',', which Broden cells cannot hold"))
        elif key in seen:
            skipped.append(Skipped(str(path), f"another image has the same name {key} (other extension)"))
        elif key not in mask_of:
            skipped.append(Skipped(str(path), f"no mask {masks_dir / key}{mask_suffix}.png"))
        else:
            items.append(ConvertItem(key, path, mask_of[key], split_of(key)))
        seen.add(key)
    for key in sorted(set(mask_of) - seen):
        skipped.append(Skipped(str(mask_of[key]), f"no image for this mask under {images_dir}"))
    return items, skipped


def image_names(item: ConvertItem, images_dir: Path) -> list[str]:
    """The names an image-label row may use for the item: its path under the images folder, and its key."""
    return [item.image.relative_to(images_dir).as_posix(), item.key]


def decode_class_mask(item: ConvertItem) -> np.ndarray:
    """The class indices of a mask PNG, shape (H, W) int64 (palette PNGs: the palette indices)."""
    with Image.open(item.mask) as mask:
        mode = mask.mode
        pixels = np.asarray(mask)
    if mode in ("RGB", "RGBA"):
        if not (np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])):
            raise BadInput("the mask is a colour image (RGB with unequal channels); masks must hold class indices "
                           "(mode L, I, or a palette PNG)")
        pixels = pixels[..., 0]
    elif mode == "LA":
        pixels = pixels[..., 0]
    if pixels.ndim != 2:
        raise BadInput(f"the mask has mode {mode}, which holds no class indices")
    return pixels.astype(np.int64)
