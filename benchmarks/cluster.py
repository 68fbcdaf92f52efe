"""Benchmark of the cluster back end: extract and tally images/s in-process and on 1 and 2 worker processes.

Usage: ``python benchmarks/cluster.py [--model alexnet] [--images 400] [--tasks 200]``

On one generated Broden-format probe set (``data_prep.synthetic_broden``, at
the model's input size; random weights: throughput does not depend on them) it
runs ``python -m dissect stages=[extract,thresholds,tally]`` in a fresh
process for each cluster:

- ``in-process``: the default ``cluster=local`` (one worker inside the run's
  process, a thread per core);
- ``1 process``: ``cluster.processes=true cluster.n_workers=1`` (one worker
  process with every core);
- ``2 processes``: ``cluster.processes=true cluster.n_workers=2`` (one core each).

and prints each stage's images/s from the pipeline's own "stage X took N s"
lines (model set-up and cluster start-up included; each run builds its own
mask cache in its tally stage). It then prints the
overhead of one dask task on each cluster: the mean wall time of ``--tasks``
empty tasks submitted and gathered one after another. The arrays and tally of
every cluster are checked equal to the in-process run's after float16
rounding (bit-identical where the same kernels run).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from distributed import Client, LocalCluster

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = {
    "in-process": [],
    "1 process": ["cluster.processes=true", "cluster.n_workers=1"],
    "2 processes": ["cluster.processes=true", "cluster.n_workers=2"],
}
STAGES = ("extract", "thresholds", "tally")


def seeded_checkpoint(model: str, path: Path) -> Path:
    """Random weights of ``model`` (seed 0) saved as a checkpoint, so that every run loads the same ones."""
    import torch
    from hydra import compose, initialize_config_dir

    from dissect.models import load_model

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={model}", "model.weights=null", "model.checkpoint=null"])
    torch.manual_seed(0)
    torch.save(load_model(cfg.model).module.state_dict(), path)
    return path


def dissect(model: str, checkpoint: Path, probe: Path, out_dir: Path, cluster: list[str]) -> dict[str, float]:
    """Run the three stages in a fresh process; seconds per stage, from its log."""
    command = [sys.executable, "-m", "dissect", f"model={model}", "model.weights=null",
               f"model.checkpoint={checkpoint}", "dataset=default", f"dataset.root={probe}", f"out_dir={out_dir}",
               f"tally.mask_cache={out_dir / 'mask_cache'}",  # each run builds its own: no run reuses another's
               f"stages=[{','.join(STAGES)}]", *cluster]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    log = result.stdout + result.stderr  # Hydra logs to stdout, progress bars go to stderr
    seconds = {stage: float(value) for stage, value in re.findall(r"stage (\w+) took ([\d.]+) s", log)}
    return {stage: seconds[stage] for stage in STAGES}


def task_overhead(cluster_args: list[str], tasks: int) -> float:
    """Mean seconds of one empty task submitted and gathered on a cluster like the run's."""
    processes = "cluster.processes=true" in cluster_args
    n_workers = 2 if "cluster.n_workers=2" in cluster_args else 1
    network = {"host": "127.0.0.1"} if processes else {}
    with LocalCluster(n_workers=n_workers, threads_per_worker=max(1, (os.cpu_count() or 1) // n_workers),
                      processes=processes, dashboard_address=None, **network) as cluster, Client(cluster) as client:
        client.submit(int, 0, pure=False).result()  # warm-up
        started = time.perf_counter()
        for i in range(tasks):
            client.submit(int, i, pure=False).result()
        return (time.perf_counter() - started) / tasks


def same_outputs(first: Path, second: Path) -> str:
    """'identical', or the largest float16 difference of any array, and whether the tally labels agree."""
    a, b = zarr.open_group(first / "activations.zarr", mode="r"), zarr.open_group(second / "activations.zarr",
                                                                                     mode="r")
    largest = 0.0
    for layer in a.attrs["layer_order"]:
        for name in a[layer].array_keys():
            largest = max(largest, float(np.abs(a[layer][name][:].astype(np.float32)
                                                - b[layer][name][:].astype(np.float32)).max()))
    labels = all((first / "layers" / layer / "tally.csv").read_bytes()
                 == (second / "layers" / layer / "tally.csv").read_bytes()
                 for layer in a.attrs["layer_order"] if (first / "layers" / layer / "tally.csv").exists())
    arrays = "arrays identical" if largest == 0 else f"arrays differ by at most {largest:.3g}"
    return f"{arrays}; tally {'identical' if labels else 'DIFFERENT'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="alexnet")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--tasks", type=int, default=200)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from data_prep.synthetic_broden import generate
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        size = int(compose(config_name="config", overrides=[f"model={args.model}"]).model.input_size)
    print(f"model={args.model} (random weights), {args.images} generated images at {size} px, "
          f"{os.cpu_count()} cores; images/s per stage, set-up included")
    print(f"{'cluster':<12} " + " ".join(f"{stage + ' img/s':>16}" for stage in STAGES)
          + f" {'task overhead':>14}  outputs against in-process")
    with tempfile.TemporaryDirectory() as scratch:
        probe = generate(Path(scratch) / "probe", n_images=args.images, size=size, seed=1, workers=2)
        checkpoint = seeded_checkpoint(args.model, Path(scratch) / "weights.pt")
        reference = None
        for name, cluster in CLUSTERS.items():
            out_dir = Path(scratch) / name.replace(" ", "_")
            seconds = dissect(args.model, checkpoint, probe, out_dir, cluster)
            overhead = task_overhead(cluster, args.tasks)
            check = "(reference)" if reference is None else same_outputs(reference, out_dir)
            reference = reference or out_dir
            print(f"{name:<12} " + " ".join(f"{args.images / seconds[stage]:>16.1f}" for stage in STAGES)
                  + f" {overhead * 1000:>11.2f} ms  {check}")


if __name__ == "__main__":
    main()
