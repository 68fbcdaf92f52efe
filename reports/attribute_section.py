"""The attribution section of the report, read from ``<run_dir>/attribute/`` (the attribute stage's outputs).

``render`` gives the index page's section: the methods and their map
conventions, the concept-agreement summary, the randomisation table with its
flags, and the class-image strips. ``unit_fragment`` gives the part of a unit's
card: its strip and its agreement per method. The report lives at
``<run_dir>/report/``, so files are linked as ``../attribute/...``. Every text
taken from data is escaped.
"""

import functools
from html import escape
from pathlib import Path

import pandas as pd

from dissect.artifacts import read_json
from dissect.layout import RunLayout


def _link(run_dir: Path, path: Path) -> str:
    """A path under the run directory as seen from the report directory, escaped for an attribute."""
    return escape(f"../{path.relative_to(run_dir).as_posix()}", quote=True)


def _number(value: object, digits: int = 3) -> str:
    """A figure with ``digits`` decimals; a dash for a missing one (None, NaN, or an empty CSV cell)."""
    return "&ndash;" if value is None or value == "" or pd.isna(value) else f"{float(value):.{digits}f}"


def methods_table(summary: dict) -> str:
    """One row per method: map convention, speed, agreement and the final randomisation correlation."""
    head = ("<tr><th>method</th><th>map</th><th>pairs / s</th><th>inside share (positive mass)</th>"
            "<th>chance share</th><th>Spearman after randomisation</th><th>verdict</th></tr>")
    rows = []
    for method, entry in summary["methods"].items():
        agreement = entry.get("agreement") or {}
        randomisation = entry.get("randomisation")
        if randomisation is None:
            verdict = "not checked"
        elif randomisation["flagged"]:
            verdict = "<span class='verdict-bad'>barely changes: does not reflect the model</span>"
        else:
            verdict = "<span class='verdict-ok'>changes with the weights</span>"
        rows.append(f"<tr><td>{escape(method)}</td><td>{escape(entry['map'])}</td>"
                    f"<td>{_number(entry.get('pairs_per_second'), 1)}</td>"
                    f"<td>{_number(agreement.get('mean_inside_share'))}</td>"
                    f"<td>{_number(agreement.get('mean_chance_share'))}</td>"
                    f"<td>{_number(randomisation and randomisation['final_spearman'])}</td><td>{verdict}</td></tr>")
    return f"<table class='data'>{head}{''.join(rows)}</table>"


def randomisation_table(table: pd.DataFrame) -> str:
    """Mean Spearman correlation per method (rows) after each cascade step (columns), with the pairs it is over."""
    steps = table.drop_duplicates("step").sort_values("step")
    head = "<tr><th>method</th>" + "".join(
        f"<th>{int(s.randomised)} module(s) randomised, down to {escape(str(s.deepest))}</th>"
        for s in steps.itertuples()) + "</tr>"
    rows = []
    for method, group in table.groupby("method", sort=False):
        by_step = group.set_index("step")
        rows.append(f"<tr><td>{escape(str(method))}</td>" + "".join(
            f"<td>{_number(by_step.at[s, 'spearman_mean'])} &plusmn; {_number(by_step.at[s, 'spearman_std'])} "
            f"(n={int(by_step.at[s, 'pairs'])})</td>"
            for s in steps["step"]) + "</tr>")
    return f"<table class='data'>{head}{''.join(rows)}</table>"


def render(run_dir: Path, report_dir: Path) -> str | None:
    """The attribution section of the index page; None when the attribute stage has not finished."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    if not layout.stamp("attribute").exists():
        return None
    summary = read_json(layout.attribute_json)
    pairs = pd.read_csv(layout.attribute_pairs_csv, keep_default_na=False)
    files = " · ".join(f"<a href='{_link(run_dir, path)}'>{path.name}</a>"
                       for path in (layout.attribute_pairs_csv, layout.attribute_agreement_csv,
                                    layout.attribute_randomisation_csv, layout.attribute_json, layout.attribute_maps)
                       if path.exists())
    parts = [f"<section class='section' id='attribute'><h2>Attribution maps</h2>"
             f"<p>{summary['units']} unit(s) on {summary['pairs']['unit']} top image(s) and "
             f"{summary['pairs']['class']} class map(s) · {files}</p>"
             "<p>A unit is explained through its maximum activation over its map. The inside share is the "
             "share of a map's positive mass inside the mask of the unit's concept on its top images; chance is "
             "the mask's area share.</p>", methods_table(summary)]
    if summary["flagged_methods"]:
        flagged = ", ".join(escape(m) for m in summary["flagged_methods"])
        parts.append(f"<p class='verdict-bad'>Flagged (Spearman &gt; {summary['max_correlation']} once every "
                     f"layer is randomised): {flagged}: {escape(summary['flag_meaning'])}.</p>")
    if layout.attribute_randomisation_csv.exists():
        parts.append("<h3>Parameter randomisation (cascading from the last layer)</h3>"
                     + randomisation_table(pd.read_csv(layout.attribute_randomisation_csv, keep_default_na=False)))
    units = pairs[pairs["kind"] == "unit"][["layer", "target"]].drop_duplicates()
    if len(units):
        links = " · ".join(f"<a href='{_link(run_dir, layout.attribute_unit_strip(layer, int(unit)))}'>"
                           f"{escape(layer)} unit {int(unit)}</a>" for layer, unit in units.itertuples(index=False))
        parts.append(f"<h3>Unit strips</h3><p>{links}</p>")
    for row in pairs[pairs["kind"] == "class"].itertuples():
        src = _link(run_dir, layout.attribute_class_strip(int(row.image_index), int(row.target)))
        parts.append(f"<figure><img loading=\"lazy\" src=\"{src}\" alt=\"class {int(row.target)} maps\">"
                     f"<figcaption>class {int(row.target)} on {escape(str(row.image_id))}</figcaption></figure>")
    return "".join(parts) + "</section>"


@functools.lru_cache(maxsize=8)
def _unit_tables(layout: RunLayout, version: int) -> tuple[set[tuple[str, int]],
                                                          dict[tuple[str, int], pd.DataFrame]]:
    """The explained (layer, unit) pairs and each one's agreement rows, read once per stamp ``version``."""
    pairs = pd.read_csv(layout.attribute_pairs_csv, keep_default_na=False)
    units = {(str(layer), int(unit)) for layer, unit in
             pairs.loc[pairs["kind"] == "unit", ["layer", "target"]].itertuples(index=False)}
    agreement: dict[tuple[str, int], pd.DataFrame] = {}
    if layout.attribute_agreement_csv.exists():
        table = pd.read_csv(layout.attribute_agreement_csv, keep_default_na=False)
        agreement = {(str(layer), int(unit)): rows for (layer, unit), rows in table.groupby(["layer", "unit"])}
    return units, agreement


def unit_fragment(run_dir: Path, layer: str, unit: int) -> str:
    """HTML for a unit's card: its attribution strip and agreement per method; "" when the unit was not explained.

    The tables are read once (per version of pairs.csv), so a layer page of thousands of cards stays fast.
    """
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    if not layout.stamp("attribute").exists():
        return ""
    units, agreement = _unit_tables(layout, layout.stamp("attribute").stat().st_mtime_ns)
    if (layer, int(unit)) not in units:
        return ""
    strip = layout.attribute_unit_strip(layer, int(unit))
    html = (f"<div class='attribution'><img loading=\"lazy\" src=\"{_link(run_dir, strip)}\" "
            f"alt=\"attribution maps of unit {int(unit)}\">")
    rows = agreement.get((layer, int(unit)))
    if rows is not None:
        cells = " · ".join(f"{escape(str(r.method))} {_number(r.inside_share, 2)}" for r in rows.itertuples())
        html += (f"<div class='concepts'>share of positive attribution inside "
                 f"{escape(str(rows['label'].iat[0]))} (chance {_number(rows['chance_share'].iat[0], 2)}): "
                 f"{cells}</div>")
    return html + "</div>"
