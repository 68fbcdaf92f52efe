"""Benchmark of the tally stage: images/s against a plain per-image, per-unit reference, same inputs, same result.

Usage: ``python benchmarks/tally.py [--images 512] [--layers features.relu3 features.relu4] [--repeats 2]``

On the first ``--images`` images of the generated probe set (``data/synthetic_broden``,
``make data``; a subset directory shares its images and masks), the embedded default
model (``data/embedded_model/model.pt``, ``make model``) is run through the extract
and thresholds stages once (untimed). Then, on the same activations, thresholds
and masks:

- **stage**: ``dissect.tally.run`` as ``make dissect`` runs it (the default
  in-process dask cluster, set-up and writing of every output included; its kept
  block tallies are removed before each repeat);
- **block, 1 thread**: ``dissect.tally.tally_block`` over all images in one call,
  one thread (the algorithm alone);
- **reference**: what the older tools do, written here: per image, per unit,
  resize the map with ``torch.nn.functional.interpolate`` (bilinear,
  align_corners=False), threshold it, and ``numpy.bincount`` the label numbers
  under the mask (each (pixel, label) pair counted once), one thread.

Each is timed as the best of ``--repeats``. The reference's intersection,
activation and truth counts must equal the block's exactly, and the stage's
``iou.npy`` must equal the IoU computed from the reference's counts; the script
stops with an error otherwise. Mask decoding is part of every path.
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "data" / "synthetic_broden"
TRAINED = REPO / "data" / "embedded_model" / "model.pt"
DEFAULT_LAYERS = ["features.relu3", "features.relu4"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def subset_probe(source: Path, target: Path, n_images: int) -> Path:
    """A Broden directory with the first ``n_images`` rows of ``source``'s index.csv; images/ is a symlink."""
    target.mkdir(parents=True)
    lines = (source / "index.csv").read_text().splitlines(keepends=True)
    (target / "index.csv").write_text("".join(lines[:n_images + 1]))
    for table in source.glob("*.csv"):
        if table.name != "index.csv":
            shutil.copy(table, target / table.name)
    (target / "images").symlink_to(source / "images")
    return target


def reference_counts(store_path: Path, broden_root: Path, layers: list[str],
                     thresholds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The counts of the tally, one image and one unit at a time.

    Returns ``truth`` (L+1,), ``intersection/<layer>`` (U, L+1) and
    ``activation/<layer>`` (U, n_categories), int64, keyed as ``tally_block``'s result.
    """
    from dissect.broden import CATEGORIES, IMAGE_CATEGORIES, PIXEL_CATEGORIES, BrodenDataset

    broden = BrodenDataset(broden_root)
    n_labels = len(broden.labels)
    store = zarr.open_group(str(store_path), mode="r")
    maps = {layer: store[layer]["maps"][:] for layer in layers}
    counts = {"truth": np.zeros(n_labels + 1, dtype=np.int64)}
    for layer in layers:
        counts[f"intersection/{layer}"] = np.zeros((maps[layer].shape[1], n_labels + 1), dtype=np.int64)
        counts[f"activation/{layer}"] = np.zeros((maps[layer].shape[1], len(CATEGORIES)), dtype=np.int64)
    for i in range(len(broden)):
        size = broden.mask_size(i)
        stacked = np.concatenate([broden.pixel_labels(i, c).reshape(-1, size[0] * size[1]) for c in PIXEL_CATEGORIES])
        pixel, mask_layer = np.nonzero(stacked.T)  # the labelled (pixel, mask layer) positions
        pairs = np.unique(pixel * (n_labels + 1) + stacked.T[pixel, mask_layer])  # each (pixel, label) once
        pixel, label = pairs // (n_labels + 1), pairs % (n_labels + 1)
        whole = [n for c in IMAGE_CATEGORIES for n in broden.image_labels(i, c)]
        annotated = [k for k, c in enumerate(CATEGORIES) if broden.has_category(i, c)]
        counts["truth"] += np.bincount(label, minlength=n_labels + 1)
        counts["truth"][whole] += size[0] * size[1]
        for layer in layers:
            for unit, unit_map in enumerate(maps[layer][i]):
                resized = F.interpolate(torch.from_numpy(unit_map.astype(np.float32))[None, None], size=size,
                                        mode="bilinear", align_corners=False)[0, 0].numpy()
                fired = (resized > thresholds[layer][unit]).ravel()
                counts[f"intersection/{layer}"][unit] += np.bincount(label[fired[pixel]], minlength=n_labels + 1)
                counts[f"intersection/{layer}"][unit, whole] += fired.sum()
                counts[f"activation/{layer}"][unit, annotated] += fired.sum()
    return counts


def reference_iou(counts: dict[str, np.ndarray], layer: str, label_categories: np.ndarray) -> np.ndarray:
    """(U, L) IoU = I / (A[category of the label] + T - I), 0 where the union is empty, from ``reference_counts``."""
    intersection = counts[f"intersection/{layer}"][:, 1:].astype(np.float64)
    union = counts[f"activation/{layer}"][:, label_categories] + counts["truth"][None, 1:] - intersection
    iou = np.zeros_like(intersection)
    np.divide(intersection, union, out=iou, where=union > 0)
    return iou


def best_seconds(function, repeats: int):
    """(best wall-clock seconds of ``repeats`` calls, the last result)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="first images of the probe set to use")
    parser.add_argument("--layers", nargs="+", default=DEFAULT_LAYERS)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    missing = [f"{path} (run `make {target}`)" for path, target in ((PROBE / "index.csv", "data"), (TRAINED, "model"))
               if not path.exists()]
    if missing:
        sys.exit("missing: " + "; ".join(missing))

    from dissect import tally
    from dissect.broden import CATEGORIES, BrodenDataset
    from dissect.pipeline import run_pipeline
    from dissect.thresholds import read_thresholds

    with tempfile.TemporaryDirectory() as tmp:
        probe = subset_probe(PROBE, Path(tmp) / "probe", args.images)
        out_dir = Path(tmp) / "run"
        cfg = compose(["model=default", f"model.checkpoint={TRAINED}", "dataset=default", f"dataset.root={probe}",
                       f"out_dir={out_dir}", f"layers=[{','.join(args.layers)}]", "stages=[extract,thresholds]"])
        run_pipeline(cfg)
        thresholds = {layer: read_thresholds(out_dir / layer) for layer in args.layers}
        store = out_dir / "activations.zarr"
        units = sum(zarr.open_group(str(store), mode="r")[layer]["maps"].shape[1] for layer in args.layers)

        def stage() -> None:
            shutil.rmtree(out_dir / tally.PARTS_DIR, ignore_errors=True)
            tally.run(cfg)

        stage_s, _ = best_seconds(stage, args.repeats)
        torch.set_num_threads(1)
        with threadpool_limits(1):
            block_s, block = best_seconds(lambda: tally.tally_block(str(store), str(probe), args.layers, thresholds,
                                                                    0, args.images, False), args.repeats)
            reference_s, reference = best_seconds(lambda: reference_counts(store, probe, args.layers, thresholds),
                                                  args.repeats)

        for key, expected in reference.items():
            if not np.array_equal(block[key], expected):
                raise AssertionError(f"{key}: the tally's counts differ from the reference's "
                                     f"({int((block[key] != expected).sum())} entries)")
        broden = BrodenDataset(probe)
        label_categories = np.array([CATEGORIES.index(broden.category_of(n)) for n in range(1, len(broden.labels) + 1)])
        for layer in args.layers:
            expected = reference_iou(reference, layer, label_categories).astype(np.float32)
            if not np.array_equal(np.load(out_dir / layer / tally.IOU_NPY), expected):
                raise AssertionError(f"{layer}: the stage's iou.npy differs from the reference's IoU")

    print(f"\n{args.images} images of {PROBE.name}, layers {', '.join(args.layers)} ({units} units); best of "
          f"{args.repeats}; counts and IoU equal to the reference's")
    print(f"{'path':<42}{'images/s':>10}{'vs reference':>14}")
    for name, seconds in (("stage (tally.run, default local cluster)", stage_s),
                          ("block (tally_block, 1 thread)", block_s),
                          ("reference (per image, per unit, 1 thread)", reference_s)):
        print(f"{name:<42}{args.images / seconds:>10.1f}{reference_s / seconds:>13.1f}x")


if __name__ == "__main__":
    main()
