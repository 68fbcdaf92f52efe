"""Small I/O helpers shared by the stages (the paths themselves are in ``dissect.layout``)."""

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from dissect.broden import BrodenDataset
from dissect.errors import ArtifactError, ConfigError
from dissect.layout import RunLayout

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
    path = RunLayout(run_dir).activations
    if not path.is_dir():
        raise ArtifactError(f"no activations at {path}; run the extract stage first (stages=[extract])")
    group = zarr.open_group(path, mode="r")
    if not group.attrs.get("complete", False):
        raise ArtifactError(f"the activations at {path} are unfinished; run the extract stage again to finish them")
    return group


def map_layers(store: zarr.Group, requested: list[str]) -> list[str]:
    """The requested layers that the store holds as maps (vector layers cannot be dissected against masks)."""
    missing = [name for name in requested if name not in store.attrs["layers"]]
    if missing:
        raise ArtifactError(f"layers {missing} were not extracted; the store holds {store.attrs['layer_order']}. "
                            "Add them to layers=[...] and run the extract stage")
    return [name for name in requested if store.attrs["layers"][name]["kind"] == "map"]


def read_thresholds(layout: RunLayout, layer: str) -> np.ndarray:
    """(U,) thresholds of a layer written by the thresholds stage; float64, exactly as computed."""
    path = layout.thresholds_csv(layer)
    if not path.is_file():
        raise ArtifactError(f"no thresholds for layer {layer!r} ({path} is missing); run the thresholds stage first")
    return pd.read_csv(path)["threshold"].to_numpy(np.float64)


def chunk_blocks(array: zarr.Array, block_mib: float) -> list[tuple[int, int]]:
    """(start, stop) of consecutive blocks of the image axis, each a whole number of ``array``'s chunks.

    A block holds about ``block_mib`` MiB of the array (at least one chunk).
    """
    chunk = array.chunks[0]
    chunk_bytes = chunk * math.prod(array.shape[1:]) * array.dtype.itemsize
    step = chunk * max(1, int(block_mib * 2**20 // max(chunk_bytes, 1)))
    return [(start, min(start + step, array.shape[0])) for start in range(0, array.shape[0], step)]


def concept_probe_set(dataset: Any, store: zarr.Group, run_dir: Path, needed_by: str) -> BrodenDataset:
    """The Broden-format probe set of ``dataset`` (a dataset config), checked against the run's activations.

    ``needed_by`` names what needs concept masks in the errors (for example "the tally").
    """
    if dataset.kind != "broden":
        raise ConfigError(f"{needed_by} needs concept masks: dataset.kind={dataset.kind!r} has none; "
                          "use a Broden-format probe set (dataset=default or dataset=broden)")
    broden = BrodenDataset(Path(str(dataset.root)).resolve())
    if list(store["image_ids"][:]) != broden.image_ids:
        raise ArtifactError(f"the activations in {run_dir} were extracted from other images than {broden.root}")
    return broden
