"""The comparison page of finished runs: detectors and unit health of several runs side by side.

    python -m dissect.compare RUN_DIR [RUN_DIR ...] [--names a,b,...] [--out DIR]

Each RUN_DIR is a run directory (``out_dir`` of ``python -m dissect``; it must
at least hold a finished extract stage). Runs are named after their directories
unless ``--names`` gives one distinct name per run, and are listed in the order
given: list checkpoints in training order, since ``died`` and ``came_back``
compare each run with the one before it. Only artifacts are read (through
``dissect.layout.RunLayout``): ``tally.csv`` and ``tally.json`` of every layer
whose tally finished (its stamp exists), ``audit/units.csv`` and
``audit/audit.json`` of a finished audit, and whether ``report/index.html``
exists; no model is run. A run without
a tally or an audit still appears, with that part marked missing, and runs with
different layers are fine: each layer is compared across the runs that have it.

Written to ``--out`` (default ``results/compare/``): ``index.html`` (built by
``reports.compare_page``: grouped bar charts, one bar per run, of detectors per
layer, unique detectors per category and dead shares, the tables below, the
health remarks and a link to each run's report) and these tables:

``runs.csv``, one row per run in the given order:
    run (its name), run_dir (as given), tallied_layers (layers with a finished
    tally; 0: no tally), audited_layers (layers of the finished audit; 0: no
    audit), report (True when ``report/index.html`` exists).

``detectors.csv``, one row per (layer, run) whose tally finished, layers in
order of first appearance (each run's layers in its activation store's order),
then runs in the given order:
    layer, run, units, iou_threshold (the run's ``tally.iou_threshold``, as its
    tally.json recorded it), detectors (units whose best IoU in tally.csv
    exceeds iou_threshold), unique_detectors (distinct concepts among the
    detectors' labels), and
    ``unique_<category>`` for each Broden category (color, object, part,
    material, scene, texture): the distinct concepts of that category detected.

``audit.csv``, one row per (layer, run) of a finished audit, in the same order:
    layer, run, units, dead, nearly_dead (unit counts), dead_share,
    nearly_dead_share (their shares of the layer's units), compared_with (the
    latest earlier run that audited this layer; empty for the first), died
    (units dead now that were not dead there) and came_back (units dead there
    that fire now); both empty when there is no earlier run or its layer has
    another number of units.

The health remarks (printed and on the page) say which run looks unhealthy and
why: the largest dead share of any layer when it reaches the warning level its
audit recorded (``thresholds.dead_share_warning`` in audit.json), and every run
with noisy first-layer filters.
"""

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dissect.artifacts import open_activations, read_json
from dissect.broden import CATEGORIES
from dissect.errors import DissectError
from dissect.layout import LAYERS, RunLayout

#: Where the comparison goes when --out is not given.
DEFAULT_OUT = Path("results/compare")
#: The module that renders the page; found by name, like the report stage, so that dissect imports no reports.
PAGE_MODULE = "reports.compare_page"
#: The tables written beside the page, and the file name of each.
TABLE_FILES = {"runs": "runs.csv", "detectors": "detectors.csv", "audit": "audit.csv"}

RUN_COLUMNS = ["run", "run_dir", "tallied_layers", "audited_layers", "report"]
DETECTOR_COLUMNS = (["layer", "run", "units", "iou_threshold", "detectors", "unique_detectors"]
                    + [f"unique_{category}" for category in CATEGORIES])
AUDIT_COLUMNS = ["layer", "run", "units", "dead", "nearly_dead", "dead_share", "nearly_dead_share",
                 "compared_with", "died", "came_back"]


class CompareError(DissectError):
    """The given directories cannot be compared (not run directories, or names that do not fit them)."""


@dataclass(frozen=True)
class Run:
    """One run directory as the comparison reads it.

    ``layers``: the layers whose tally finished, in the run's layer order;
    ``audit``: its audit.json, or None without a finished audit; ``units``: its
    audit/units.csv (None without a finished audit).
    """

    name: str
    layout: RunLayout
    layers: list[str]
    audit: dict[str, Any] | None
    units: pd.DataFrame | None

    @property
    def audited_layers(self) -> list[str]:
        """The layers of the finished audit, in its order (none without an audit)."""
        return [] if self.audit is None else list(self.audit["layer_order"])

    @property
    def has_report(self) -> bool:
        """Whether the run's report (report/index.html) exists."""
        return self.layout.report_index.is_file()


@dataclass(frozen=True)
class Comparison:
    """The runs in the given order, every layer any of them has, the three tables and the health remarks."""

    runs: list[Run]
    layers: list[str]
    runs_table: pd.DataFrame
    detectors: pd.DataFrame
    audit: pd.DataFrame
    remarks: list[str]


def in_layer_order(layout: RunLayout, layers: set[str]) -> list[str]:
    """``layers`` in the order of the run's activation store (by name where the store is gone or lacks one)."""
    order = list(open_activations(layout.root).attrs["layer_order"]) if layout.activations.is_dir() else []
    return sorted(layers, key=lambda layer: (order.index(layer) if layer in order else len(order), layer))


def tallied_layers(layout: RunLayout) -> list[str]:
    """The layers of a run whose tally finished (their stamp exists), in the run's layer order."""
    folder = layout.root / LAYERS
    names = {path.name for path in folder.iterdir() if path.is_dir()} if folder.is_dir() else set()
    return in_layer_order(layout, {name for name in names if layout.stamp("tally", name).is_file()})


def open_run(run_dir: Path, name: str) -> Run:
    """Read what the comparison needs from a run directory; raise CompareError when it is not one."""
    layout = RunLayout(Path(run_dir))
    if not layout.stamp("extract").is_file():
        raise CompareError(f"{run_dir} is not a run directory: it has no {layout.stamp('extract')} (written by a "
                           "finished extract stage); give the out_dir of a run of python -m dissect")
    audited = layout.stamp("audit").is_file()
    return Run(name=name, layout=layout, layers=tallied_layers(layout),
               audit=read_json(layout.audit_json) if audited else None,
               units=pd.read_csv(layout.audit_units_csv) if audited else None)


def run_names(run_dirs: list[Path], names: list[str] | None) -> list[str]:
    """The given names, or the directory names; one distinct, non-empty name per run directory."""
    chosen = names if names is not None else [Path(run_dir).resolve().name for run_dir in run_dirs]
    if not run_dirs or len(chosen) != len(run_dirs) or len(set(chosen)) != len(chosen) or "" in chosen:
        raise CompareError(f"need one distinct, non-empty name per run directory; got names {chosen} for "
                           f"{len(run_dirs)} directories (give them with --names a,b,...)")
    return chosen


def all_layers(runs: list[Run]) -> list[str]:
    """Every layer tallied or audited by any run, in order of first appearance."""
    return list(dict.fromkeys(layer for run in runs
                              for layer in in_layer_order(run.layout, set(run.layers) | set(run.audited_layers))))


def runs_table(runs: list[Run]) -> pd.DataFrame:
    """One row per run: run, run_dir, tallied_layers, audited_layers, report (see the module docstring)."""
    return pd.DataFrame([{"run": run.name, "run_dir": str(run.layout.root), "tallied_layers": len(run.layers),
                          "audited_layers": len(run.audited_layers), "report": run.has_report} for run in runs],
                        columns=RUN_COLUMNS)


def detector_row(run: Run, layer: str) -> dict[str, Any]:
    """A layer's units, detectors and unique detectors (per category) from its tally.csv, above the IoU threshold
    its tally.json recorded."""
    threshold = float(read_json(run.layout.tally_json(layer))["iou_threshold"])
    table = pd.read_csv(run.layout.tally_csv(layer), keep_default_na=False)  # a label "NA" stays a label
    detectors = table[table["iou"] > threshold]
    return {"layer": layer, "run": run.name, "units": len(table), "iou_threshold": threshold,
            "detectors": len(detectors), "unique_detectors": detectors["label"].nunique(),
            **{f"unique_{c}": detectors.loc[detectors["category"] == c, "label"].nunique() for c in CATEGORIES}}


def detector_table(runs: list[Run], layers: list[str]) -> pd.DataFrame:
    """One row per (layer, run) whose tally finished (see the module docstring)."""
    return pd.DataFrame([detector_row(run, layer) for layer in layers for run in runs if layer in run.layers],
                        columns=DETECTOR_COLUMNS)


def audit_table(runs: list[Run], layers: list[str]) -> pd.DataFrame:
    """One row per (layer, run) of a finished audit, with died and came_back (see the module docstring)."""
    rows = []
    for layer in layers:
        previous: tuple[str, np.ndarray] | None = None  # the latest earlier run that audited this layer
        for run in runs:
            if run.units is None or layer not in run.audited_layers:
                continue
            units = run.units.loc[run.units["layer"] == layer].sort_values("unit")
            dead, nearly = units["dead"].to_numpy(bool), units["nearly_dead"].to_numpy(bool)
            comparable = previous is not None and len(previous[1]) == len(dead)
            rows.append({
                "layer": layer, "run": run.name, "units": len(dead), "dead": int(dead.sum()),
                "nearly_dead": int(nearly.sum()), "dead_share": float(dead.mean()),
                "nearly_dead_share": float(nearly.mean()),
                "compared_with": previous[0] if previous is not None else pd.NA,
                "died": int((dead & ~previous[1]).sum()) if comparable else pd.NA,
                "came_back": int((previous[1] & ~dead).sum()) if comparable else pd.NA,
            })
            previous = (run.name, dead)
    table = pd.DataFrame(rows, columns=AUDIT_COLUMNS)
    return table.astype({"units": "int64", "dead": "int64", "nearly_dead": "int64", "dead_share": "float64",
                         "nearly_dead_share": "float64", "died": "Int64", "came_back": "Int64"})


def health_remarks(runs: list[Run], table: pd.DataFrame) -> list[str]:
    """Plain-language lines: which run looks unhealthy and why (or that none does) from the audit table."""
    audited = [run for run in runs if run.audit is not None]
    if not audited:
        return ["no run has a finished audit, so none can be judged (run stages=[audit])"]
    warning = {run.name: float(run.audit["thresholds"]["dead_share_warning"]) for run in audited}
    remarks = []
    over = table[table["dead_share"] >= table["run"].map(warning)]
    if not over.empty:
        worst = over.loc[over["dead_share"].idxmax()]
        remarks.append(f"{worst['run']} looks unhealthy: {worst['dead_share']:.0%} of its {worst['layer']} units "
                       f"are dead, the largest dead share of all runs and layers (warning level "
                       f"{warning[worst['run']]:.0%}): a symptom of a learning rate that was too high (dying ReLUs)")
    for run in audited:
        first = run.audit["first_layer"]
        if first is not None and first["noisy"]:
            remarks.append(f"{run.name} has noisy first-layer filters ({first['layer']}: median "
                           f"{first['high_frequency_share_median']:.0%} of their energy at high spatial "
                           f"frequencies, white noise {first['white_noise_share']:.0%})")
    levels = "/".join(f"{level:.0%}" for level in sorted(set(warning.values())))
    return remarks or [(f"no run looks unhealthy: every dead share is below its audit's warning level ({levels}) "
                        "and no first layer is noisy")]


def compare(run_dirs: list[Path], names: list[str] | None = None) -> Comparison:
    """Read every run directory (in the given order) and build the comparison's tables and remarks."""
    runs = [open_run(Path(run_dir), name) for run_dir, name in zip(run_dirs, run_names(run_dirs, names))]
    layers = all_layers(runs)
    audit = audit_table(runs, layers)
    return Comparison(runs=runs, layers=layers, runs_table=runs_table(runs), detectors=detector_table(runs, layers),
                      audit=audit, remarks=health_remarks(runs, audit))


def write_comparison(comparison: Comparison, out_dir: Path) -> Path:
    """Write the tables (TABLE_FILES) and index.html into ``out_dir``; return the page's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {"runs": comparison.runs_table, "detectors": comparison.detectors, "audit": comparison.audit}
    for key, table in tables.items():
        table.to_csv(out_dir / TABLE_FILES[key], index=False)
    index = out_dir / "index.html"
    index.write_text(importlib.import_module(PAGE_MODULE).render(comparison, out_dir), encoding="utf-8")
    return index


def summary_text(comparison: Comparison) -> str:
    """The printed comparison: the runs, both tables (or that they are missing) and the remarks."""
    lines = [comparison.runs_table.to_string(index=False), ""]
    if comparison.detectors.empty:
        lines.append("detectors: no run has a finished tally")
    else:
        lines.append(comparison.detectors.to_string(index=False))
    lines.append("")
    if comparison.audit.empty:
        lines.append("audit: no run has a finished audit")
    else:
        shares = {"dead_share": "{:.1%}".format, "nearly_dead_share": "{:.1%}".format}
        lines.append(comparison.audit.to_string(index=False, formatters=shares))
    lines += [""] + [f"- {remark}" for remark in comparison.remarks]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Compare the runs, print the tables and remarks, write the page and CSVs; a DissectError exits with 2."""
    parser = argparse.ArgumentParser(prog="python -m dissect.compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="a run directory, in training order")
    parser.add_argument("--names", help="comma-separated run names, one per RUN_DIR (default: directory names)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        comparison = compare(args.runs, args.names.split(",") if args.names is not None else None)
        index = write_comparison(comparison, args.out)
    except DissectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary_text(comparison))
    print(f"comparison: open {index.resolve().as_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
