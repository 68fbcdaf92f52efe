"""Probe sets: the images a model is run on, and their preprocessing.

A probe set is either a Broden-format directory (``kind: broden``; images are
listed by its ``index.csv``) or a plain folder of images (``kind: folder``;
every image file under it, sorted, ids are paths relative to the folder).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dissect.broden import BrodenDataset
from dissect.errors import DataError

PROBE_KINDS = ("broden", "folder")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ProbeSetError(DataError):
    """A probe set configuration or directory that cannot be used."""


@dataclass(frozen=True)
class ProbeSet:
    """The images of a probe set: ids (stable names) and file paths, same order."""

    name: str
    kind: str
    root: Path
    image_ids: list[str]
    image_paths: list[Path]

    def __len__(self) -> int:
        return len(self.image_ids)

    def description(self) -> dict[str, Any]:
        """JSON-serialisable description stored with every stage output."""
        return {"name": self.name, "kind": self.kind, "root": str(self.root), "images": len(self)}


def open_probe_set(cfg: Mapping[str, Any]) -> ProbeSet:
    """Open the probe set described by a dataset config (keys name, kind, root)."""
    kind = cfg["kind"]
    root = Path(str(cfg["root"])).expanduser().resolve()
    if kind not in PROBE_KINDS:
        raise ProbeSetError(f"dataset.kind={kind!r} is not known; allowed: {', '.join(PROBE_KINDS)}")
    if not root.is_dir():
        raise ProbeSetError(f"dataset.root={str(cfg['root'])!r} is not a directory ({root})")
    if kind == "broden":
        broden = BrodenDataset(root)
        ids = list(broden.image_ids)
        paths = [broden.image_path(i) for i in range(len(broden))]
    else:
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        ids = [p.relative_to(root).as_posix() for p in paths]
    if not ids:
        raise ProbeSetError(f"the probe set at {root} holds no images")
    return ProbeSet(name=str(cfg["name"]), kind=kind, root=root, image_ids=ids, image_paths=paths)


@dataclass(frozen=True)
class Preprocessing:
    """Resize to input_size x input_size (no crop: pixels stay aligned with masks), normalise.

    Split in two so that loader workers only decode (``load``, uint8) and the
    normalisation runs batched on the model's device (``normalise``).
    """

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def load(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, input_size, input_size) uint8 tensor (bilinear resize only if needed)."""
        rgb = image.convert("RGB")
        if rgb.size != (self.input_size, self.input_size):
            rgb = rgb.resize((self.input_size, self.input_size), Image.BILINEAR)
        return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 on any device -> (N, 3, S, S) float32, (x / 255 - mean) / std."""
        scale = 255.0 * torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        shift = 255.0 * torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        return images.float().sub_(shift).div_(scale)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, input_size, input_size) normalised float32 tensor."""
        return self.normalise(self.load(image)[None])[0]

    def description(self) -> dict[str, Any]:
        return {
            "resize": f"bilinear to {self.input_size}x{self.input_size} when the image has another size, no crop",
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }


class ProbeImages(Dataset):
    """Decoded probe images at the input size; a file that cannot be read is flagged, not raised.

    Item i is ``(i, image (3, S, S) uint8, error)`` where error is "" when the
    image decoded and otherwise the reason (the image tensor is then zeros).
    Normalise batches with ``Preprocessing.normalise``.
    """

    def __init__(self, paths: list[Path], preprocessing: Preprocessing) -> None:
        self.paths = paths
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        try:
            with Image.open(self.paths[index]) as image:
                image.load()
                return index, self.preprocessing.load(image), ""
        except (OSError, ValueError, SyntaxError) as error:  # PIL raises all three on bad files
            size = self.preprocessing.input_size
            return index, torch.zeros(3, size, size, dtype=torch.uint8), f"{type(error).__name__}: {error}"
