"""The comparison page of several runs (``python -m dissect.compare``): one static, self-contained HTML file.

It shows the runs (with a relative link to each run's report, or "no report"),
grouped bar charts with one bar per run, in the given order and one colour
each (detectors and unique detectors per layer, unique detectors per Broden
category of every layer, dead share per layer), the tables of
``dissect.compare`` and its health remarks. A part a run lacks (no tally, no
audit, a layer it does not have) is said to be missing. The charts are inline
SVG written here: no script, no network. Every text taken from data is escaped.
"""

from collections.abc import Callable
from html import escape
from pathlib import Path

import pandas as pd

from dissect.broden import CATEGORIES
from dissect.compare import TABLE_FILES, Comparison, Run
from reports.build import page
from reports.links import relative

#: One colour per run, in the given order (repeated after ten runs).
RUN_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf")
BAR, BAR_GAP, GROUP_GAP, LEFT, TOP, PLOT, CHAR = 18, 2, 28, 48, 18, 160, 6.5


def run_colours(runs: list[Run]) -> dict[str, str]:
    """Each run's colour, by its place in the given order; the same in every chart."""
    return {run.name: RUN_COLOURS[k % len(RUN_COLOURS)] for k, run in enumerate(runs)}


def count(value: float) -> str:
    """A count as text."""
    return f"{value:g}"


def share(value: float) -> str:
    """A share as a percentage."""
    return f"{value:.1%}"


def cell(value: object, fmt: Callable[[float], str] = str) -> str:
    """A table cell's escaped text; a dash for a missing value."""
    return "&ndash;" if pd.isna(value) else escape(fmt(value))


def legend(colours: dict[str, str]) -> str:
    """The runs' colours, in the given order."""
    items = " ".join(f"<span class='legend-run'><span style='color:{colour}'>&#9632;</span> {escape(name)}</span>"
                     for name, colour in colours.items())
    return f"<p class='legend'>{items}</p>"


def grouped_bars(chart_id: str, title: str, groups: list[str], colours: dict[str, str],
                 values: dict[tuple[str, str], float], fmt: Callable[[float], str] = count,
                 top: float | None = None) -> str:
    """Inline SVG: one group per entry of ``groups``, one bar per run of ``colours`` (in its colour; a dash where
    the run has no value, and no place for a run without any), each bar's height ``values[(group, run)] / top``
    (``top`` defaults to the largest value), and a legend."""
    colours = {name: colour for name, colour in colours.items() if any((g, name) in values for g in groups)}
    names = list(colours)
    top = top or max(values.values(), default=0) or 1
    group_width = max(len(names) * (BAR + BAR_GAP), int(CHAR * max((len(g) for g in groups), default=1)))
    width = LEFT + len(groups) * (group_width + GROUP_GAP)
    base = TOP + PLOT
    parts = [(f"<svg class='compare-bars' id='{escape(chart_id)}' xmlns='http://www.w3.org/2000/svg' "
              f"width='{width}' height='{base + 30}' role='img' aria-label='{escape(title)}'>"),
             f"<line x1='{LEFT - 6}' y1='{TOP}' x2='{LEFT - 6}' y2='{base}' stroke='#999'/>",
             f"<line x1='{LEFT - 6}' y1='{base}' x2='{width}' y2='{base}' stroke='#999'/>",
             f"<text x='{LEFT - 9}' y='{TOP + 4}' font-size='10' text-anchor='end'>{escape(fmt(top))}</text>",
             f"<text x='{LEFT - 9}' y='{base}' font-size='10' text-anchor='end'>{escape(fmt(0))}</text>"]
    for g, group in enumerate(groups):
        x0 = LEFT + g * (group_width + GROUP_GAP)
        left = x0 + (group_width - len(names) * (BAR + BAR_GAP)) / 2
        for k, name in enumerate(names):
            x = left + k * (BAR + BAR_GAP)
            value = values.get((group, name))
            if value is None:
                parts.append(f"<text x='{x + BAR / 2:.1f}' y='{base - 3}' font-size='10' text-anchor='middle' "
                             f"fill='#999'>&ndash;<title>{escape(name)} · {escape(group)}: missing</title></text>")
                continue
            h = PLOT * min(value / top, 1.0)
            label = f"{escape(name)} · {escape(group)}: {escape(fmt(value))}"
            parts.append(f"<rect class='bar' data-run='{escape(name)}' data-group='{escape(group)}' "
                         f"x='{x:.1f}' y='{base - h:.1f}' width='{BAR}' height='{h:.1f}' fill='{colours[name]}'>"
                         f"<title>{label}</title></rect>"
                         f"<text x='{x + BAR / 2:.1f}' y='{base - h - 3:.1f}' font-size='9' "
                         f"text-anchor='middle'>{escape(fmt(value))}</text>")
        parts.append(f"<text x='{x0 + group_width / 2:.1f}' y='{base + 16}' font-size='11' "
                     f"text-anchor='middle'>{escape(group)}</text>")
    parts.append("</svg>")
    return f"<h3>{escape(title)}</h3>{''.join(parts)}{legend(colours)}"


def table_html(table: pd.DataFrame, formats: dict[str, Callable[[float], str]]) -> str:
    """An escaped table of every column of ``table`` (a column of ``formats`` shown with its function)."""
    head = "".join(f"<th>{escape(str(column)).replace('_', ' ')}</th>" for column in table.columns)
    rows = "".join("<tr>" + "".join(f"<td>{cell(row[c], formats.get(c, str))}</td>" for c in table.columns)
                   + "</tr>" for _, row in table.iterrows())
    return f"<table class='data'><tr>{head}</tr>{rows}</table>"


def missing_note(names: list[str], what: str) -> str:
    """A sentence naming the runs that lack a part ("" when none does)."""
    return f"<p>Missing {what}: {escape(', '.join(names))}.</p>" if names else ""


def runs_section(runs: list[Run], out_dir: Path) -> str:
    """The runs in the given order: directory, tallied and audited layers (or missing) and the report link."""
    rows = []
    colours = run_colours(runs)
    for run in runs:
        tally = (f"{len(run.layers)} layers: {escape(', '.join(run.layers))}" if run.layers
                 else "missing (no finished tally)")
        audit = (f"{len(run.audited_layers)} layers" if run.audit is not None else "missing (no finished audit)")
        report = (f"<a href='{escape(relative(run.layout.report_index.resolve(), out_dir.resolve()))}'>report</a>"
                  if run.has_report else "no report")
        rows.append(f"<tr><td><span style='color:{colours[run.name]}'>&#9632;</span> {escape(run.name)}</td>"
                    f"<td>{escape(str(run.layout.root))}</td><td>{tally}</td><td>{audit}</td><td>{report}</td></tr>")
    head = "<tr><th>run</th><th>directory</th><th>tally</th><th>audit</th><th>report</th></tr>"
    return (f"<section class='section' id='runs'><h2>Runs</h2><p>In the order given.</p>"
            f"<table class='data'>{head}{''.join(rows)}</table></section>")


def values_of(table: pd.DataFrame, column: str) -> dict[tuple[str, str], float]:
    """{(layer, run): value} of one column of a per-(layer, run) table."""
    return {(row.layer, row.run): float(getattr(row, column)) for row in table.itertuples()}


def detectors_section(comparison: Comparison) -> str:
    """Detectors and unique detectors per layer, unique detectors per category of every layer, and the table."""
    colours = run_colours(comparison.runs)
    table = comparison.detectors
    header = "<section class='section' id='detectors'><h2>Detectors</h2>"
    if table.empty:
        return f"{header}<p>Missing: no run has a finished tally.</p></section>"
    layers = list(dict.fromkeys(table["layer"]))
    parts = [header, missing_note([run.name for run in comparison.runs if not run.layers], "tally"),
             ("<p>A detector is a unit whose best IoU exceeds its run's IoU threshold; unique detectors count the "
              "distinct concepts they detect.</p>"),
             grouped_bars("chart-detectors", "Detectors per layer", layers, colours, values_of(table, "detectors")),
             grouped_bars("chart-unique", "Unique detectors per layer", layers, colours,
                          values_of(table, "unique_detectors"))]
    for layer in layers:
        rows = table[table["layer"] == layer]
        values = {(category, row.run): float(getattr(row, f"unique_{category}"))
                  for row in rows.itertuples() for category in CATEGORIES}
        parts.append(grouped_bars(f"chart-categories-{layer}", f"Unique detectors per category: {layer}",
                                  list(CATEGORIES), colours, values))
        parts.append(missing_note([run.name for run in comparison.runs if run.layers and layer not in run.layers],
                                  f"layer {layer}"))
    parts.append(f"<h3>Table</h3>{table_html(table, {})}</section>")
    return "".join(parts)


def audit_section(comparison: Comparison) -> str:
    """Dead share per layer, the dead and nearly dead units with died and came_back, and the health remarks."""
    table = comparison.audit
    remarks = "".join(f"<li>{escape(remark)}</li>" for remark in comparison.remarks)
    header = "<section class='section' id='audit'><h2>Unit health (audit)</h2>"
    if table.empty:
        return f"{header}<p>Missing: no run has a finished audit.</p><ul>{remarks}</ul></section>"
    layers = list(dict.fromkeys(table["layer"]))
    return (f"{header}{missing_note([run.name for run in comparison.runs if run.audit is None], 'audit')}"
            f"<ul>{remarks}</ul>"
            + grouped_bars("chart-dead", "Dead share per layer", layers, run_colours(comparison.runs),
                           values_of(table, "dead_share"), fmt=share, top=1.0)
            + "<p>Died: units dead in this run that were not dead in the run it is compared with; came back: "
              "units dead there that fire here.</p>"
            + table_html(table, {"dead_share": share, "nearly_dead_share": share}) + "</section>")


def render(comparison: Comparison, out_dir: Path) -> str:
    """The whole comparison page, for writing to ``out_dir/index.html`` (links are relative to ``out_dir``)."""
    names = [run.name for run in comparison.runs]
    title = f"Comparison of {len(names)} runs: {', '.join(names)}"
    files = " · ".join(f"<a href='{escape(name)}'>{escape(name)}</a>" for name in TABLE_FILES.values())
    body = (f"<h1>{escape(title)}</h1><p>Tables: {files}</p>{runs_section(comparison.runs, Path(out_dir))}"
            f"{detectors_section(comparison)}{audit_section(comparison)}")
    return page(title, body)
