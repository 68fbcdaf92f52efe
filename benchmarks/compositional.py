"""Benchmark of the compositional stage: seconds (and peak memory) for every unit of a layer.

Usage: ``python benchmarks/compositional.py [--sets default large many] [--images 10000] [--width 64]
[--many-rows 20000] [--max-images N] [--scratch DIR]``

Three probe sets, each dissected first (extract, thresholds, tally) in a fresh
``python -m dissect`` process:

- ``default``: the embedded default (``data/synthetic_broden``, 3000 images,
  112 x 112 masks; the trained embedded model, layer ``features.relu4``, 128
  units; needs ``make data model``);
- ``large``: a generated set of ``--images`` images (224 px, 112 x 112 masks)
  and a random SmallCNN of ``--width`` (relu4 has 8 x width units: 512 at 64)
  fed at 112 px, layer ``features.relu4``; kept in ``--scratch`` for reruns.
- ``many``: a Broden-scale label set: ``data/synthetic_broden`` copied to
  ``--many-rows`` index rows (its 3000 images repeated; the JPEGs are symbolic
  links) with its 39 labels split deterministically into 1,368 label numbers
  as in the real Broden's category sizes (11 colours, 580 objects, 230 parts,
  30 materials, 470 scenes, 47 textures; mask PNGs rewritten, R = number %
  256, G = number // 256): each row's copy of a label gets one of the
  numbers its source label was split into, by a hash of the row and the label.
  The embedded default model, both its layers (``features.relu3`` 64 units,
  ``features.relu4`` 128). Kept in ``--scratch``.

For ``default`` and ``large``, ``stages=[compositional]`` runs at
``compositional.max_length`` 1, 2 and 3 (beam 5), each a fresh process, and the
table gives the stage's seconds from the pipeline's log (the first run also
bit-packs the concept masks, reported apart), seconds per unit, and how many
units a formula labels better than a single concept. For ``many``, one run at
the default settings (``--max-images`` overrides ``compositional.max_images``):
its seconds (packing, each layer), the images searched, and the peak resident
memory of that process beside that of a process that only imports the pipeline
and skips (the libraries' share: torch alone maps several hundred MiB).
"""

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from multiprocessing import Pool
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LAYER = "features.relu4"
#: Label numbers per category of the ``many`` set (the real Broden has 1,197 in all; this is a little more).
MANY_LABELS = {"color": 11, "object": 580, "part": 230, "material": 30, "scene": 470, "texture": 47}


def dissect(overrides: list[str]) -> tuple[str, int]:
    """Run ``python -m dissect`` with overrides; its log (Hydra logs to stdout, bars to stderr) and its peak RSS
    in KiB (``wait4``: this child alone)."""
    with tempfile.TemporaryFile("w+") as output:
        child = subprocess.Popen([sys.executable, "-m", "dissect", *overrides], cwd=REPO, stdout=output,
                                 stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        log = output.read()
    if child.returncode:
        sys.exit(log[-4000:])
    return log, usage.ru_maxrss


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


# ------------------------------------------------------------ the many-label set


def split_codes(n_source: int, n_target: int) -> list[range]:
    """The new codes (0-based) each of a category's n_source labels is split into: n_target in all, in order."""
    return [range(s * n_target // n_source, (s + 1) * n_target // n_source) for s in range(n_source)]


def slot(row: int, number: int, size: int) -> int:
    """Which of ``size`` new numbers the copy of label ``number`` in index row ``row`` gets (deterministic)."""
    return int.from_bytes(hashlib.blake2b(f"{row}:{number}".encode(), digest_size=8).digest(), "little") % size


def remap_row(job: tuple) -> tuple[list[str], dict[int, list[int]]]:
    """Write index row ``row``'s remapped masks (a copy of source image ``i``); its index cells and the new label
    numbers present per category."""
    from PIL import Image

    source, dest, row, cells, new_of = job
    folder = f"r{row // 1000:03d}"
    (dest / "images" / folder).mkdir(exist_ok=True)
    image = f"{folder}/{row:06d}.jpg"
    link = dest / "images" / image
    if not link.is_symlink():
        link.symlink_to((source / "images" / cells[0]).resolve())
    out, present = [image, *cells[1:6]], {}
    for c, category in enumerate(["color", "object", "part", "material"]):
        names = []
        for k, name in enumerate(entry for entry in cells[6 + c].split(";") if entry):
            with Image.open(source / "images" / name) as png:
                pixels = np.asarray(png.convert("RGB"))
            numbers = pixels[:, :, 0].astype(np.int64) + 256 * pixels[:, :, 1].astype(np.int64)
            table = {int(n): new_of(row, int(n)) for n in np.unique(numbers) if n}
            lookup = np.zeros(int(numbers.max()) + 1, dtype=np.int64)
            for n, new in table.items():
                lookup[n] = new
            remapped = lookup[numbers]
            present.setdefault(c, []).extend(table.values())
            rgb = np.stack([remapped % 256, remapped // 256, np.zeros_like(remapped)], axis=2).astype(np.uint8)
            names.append(f"{folder}/{row:06d}_{category}_{k}.png")
            Image.fromarray(rgb, "RGB").save(dest / "images" / names[-1])
        out.append(";".join(names))
    for c in (4, 5):
        numbers = [new_of(row, int(n)) for n in cells[6 + c].split(";") if n]
        present.setdefault(c, []).extend(numbers)
        out.append(";".join(str(n) for n in numbers))
    return out, present


class NewNumbers:
    """Source label number -> the new label number of its copy in a row (picklable for the worker pool)."""

    def __init__(self, split: dict[int, tuple[int, range]]) -> None:
        self.split = split  # source number -> (first new number of its category - 1, its new codes)

    def __call__(self, row: int, number: int) -> int:
        base, codes = self.split[number]
        return base + 1 + codes[slot(row, number, len(codes))]


def many_labels_set(source: Path, dest: Path, rows: int) -> Path:
    """A Broden-format copy of ``source`` with ``rows`` index rows and the labels split into MANY_LABELS."""
    import pandas as pd

    if (dest / "index.csv").exists():
        return dest
    labels = pd.read_csv(source / "label.csv", keep_default_na=False)
    categories = list(MANY_LABELS)
    primary = {int(n): max(((m.split("(")[0], int(m.split("(")[1].rstrip(")"))) for m in cell.split(";")),
                           key=lambda x: x[1])[0] for n, cell in zip(labels["number"], labels["category"])}
    firsts = dict(zip(categories, np.concatenate([[0], np.cumsum(list(MANY_LABELS.values()))]).tolist()))
    split, names = {}, {}
    for category in categories:
        numbers = sorted(n for n, c in primary.items() if c == category)
        for number, codes in zip(numbers, split_codes(len(numbers), MANY_LABELS[category])):
            split[number] = (firsts[category], codes)
            for j, code in enumerate(codes):
                names[firsts[category] + 1 + code] = (f"{labels.set_index('number').at[number, 'name']}-{j}", category)
    index = pd.read_csv(source / "index.csv", dtype=str, keep_default_na=False)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    new_of = NewNumbers(split)
    jobs = [(source, dest, row, index.iloc[row % len(index)].tolist(), new_of) for row in range(rows)]
    with Pool(2) as pool:
        results = pool.map(remap_row, jobs, chunksize=64)
    frequency = {n: 0 for n in names}
    for _, present in results:
        for numbers in present.values():
            for n in set(numbers):
                frequency[n] += 1
    pd.DataFrame([r for r, _ in results], columns=list(index.columns)).to_csv(dest / "index.csv", index=False)
    pd.DataFrame({"number": list(names), "name": [names[n][0] for n in names],
                  "category": [f"{names[n][1]}({frequency[n]})" for n in names],
                  "frequency": [frequency[n] for n in names], "coverage": [float(frequency[n]) for n in names],
                  "syns": ""}).to_csv(dest / "label.csv", index=False)
    rows_of = []
    for category in categories:
        numbers = [n for n in names if names[n][1] == category]
        rows_of.append({"name": category, "first": min(numbers), "last": max(numbers), "count": len(numbers),
                        "frequency": sum(frequency[n] for n in numbers)})
        pd.DataFrame({"code": range(1, len(numbers) + 1), "number": numbers, "name": [names[n][0] for n in numbers],
                      "frequency": [frequency[n] for n in numbers],
                      "coverage": [float(frequency[n]) for n in numbers]}).to_csv(dest / f"c_{category}.csv",
                                                                                 index=False)
    pd.DataFrame(rows_of).to_csv(dest / "category.csv", index=False)
    return dest


def run_many(args: argparse.Namespace) -> None:
    """The Broden-scale label set through the pipeline; the compositional stage's seconds and peak RSS."""
    probe = many_labels_set(REPO / "data" / "synthetic_broden", args.scratch / f"many_labels_{args.many_rows}",
                            args.many_rows)
    out_dir = args.scratch / f"many-run-{args.many_rows}"
    common = [f"dataset.root={probe}", f"out_dir={out_dir}"]
    if args.max_images is not None:
        common.append(f"compositional.max_images={args.max_images}")
    dissect([*common, "stages=[extract,thresholds,tally]"])
    log, peak = dissect([*common, "stages=[compositional]"])
    _, idle = dissect([*common, "stages=[compositional]"])  # everything current: imports and skips
    searched = re.findall(r"packed the concept masks of (\d+) images in ([\d.]+) s \((\d+) image-concept pairs, "
                          r"(\d+) MiB\)", log)
    layers = re.findall(r"compositional (\S+): a formula beats the single label for (\d+) of (\d+) units "
                        r"\(mean gain ([\d.]+)\), ([\d.]+) s", log)
    load = os.getloadavg()
    print(f"many-label set: {args.many_rows} index rows, {sum(MANY_LABELS.values())} labels; load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    if searched:
        images, pack, pairs, mib = searched[-1]
        print(f"  searched images {images}, packing {float(pack):.1f} s ({pairs} image-concept pairs, {mib} MiB)")
    for layer, better, units, gain, secs in layers:
        print(f"  {layer}: {units} units, {float(secs):.1f} s, a formula beats the single label for {better} "
              f"(mean gain {gain})")
    stage = seconds(log, r"stage compositional took ([\d.]+) s")
    print(f"  stage compositional {stage:.1f} s; peak RSS "
          f"{peak / 1024:.0f} MiB (a process that only imports and skips: {idle / 1024:.0f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--many-rows", type=int, default=20000)
    parser.add_argument("--max-images", type=int, default=None, help="compositional.max_images of the many run")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/compositional-benchmark"))
    parser.add_argument("--sets", nargs="+", default=["default", "large"], choices=["default", "large", "many"])
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    sets = {}
    if "default" in args.sets:
        sets["default"] = [f"out_dir={args.scratch / 'default-run'}"]
    if "large" in args.sets:
        probe, checkpoint = large_set(args)
        sets["large"] = [f"dataset.root={probe}", f"model.checkpoint={checkpoint}", f"+model.module.width={args.width}",
                         "model.input_size=112", f"out_dir={args.scratch / f'large-run-{args.images}'}"]
    if sets:
        print(f"{'set':<8} {'images':>7} {'units':>6} {'length':>7} {'pack s':>7} {'search s':>9} {'s/unit':>7} "
              f"{'formula better':>15}")
    for name, overrides in sets.items():
        common = [*overrides, f"layers=[{LAYER}]"]
        dissect([*common, "stages=[extract,thresholds,tally]"])
        for length in (1, 2, 3):
            log, _ = dissect([*common, "stages=[compositional]", f"compositional.max_length={length}"])
            pack = seconds(log, r"packed the concept masks of \d+ images in ([\d.]+) s")
            total = seconds(log, r"stage compositional took ([\d.]+) s")
            out_dir = Path(next(o for o in overrides if o.startswith("out_dir=")).split("=", 1)[1])
            summary = json.loads((out_dir / "layers" / LAYER / "compositional.json").read_text())
            images = int(re.findall(r"packed the concept masks of (\d+) images", log)[0]) if pack else None
            sets_images = images or "-"
            print(f"{name:<8} {sets_images:>7} {summary['units']:>6} {length:>7} {pack:>7.1f} {total - pack:>9.1f} "
                  f"{(total - pack) / summary['units']:>7.3f} {summary['formula_beats_single']:>15}", flush=True)
    if "many" in args.sets:
        run_many(args)


if __name__ == "__main__":
    main()
