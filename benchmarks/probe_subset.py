"""A Broden directory holding the first images of another, for benchmarks at several sizes of one probe set."""

import shutil
from pathlib import Path


def subset_probe(source: Path, target: Path, n_images: int) -> Path:
    """Write ``target``: the first ``n_images`` rows of ``source``'s index.csv, its other tables copied, and
    ``images/`` a symlink to ``source``'s (label frequencies stay those of the whole set)."""
    target.mkdir(parents=True)
    lines = (source / "index.csv").read_text().splitlines(keepends=True)
    (target / "index.csv").write_text("".join(lines[:n_images + 1]))
    for table in source.glob("*.csv"):
        if table.name != "index.csv":
            shutil.copy(table, target / table.name)
    (target / "images").symlink_to((source / "images").resolve())
    return target
