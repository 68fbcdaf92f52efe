"""The extract stage: stream the probe set through the model into chunked Zarr.

Output, in the run directory (see README "Zarr layout"):

- ``activations.zarr/``: root arrays ``image_ids`` (N,) str and ``valid`` (N,)
  bool; one group per recorded layer holding either ``maps`` (N, U, h, w)
  float16 and ``maxima`` (N, U) float32 (spatial maximum of the stored float16
  map), or, for a vector layer, ``activations`` (N, D) float16. Arrays are
  chunked along the image axis only; the chunk length is a multiple of the batch
  size. Attributes describe the model, layers, preprocessing and probe set.
- ``extract/progress.json``: which chunks of which arrays are on disk, and the
  images that could not be read so far. It is what makes a killed run resume.
- ``extract/skipped_images.csv``: ``index,image_id,error`` of every unreadable
  image (its rows in the arrays are zeros and ``valid`` is False).
- ``extract/stamp.json`` (``dissect.stamps``), written last: the fingerprint
  below. Unlike the other stages, extract never replaces activations made from
  another model, layer list, preprocessing or probe set: they are expensive,
  so it names what differs and stops.

Every chunk is written whole, after which it is marked done; a run killed at any
moment recomputes only chunks not marked done, with the same batches, so the
final arrays are identical to those of an uninterrupted run.
"""

import csv
import hashlib
import logging
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm
from zarr.codecs import BloscCodec

from dissect.artifacts import read_json, write_json_atomic
from dissect.devices import pick_device
from dissect.errors import DissectError
from dissect.layers import LayerRecorder, get_layer, layer_kind
from dissect.layout import RunLayout
from dissect.models import LoadedModel, load_model
from dissect.probe import Preprocessing, ProbeImages, ProbeSet, open_probe_set
from dissect.settings import ExtractSettings, section
from dissect.stamps import write_stamp

log = logging.getLogger(__name__)

#: The version of the extract stage's output format (a change makes old run directories foreign).
FORMAT = 1
MAX_PENDING_WRITES = 4
COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")


class ExtractError(DissectError):
    """The extract stage cannot run with this configuration or run directory."""


@dataclass(frozen=True)
class LayerSpec:
    """A recorded layer: 'map' layers have shape (U, h, w) per image, 'vector' layers (D,)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    module: str

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Array name -> (per-image shape, dtype) of what this layer stores."""
        if self.kind == "map":
            return {"maps": (self.shape, "float16"), "maxima": (self.shape[:1], "float32")}
        return {"activations": (self.shape, "float16")}


@dataclass
class ChunkStream:
    """One output array, filled in image order and written one whole chunk at a time."""

    key: str
    array: zarr.Array
    chunk_len: int
    done: set[int]
    buffer: list[np.ndarray] = field(default_factory=list)
    buffer_start: int = 0

    def first_missing_image(self) -> int:
        """Index of the first image of the first chunk not yet on disk (n_images if none)."""
        n_images = self.array.shape[0]
        n_chunks = math.ceil(n_images / self.chunk_len)
        missing = [c for c in range(n_chunks) if c not in self.done]
        return missing[0] * self.chunk_len if missing else n_images

    def add(self, rows: np.ndarray, start: int) -> list[tuple[int, np.ndarray]]:
        """Append rows for images start.. and return the chunks they complete as (chunk index, data)."""
        if not self.buffer:
            self.buffer_start = start
        self.buffer.append(rows)
        n_images = self.array.shape[0]
        buffered = sum(len(b) for b in self.buffer)
        completed: list[tuple[int, np.ndarray]] = []
        chunk = self.buffer_start // self.chunk_len
        chunk_end = min((chunk + 1) * self.chunk_len, n_images)
        if self.buffer_start + buffered >= chunk_end:
            data = np.concatenate(self.buffer)
            cut = chunk_end - self.buffer_start
            completed.append((chunk, data[:cut]))
            rest = data[cut:]
            self.buffer = [rest] if len(rest) else []
            self.buffer_start = chunk_end
        return completed


class ExtractProgress:
    """The state in ``extract/progress.json``; mutated only by the writer thread."""

    def __init__(self, path: Path, fingerprint: dict[str, Any]) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.done: dict[str, set[int]] = {}
        self.failures: dict[int, str] = {}
        self.complete = False
        if path.exists():
            saved = read_json(path)
            changed = sorted(k for k in set(fingerprint) | set(saved["fingerprint"])
                             if fingerprint.get(k) != saved["fingerprint"].get(k))
            if changed:
                raise ExtractError(
                    f"{path.parent} already holds activations made with a different {', '.join(changed)}; "
                    "choose another out_dir=... or delete that directory"
                )
            self.done = {key: set(chunks) for key, chunks in saved["done"].items()}
            self.failures = {int(i): error for i, error in saved["failures"].items()}
            self.complete = saved["complete"]

    def save(self) -> None:
        write_json_atomic(self.path, {
            "fingerprint": self.fingerprint,
            "done": {key: sorted(chunks) for key, chunks in self.done.items()},
            "failures": {str(i): error for i, error in sorted(self.failures.items())},
            "complete": self.complete,
        })


def check(cfg: DictConfig) -> None:
    """Refuse bad extract settings before any stage runs (no disk or model access)."""
    settings = section(cfg.extract, ExtractSettings)
    pick_device(settings.device, "extract.device")
    layer_names = [str(name) for name in cfg.layers]
    if not layer_names or len(set(layer_names)) != len(layer_names):
        raise ExtractError(f"layers={layer_names} must name at least one layer, each once")


def run(cfg: DictConfig) -> Path:
    """Run the extract stage for ``cfg`` and return the path of the Zarr store."""
    check(cfg)
    layout = RunLayout(Path(cfg.out_dir))
    probe = open_probe_set(cfg.dataset)
    loaded = load_model(cfg.model)
    device = pick_device(str(cfg.extract.device), "extract.device")
    preprocessing = Preprocessing(loaded.input_size, loaded.mean, loaded.std)
    layer_names = [str(name) for name in cfg.layers]
    for name in layer_names:
        get_layer(loaded.module, name)  # fails early, listing valid names nearby
    module = loaded.module.to(device)
    specs = probe_layers(module, layer_names, preprocessing.input_size, device)
    batch_size = int(cfg.extract.batch_size)
    fingerprint = {
        "model": loaded.description,
        "layers": [s.__dict__ | {"shape": list(s.shape)} for s in specs],
        "preprocessing": preprocessing.description(),
        "probe_set": probe.description(),
        "image_ids_sha": _ids_digest(probe.image_ids),
        "checkpoint_sha": _file_digest(loaded.description.get("checkpoint")),
        "batch_size": batch_size,
        "chunk_mib": float(cfg.extract.chunk_mib),
        "format": FORMAT,
    }
    layout.extract_progress.parent.mkdir(parents=True, exist_ok=True)
    progress = ExtractProgress(layout.extract_progress, fingerprint)
    store_path = layout.activations
    if progress.complete:
        log.info("extract: %s is complete, skipping", store_path)
        if not layout.stamp("extract").is_file():  # killed between the last two writes
            write_stamp(layout.stamp("extract"), fingerprint, FORMAT)
        return store_path
    streams = open_streams(store_path, probe, specs, batch_size, float(cfg.extract.chunk_mib), progress)
    _set_store_attributes(store_path, loaded, specs, preprocessing, probe, cfg)
    start = min(stream.first_missing_image() for stream in streams.values())
    if start > 0:
        log.info("extract: resuming at image %d of %d", start, len(probe))
    started = time.perf_counter()
    stream_images(module, probe, preprocessing, specs, streams, progress, start, batch_size, cfg, device)
    seconds = time.perf_counter() - started
    finish_store(layout, probe, progress, {"images": len(probe) - start, "seconds": round(seconds, 3),
                                           "device": str(device)})
    write_stamp(layout.stamp("extract"), fingerprint, FORMAT)
    return store_path


def probe_layers(module: torch.nn.Module, names: list[str], input_size: int, device: torch.device) -> list[LayerSpec]:
    """Run one blank image to learn each layer's output shape; (N,C,1,1) outputs count as vectors."""
    blank = torch.zeros(1, 3, input_size, input_size, device=device)
    with torch.inference_mode(), LayerRecorder(module, names, stop_early=True) as recorder:
        outputs = recorder.run(blank)
    specs = []
    for name in names:
        try:
            kind = layer_kind(outputs[name])
        except ValueError as error:
            raise ExtractError(f"layer {name!r}: {error}") from error
        shape = tuple(outputs[name].shape[1:]) if kind == "map" else (outputs[name].shape[1],)
        specs.append(LayerSpec(name, kind, shape, type(get_layer(module, name)).__name__))
    return specs


def chunk_length(per_image_bytes: int, batch_size: int, chunk_mib: float) -> int:
    """Smallest multiple of batch_size whose chunk holds at least chunk_mib MiB."""
    batches = max(1, math.ceil(chunk_mib * 2**20 / (per_image_bytes * batch_size)))
    return batches * batch_size


def open_streams(store_path: Path, probe: ProbeSet, specs: list[LayerSpec], batch_size: int,
                 chunk_mib: float, progress: ExtractProgress) -> dict[str, ChunkStream]:
    """Create (or reopen, when resuming) every output array; key 'layer/array'."""
    root = zarr.open_group(store_path, mode="a")
    n_images = len(probe)
    if "image_ids" not in root:
        ids = root.create_array("image_ids", shape=(n_images,), dtype=str, chunks=(n_images,),
                                dimension_names=["image"])
        ids[:] = np.array(probe.image_ids, dtype=object)
    streams = {}
    for spec in specs:
        group = root.require_group(spec.name)
        for array_name, (shape, dtype) in spec.arrays().items():
            key = f"{spec.name}/{array_name}"
            per_image = int(np.prod(shape)) * np.dtype(dtype).itemsize
            length = chunk_length(per_image, batch_size, chunk_mib)
            if array_name in group:
                array = group[array_name]
            else:
                dims = ["image", "unit", "y", "x"] if len(shape) == 3 else ["image", "unit"]
                array = group.create_array(array_name, shape=(n_images, *shape), dtype=dtype,
                                           chunks=(length, *shape), compressors=COMPRESSOR,
                                           fill_value=0, dimension_names=dims)
            streams[key] = ChunkStream(key, array, length, progress.done.setdefault(key, set()))
    return streams


def stream_images(module: torch.nn.Module, probe: ProbeSet, preprocessing: Preprocessing,
                  specs: list[LayerSpec], streams: dict[str, ChunkStream], progress: ExtractProgress,
                  start: int, batch_size: int, cfg: DictConfig, device: torch.device) -> None:
    """Forward images start..N in batches, handing whole chunks to a writer thread."""
    dataset = Subset(ProbeImages(probe.image_paths, preprocessing), range(start, len(probe)))
    workers = loader_workers(cfg.extract.num_workers, device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if workers else None)
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda" and bool(cfg.extract.amp))
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zarr-writer")
    pending: list[Future] = []
    layer_names = [spec.name for spec in specs]
    try:
        with LayerRecorder(module, layer_names, dtype=torch.float16, stop_early=True) as recorder, \
                tqdm(total=len(probe), initial=start, unit="img", desc="extract", dynamic_ncols=True) as bar:
            pending.append(writer.submit(_forget_failures_from, progress, start))
            for indices, images, errors in loader:
                with torch.inference_mode(), autocast:
                    batch = preprocessing.normalise(images.to(device, non_blocking=True))
                    outputs = recorder.run(batch)
                failed = np.array([bool(e) for e in errors])
                first = int(indices[0])
                if failed.any():
                    batch_failures = {int(i): e for i, e in zip(indices, errors) if e}
                    pending.append(writer.submit(progress.failures.update, batch_failures))
                for spec in specs:
                    for array_name, rows in _layer_rows(spec, outputs[spec.name], failed).items():
                        stream = streams[f"{spec.name}/{array_name}"]
                        for chunk, data in stream.add(rows, first):
                            if chunk not in stream.done:
                                pending.append(writer.submit(_write_chunk, stream, chunk, data, progress))
                pending = _bound_pending(pending)
                bar.update(len(indices))
        for future in pending:
            future.result()
    finally:
        writer.shutdown(wait=True)


def loader_workers(requested: int | str, device: torch.device) -> int:
    """``auto``: decode in the main process on the CPU, in min(8, cores) workers for a GPU.

    On the CPU the model's threads already use every core; a worker process
    steals a core from them mid-batch and slows the whole forward pass down more
    than decoding in between batches does (see benchmarks/extract.py).
    """
    if requested == "auto":
        return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    return int(requested)  # checked by ExtractSettings


def _layer_rows(spec: LayerSpec, output: torch.Tensor, failed: np.ndarray) -> dict[str, np.ndarray]:
    """A layer's float16 output for one batch -> rows of each of its arrays (zeros for failed images)."""
    values = output.detach().to("cpu", torch.float16).numpy()
    values[failed] = 0
    if spec.kind == "vector":
        return {"activations": values.reshape(len(values), -1)}
    return {"maps": values, "maxima": values.max(axis=(2, 3)).astype(np.float32)}


def _write_chunk(stream: ChunkStream, chunk: int, data: np.ndarray, progress: ExtractProgress) -> None:
    """Write one whole chunk, then record it as done (runs on the writer thread)."""
    begin = chunk * stream.chunk_len
    stream.array[begin:begin + len(data)] = data
    stream.done.add(chunk)
    progress.save()


def _forget_failures_from(progress: ExtractProgress, start: int) -> None:
    """Images from start on are read again, so their earlier failures are dropped."""
    for index in [i for i in progress.failures if i >= start]:
        del progress.failures[index]


def _bound_pending(pending: list[Future]) -> list[Future]:
    """Wait for old writes so at most MAX_PENDING_WRITES chunks sit in memory; re-raise their errors."""
    while len(pending) > MAX_PENDING_WRITES:
        pending.pop(0).result()
    unfinished = []
    for future in pending:
        if future.done():
            future.result()
        else:
            unfinished.append(future)
    return unfinished


def finish_store(layout: RunLayout, probe: ProbeSet, progress: ExtractProgress, session: dict[str, Any]) -> None:
    """Write the valid mask and the skipped-images list, mark the store and the progress complete.

    ``session`` (images streamed, seconds, device) of the run that finished the
    store goes into its attributes as ``last_session``.
    """
    store_path = layout.activations
    root = zarr.open_group(store_path, mode="a")
    valid = np.ones(len(probe), dtype=bool)
    valid[list(progress.failures)] = False
    if "valid" not in root:
        root.create_array("valid", shape=valid.shape, dtype=bool, chunks=valid.shape, dimension_names=["image"])
    root["valid"][:] = valid
    skipped_path = layout.skipped_images
    with open(skipped_path, "w", newline="", encoding="utf-8") as handle:
        table = csv.writer(handle)
        table.writerow(["index", "image_id", "error"])
        for index, error in sorted(progress.failures.items()):
            table.writerow([index, probe.image_ids[index], error])
    root.attrs.update({"complete": True, "last_session": session})
    progress.complete = True
    progress.save()
    if progress.failures:
        log.warning("extract: %d of %d images could not be read and were skipped; see %s",
                    len(progress.failures), len(probe), skipped_path)
    log.info("extract: wrote %s (%d images; this session streamed %d in %.1f s, %.1f img/s on %s)",
             store_path, len(probe), session["images"], session["seconds"],
             session["images"] / max(session["seconds"], 1e-9), session["device"])


def _set_store_attributes(store_path: Path, loaded: LoadedModel, specs: list[LayerSpec],
                          preprocessing: Preprocessing, probe: ProbeSet, cfg: DictConfig) -> None:
    root = zarr.open_group(store_path, mode="a")
    root.attrs.update({
        "model": loaded.description,
        "layers": {s.name: {"kind": s.kind, "shape": list(s.shape), "module": s.module} for s in specs},
        "layer_order": [s.name for s in specs],
        "preprocessing": preprocessing.description(),
        "probe_set": probe.description(),
        "extract": OmegaConf.to_container(cfg.extract, resolve=True),
        "complete": False,
    })


def _file_digest(path: str | None) -> str | None:
    """SHA-256 of a checkpoint file, so that retrained weights at the same path are noticed on resume."""
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _ids_digest(image_ids: list[str]) -> str:
    """Short digest of the ordered image ids, so a changed probe set is noticed on resume."""
    return hashlib.sha256("\n".join(image_ids).encode()).hexdigest()[:16]
