"""Names of the report's pages and anchors, shared by the page builder and the sections."""

import os
from pathlib import Path

from dissect.layout import layer_page_name


def layer_file(layer: str) -> str:
    """File name of a layer's page of unit cards, relative to the report directory."""
    return layer_page_name(layer)


def unit_anchor(layer: str, unit: int) -> str:
    """Id of a unit's card on its layer page."""
    return f"unit-{layer}-{unit}"


def relative(path: Path, report_dir: Path) -> str:
    """A path as a link relative to the report directory, with forward slashes."""
    return Path(os.path.relpath(path, report_dir)).as_posix()
