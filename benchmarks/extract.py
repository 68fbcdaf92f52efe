"""Benchmark of the extract stage: images/s against a bare ``model(x)`` loop, and peak memory.

Usage: ``python benchmarks/extract.py [--models default alexnet] [--sizes 256 1024] [--batch-size 32] [--repeats 3]``

For each model and probe-set size it writes a folder of JPEG photo crops
(scikit-image's photos) at the model's input size, runs the extract stage in a
fresh subprocess (so that its peak RSS is its own; its children, DataLoader
workers if any, are reported apart, with the pages they share with it) and
prints its images/s over the whole stage (model set-up included) and over its
stream (decode, forward, Zarr writes), next to a bare ``model(x)`` loop over the
same images, already decoded and normalised, with the same batch size and torch
threads, the model in eval mode under ``torch.inference_mode``, each in a fresh
process too: as the model comes (contiguous memory, ``bare``) and with model
and images in channels-last memory order (``bare CL``), the order the stage
runs in, each both as it is and inside ``dissect.heap.retained_heap`` as the
stage's CPU forward pass runs (``heap``, ``CL heap``: the stream's ceiling).
``ratio`` is stream / bare (the issue's target is >= 0.9); ``ratio heap``
stream / heap, against a loop with the stage's heap settings; ``ratio CL``
stream / CL heap, what decoding and writing cost against the same forward pass.
After each model's last run, the stored codec (``extract.COMPRESSOR``) is
set against other Blosc settings on the first chunk of every map array:
compression ratio and single-threaded encode and decode milliseconds per
image (CPU work, which machine load hardly changes: the forward pass uses
every core, so what the writes cost comes out of it).
Stage and bare loop alternate ``--repeats`` times and the best of each counts,
so that a moment of load from other processes shows in neither; the load
average is printed with each row. The embedded model (``default``) loads its
checkpoint; torchvision models take random weights (throughput does not depend on them).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import CONF_DIR, write_image_folder  # noqa: E402

from dissect.heap import retained_heap  # noqa: E402


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def overrides(model: str, probe: Path, out_dir: Path, batch_size: int) -> list[str]:
    return [f"model={model}", "model.weights=null", "dataset=folder", f"dataset.root={probe}",
            f"out_dir={out_dir}", f"extract.batch_size={batch_size}", "stages=[extract]"]


def child(args: argparse.Namespace) -> None:
    """Run one extract stage (``--child stage``) or bare loop and print its results as JSON."""
    if args.child != "stage":
        print(json.dumps({"images_per_s": bare_forward(args.model, Path(args.probe), args.batch_size,
                                                       channels_last="-cl" in args.child,
                                                       heap=args.child.endswith("-heap"))}))
        return
    from dissect.stages.extract import run

    cfg = compose(overrides(args.model, Path(args.probe), Path(args.out), args.batch_size))
    started = time.perf_counter()
    store = run(cfg)
    seconds = time.perf_counter() - started
    import zarr

    print(json.dumps({
        "seconds": seconds,
        "stream_seconds": zarr.open_group(store, mode="r").attrs["last_session"]["seconds"],
        "peak_rss_mib": own_peak_rss_mib(),
        "peak_rss_children_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))


def own_peak_rss_mib() -> float:
    """Peak RSS of this process since its exec (VmHWM); ru_maxrss would include the forking parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def bare_forward(model: str, probe: Path, batch_size: int, channels_last: bool, heap: bool) -> float:
    """images/s of ``model(x)`` over the probe images, decoded and normalised beforehand, batch by batch.

    ``channels_last``: model and images in that memory order (as the stage runs them), else contiguous.
    ``heap``: the loop runs inside ``dissect.heap.retained_heap``, as the stage's CPU forward pass does.

    The loop runs in a thread of its own, as the stage's forward pass does (in
    a dask worker thread): here the main thread's loop was up to 2x slower
    (glibc hands the main thread's freed memory back to the system and faults it
    in again every batch), which would flatter the stage.
    """
    from dissect.models import load_model
    from dissect.probe import Preprocessing, open_probe_set

    cfg = compose(overrides(model, probe, Path("unused"), batch_size))
    loaded = load_model(cfg.model)
    module = loaded.module.eval()
    prep = Preprocessing(loaded.input_size, loaded.mean, loaded.std)
    paths = open_probe_set(cfg.dataset).image_paths
    batches = [torch.stack([prep(Image.open(p)) for p in paths[begin:begin + batch_size]])
               for begin in range(0, len(paths), batch_size)]
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
        batches = [images.contiguous(memory_format=torch.channels_last) for images in batches]
    threads = torch.get_num_threads()
    seconds = []

    def loop() -> None:
        torch.set_num_threads(threads)
        with torch.inference_mode(), retained_heap() if heap else nullcontext():
            module(batches[0])  # warm-up
            started = time.perf_counter()
            for images in batches:
                module(images)
            seconds.append(time.perf_counter() - started)

    thread = threading.Thread(target=loop, name="bare-forward")
    thread.start()
    thread.join()
    return len(paths) / seconds[0]


def in_child(what: str, model: str, probe: Path, out: Path, batch_size: int) -> dict:
    """Run ``what`` (the extract stage on ``probe`` into ``out``, or a bare loop) in a fresh process; its results."""
    result = subprocess.run([sys.executable, __file__, "--child", what, "--models", model, "--probe", str(probe),
                             "--out", str(out), "--batch-size", str(batch_size)],
                            cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


#: The bare loops, each in a fresh process (glibc's heap state from one would carry into the next).
BARE_LOOPS = ("bare", "bare-heap", "bare-cl", "bare-cl-heap")


#: Blosc settings (cname, clevel, shuffle) set against the stored codec; shuffle 0 none, 1 byte, 2 bit.
CODECS = [("lz4", 1, 0), ("lz4", 1, 1), ("lz4", 5, 1), ("lz4", 5, 2), ("zstd", 1, 1)]


def codec_rows(store: Path) -> list[str]:
    """Per map array of ``store`` and Blosc setting: ratio, encode and decode ms per image (first chunk, one thread)."""
    import zarr
    from numcodecs import Blosc

    Blosc.use_threads = False
    root = zarr.open_group(store, mode="r")
    rows = []
    for layer in root.attrs["layer_order"]:
        if "maps" not in root[layer]:
            continue
        maps = root[layer]["maps"]
        chunk = maps[:maps.chunks[0]]
        for cname, clevel, shuffle in CODECS:
            codec = Blosc(cname=cname, clevel=clevel, shuffle=shuffle)
            started = time.process_time()
            for _ in range(3):
                encoded = codec.encode(chunk)
            encode_ms = (time.process_time() - started) / 3 * 1e3 / len(chunk)
            started = time.process_time()
            for _ in range(3):
                codec.decode(encoded)
            decode_ms = (time.process_time() - started) / 3 * 1e3 / len(chunk)
            rows.append(f"{layer:>16} {str(chunk.shape[1:]):>15} {cname:>5} {clevel:>6} {shuffle:>7} "
                        f"{chunk.nbytes / len(encoded):>6.2f} {encode_ms:>10.3f} {decode_ms:>10.3f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["default", "alexnet"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=("stage", *BARE_LOOPS), help=argparse.SUPPRESS)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.model = args.models[0]
        child(args)
        return
    print(f"batch_size={args.batch_size} torch threads={torch.get_num_threads()} cores={os.cpu_count()}")
    print(f"best of {args.repeats}, alternating: bare: a model(x) loop; CL: channels-last; heap: in retained_heap;"
          " stage: the whole extract stage, model set-up included; stream: its image loop (decode, forward, Zarr"
          " writes); ratio: stream / bare; ratio heap: stream / heap; ratio CL: stream / CL heap")
    print(f"{'model':>8} {'images':>7} {'bare img/s':>11} {'heap':>6} {'bare CL':>8} {'CL heap':>8} "
          f"{'stage img/s':>12} {'stream img/s':>13} {'ratio':>6} {'ratio heap':>10} {'ratio CL':>8} "
          f"{'peak RSS MiB':>13} {'children MiB':>13} {'store MiB':>10} {'load':>11}")
    with tempfile.TemporaryDirectory() as scratch:
        for model in args.models:
            # Probe images are stored at the model's input size, as Broden is (broden1_227 for AlexNet).
            input_size = int(compose([f"model={model}"]).model.input_size)
            for n_images in args.sizes:
                probe = write_image_folder(Path(scratch) / f"{model}{n_images}", n_images, size=input_size,
                                           seed=n_images, png_every=0)
                bare: dict[str, list[float]] = {what: [] for what in BARE_LOOPS}
                runs, loads = [], [os.getloadavg()[0]]
                for repeat in range(args.repeats):
                    for what in BARE_LOOPS:
                        bare[what].append(in_child(what, model, probe, Path("unused"), args.batch_size)["images_per_s"])
                    out = Path(scratch) / f"run-{model}{n_images}-{repeat}"
                    runs.append(in_child("stage", model, probe, out, args.batch_size))
                    store_mib = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
                    if repeat < args.repeats - 1 or n_images != args.sizes[-1]:
                        shutil.rmtree(out)
                    loads.append(os.getloadavg()[0])
                best = max(runs, key=lambda run: n_images / run["stream_seconds"])
                stage_rate = max(n_images / run["seconds"] for run in runs)
                stream = n_images / best["stream_seconds"]
                bare_best = {what: max(rates) for what, rates in bare.items()}
                print(f"{model:>8} {n_images:>7} {bare_best['bare']:>11.1f} {bare_best['bare-heap']:>6.1f} "
                      f"{bare_best['bare-cl']:>8.1f} {bare_best['bare-cl-heap']:>8.1f} {stage_rate:>12.1f} "
                      f"{stream:>13.1f} {stream / bare_best['bare']:>6.2f} {stream / bare_best['bare-heap']:>10.2f} "
                      f"{stream / bare_best['bare-cl-heap']:>8.2f} "
                      f"{best['peak_rss_mib']:>13.0f} "
                      f"{best['peak_rss_children_mib']:>13.0f} {store_mib:>10.1f} "
                      f"{min(loads):>5.2f}-{max(loads):<5.2f}", flush=True)
            from dissect.stages.extract import COMPRESSOR

            print(f"\n{model}: stored codec {COMPRESSOR.to_dict()['configuration']}; others on the first chunk of each"
                  " map array (shuffle 0 none, 1 byte, 2 bit; ms per image, one thread)")
            print(f"{'layer':>16} {'map':>15} {'codec':>5} {'clevel':>6} {'shuffle':>7} {'ratio':>6} "
                  f"{'encode ms':>10} {'decode ms':>10}")
            print("\n".join(codec_rows(out / "activations.zarr")), flush=True)
            shutil.rmtree(out)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
