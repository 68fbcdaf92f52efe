"""Benchmark of the tally stage: images/s against per-image, per-unit references, same inputs, same result.

Usage: ``python benchmarks/tally.py [--model embedded|resnet18] [--images 2000] [--layers ...] [--labels 1200]
[--repeats 3]``

On the first ``--images`` images of the generated probe set (``data/synthetic_broden``,
``make data``; a subset directory shares its images and masks) a model is run through
the extract and thresholds stages once (untimed):

- ``--model embedded`` (default): the embedded default model (``data/embedded_model/model.pt``,
  ``make model``), layers ``features.relu3 features.relu4`` unless ``--layers``;
- ``--model resnet18``: torchvision's resnet18 with random weights (``weights=None``, seeded
  with ``--seed``; nothing is downloaded), layer ``layer3`` unless ``--layers``: 256 units,
  14 x 14 maps at 224 px, against the 112 x 112 masks.

``--labels N`` tallies against a Broden-format copy of the subset whose ~N labels are the
probe set's labels each split into variants: every image's label n (mask pixels and
whole-image labels alike) becomes one variant of n chosen from the image index, so the
masks cover as many pixels as before, spread over N labels. Then, on the same
activations, thresholds and masks:

- **stage**: ``dissect.stages.tally.run`` as ``make dissect`` runs it (the default
  in-process dask cluster, set-up and writing of every output included; its kept
  block tallies are removed before each repeat). The first run also decodes the probe
  set's masks into the mask cache (``tally.mask_cache``) and is reported apart;
  later runs read that cache;
- **block, 1 thread**: ``dissect.stages.tally.tally_block`` over all images in one call,
  one thread (the algorithm alone);
- **exact reference** (``tests/reference_tally.py``, ``reference_counts``): per image,
  per unit, resize the map with ``torch.nn.functional.interpolate`` (bilinear,
  align_corners=False), threshold it, ``numpy.bincount`` the label numbers under the
  mask (each (pixel, label) pair counted once), one thread;
- **Lite-style reference** (``lite_counts``): the same with NetDissect-Lite's PIL
  bilinear resize of the float32 map, skipping units whose map maximum is at most T
  (they cannot fire), one thread: at least as fast as Lite itself.

Each is timed as the best of ``--repeats``, mask decoding included in every path but
the warm stage and the block. The exact reference's intersection, activation and truth
counts must equal the block's exactly, and the stage's ``iou.npy`` must equal the IoU
computed from them; the script stops with an error otherwise. PIL rounds differently
at the threshold, so for the Lite-style reference it prints how many units get the
same best label and the largest IoU difference.
"""

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from PIL import Image
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]  # this checkout's package, the references

from probe_subset import subset_probe  # noqa: E402
from reference_tally import lite_counts, reference_counts, reference_iou  # noqa: E402

PROBE = REPO / "data" / "synthetic_broden"
TRAINED = REPO / "data" / "embedded_model" / "model.pt"
DEFAULT_LAYERS = {"embedded": ["features.relu3", "features.relu4"], "resnet18": ["layer3"]}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def spread_labels(source: Path, target: Path, n_labels: int) -> Path:
    """A copy of the Broden directory ``source`` whose labels are split into variants, about ``n_labels`` in all.

    Label n (1..L) becomes labels (n - 1) * V + 1 .. n * V, V = ceil(n_labels / L), each of n's category;
    in image i, every pixel and whole-image label n is replaced by variant (7 i + 13 n) mod V. The images
    are symlinks; the mask PNGs are written anew.
    """
    import pandas as pd

    from dissect.broden import CATEGORIES, IMAGE_CATEGORIES, PIXEL_CATEGORIES, decode_label_png, split_cell

    labels = pd.read_csv(source / "label.csv", dtype=str, keep_default_na=False)
    variants = math.ceil(n_labels / len(labels))

    def spread(numbers: np.ndarray, i: int) -> np.ndarray:
        return np.where(numbers > 0, (numbers - 1) * variants + (7 * i + 13 * numbers) % variants + 1, 0)

    (target / "images").mkdir(parents=True)
    rows = labels.loc[labels.index.repeat(variants)].reset_index(drop=True)
    rows["name"] = [f"{name}-{k}" for name, k in zip(rows["name"], np.tile(np.arange(variants), len(labels)))]
    rows["number"] = np.arange(1, len(rows) + 1)
    rows.to_csv(target / "label.csv", index=False)
    categories = pd.read_csv(source / "category.csv")
    categories["first"] = (categories["first"] - 1) * variants + 1
    categories["last"] *= variants
    categories["count"] *= variants
    categories.to_csv(target / "category.csv", index=False)
    for category in categories["name"]:
        spans = categories.set_index("name").loc[category]
        numbers = np.arange(spans["first"], spans["last"] + 1)
        pd.DataFrame({"code": np.arange(1, len(numbers) + 1), "number": numbers,
                      **{column: rows[column].to_numpy()[numbers - 1] for column in ("name", "frequency", "coverage")}}
                     ).to_csv(target / f"c_{category}.csv", index=False)
    index = pd.read_csv(source / "index.csv", dtype=str, keep_default_na=False)
    for i, row in index.iterrows():
        (target / "images" / row["image"]).symlink_to(source / "images" / row["image"])
        for category in PIXEL_CATEGORIES:
            for name in split_cell(row[category]):
                numbers = spread(decode_label_png(source / "images" / name), i)
                rgb = np.zeros((*numbers.shape, 3), np.uint8)
                rgb[..., 0], rgb[..., 1] = numbers % 256, numbers // 256
                Image.fromarray(rgb).save(target / "images" / name)
        for category in IMAGE_CATEGORIES:
            numbers = np.array([int(n) for n in split_cell(row[category])], dtype=np.int64)
            index.loc[i, category] = ";".join(str(n) for n in spread(numbers, i))
    index.to_csv(target / "index.csv", index=False, columns=["image", "split", "ih", "iw", "sh", "sw", *CATEGORIES])
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
    parser.add_argument("--model", choices=sorted(DEFAULT_LAYERS), default="embedded")
    parser.add_argument("--images", type=int, default=2000, help="first images of the probe set to use")
    parser.add_argument("--layers", nargs="+", help="default: relu3, relu4 (embedded) or layer3 (resnet18)")
    parser.add_argument("--labels", type=int, help="spread the probe set's labels over about this many")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random resnet18 weights")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    layers = args.layers or DEFAULT_LAYERS[args.model]
    needed = [(PROBE / "index.csv", "data")] + ([(TRAINED, "model")] if args.model == "embedded" else [])
    missing = [f"{path} (run `make {target}`)" for path, target in needed if not path.exists()]
    if missing:
        sys.exit("missing: " + "; ".join(missing))

    from dissect.stages import tally
    from dissect.artifacts import read_thresholds
    from dissect.broden import CATEGORIES, BrodenDataset
    from dissect.layout import RunLayout
    from dissect.mask_cache import cache_name
    from dissect.pipeline import run_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        probe = subset_probe(PROBE, Path(tmp) / "probe", args.images)
        if args.model == "embedded":
            model = ["model=default", f"model.checkpoint={TRAINED}"]
            described = "the embedded model"
        else:
            torch.manual_seed(args.seed)
            import torchvision

            checkpoint = Path(tmp) / "resnet18-random.pt"
            torch.save(torchvision.models.resnet18(weights=None).state_dict(), checkpoint)
            model = ["model=resnet18", "model.weights=null", f"model.checkpoint={checkpoint}"]
            described = f"resnet18 (random weights, seed {args.seed})"
        out_dir = Path(tmp) / "run"
        run_pipeline(compose(model + ["dataset=default", f"dataset.root={probe}", f"out_dir={out_dir}",
                                      f"layers=[{','.join(layers)}]", "stages=[extract,thresholds]"]))
        if args.labels:
            probe = spread_labels(probe, Path(tmp) / "probe-spread", args.labels)
        cfg = compose(model + ["dataset=default", f"dataset.root={probe}", f"out_dir={out_dir}",
                               f"layers=[{','.join(layers)}]", "stages=[tally]"])
        layout = RunLayout(out_dir)
        thresholds = {layer: read_thresholds(layout, layer) for layer in layers}
        store = layout.activations
        group = zarr.open_group(str(store), mode="r")
        shapes = ", ".join(f"{layer} ({group[layer]['maps'].shape[1]} units, "
                           f"{'x'.join(map(str, group[layer]['maps'].shape[2:]))} maps)" for layer in layers)
        broden = BrodenDataset(probe)

        def stage() -> None:  # from scratch each time: no kept blocks, no stamps
            shutil.rmtree(layout.tally_parts, ignore_errors=True)
            for layer in layers:
                layout.stamp("tally", layer).unlink(missing_ok=True)
            tally.run(cfg)

        shutil.rmtree(Path(str(cfg.tally.mask_cache)), ignore_errors=True)
        cold_s, _ = best_seconds(stage, 1)
        stage_s, _ = best_seconds(stage, args.repeats)
        cache = Path(str(cfg.tally.mask_cache)).resolve() / cache_name(broden)
        torch.set_num_threads(1)
        with threadpool_limits(1):
            block_s, block = best_seconds(lambda: tally.tally_block(str(store), str(cache), layers, thresholds,
                                                                    0, args.images, False), args.repeats)
            reference_s, reference = best_seconds(lambda: reference_counts(store, probe, layers, thresholds),
                                                  args.repeats)
            lite_s, lite = best_seconds(lambda: lite_counts(store, probe, layers, thresholds), args.repeats)

        for key, expected in reference.items():
            if not np.array_equal(block[key], expected):
                raise AssertionError(f"{key}: the tally's counts differ from the reference's "
                                     f"({int((block[key] != expected).sum())} entries)")
        label_categories = np.array([CATEGORIES.index(broden.category_of(n)) for n in range(1, len(broden.labels) + 1)])
        agreement = []
        for layer in layers:
            expected = reference_iou(reference, layer, label_categories).astype(np.float32)
            if not np.array_equal(np.load(layout.iou_npy(layer)), expected):
                raise AssertionError(f"{layer}: the stage's iou.npy differs from the reference's IoU")
            lite_iou = reference_iou(lite, layer, label_categories).astype(np.float32)
            same = int((lite_iou.argmax(axis=1) == expected.argmax(axis=1)).sum())
            agreement.append(f"{layer}: best label equal for {same}/{len(expected)} units, "
                             f"max |IoU difference| {np.abs(lite_iou - expected).max():.2g}")

    print(f"\n{args.images} images of {PROBE.name} ({len(broden.labels)} labels, "
          f"{'x'.join(map(str, broden.mask_size(0)))} masks), {described}: {shapes}; best of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print("counts and IoU equal to the exact reference's; Lite-style reference: " + "; ".join(agreement))
    print(f"{'path':<52}{'images/s':>10}{'vs Lite-style':>15}")
    for name, seconds in (("stage, first run (builds the mask cache)", cold_s),
                          ("stage (tally.run, default local cluster)", stage_s),
                          ("block (tally_block, 1 thread)", block_s),
                          ("exact reference (torch interpolate, 1 thread)", reference_s),
                          ("Lite-style reference (PIL resize, 1 thread)", lite_s)):
        print(f"{name:<52}{args.images / seconds:>10.1f}{lite_s / seconds:>14.1f}x")


if __name__ == "__main__":
    main()
