"""Benchmark of the tally stage: images/s against a plain per-image, per-unit reference, same inputs, same result.

Usage: ``python benchmarks/tally.py [--images 512] [--layers features.relu3 features.relu4] [--repeats 2]``

On the first ``--images`` images of the generated probe set (``data/synthetic_broden``,
``make data``; a subset directory shares its images and masks), the embedded default
model (``data/embedded_model/model.pt``, ``make model``) is run through the extract
and thresholds stages once (untimed). Then, on the same activations, thresholds
and masks:

- **stage**: ``dissect.stages.tally.run`` as ``make dissect`` runs it (the default
  in-process dask cluster, set-up and writing of every output included; its kept
  block tallies are removed before each repeat);
- **block, 1 thread**: ``dissect.stages.tally.tally_block`` over all images in one call,
  one thread (the algorithm alone);
- **reference**: what the older tools do, written in ``tests/reference_tally.py``
  (``tests/test_tally_reference.py`` checks it against the stage too): per image, per unit,
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
import zarr
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from reference_tally import reference_counts, reference_iou  # noqa: E402

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

    from dissect.stages import tally
    from dissect.artifacts import read_thresholds
    from dissect.broden import CATEGORIES, BrodenDataset
    from dissect.layout import RunLayout
    from dissect.pipeline import run_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        probe = subset_probe(PROBE, Path(tmp) / "probe", args.images)
        out_dir = Path(tmp) / "run"
        cfg = compose(["model=default", f"model.checkpoint={TRAINED}", "dataset=default", f"dataset.root={probe}",
                       f"out_dir={out_dir}", f"layers=[{','.join(args.layers)}]", "stages=[extract,thresholds]"])
        run_pipeline(cfg)
        layout = RunLayout(out_dir)
        thresholds = {layer: read_thresholds(layout, layer) for layer in args.layers}
        store = layout.activations
        units = sum(zarr.open_group(str(store), mode="r")[layer]["maps"].shape[1] for layer in args.layers)

        def stage() -> None:  # from scratch each time: no kept blocks, no stamps
            shutil.rmtree(layout.tally_parts, ignore_errors=True)
            for layer in args.layers:
                layout.stamp("tally", layer).unlink(missing_ok=True)
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
            if not np.array_equal(np.load(layout.iou_npy(layer)), expected):
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
