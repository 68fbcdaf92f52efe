"""Check a Broden directory file by file and list what is wrong with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dissect.broden import (
    IMAGE_CATEGORIES,
    PIXEL_CATEGORIES,
    BrodenDataset,
    BrodenFormatError,
    decode_label_png,
)


def verify(root: Path) -> list[str]:
    """Problems of the Broden directory ``root``, one sentence each; empty when it is fine.

    Checks that the tables parse; every image and mask referenced by index.csv
    exists and decodes; images have size (ih, iw) and masks (sh, sw); every
    label number in the masks and the scene/texture cells is in label.csv;
    category.csv first/last/count agree with c_<category>.csv and with the
    categories listed in label.csv; c_<category>.csv numbers and names agree
    with label.csv.
    """
    try:
        dataset = BrodenDataset(root)
    except BrodenFormatError as error:
        return [str(error)]
    problems = check_tables(dataset)
    for i in tqdm(range(len(dataset)), unit="img", desc=f"verifying {dataset.root.name}"):
        problems += check_image(dataset, i)
    return problems


def check_tables(dataset: BrodenDataset) -> list[str]:
    """Problems in category.csv and c_<category>.csv relative to label.csv."""
    problems = []
    labels = dataset.labels
    for category, row in dataset.categories.iterrows():
        path = dataset.root / f"c_{category}.csv"
        codes = dataset.codes[category]
        numbers = codes["number"].to_numpy()
        unknown = sorted(set(numbers.tolist()) - set(labels.index.tolist()))
        if unknown:
            problems.append(f"{path} lists label numbers {unknown} that are not in label.csv")
        known = codes[codes["number"].isin(labels.index)]
        wrong_names = known[known["name"].to_numpy() != labels.loc[known["number"], "name"].to_numpy()]
        for code, entry in wrong_names.iterrows():
            problems.append(
                f"{path} code {code}: name {entry['name']!r} differs from label.csv name "
                f"{labels.at[entry['number'], 'name']!r} of number {entry['number']}"
            )
        expected = (int(numbers.min()), int(numbers.max()), len(numbers)) if len(numbers) else None
        found = (int(row["first"]), int(row["last"]), int(row["count"]))
        if expected != found:
            problems.append(
                f"{dataset.root / 'category.csv'} row {category}: first, last, count are {found}, "
                f"but {path} has {expected}"
            )
        listed = {number for number, counts in dataset.category_counts.items() if category in counts}
        if listed != set(numbers.tolist()):
            problems.append(
                f"{path} holds label numbers {sorted(set(numbers.tolist()))}, but label.csv lists category "
                f"{category} for {sorted(listed)}"
            )
    return problems


def check_image(dataset: BrodenDataset, i: int) -> list[str]:
    """Problems with the files and label numbers of image ``i``."""
    where = f"{dataset.root / 'index.csv'} line {i + 2} ({dataset.image_ids[i]})"
    problems = []
    path = dataset.image_path(i)
    try:
        with Image.open(path) as image:
            image.load()
            size = (image.height, image.width)
        expected = dataset.image_size(i)
        if size != expected:
            problems.append(f"{where}: image {path} has size {size}, expected (ih, iw) = {expected}")
    except FileNotFoundError:
        problems.append(f"{where}: image {path} does not exist")
    except (OSError, SyntaxError, ValueError) as error:
        problems.append(f"{where}: image {path} cannot be decoded ({error})")
    known = dataset.labels.index.to_numpy()
    for category in PIXEL_CATEGORIES:
        for name in dataset.mask_files(i, category):
            mask_path = dataset.root / "images" / name
            try:
                layer = decode_label_png(mask_path)
            except BrodenFormatError as error:
                problems.append(f"{where}, {category}: {error}")
                continue
            if layer.shape != dataset.mask_size(i):
                problems.append(
                    f"{where}, {category}: mask {mask_path} has size {layer.shape}, "
                    f"expected (sh, sw) = {dataset.mask_size(i)}"
                )
            values = np.unique(layer)
            unknown = values[(values != 0) & ~np.isin(values, known)]
            if unknown.size:
                problems.append(
                    f"{where}, {category}: mask {mask_path} holds label numbers {unknown.tolist()} "
                    f"that are not in label.csv (1..{len(known)})"
                )
    for category in IMAGE_CATEGORIES:
        try:
            numbers = dataset.image_labels(i, category)
        except BrodenFormatError as error:
            problems.append(str(error))
            continue
        unknown_numbers = [n for n in numbers if n not in dataset.labels.index]
        if unknown_numbers:
            problems.append(f"{where}: {category} labels {unknown_numbers} are not in label.csv (1..{len(known)})")
    return problems
