"""Converters from common segmentation layouts to a Broden-format probe set.

    python -m data_prep convert semantic SRC --out DIR [--classes CSV|voc|cityscapes] [--images NAME]
        [--masks NAME] [--image-suffix S] [--mask-suffix S] [--ignore-index 0,255]
    python -m data_prep convert coco-panoptic PANOPTIC.json --out DIR [--images DIR] [--masks DIR]
    common: [--size 224|227|keep] [--categories CSV] [--image-labels CSV --image-label-category scene|texture]
            [--strict] [--workers N]

Modules: ``semantic`` (image folder + class-index masks + class table: home-made
sets, ADE20K, Cityscapes, Pascal VOC), ``coco_panoptic`` and ``writer`` (label
numbering, per-image conversion, tables; shared). Exit codes of ``main``: 0 done
(bad inputs skipped and listed), 1 the conversion cannot start or converted
nothing, 2 a bad input with ``--strict``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.convert import coco_panoptic, semantic
from data_prep.convert.writer import (
    ConvertError,
    StrictStop,
    Summary,
    apply_overrides,
    attach_image_labels,
    plan_labels,
    read_category_overrides,
    read_image_labels,
    run_conversion,
)
from dissect.broden import IMAGE_CATEGORIES

FORMATS = ("semantic", "coco-panoptic")


def parse_size(text: str) -> int | None:
    """``--size``: 224, 227 or keep (None)."""
    if text == "keep":
        return None
    if text not in ("224", "227"):
        raise argparse.ArgumentTypeError(f"--size must be 224, 227 or keep, not {text!r}")
    return int(text)


def parse_indices(text: str) -> list[int]:
    """``--ignore-index``: comma-separated non-negative integers."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ignore-index must be integers separated by commas, not {text!r}")
    if any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"--ignore-index values must be >= 0, not {text!r}")
    return values


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``convert`` subcommand to the ``python -m data_prep`` parser."""
    convert = commands.add_parser("convert", help="convert a segmentation data set into a Broden-format probe set",
                                  description=__doc__.splitlines()[0])
    convert.add_argument("format", choices=FORMATS)
    convert.add_argument("src", type=Path, help="semantic: the data set folder; coco-panoptic: the panoptic JSON")
    convert.add_argument("--out", type=Path, required=True, help="the Broden directory to write")
    convert.add_argument("--size", type=parse_size, default=224, help="224, 227 or keep (default 224)")
    convert.add_argument("--strict", action="store_true", help="stop (exit 2) at the first bad input")
    convert.add_argument("--workers", type=int, default=2)
    convert.add_argument("--categories", type=Path, help="name,category CSV overriding Broden categories of classes")
    convert.add_argument("--image-labels", type=Path, help="image,labels CSV of whole-image labels (';'-separated)")
    convert.add_argument("--image-label-category", choices=IMAGE_CATEGORIES, default="scene")
    convert.add_argument("--classes", help="semantic: class table CSV (index,name[,category]) or voc / cityscapes; "
                                           "default SRC/objectInfo150.csv")
    convert.add_argument("--images", help="semantic: image folder under SRC (default images); "
                                          "coco-panoptic: image folder (default <json dir>/../<split>)")
    convert.add_argument("--masks", help="semantic: mask folder under SRC (default masks, or annotations); "
                                         "coco-panoptic: PNG folder (default the JSON path without .json)")
    convert.add_argument("--image-suffix", default="", help="semantic: image name ending to drop when pairing")
    convert.add_argument("--mask-suffix", default="", help="semantic: mask name ending to drop when pairing")
    convert.add_argument("--ignore-index", type=parse_indices, help="semantic: mask values meaning unlabelled "
                                                                    "(default 0; voc 0,255; cityscapes 0..6)")


def convert(args: argparse.Namespace) -> Summary:
    """Run the conversion described by the parsed ``convert`` arguments."""
    if args.workers < 1:
        raise ConvertError(f"--workers must be at least 1, not {args.workers}")
    src = Path(args.src)
    if args.format == "semantic":
        classes, ignore = semantic.class_table(src, args.classes, args.ignore_index)
        items, skipped = semantic.find_items(src, args.images or "images", args.masks, args.image_suffix,
                                             args.mask_suffix)
        images_dir = src / (args.images or "images")
        decode, names_of = semantic.decode_class_mask, semantic.image_names
    else:
        data = coco_panoptic.read_panoptic(src)
        classes, ignore = coco_panoptic.panoptic_classes(data), frozenset({0})
        items, skipped, images_dir = coco_panoptic.find_items(src, data, args.images and Path(args.images),
                                                              args.masks and Path(args.masks))
        decode, names_of = coco_panoptic.decode_panoptic, coco_panoptic.image_names
    if args.categories:
        classes = apply_overrides(classes, read_category_overrides(args.categories), src)
    labels = read_image_labels(args.image_labels) if args.image_labels else {}
    plan = plan_labels(classes, ignore, [name for names in labels.values() for name in names],
                       args.image_label_category)
    if labels:
        items, unmatched = attach_image_labels(items, labels, plan, lambda item: names_of(item, images_dir),
                                               args.image_labels)
        skipped += unmatched
    params = {"format": args.format, "ignore": sorted(ignore)}
    return run_conversion(items, decode, plan, args.out, args.size, params, skipped, args.strict, args.workers)


def main(args: argparse.Namespace) -> int:
    """The ``convert`` command: print the summary line; exit 1 when it cannot run, 2 on a bad input with --strict."""
    try:
        summary = convert(args)
    except StrictStop as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ConvertError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary.line(args.out))
    return 0
