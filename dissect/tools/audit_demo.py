"""Demonstration: a learning rate far too high leaves dead ReLU units, and the audit finds them.

    python -m dissect.tools.audit_demo [--data data/synthetic_broden] [--epochs 3] [--n-images 3000] [--size 224]
                                 [--lrs 0.003 0.3] [--out results/audit-demo] [--seed 0] [--batch-size 64]

The embedded architecture (``dissect.embedded_model.SmallCNN``) is trained once
per learning rate with the embedded model's own recipe
(``dissect.embedded_training.train``: AdamW, one-cycle schedule, same seed) on
the first ``--n-images`` images of the generated probe set, at ``--size``
pixels. Each checkpoint goes to ``<out>/lr-<value>/model.pt`` (with
``training.json``), and that run directory is then extracted and audited with
the project's real configuration (``model=default`` with this checkpoint, the
whole probe set, the model's default layers). The audits are printed side by
side (``dissect.compare``) with each model's verdict and the time taken.

A run directory whose ``training.json`` matches the settings is reused (its
extract and audit are skipped when complete); one trained with other settings
is deleted and trained again.
"""

import argparse
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dissect.embedded_training import PREPROCESSING, LabelledImages, accuracy, load_labelled_images, train
from dissect.stages import audit, extract
from dissect.artifacts import read_json, write_json_atomic
from dissect.compare import compare
from dissect.layout import RunLayout
from dissect.probe import Preprocessing

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
#: Must match conf/model/default.yaml (mean, std).
MEAN, STD = PREPROCESSING.mean, PREPROCESSING.std


@dataclass(frozen=True)
class DemoSettings:
    """What the demonstration trains and where it writes."""

    data: Path
    out: Path
    lrs: tuple[float, ...]
    epochs: int
    n_images: int
    size: int
    seed: int
    batch_size: int = 64


def run_name(lr: float) -> str:
    """Run directory name of a learning rate: lr-0.003, lr-0.3."""
    return f"lr-{lr:g}"


def training_params(settings: DemoSettings, lr: float) -> dict:
    """The settings a checkpoint was trained with (a run directory is reused only when they match)."""
    return {"tasks": "class+presence", "lr": lr, "epochs": settings.epochs, "n_images": settings.n_images, "size": settings.size,
            "seed": settings.seed, "batch_size": settings.batch_size, "data": str(settings.data.resolve())}


def train_checkpoint(data: LabelledImages, params: dict, run_dir: Path) -> None:
    """Train SmallCNN with the embedded recipe; write run_dir/model.pt and training.json (params, losses, accuracy)."""
    started = time.perf_counter()
    model, losses = train(data, epochs=params["epochs"], lr=params["lr"], seed=params["seed"],
                          batch_size=params["batch_size"])
    held_out = ~data.is_train
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), run_dir / "model.pt")
    write_json_atomic(RunLayout(run_dir).training_json, {
        "params": params,
        "classes": data.class_names,
        "num_outputs": data.num_outputs,
        "epoch_losses": losses,
        "held_out_accuracy": accuracy(model, data.images[held_out], data.targets[held_out]),
        "seconds": round(time.perf_counter() - started, 1),
    })


def stage_config(settings: DemoSettings, run_dir: Path, num_classes: int) -> DictConfig:
    """The project's configuration for one checkpoint: model=default with it, the whole probe set, run_dir."""
    overrides = [
        "model=default",
        f"model.checkpoint={(run_dir / 'model.pt').resolve()}",
        f"model.module.num_classes={num_classes}",
        f"model.input_size={settings.size}",
        "dataset=default",
        f"dataset.root={settings.data.resolve()}",
        f"out_dir={run_dir.resolve()}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_demo(settings: DemoSettings) -> tuple[pd.DataFrame, list[str], list[Path]]:
    """Train, extract and audit one checkpoint per learning rate; return the comparison, remarks and run dirs."""
    if len(settings.lrs) < 2 or len(set(settings.lrs)) != len(settings.lrs):
        raise ValueError(f"lrs={list(settings.lrs)} must hold at least two different learning rates")
    data = None
    run_dirs = []
    for lr in settings.lrs:
        run_dir = settings.out / run_name(lr)
        params = training_params(settings, lr)
        record = RunLayout(run_dir).training_json
        if not (record.exists() and read_json(record)["params"] == params):
            if run_dir.exists():
                shutil.rmtree(run_dir)
            if data is None:
                data = load_labelled_images(settings.data, settings.n_images, Preprocessing(settings.size, MEAN, STD))
            print(f"training SmallCNN with lr={lr:g} for {settings.epochs} epoch(s) on "
                  f"{int(data.is_train.sum())} images at {settings.size} px", flush=True)
            train_checkpoint(data, params, run_dir)
        cfg = stage_config(settings, run_dir, read_json(record)["num_outputs"])
        extract.run(cfg)
        audit.run(cfg)
        run_dirs.append(run_dir)
    comparison = compare(run_dirs, [run_name(lr) for lr in settings.lrs])
    return comparison.audit, comparison.remarks, run_dirs


def report(table: pd.DataFrame, remarks: list[str], run_dirs: list[Path]) -> str:
    """The printed comparison: training results, the side-by-side table, each verdict and the remarks."""
    lines = []
    for run_dir in run_dirs:
        training = read_json(RunLayout(run_dir).training_json)
        verdict = read_json(RunLayout(run_dir).audit_json)["verdict"]["text"]
        lines.append(f"{run_dir.name}: held-out accuracy {training['held_out_accuracy']:.3f}, final training loss "
                     f"{training['epoch_losses'][-1]:.3f}\n  verdict: {verdict}")
    side_by_side = table.pivot(index="layer", columns="run", values="dead_share")
    side_by_side = side_by_side.loc[list(dict.fromkeys(table["layer"])), list(dict.fromkeys(table["run"]))]
    lines += ["", "dead share per layer:", side_by_side.to_string(float_format="{:.1%}".format), "",
              table.to_string(index=False, formatters={"dead_share": "{:.1%}".format,
                                                       "nearly_dead_share": "{:.1%}".format}), ""]
    lines += [f"- {remark}" for remark in remarks]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the demonstration and print the audits side by side with the time taken."""
    parser = argparse.ArgumentParser(prog="python -m dissect.tools.audit_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/synthetic_broden"))
    parser.add_argument("--out", type=Path, default=Path("results/audit-demo"))
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 0.3])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n-images", type=int, default=3000, help="images to train on (the first ones)")
    parser.add_argument("--size", type=int, default=224, help="input size of the model, in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not (args.data / "index.csv").is_file():
        print(f"error: {args.data} holds no generated probe set (index.csv); build it with `make data`",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    settings = DemoSettings(args.data, args.out, tuple(args.lrs), args.epochs, args.n_images, args.size, args.seed,
                            args.batch_size)
    table, remarks, run_dirs = run_demo(settings)
    print(report(table, remarks, run_dirs))
    print(f"\naudit demo: {time.perf_counter() - started:.0f} s ({settings.epochs} epochs on the first "
          f"{settings.n_images} images at {settings.size} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
