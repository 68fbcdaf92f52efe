"""Compare the audits of several checkpoints of one model side by side.

    python -m dissect.tools.audit_compare NAME=RUN_DIR NAME=RUN_DIR ... [--out table.csv]

Each RUN_DIR is a run directory whose audit stage has finished
(``<RUN_DIR>/audit/audit.json``); the checkpoints are compared in the order
given, so list them in training order. Per layer and checkpoint the table holds
the number of units, dead and nearly dead units, the dead share, and against
the previous checkpoint ``died`` (units dead now that were not dead before) and
``came_back`` (units dead before that fire now); the first checkpoint has no
previous one (<NA>). Below the table it says which checkpoint looks unhealthy
and why: the largest dead share of any layer when it reaches
``dissect.stages.audit.DEAD_SHARE_WARNING``, and every checkpoint with noisy
first-layer filters.
"""

import argparse
import sys
from pathlib import Path

import pandas as pd

from dissect.artifacts import read_json
from dissect.stages.audit import DEAD_SHARE_WARNING
from dissect.layout import RunLayout
from dissect.errors import DissectError

COLUMNS = ["layer", "checkpoint", "units", "dead", "nearly_dead", "dead_share", "died", "came_back"]


class CompareError(DissectError):
    """The audits cannot be compared."""


def read_units(run_dir: Path) -> pd.DataFrame:
    """The units.csv of a finished audit; raise naming the directory when there is none."""
    layout = RunLayout(Path(run_dir))
    if not layout.stamp("audit").exists():
        raise CompareError(f"{run_dir} holds no finished audit ({layout.stamp('audit')} is missing); "
                           "run the audit stage there first (stages=[audit])")
    return pd.read_csv(layout.audit_units_csv)


def compare(run_dirs: list[Path], names: list[str]) -> pd.DataFrame:
    """One row per (layer, checkpoint), layers in the first audit's order, checkpoints in the given order.

    Columns: layer, checkpoint, units, dead, nearly_dead, dead_share, died and
    came_back (against the previous checkpoint; <NA> for the first). Every
    audit must hold the same layers with the same number of units.
    """
    if len(run_dirs) != len(names) or not names or len(set(names)) != len(names):
        raise CompareError(f"need one distinct name per run directory; got names {names} for {len(run_dirs)} "
                           "directories")
    tables = [read_units(run_dir) for run_dir in run_dirs]
    layers = list(dict.fromkeys(tables[0]["layer"]))
    for name, table in zip(names, tables):
        counts = table.groupby("layer", sort=False).size()
        expected = tables[0].groupby("layer", sort=False).size()
        if list(counts.index) != layers or not counts.equals(expected):
            raise CompareError(f"checkpoint {name!r} audits layers {dict(counts)}, but {names[0]!r} audits "
                               f"{dict(expected)}; compare audits of the same layers of one model")
    rows = []
    for layer in layers:
        previous = None
        for name, table in zip(names, tables):
            units = table.loc[table["layer"] == layer].sort_values("unit")
            dead, nearly = units["dead"].to_numpy(bool), units["nearly_dead"].to_numpy(bool)
            rows.append({
                "layer": layer, "checkpoint": name, "units": len(dead), "dead": int(dead.sum()),
                "nearly_dead": int(nearly.sum()), "dead_share": float(dead.mean()),
                "died": pd.NA if previous is None else int((dead & ~previous).sum()),
                "came_back": pd.NA if previous is None else int((previous & ~dead).sum()),
            })
            previous = dead
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.astype({"died": "Int64", "came_back": "Int64"})


def health_remarks(run_dirs: list[Path], names: list[str], table: pd.DataFrame) -> list[str]:
    """Plain-language lines: which checkpoint looks unhealthy and why (or that none does)."""
    remarks = []
    worst = table.loc[table["dead_share"].idxmax()]
    if worst["dead_share"] >= DEAD_SHARE_WARNING:
        remarks.append(f"{worst['checkpoint']} looks unhealthy: {worst['dead_share']:.0%} of its {worst['layer']} "
                       f"units are dead, the largest dead share of all checkpoints and layers (warning level "
                       f"{DEAD_SHARE_WARNING:.0%}): a symptom of a learning rate that was too high (dying ReLUs)")
    for name, run_dir in zip(names, run_dirs):
        first = read_json(RunLayout(Path(run_dir)).audit_json)["first_layer"]
        if first is not None and first["noisy"]:
            remarks.append(f"{name} has noisy first-layer filters ({first['layer']}: median "
                           f"{first['high_frequency_share_median']:.0%} of their energy at high spatial "
                           f"frequencies, white noise {first['white_noise_share']:.0%})")
    return remarks or [f"no checkpoint looks unhealthy: every dead share is below {DEAD_SHARE_WARNING:.0%} and "
                       "no first layer is noisy"]


def parse_pairs(pairs: list[str]) -> tuple[list[str], list[Path]]:
    """['NAME=RUN_DIR', ...] -> (names, run directories)."""
    names, run_dirs = [], []
    for pair in pairs:
        name, sep, run_dir = pair.partition("=")
        if not sep or not name or not run_dir:
            raise CompareError(f"{pair!r} is not NAME=RUN_DIR (for example lr-0.003=results/audit-demo/lr-0.003)")
        names.append(name)
        run_dirs.append(Path(run_dir))
    return names, run_dirs


def main(argv: list[str] | None = None) -> int:
    """Print the comparison table and the health remarks; write the table to --out when given."""
    parser = argparse.ArgumentParser(prog="python -m dissect.tools.audit_compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR", help="a checkpoint's name and its run directory")
    parser.add_argument("--out", type=Path, help="write the table to this CSV file")
    args = parser.parse_args(argv)
    try:
        names, run_dirs = parse_pairs(args.runs)
        table = compare(run_dirs, names)
        remarks = health_remarks(run_dirs, names, table)
    except CompareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(table.to_string(index=False, formatters={"dead_share": "{:.1%}".format}))
    for remark in remarks:
        print(f"- {remark}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
