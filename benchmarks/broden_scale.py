"""Benchmark of the whole pipeline at Broden's size: seconds, images/s and peak RSS of every stage.

Usage: ``python benchmarks/broden_scale.py [--sizes 8000 63305] [--root data/broden_scale]
[--out results/broden_scale] [--timeout 3600]`` (``make benchmark-broden-scale``)

The probe set is the generated Broden-scale set (``python -m data_prep synthetic
--profile broden-scale``: 224 px images, 112 px masks, Broden's label counts
per category and long-tailed coverage); it is built into ``--root`` with the
largest of ``--sizes`` images when missing (that build resumes if killed).
Each smaller size is the first images of the same set (``probe_subset``).

For each size, one ``python -m dissect model=default dataset=broden_scale
stages=all`` process runs the whole pipeline with the embedded default model
(``make model``) into a fresh ``--out/<size>`` directory. The benchmark reads
the pipeline's log ("stage X" ... "stage X took S s") to learn which stage runs,
and samples the resident memory of the process and all its children (dask
worker or loader processes, if any) every 0.2 s; a stage's peak is the largest
sample while it ran (a sum over processes counts shared pages once per
process, so it can only overstate). It prints, per size and stage, seconds,
images/s and peak RSS, then the growth of each stage's seconds between the
smallest and the largest size against the growth in images; and writes the
numbers to ``--out/broden_scale.json``. It asserts nothing.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from probe_subset import subset_probe  # noqa: E402

BRODEN_SIZE = 63305
TRAINED = REPO / "data" / "embedded_model" / "model.pt"
STAGE_STARTS = re.compile(r"\] - stage (\w+)$")
STAGE_ENDS = re.compile(r"\] - stage (\w+) took ([0-9.]+) s$")
SAMPLE_SECONDS = 0.2


@dataclass
class StageRecord:
    """What one stage took: seconds (the pipeline's own timing) and the peak RSS sampled while it ran."""

    seconds: float = 0.0
    peak_rss_mib: float = 0.0


@dataclass
class RunRecord:
    """One pipeline run: its stages in order, its wall-clock seconds and the overall peak RSS."""

    images: int
    stages: dict[str, StageRecord] = field(default_factory=dict)
    wall_seconds: float = 0.0
    peak_rss_mib: float = 0.0
    returncode: int = 0


def tree_rss_mib(process: psutil.Process) -> float:
    """Resident memory of ``process`` and all its descendants, MiB (0 for processes that ended meanwhile)."""
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:  # the process itself ended meanwhile
        return 0.0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def ensure_probe_set(root: Path, n_images: int) -> None:
    """Build the Broden-scale set with ``n_images`` images into ``root`` unless it is there (resumes a killed build)."""
    command = [sys.executable, "-m", "data_prep", "synthetic", "--profile", "broden-scale", "--out", str(root),
               "--n-images", str(n_images)]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def run_pipeline(probe: Path, out_dir: Path, images: int, timeout: float) -> RunRecord:
    """Run ``stages=all`` on ``probe`` into ``out_dir`` (removed first) and record every stage."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    command = [sys.executable, "-m", "dissect", "model=default", f"model.checkpoint={TRAINED}",
               "dataset=broden_scale", f"dataset.root={probe}", f"out_dir={out_dir}", "stages=all"]
    print("$ " + " ".join(command), flush=True)
    record = RunRecord(images)
    current: list[str] = []
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watched = psutil.Process(child.pid)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_SECONDS):
            rss = tree_rss_mib(watched)
            record.peak_rss_mib = max(record.peak_rss_mib, rss)
            if current:
                stage = record.stages[current[-1]]
                stage.peak_rss_mib = max(stage.peak_rss_mib, rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log_path = out_dir.parent / f"{out_dir.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        for line in child.stdout:
            log.write(line)
            line = line.rstrip()
            if (ended := STAGE_ENDS.search(line)) is not None:
                record.stages[ended.group(1)].seconds = float(ended.group(2))
                print(f"  {ended.group(1):<14} {float(ended.group(2)):8.1f} s", flush=True)
            elif (begun := STAGE_STARTS.search(line)) is not None:
                record.stages[begun.group(1)] = StageRecord()
                current.append(begun.group(1))
            if time.perf_counter() - started > timeout:
                child.kill()
                print(f"  stopped after {timeout:.0f} s (--timeout)", flush=True)
                break
    record.returncode = child.wait()
    done.set()
    sampler.join()
    record.wall_seconds = time.perf_counter() - started
    if record.returncode != 0:
        print(f"  the pipeline exited with {record.returncode}; its log: {log_path}", flush=True)
    return record


def print_table(record: RunRecord) -> None:
    """Per stage: seconds, images/s, peak RSS; then the totals."""
    print(f"\n{record.images} images (load average {os.getloadavg()[0]:.1f})")
    print(f"  {'stage':<14} {'seconds':>8} {'images/s':>9} {'peak RSS MiB':>13}")
    for name, stage in record.stages.items():
        rate = record.images / stage.seconds if stage.seconds > 0 else float("nan")
        print(f"  {name:<14} {stage.seconds:8.1f} {rate:9.0f} {stage.peak_rss_mib:13.0f}")
    print(f"  {'whole run':<14} {record.wall_seconds:8.1f} {record.images / record.wall_seconds:9.0f} "
          f"{record.peak_rss_mib:13.0f}   (wall clock, start-up included)")


def print_growth(small: RunRecord, large: RunRecord) -> None:
    """Each stage's seconds and peak RSS at the largest size over the smallest, against the image ratio."""
    print(f"\ngrowth from {small.images} to {large.images} images ({large.images / small.images:.1f}x images)")
    print(f"  {'stage':<14} {'seconds':>8} {'peak RSS':>9}")
    for name, stage in large.stages.items():
        before = small.stages.get(name)
        if before is None or before.seconds <= 0 or before.peak_rss_mib <= 0:
            continue
        print(f"  {name:<14} {stage.seconds / before.seconds:7.1f}x {stage.peak_rss_mib / before.peak_rss_mib:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8000, BRODEN_SIZE])
    parser.add_argument("--root", type=Path, default=REPO / "data" / "broden_scale")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "broden_scale")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to one pipeline run")
    args = parser.parse_args()
    if not TRAINED.exists():
        sys.exit(f"missing: {TRAINED} (run `make model`)")
    sizes = sorted(set(args.sizes))
    ensure_probe_set(args.root, sizes[-1])
    records = []
    for size in sizes:
        probe = args.root if size == sizes[-1] else args.out / "probes" / str(size)
        if probe != args.root and not (probe / "index.csv").exists():
            shutil.rmtree(probe, ignore_errors=True)
            subset_probe(args.root, probe, size)
        print(f"\n== {size} images ==", flush=True)
        records.append(run_pipeline(probe, args.out / str(size), size, args.timeout))
        print_table(records[-1])
    if len(records) > 1:
        print_growth(records[0], records[-1])
    summary = [{"images": r.images, "wall_seconds": r.wall_seconds, "peak_rss_mib": r.peak_rss_mib,
                "returncode": r.returncode,
                "stages": {name: vars(stage) for name, stage in r.stages.items()}} for r in records]
    (args.out / "broden_scale.json").write_text(json.dumps({"cores": os.cpu_count(), "runs": summary}, indent=2))


if __name__ == "__main__":
    main()
