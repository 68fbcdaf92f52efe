"""Benchmark: wall time of ``python -m dissect stages=all`` for every shipped model config, random weights.

Usage: ``python benchmarks/every_model.py --probe DIR [--input-size 64] [--models alexnet vgg16] [--out DIR]``

Each model runs in a fresh process, as a user runs it (so each one pays the
imports and UMAP's first-call compile), on the Broden-format probe set
``--probe`` (for example one made by ``python -m data_prep synthetic --n-images
200``), with ``model.weights=null`` (``default`` keeps its embedded checkpoint
when it exists, as ``make dissect`` does). Every stage starts from an empty run
directory. Prints the seconds of each stage (from the pipeline's log) and the
whole command, per model; extra Hydra overrides go after ``--``.
"""

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = sorted(path.stem for path in (REPO / "conf" / "model").glob("*.yaml"))
STAGE_TIME = re.compile(r"stage (\w+) took ([0-9.]+) s")


def run_model(model: str, probe: Path, out: Path, input_size: int | None, extra: list[str]) -> tuple[float, dict]:
    """Seconds of the whole command and of each stage; raises if the command fails."""
    run_dir = out / model
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"model={model}", "model.weights=null", f"dataset.root={probe}", f"out_dir={run_dir}", *extra]
    if model == "default" and not (REPO / "data" / "embedded_model" / "model.pt").exists():
        overrides.append("model.checkpoint=null")
    if input_size:
        overrides.append(f"model.input_size={input_size}")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dissect", *overrides], cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{model} failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    stages = {name: float(value) for name, value in STAGE_TIME.findall(result.stdout + result.stderr)}
    return seconds, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", type=Path, required=True)
    parser.add_argument("--input-size", type=int, default=None, help="model.input_size (default: each model's)")
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--out", type=Path, default=Path("results/bench-every-model"))
    parser.add_argument("extra", nargs="*", help="more Hydra overrides (after --)")
    args = parser.parse_args()
    print(f"probe {args.probe}, input size {args.input_size or 'per model'}, overrides {args.extra}")
    for model in args.models:
        seconds, stages = run_model(model, args.probe.resolve(), args.out.resolve(), args.input_size, args.extra)
        detail = ", ".join(f"{name} {value:.0f}" for name, value in stages.items())
        print(f"{model:12s} {seconds:7.1f} s   ({detail})", flush=True)


if __name__ == "__main__":
    main()
