"""Benchmark of the extract stage: images/s against a bare ``model(x)`` loop, and peak memory.

Usage: ``python benchmarks/extract.py [--model alexnet] [--sizes 256 1024] [--batch-size 32]``

For each probe-set size it writes a folder of JPEG photo crops (scikit-image's
photos) at the model's input size, runs the extract stage in a fresh subprocess
(so that its peak RSS is its own; its children, DataLoader workers if any, are
reported apart, with the pages they share with it) and
prints its images/s over the whole stage (model set-up included) next to a bare
``model(x)`` loop over the same, already decoded and normalised, images and the same
batch size. Weights are random (throughput does not depend on them).
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import CONF_DIR, write_image_folder  # noqa: E402


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def overrides(model: str, probe: Path, out_dir: Path, batch_size: int) -> list[str]:
    return [f"model={model}", "model.weights=null", "dataset=folder", f"dataset.root={probe}",
            f"out_dir={out_dir}", f"extract.batch_size={batch_size}", "stages=[extract]"]


def child(args: argparse.Namespace) -> None:
    """Run one extract stage and print its time and peak memory as JSON."""
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


def bare_forward(model: str, probe: Path, batch_size: int) -> float:
    """images/s of ``model(x)`` over the probe images, decoded and normalised beforehand."""
    from dissect.models import load_model
    from dissect.probe import Preprocessing, open_probe_set

    cfg = compose(overrides(model, probe, Path("unused"), batch_size))
    loaded = load_model(cfg.model)
    prep = Preprocessing(loaded.input_size, loaded.mean, loaded.std)
    paths = open_probe_set(cfg.dataset).image_paths
    images = torch.stack([prep(Image.open(p)) for p in paths])
    with torch.inference_mode():
        loaded.module(images[:batch_size])  # warm-up
        started = time.perf_counter()
        for begin in range(0, len(images), batch_size):
            loaded.module(images[begin:begin + batch_size])
        return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="alexnet")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(f"model={args.model} batch_size={args.batch_size} torch threads={torch.get_num_threads()}")
    print("bare: best of two model(x) loops (before and after the stage); stage: the whole extract stage,"
          " model set-up included; stream: its image loop (decode, forward, Zarr writes)")
    print(f"{'images':>7} {'bare img/s':>11} {'stage img/s':>12} {'stream img/s':>13} {'stream/bare':>12} "
          f"{'peak RSS MiB':>13} {'children MiB':>13} {'store MiB':>10}")
    # Probe images are stored at the model's input size, as Broden is (broden1_227 for AlexNet).
    input_size = int(compose([f"model={args.model}"]).model.input_size)
    with tempfile.TemporaryDirectory() as scratch:
        for n_images in args.sizes:
            probe = write_image_folder(Path(scratch) / f"probe{n_images}", n_images, size=input_size,
                                       seed=n_images, png_every=0)
            out = Path(scratch) / f"run{n_images}"
            bare_before = bare_forward(args.model, probe, args.batch_size)
            result = subprocess.run([sys.executable, __file__, "--child", "--model", args.model,
                                     "--probe", str(probe), "--out", str(out),
                                     "--batch-size", str(args.batch_size)],
                                    cwd=REPO, capture_output=True, text=True, check=True)
            stats = json.loads(result.stdout.strip().splitlines()[-1])
            bare = max(bare_before, bare_forward(args.model, probe, args.batch_size))
            stage = n_images / stats["seconds"]
            stream = n_images / stats["stream_seconds"]
            store_mib = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
            print(f"{n_images:>7} {bare:>11.1f} {stage:>12.1f} {stream:>13.1f} {stream / bare:>12.2f} "
                  f"{stats['peak_rss_mib']:>13.0f} {stats['peak_rss_children_mib']:>13.0f} {store_mib:>10.1f}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
