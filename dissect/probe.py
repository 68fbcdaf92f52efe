"""Probe sets: the images a model is run on, and their preprocessing.

A probe set is either a Broden-format directory (``kind: broden``; images are
listed by its ``index.csv``) or a plain folder of images (``kind: folder``;
every image file under it, sorted, ids are paths relative to the folder).

Images are decoded by ``Preprocessing.read``: baseline and progressive JPEGs
(YCbCr or greyscale) by libjpeg-turbo through simplejpeg, which holds no GIL
while it decodes, so threads decode in parallel (``ThreadedBatches``); every other file, and any JPEG that simplejpeg refuses,
by PIL. Both give the same pixels as PIL, and an unreadable file raises PIL's error.
"""

from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch.utils.data import Dataset

from dissect.broden import BrodenDataset
from dissect.errors import DataError

PROBE_KINDS = ("broden", "folder")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: The bytes PIL recognises a JPEG by.
JPEG_MAGIC = b"\xff\xd8\xff"
#: JPEG colour spaces that simplejpeg decodes to RGB with PIL's pixels; others (CMYK, YCCK) go through PIL.
FAST_JPEG_COLORSPACES = ("YCbCr", "Gray")
#: The errors PIL raises on a file it cannot read.
UNREADABLE = (OSError, ValueError, SyntaxError)


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
        return torch.from_numpy(np.array(self._resized(image))).permute(2, 0, 1)

    def read(self, path: Path, out: np.ndarray | None = None) -> np.ndarray:
        """The image file at ``path`` -> (input_size, input_size, 3) uint8 RGB, written into ``out`` if given.

        The pixels are those of ``load(Image.open(path))``: a JPEG that
        simplejpeg decodes (strictly, so any fault in the file sends it to PIL)
        is decoded without the GIL, resized by PIL if it has another size;
        anything else is opened by PIL. Raises what PIL raises on a file it
        cannot read (one of ``UNREADABLE``).
        """
        size = self.input_size
        target = np.empty((size, size, 3), dtype=np.uint8) if out is None else out
        with open(path, "rb") as handle:
            data = handle.read()
        if data.startswith(JPEG_MAGIC):
            try:
                height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
                limit = Image.MAX_IMAGE_PIXELS  # larger images go to PIL, which warns or refuses them
                if colorspace in FAST_JPEG_COLORSPACES and (limit is None or height * width <= limit):
                    if (height, width) == (size, size) and target.flags.c_contiguous:
                        simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=target)
                    else:
                        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB")
                        target[...] = np.asarray(self._resized(Image.fromarray(rgb)))
                    return target
            except ValueError:  # simplejpeg's error for anything it cannot decode strictly: let PIL judge the file
                pass
        with Image.open(path) as image:
            image.load()
            target[...] = np.asarray(self._resized(image))
        return target

    def _resized(self, image: Image.Image) -> Image.Image:
        """PIL image -> input_size x input_size RGB image (bilinear resize only if needed)."""
        rgb = image.convert("RGB")
        if rgb.size != (self.input_size, self.input_size):
            rgb = rgb.resize((self.input_size, self.input_size), Image.BILINEAR)
        return rgb

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 on any device -> (N, 3, S, S) float32, (x / 255 - mean) / std."""
        scale = 255.0 * torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        shift = 255.0 * torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        return images.float().sub_(shift).div_(scale)

    def normalise_array(self, images: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 in channels-last memory order, bit for bit ``normalise``.

        The result is a transposed view of ``out`` (N, S, S, 3) float32 (a new
        array if None), so both numpy passes run over contiguous memory, on one
        thread, without the GIL: for a thread beside the model's, whose
        convolutions run fastest on channels-last input.
        """
        if out is None:
            out = np.empty(images.shape, dtype=np.float32)
        if not out.flags.c_contiguous:
            raise ValueError("normalise_array needs a C-contiguous out array")
        # as rows of S x 3 values against the per-channel constants tiled S times: numpy's inner
        # loop then runs over a whole row, not over the 3 channels of one pixel (4x faster)
        width = images.shape[2]
        rows, out_rows = images.reshape(-1, width * 3), out.reshape(-1, width * 3)
        np.subtract(rows, np.tile(255.0 * np.asarray(self.mean, dtype=np.float32), width), out=out_rows)
        np.divide(out_rows, np.tile(255.0 * np.asarray(self.std, dtype=np.float32), width), out=out_rows)
        return out.transpose(0, 3, 1, 2)

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
        size = self.preprocessing.input_size
        pixels = np.zeros((size, size, 3), dtype=np.uint8)
        error = read_into(self.paths[index], self.preprocessing, pixels)
        return index, torch.from_numpy(pixels).permute(2, 0, 1), error


def read_into(path: Path, preprocessing: Preprocessing, out: np.ndarray) -> str:
    """Decode ``path`` into ``out`` (S, S, 3) uint8; "" or, for an unreadable file, its error (``out`` zeroed)."""
    try:
        preprocessing.read(path, out)
        return ""
    except UNREADABLE as error:  # PIL raises all three on bad files
        out[...] = 0
        return f"{type(error).__name__}: {error}"


class ThreadedBatches:
    """Batches of probe images decoded and normalised by threads, optionally a few batches ahead.

    Iterating yields ``(indices, images (n, 3, S, S) float32, errors)`` per
    batch of ``batches``, in order: ``images`` in channels-last memory order
    (``torch.channels_last``, the layout the decoder writes), normalised as
    ``Preprocessing.normalise`` does, an unreadable image as zeros before
    normalisation, and ``errors[i]`` "" or the reason image i could not be
    read (as ``ProbeImages``). Up to ``depth`` batches are decoded ahead of the
    one being used (0: each when it is asked for), each batch cut between
    ``threads`` threads (simplejpeg and numpy hold no GIL while they work, so
    they run beside each other and the model's threads). The tensor of
    a batch is a reused buffer, overwritten once the next batch is taken:
    copy it to keep it. Use as a context manager; leaving it (also on an
    error, or before the last batch) cancels the batches not yet started and
    waits for the threads. An error other than an unreadable image is raised
    where its batch is taken.
    """

    def __init__(self, paths: Sequence[Path], preprocessing: Preprocessing, batches: Sequence[Sequence[int]],
                 depth: int = 2, threads: int = 1) -> None:
        if depth < 0 or threads < 1:
            raise ValueError(f"depth={depth} must be >= 0 and threads={threads} >= 1")
        self.paths = paths
        self.preprocessing = preprocessing
        self.batches = [list(batch) for batch in batches]
        self.depth = depth
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._started = False

    def __enter__(self) -> "ThreadedBatches":
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="probe-decoder")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
        if self._pool is None:
            raise RuntimeError("iterate ThreadedBatches inside its `with` block")
        if self._started:
            raise RuntimeError("ThreadedBatches can be iterated once")
        self._started = True
        return self._iterate(self._pool)

    def _iterate(self, pool: ThreadPoolExecutor) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
        size = self.preprocessing.input_size
        longest = max((len(batch) for batch in self.batches), default=0)
        slots = [(np.zeros((longest, size, size, 3), dtype=np.uint8),
                  np.empty((longest, size, size, 3), dtype=np.float32)) for _ in range(self.depth + 1)]
        pending: deque[list[Future]] = deque()  # per batch, the tasks of its parts

        def submit(number: int) -> None:
            if number < len(self.batches):
                batch, (pixels, normalised) = self.batches[number], slots[number % len(slots)]
                cuts = np.linspace(0, len(batch), min(self.threads, len(batch)) + 1).astype(int)
                pending.append([pool.submit(self._decode, batch[begin:end], pixels[begin:end], normalised[begin:end])
                                for begin, end in zip(cuts[:-1], cuts[1:])])

        try:
            for number in range(self.depth):
                submit(number)
            for number, batch in enumerate(self.batches):
                submit(number + self.depth)  # into the slot of the batch before this one, which is done with
                errors = [error for part in pending.popleft() for error in part.result()]
                normalised = slots[number % len(slots)][1][:len(batch)].transpose(0, 3, 1, 2)
                yield batch, torch.from_numpy(normalised), errors
        finally:
            for parts in pending:
                for part in parts:
                    part.cancel()

    def _decode(self, batch: list[int], pixels: np.ndarray, normalised: np.ndarray) -> list[str]:
        """Decode images ``batch`` into ``pixels`` (n, S, S, 3), normalise them into ``normalised`` (n, S, S, 3)."""
        errors = [read_into(self.paths[index], self.preprocessing, pixels[i]) for i, index in enumerate(batch)]
        self.preprocessing.normalise_array(pixels[:len(batch)], normalised[:len(batch)])
        return errors
