"""The extract stage: stream the probe set through the model into chunked Zarr, on the run's dask cluster.

Output, in the run directory (see README "Zarr layout"):

- ``activations.zarr/``: root arrays ``image_ids`` (N,) str and ``valid`` (N,)
  bool; one group per recorded layer holding either ``maps`` (N, U, h, w)
  float16 and ``maxima`` (N, U) float32 (spatial maximum of the stored float16
  map), or, for a vector layer, ``activations`` (N, D) float16. Every array is
  chunked along the image axis only, with one chunk length for the whole store:
  the smallest multiple of the batch size whose chunk of the largest array
  holds ``extract.chunk_mib``. Attributes describe the model, layers,
  preprocessing and probe set.
- ``extract/fingerprint.json``: what the activations are made from; a run with
  another model, layer list, preprocessing, probe set or chunking is refused.
- ``extract/chunks/chunk_<c>.json``: one marker per chunk ``c`` of images whose
  rows are written in every array, with the images of that chunk that could not
  be read and the host and pid of the process that wrote it. Writers never share a file, so any number of workers can write.
- ``extract/skipped_images.csv``: ``index,image_id,error`` of every unreadable
  image (its rows in the arrays are zeros and ``valid`` is False).
- ``extract/stamp.json`` (``dissect.stamps``), written last: the fingerprint.
  Unlike the other stages, extract never replaces activations made from another
  model, layer list, preprocessing or probe set: they are expensive, so it
  names what differs and stops.

How it runs: this process loads the model once on the CPU to learn the layer
shapes and creates the arrays; the chunks without a marker are cut into shards
of consecutive chunks (about four per worker) and each shard is a dask task.
A worker loads the model once (``dissect.cluster.worker_state``) on its own
device (``extract.device=auto``: its GPU when it has one, float16 autocast when
``extract.amp``), decodes its shard's images (``extract.num_workers`` loader
processes, or with none threads of the worker: ``dissect.probe.ThreadedBatches``,
as ``decoding_plan`` says), runs model and images channels-last (on the CPU
inside ``dissect.heap.retained_heap``, which keeps the freed layer outputs for
the next batch), and writes each chunk whole straight into the shared store,
then its marker. Batches start at chunk boundaries, so they are the same whoever
runs them and the arrays are identical to a single-process run. A killed run,
or a worker lost mid-shard (dask runs the shard again elsewhere), recomputes
only the chunks without a marker.
"""

import csv
import hashlib
import json
import logging
import math
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm
from zarr.codecs import BloscCodec

from dissect.artifacts import read_json, write_json_atomic
from dissect.chunk_files import ChunkFiles
from dissect.cluster import (
    check_worker_paths,
    dask_client,
    device_lock,
    runs_in_this_process,
    worker_count,
    worker_state,
)
from dissect.devices import pick_device
from dissect.errors import DissectError
from dissect.heap import retained_heap
from dissect.layers import LayerRecorder, get_layer, layer_kind
from dissect.layout import RunLayout, chunk_marker_name
from dissect.models import LoadedModel, load_model
from dissect.probe import (
    Preprocessing,
    ProbeImages,
    ProbeSet,
    ThreadedBatches,
    open_probe_set,
)
from dissect.settings import ExtractSettings, section
from dissect.stamps import write_stamp

log = logging.getLogger(__name__)

#: The version of the extract stage's output format (a change makes old run directories foreign).
FORMAT = 2
MAX_PENDING_WRITES = 4
#: Without loader processes and beside a GPU: batches the decoder threads work ahead of the one being forwarded.
PREFETCH_BATCHES = 2
#: Seconds between two looks at the chunk markers, which drive the progress bar.
PROGRESS_POLL_S = 0.25
#: LZ4 at level 1 without a shuffle filter: on the embedded model's float16 ReLU maps (about half zeros) it
#: packed relu3 1.87x at 0.061 ms per image of one-thread encoding against bit-shuffle + level 5's 1.71x at
#: 0.173 ms, and decoded in 0.026 against 0.073 ms, which every later stage reads (benchmarks/extract.py prints
#: the comparison; README, "Run directory and Zarr layout")
COMPRESSOR = BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")


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


@dataclass(frozen=True)
class ShardJob:
    """What a worker needs to extract chunks of the probe set; every field pickles."""

    store: str
    markers: str
    model: dict[str, Any]
    probe: dict[str, Any]
    specs: tuple[LayerSpec, ...]
    chunk_len: int
    batch_size: int
    num_workers: int | str
    device: str
    amp: bool

    @property
    def state_key(self) -> str:
        """Identifies the loaded model and probe set a worker keeps between shards."""
        text = json.dumps([self.model, self.probe, self.device], sort_keys=True, default=str)
        return "extract:" + hashlib.sha256(text.encode()).hexdigest()


@dataclass
class WorkerModel:
    """A worker's model on its device, with the probe set's images and preprocessing."""

    module: torch.nn.Module
    device: torch.device
    preprocessing: Preprocessing
    image_paths: list[Path]


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
    settings = section(cfg.extract, ExtractSettings)
    layout = RunLayout(Path(cfg.out_dir))
    probe = open_probe_set(cfg.dataset)
    loaded = load_model(cfg.model)
    preprocessing = Preprocessing(loaded.input_size, loaded.mean, loaded.std)
    layer_names = [str(name) for name in cfg.layers]
    for name in layer_names:
        get_layer(loaded.module, name)  # fails early, listing valid names nearby
    specs = probe_layers(loaded.module, layer_names, preprocessing.input_size, torch.device("cpu"))
    chunk_len = store_chunk_length(specs, settings.batch_size, settings.chunk_mib)
    fingerprint = {
        "model": loaded.description,
        "layers": [s.__dict__ | {"shape": list(s.shape)} for s in specs],
        "preprocessing": preprocessing.description(),
        "probe_set": probe.description(),
        "image_ids_sha": _ids_digest(probe.image_ids),
        "checkpoint_sha": _file_digest(loaded.description.get("checkpoint")),
        "batch_size": settings.batch_size,
        "chunk_mib": settings.chunk_mib,
        "format": FORMAT,
    }
    store_path = layout.activations
    claim_run_directory(layout, fingerprint)
    if zarr.open_group(store_path, mode="a").attrs.get("complete"):
        log.info("extract: %s is complete, skipping", store_path)
        if not layout.stamp("extract").is_file():  # killed between the last two writes
            write_stamp(layout.stamp("extract"), fingerprint, FORMAT)
        return store_path
    create_arrays(store_path, probe, specs, chunk_len)
    _set_store_attributes(store_path, loaded, specs, preprocessing, probe, cfg)
    n_chunks = math.ceil(len(probe) / chunk_len)
    layout.extract_chunks.mkdir(parents=True, exist_ok=True)
    todo = [chunk for chunk in range(n_chunks) if not layout.chunk_marker(chunk).exists()]
    if len(todo) < n_chunks:
        log.info("extract: resuming, %d of %d chunks already on disk", n_chunks - len(todo), n_chunks)
    job = ShardJob(store=str(store_path), markers=str(layout.extract_chunks),
                   model=OmegaConf.to_container(cfg.model, resolve=True),
                   probe=OmegaConf.to_container(cfg.dataset, resolve=True), specs=tuple(specs), chunk_len=chunk_len,
                   batch_size=settings.batch_size, num_workers=settings.num_workers, device=settings.device,
                   amp=settings.amp)
    started = time.perf_counter()
    def this_model() -> WorkerModel:  # an in-process worker takes the model loaded here instead of loading it again
        device = pick_device(job.device, "extract.device")
        return WorkerModel(inference_module(loaded.module, device), device, preprocessing, probe.image_paths)

    devices = run_shards(cfg, job, todo, len(probe), probe.root, loaded_checkpoint(job), this_model)
    seconds = time.perf_counter() - started
    images = sum(len(chunk_images(chunk, chunk_len, len(probe))) for chunk in todo)
    finish_store(layout, probe, n_chunks, {"images": images, "seconds": round(seconds, 3),
                                           "device": ", ".join(sorted(devices)) or "none (nothing left to do)"})
    write_stamp(layout.stamp("extract"), fingerprint, FORMAT)
    return store_path


def claim_run_directory(layout: RunLayout, fingerprint: dict[str, Any]) -> None:
    """Record what this run's activations are made from, or refuse a directory that holds others."""
    path = layout.extract_fingerprint
    if path.exists():
        saved = read_json(path)
        changed = sorted(k for k in set(fingerprint) | set(saved) if fingerprint.get(k) != saved.get(k))
        if changed:
            raise ExtractError(f"{layout.root} already holds activations made with a different {', '.join(changed)}; "
                               "choose another out_dir=... or delete that directory")
        return
    if layout.activations.exists():
        raise ExtractError(f"{layout.activations} exists but was not written by this version of the extract stage "
                           f"({path.name} is missing); choose another out_dir=... or delete that directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, fingerprint)


def loaded_checkpoint(job: ShardJob) -> list[Path]:
    """The checkpoint file a worker reads, if the model has one."""
    checkpoint = job.model.get("checkpoint")
    return [Path(str(checkpoint))] if checkpoint else []


def shards(chunks: list[int], workers: int) -> list[list[int]]:
    """Cut the chunks to do into consecutive runs, about four per worker, so that a lost worker costs little."""
    pieces = max(1, min(len(chunks), 4 * workers))
    size = math.ceil(len(chunks) / pieces)
    return [chunks[i:i + size] for i in range(0, len(chunks), size)]


def run_shards(cfg: DictConfig, job: ShardJob, todo: list[int], n_images: int, probe_root: Path,
               extra_paths: list[Path], this_model: Callable[[], WorkerModel]) -> set[str]:
    """Extract the chunks ``todo`` on the run's cluster; show progress from the markers; return the devices used."""
    if not todo:
        return set()
    markers = Path(job.markers)
    total = sum(len(chunk_images(chunk, job.chunk_len, n_images)) for chunk in todo)
    with dask_client(cfg.cluster) as client:
        check_worker_paths(client, [probe_root, *extra_paths], writable=[job.store, job.markers])
        if runs_in_this_process(client):
            worker_state(job.state_key, this_model)
        futures = [client.submit(extract_shard, job, piece, n_images, pure=False)
                   for piece in shards(todo, worker_count(client))]
        pending = set(todo)
        chunk_of = {chunk_marker_name(chunk): chunk for chunk in todo}
        settled = _settled(futures)
        with tqdm(total=total, unit="img", desc="extract", dynamic_ncols=True) as bar:
            while True:
                settled.wait(PROGRESS_POLL_S)  # wakes as soon as the last shard ends, not at the next poll
                all_done = all(future.done() for future in futures)
                # one listing, not a stat per pending chunk (63k images: 1,979 chunks, 22 ms a poll, GIL held)
                finished = {chunk_of[name] for name in os.listdir(markers) if name in chunk_of} & pending
                bar.update(sum(len(chunk_images(chunk, job.chunk_len, n_images)) for chunk in finished))
                pending -= finished
                failed = [future for future in futures if future.status == "error"]
                if failed:
                    failed[0].result()  # raises the worker's error here
                if all_done:
                    break
        devices = set(client.gather(futures))
    missing = [chunk for chunk in todo if not (markers / chunk_marker_name(chunk)).exists()]
    if missing:
        raise ExtractError(f"extract: {len(missing)} chunks have no marker after every shard finished "
                           f"(first: {missing[0]}); run again to redo them")
    return devices


def _settled(futures: list[Any]) -> threading.Event:
    """An event set once every dask future is done, or as soon as one of them fails."""
    settled, lock, left = threading.Event(), threading.Lock(), [len(futures)]

    def done(future: Any) -> None:
        with lock:
            left[0] -= 1
            if not left[0] or future.status == "error":
                settled.set()

    for future in futures:
        future.add_done_callback(done)
    return settled


def chunk_images(chunk: int, chunk_len: int, n_images: int) -> range:
    """The image indices of one chunk."""
    return range(chunk * chunk_len, min((chunk + 1) * chunk_len, n_images))


def load_worker_model(job: ShardJob) -> WorkerModel:
    """Load the job's model on this worker's device, and open its probe set (once per worker)."""
    loaded = load_model(OmegaConf.create(job.model))
    device = pick_device(job.device, "extract.device")
    probe = open_probe_set(job.probe)
    return WorkerModel(inference_module(loaded.module, device), device,
                       Preprocessing(loaded.input_size, loaded.mean, loaded.std), probe.image_paths)


def inference_module(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model on ``device`` in eval mode, its 4-d weights in channels-last memory order.

    Images reach it channels-last too (``image_batches``): on this project's
    2-core CPU the embedded model's forward pass ran 1.6x faster so (468
    against 293 images/s, batch 32), and it is the layout cuDNN prefers under
    float16 autocast.
    """
    return module.to(device).eval().to(memory_format=torch.channels_last)


def extract_shard(job: ShardJob, chunks: list[int], n_images: int) -> str:
    """Forward the images of ``chunks`` (those without a marker) and write them; runs on a dask worker.

    Returns the device it ran on.
    """
    state = worker_state(job.state_key, lambda: load_worker_model(job))
    markers = Path(job.markers)
    chunks = [chunk for chunk in chunks if not (markers / chunk_marker_name(chunk)).exists()]  # a retried shard
    if not chunks:
        return str(state.device)
    batches = [list(span[i:i + job.batch_size]) for chunk in chunks
               for span in [chunk_images(chunk, job.chunk_len, n_images)] for i in range(0, len(span), job.batch_size)]
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=state.device.type == "cuda" and job.amp)
    root = zarr.open_group(job.store, mode="r+")
    arrays = {f"{spec.name}/{name}": ChunkFiles(root[spec.name][name]) for spec in job.specs
              for name in spec.arrays()}
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zarr-writer")
    pending: list[Future] = []
    buffer = ChunkBuffer()
    # on the CPU the forward pass's freed outputs stay in the heap for the next batch (dissect.heap)
    heap = retained_heap() if state.device.type == "cpu" else nullcontext()
    try:
        with device_lock(), heap, LayerRecorder(state.module, [s.name for s in job.specs], dtype=torch.float16,
                                          stop_early=True) as recorder, \
                image_batches(state, batches, loader_workers(job.num_workers, state.device)) as loader:
            for indices, images, errors in loader:
                with torch.inference_mode(), autocast:
                    outputs = recorder.run(images)
                failed = np.array([bool(e) for e in errors])
                rows = {f"{spec.name}/{name}": values for spec in job.specs
                        for name, values in _layer_rows(spec, outputs[spec.name], failed).items()}
                buffer.add(rows, {int(i): e for i, e in zip(indices, errors) if e}, len(indices))
                chunk = int(indices[0]) // job.chunk_len
                span = chunk_images(chunk, job.chunk_len, n_images)
                if buffer.images == len(span):
                    chunk_rows, chunk_failures = buffer.take()
                    pending.append(writer.submit(write_chunk, arrays, chunk_rows, chunk, span.start,
                                                 markers / chunk_marker_name(chunk), chunk_failures))
                    pending = _bound_pending(pending)
        for future in pending:
            future.result()
    finally:
        writer.shutdown(wait=True)
    return str(state.device)


def decoding_plan(device: torch.device) -> tuple[int, int]:
    """(batches decoded ahead, decoder threads) for ``ThreadedBatches`` on ``device``.

    On the CPU the model's threads already use the cores, so each batch is
    decoded just before its forward pass by as many threads as the model has
    (0 ahead, ``torch.get_num_threads()`` threads). A decoder thread working
    ahead beside them was slower on 2 cores: it takes a core from one of the
    model's threads, and every parallel region of the forward pass then waits
    for that thread (the embedded model, batch 32, 512 images: 271-351 images/s
    decoded one thread ahead against 356-366 decoded just before by 2 threads;
    README, "Tests and benchmarks", the extract paragraph). Beside a GPU the
    cores are free: every core decodes, ``PREFETCH_BATCHES`` ahead.
    """
    if device.type == "cpu":
        return 0, torch.get_num_threads()
    return PREFETCH_BATCHES, os.cpu_count() or 1


@contextmanager
def image_batches(state: WorkerModel, batches: list[list[int]],
                  workers: int) -> Iterator[Iterable[tuple[Sequence[int], torch.Tensor, list[str]]]]:
    """The batches' images, normalised on the model's device: ``(indices, images (n, 3, S, S), errors)``.

    The images are in channels-last memory order, as the model's weights (``inference_module``).

    ``workers`` > 0: decoded by DataLoader processes and normalised on the
    device (for a GPU); 0: decoded and normalised by threads of this process
    (``ThreadedBatches``, as ``decoding_plan`` says).
    """
    if not workers:
        depth, threads = decoding_plan(state.device)
        with ThreadedBatches(state.image_paths, state.preprocessing, batches, depth=depth,
                             threads=threads) as threaded:
            if state.device.type == "cpu":
                yield threaded
            else:
                yield ((indices, images.to(state.device), errors) for indices, images, errors in threaded)
        return
    loader = DataLoader(ProbeImages(state.image_paths, state.preprocessing), batch_sampler=batches,
                        num_workers=workers, pin_memory=state.device.type == "cuda", prefetch_factor=4)
    yield ((indices, state.preprocessing.normalise(images.to(state.device, non_blocking=True)).contiguous(
        memory_format=torch.channels_last), errors) for indices, images, errors in loader)


@dataclass
class ChunkBuffer:
    """The rows of the chunk being filled: array key -> list of (n, ...) batches, and its unreadable images."""

    rows: dict[str, list[np.ndarray]] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    images: int = 0

    def add(self, rows: dict[str, np.ndarray], failures: dict[int, str], n_images: int) -> None:
        for key, values in rows.items():
            self.rows.setdefault(key, []).append(values)
        self.failures.update(failures)
        self.images += n_images

    def take(self) -> tuple[dict[str, np.ndarray], dict[int, str]]:
        """The whole chunk's rows (array key -> (n, ...)) and failures; empties the buffer."""
        chunk = {key: np.concatenate(parts) for key, parts in self.rows.items()}, self.failures
        self.rows, self.failures, self.images = {}, {}, 0
        return chunk


def write_chunk(arrays: dict[str, ChunkFiles], rows: dict[str, np.ndarray], chunk: int, begin: int, marker: Path,
                failures: dict[int, str]) -> None:
    """Write chunk ``chunk`` (its first image ``begin``) of every array whole, then its marker.

    The marker holds the chunk's unreadable images.
    """
    for key, values in rows.items():
        arrays[key].write(chunk, values)
    write_json_atomic(marker, {"images": [begin, begin + len(next(iter(rows.values())))],
                               "failures": {str(i): e for i, e in sorted(failures.items())},
                               "host": socket.gethostname(), "pid": os.getpid()})


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


def store_chunk_length(specs: list[LayerSpec], batch_size: int, chunk_mib: float) -> int:
    """The one chunk length of every array: ``chunk_length`` of the array with the most bytes per image.

    One length for all arrays makes a chunk of images a unit of work that no two writers share.
    """
    largest = max(int(np.prod(shape)) * np.dtype(dtype).itemsize
                  for spec in specs for shape, dtype in spec.arrays().values())
    return chunk_length(largest, batch_size, chunk_mib)


def create_arrays(store_path: Path, probe: ProbeSet, specs: list[LayerSpec], chunk_len: int) -> None:
    """Create every output array (kept as they are when resuming)."""
    root = zarr.open_group(store_path, mode="a")
    n_images = len(probe)
    if "image_ids" not in root:
        ids = root.create_array("image_ids", shape=(n_images,), dtype=str, chunks=(n_images,),
                                dimension_names=["image"])
        ids[:] = np.array(probe.image_ids, dtype=object)
    for spec in specs:
        group = root.require_group(spec.name)
        for array_name, (shape, dtype) in spec.arrays().items():
            if array_name not in group:
                dims = ["image", "unit", "y", "x"] if len(shape) == 3 else ["image", "unit"]
                group.create_array(array_name, shape=(n_images, *shape), dtype=dtype, chunks=(chunk_len, *shape),
                                   compressors=COMPRESSOR, fill_value=0, dimension_names=dims)


def loader_workers(requested: int | str, device: torch.device) -> int:
    """``auto``: no loader process on the CPU (decoder threads beside the model), min(8, cores) for a GPU.

    On the CPU the model's threads already use every core; a worker process
    steals a core from them mid-batch and slowed the whole forward pass down
    more than decoding in this process does (see benchmarks/extract.py).
    """
    workers = (min(8, os.cpu_count() or 1) if device.type == "cuda" else 0) if requested == "auto" else int(requested)
    if workers and multiprocessing.current_process().daemon:
        log.warning("extract: this dask worker is a daemonic process, which cannot start image loader processes; "
                    "decoding in the worker instead (start workers with DASK_DISTRIBUTED__WORKER__DAEMON=False)")
        return 0
    return workers


def _layer_rows(spec: LayerSpec, output: torch.Tensor, failed: np.ndarray) -> dict[str, np.ndarray]:
    """A layer's float16 output for one batch -> C-order rows of each of its arrays (zeros for failed images).

    The model runs channels-last, so a map comes (n, U, h, w) with its units
    innermost in memory; it is made C-order here by torch, on the model's
    device and threads (about 0.04 ms per embedded-model image), because the
    writer thread would otherwise transpose every chunk before compressing it
    (zarr's writes cost 0.36-0.48 ms of CPU per image so, 0.21-0.25 in C
    order; README, "Tests and benchmarks", the extract paragraph).
    """
    values = output.detach().to(torch.float16).contiguous().to("cpu")
    if failed.any():
        values[torch.from_numpy(failed)] = 0
    if spec.kind == "vector":
        return {"activations": values.reshape(len(values), -1).numpy()}
    # torch's maximum of the float16 maps, exactly numpy's, at a tenth of its cost
    return {"maps": values.numpy(), "maxima": values.amax(dim=(2, 3)).float().numpy()}


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


def read_failures(layout: RunLayout, n_chunks: int) -> dict[int, str]:
    """Image index -> error of every unreadable image, from the chunk markers."""
    failures: dict[int, str] = {}
    for chunk in range(n_chunks):
        failures.update({int(i): e for i, e in read_json(layout.chunk_marker(chunk))["failures"].items()})
    return failures


def finish_store(layout: RunLayout, probe: ProbeSet, n_chunks: int, session: dict[str, Any]) -> None:
    """Write the valid mask and the skipped-images list, and mark the store complete.

    ``session`` (images streamed, seconds, devices) of the run that finished the
    store goes into its attributes as ``last_session``.
    """
    store_path = layout.activations
    failures = read_failures(layout, n_chunks)
    root = zarr.open_group(store_path, mode="a")
    valid = np.ones(len(probe), dtype=bool)
    valid[list(failures)] = False
    if "valid" not in root:
        root.create_array("valid", shape=valid.shape, dtype=bool, chunks=valid.shape, dimension_names=["image"])
    root["valid"][:] = valid
    skipped_path = layout.skipped_images
    with open(skipped_path, "w", newline="", encoding="utf-8") as handle:
        table = csv.writer(handle)
        table.writerow(["index", "image_id", "error"])
        for index, error in sorted(failures.items()):
            table.writerow([index, probe.image_ids[index], error])
    root.attrs.update({"complete": True, "last_session": session})
    if failures:
        log.warning("extract: %d of %d images could not be read and were skipped; see %s",
                    len(failures), len(probe), skipped_path)
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
