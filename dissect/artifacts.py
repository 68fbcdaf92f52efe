"""File names and small I/O helpers shared by the stages.

Every stage reads the artifacts of earlier stages from the run directory
(``out_dir``) and writes its own there; these names are the interface.
"""

import json
import os
from pathlib import Path
from typing import Any

import zarr

from dissect.errors import ArtifactError

ACTIVATIONS = "activations.zarr"
EXTRACT_PROGRESS = "extract_progress.json"
SKIPPED_IMAGES = "skipped_images.csv"


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON so that a reader (or a killed writer) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """Read a JSON file written by ``write_json_atomic``."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def open_activations(run_dir: Path) -> zarr.Group:
    """Open a finished extract stage's store read-only; raise if it is missing or unfinished."""
    path = Path(run_dir) / ACTIVATIONS
    if not path.is_dir():
        raise ArtifactError(f"no activations at {path}; run the extract stage first (stages=[extract])")
    group = zarr.open_group(path, mode="r")
    if not group.attrs.get("complete", False):
        raise ArtifactError(f"the activations at {path} are unfinished; run the extract stage again to finish them")
    return group
