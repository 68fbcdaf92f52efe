"""COCO panoptic segmentation: a JSON file, its PNGs (segment ids in RGB) and the images.

``SRC`` is the panoptic JSON (``annotations/panoptic_val2017.json``) with
``images`` (id, file_name), ``annotations`` (image_id, file_name of the PNG,
segments_info: id, category_id) and ``categories`` (id, name, isthing). A PNG
pixel's segment id is ``R + 256 * G + 256**2 * B``; 0 is void (unlabelled).
Each segment's pixels get its category; category ids are the class indices.

Categories: ``isthing = 1`` -> object; stuff -> ``DEFAULT_STUFF_CATEGORIES``
when listed there (stuff that Broden, following ADE20K, counts as objects),
otherwise material. A ``name,category`` CSV (``--categories``) overrides any of
them; a stuff class mapped to ``scene`` or ``texture`` becomes a whole-image
label of every image in which it has a pixel.

Defaults (COCO's own layout): the PNG folder is the JSON path without
``.json``; the image folder is ``<json folder>/../<split>`` for a JSON named
``panoptic_<split>.json``. The split is ``val`` when the JSON name contains
``val``, else ``train``. The key of an image is its file name without extension.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.convert.writer import BadInput, ConvertError, ConvertItem, Skipped, SourceClass

DEFAULT_STUFF_CATEGORIES: dict[str, str] = {
    name: "object"
    for name in ("banner", "blanket", "bridge", "cabinet-merged", "ceiling-merged", "counter", "curtain", "door-stuff",
                 "fence-merged", "flower", "fruit", "house", "light", "mirror-stuff", "net", "pillow", "rug-merged",
                 "shelf", "sky-other-merged", "stairs", "table-merged", "tent", "towel", "tree-merged",
                 "window-blind", "window-other", "building-other-merged", "food-other-merged")
}
"""COCO panoptic stuff classes labelled object; every other stuff class is a material."""


def read_panoptic(src: Path) -> dict:
    """The panoptic JSON; raises ConvertError naming the file when it cannot be read or lacks a key."""
    try:
        data = json.loads(Path(src).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConvertError(f"{src} cannot be read as a COCO panoptic JSON file ({error})") from error
    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if missing:
        raise ConvertError(f"{src} lacks the keys {missing} of a COCO panoptic JSON file")
    return data


def panoptic_classes(data: dict) -> list[SourceClass]:
    """One class per category: id, name, object for things, DEFAULT_STUFF_CATEGORIES / material for stuff."""
    classes = []
    for category in data["categories"]:
        name = str(category["name"])
        kind = "object" if category.get("isthing", 0) == 1 else DEFAULT_STUFF_CATEGORIES.get(name, "material")
        classes.append(SourceClass(int(category["id"]), name, kind))
    return classes


def default_dirs(src: Path) -> tuple[Path, Path]:
    """(image folder, PNG folder) by COCO's layout (see the module docstring)."""
    masks = src.with_suffix("")
    split = src.stem[len("panoptic_"):] if src.stem.startswith("panoptic_") else src.stem
    return src.parent.parent / split, masks


def find_items(src: Path, data: dict, images: Path | None = None, masks: Path | None = None
               ) -> tuple[list[ConvertItem], list[Skipped], Path]:
    """(items, skipped, image folder) of a panoptic JSON; images without annotation come back as Skipped."""
    default_images, default_masks = default_dirs(src)
    images_dir = Path(images) if images else default_images
    masks_dir = Path(masks) if masks else default_masks
    for folder, option in ((images_dir, "--images"), (masks_dir, "--masks")):
        if not folder.is_dir():
            raise ConvertError(f"{folder} is not a folder; name the folder with {option}")
    split = "val" if "val" in src.stem else "train"
    files = {entry["id"]: str(entry["file_name"]) for entry in data["images"]}
    items, skipped, annotated = [], [], set()
    for annotation in data["annotations"]:
        image_id = annotation["image_id"]
        if image_id not in files:
            skipped.append(Skipped(str(masks_dir / annotation["file_name"]), f"image id {image_id} is not in {src}"))
            continue
        annotated.add(image_id)
        key = Path(files[image_id]).with_suffix("").as_posix()
        segments = {int(s["id"]): int(s["category_id"]) for s in annotation.get("segments_info", [])}
        items.append(ConvertItem(key, images_dir / files[image_id], masks_dir / annotation["file_name"], split,
                                 extra={"segments": segments}))
    for image_id in sorted(set(files) - annotated):
        skipped.append(Skipped(str(images_dir / files[image_id]), f"no panoptic annotation in {src}"))
    return items, skipped, images_dir


def image_names(item: ConvertItem, images_dir: Path) -> list[str]:
    """The names an image-label row may use for the item: its file name, and its key."""
    return [item.image.relative_to(images_dir).as_posix(), item.key]


def decode_panoptic(item: ConvertItem) -> np.ndarray:
    """The category id of every pixel of a panoptic PNG, shape (H, W) int64 (0: void)."""
    with Image.open(item.mask) as mask:
        if mask.mode not in ("RGB", "RGBA"):
            raise BadInput(f"the panoptic PNG has mode {mask.mode}; expected RGB segment ids")
        rgb = np.asarray(mask)[..., :3].astype(np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
    segments: dict[int, int] = item.extra["segments"]
    present, inverse = np.unique(ids, return_inverse=True)
    unknown = [int(i) for i in present if i and int(i) not in segments]
    if unknown:
        raise BadInput(f"segment ids {unknown} are not in the segments_info of its annotation")
    categories = np.array([segments.get(int(i), 0) for i in present], dtype=np.int64)
    return categories[inverse.reshape(ids.shape)]
