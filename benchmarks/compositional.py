"""Benchmark of the compositional stage: seconds for every unit of a layer at formula lengths 1, 2 and 3.

Usage: ``python benchmarks/compositional.py [--images 10000] [--width 64] [--scratch DIR]``

Two probe sets, each dissected first (extract, thresholds, tally) in a fresh
``python -m dissect`` process:

- ``default``: the embedded default (``data/synthetic_broden``, 3000 images,
  112 x 112 masks; the trained embedded model, layer ``features.relu4``, 128
  units; needs ``make data model``);
- ``large``: a generated set of ``--images`` images (224 px, 112 x 112 masks)
  and a random SmallCNN of ``--width`` (relu4 has 8 x width units: 512 at 64)
  fed at 112 px, layer ``features.relu4``; kept in ``--scratch`` for reruns.

Then ``stages=[compositional]`` runs at ``compositional.max_length`` 1, 2 and 3
(beam 5), each a fresh process, and the table gives the stage's seconds from
the pipeline's log (the first run also bit-packs the concept masks, reported
apart), seconds per unit, and how many units a formula labels better than a
single concept.
"""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYER = "features.relu4"


def dissect(overrides: list[str]) -> str:
    """Run ``python -m dissect`` with overrides; its log (Hydra logs to stdout, bars to stderr)."""
    result = subprocess.run([sys.executable, "-m", "dissect", *overrides], cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stdout[-2000:] + result.stderr[-2000:])
    return result.stdout + result.stderr


def seconds(log: str, pattern: str) -> float:
    found = re.findall(pattern, log)
    return float(found[-1]) if found else 0.0


def large_set(args: argparse.Namespace) -> tuple[Path, Path]:
    """The generated probe set and a seeded random SmallCNN checkpoint, made once in --scratch."""
    import torch

    sys.path.insert(0, str(REPO))
    from data_prep.synthetic_broden import generate
    from dissect.embedded_model import SmallCNN

    probe = args.scratch / f"broden{args.images}"
    if not (probe / "index.csv").exists():
        generate(probe, n_images=args.images, size=224, seed=5, workers=2)
    checkpoint = args.scratch / f"smallcnn_width{args.width}.pt"
    if not checkpoint.exists():
        torch.manual_seed(0)
        torch.save(SmallCNN(num_classes=36, width=args.width).state_dict(), checkpoint)
    return probe, checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/compositional-benchmark"))
    parser.add_argument("--sets", nargs="+", default=["default", "large"], choices=["default", "large"])
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    sets = {}
    if "default" in args.sets:
        sets["default"] = [f"out_dir={args.scratch / 'default-run'}"]
    if "large" in args.sets:
        probe, checkpoint = large_set(args)
        sets["large"] = [f"dataset.root={probe}", f"model.checkpoint={checkpoint}", f"+model.module.width={args.width}",
                         "model.input_size=112", f"out_dir={args.scratch / f'large-run-{args.images}'}"]
    print(f"{'set':<8} {'images':>7} {'units':>6} {'length':>7} {'pack s':>7} {'search s':>9} {'s/unit':>7} "
          f"{'formula better':>15}")
    for name, overrides in sets.items():
        common = [*overrides, f"layers=[{LAYER}]"]
        dissect([*common, "stages=[extract,thresholds,tally]"])
        for length in (1, 2, 3):
            log = dissect([*common, "stages=[compositional]", f"compositional.max_length={length}"])
            pack = seconds(log, r"packed the concept masks of \d+ images in ([\d.]+) s")
            total = seconds(log, r"stage compositional took ([\d.]+) s")
            out_dir = Path(next(o for o in overrides if o.startswith("out_dir=")).split("=", 1)[1])
            summary = json.loads((out_dir / "layers" / LAYER / "compositional.json").read_text())
            images = int(re.findall(r"packed the concept masks of (\d+) images", log)[0]) if pack else None
            sets_images = images or "-"
            print(f"{name:<8} {sets_images:>7} {summary['units']:>6} {length:>7} {pack:>7.1f} {total - pack:>9.1f} "
                  f"{(total - pack) / summary['units']:>7.3f} {summary['formula_beats_single']:>15}", flush=True)


if __name__ == "__main__":
    main()
