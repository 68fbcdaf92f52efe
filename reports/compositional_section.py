"""The compositional formulas in the report, read from ``layers/<layer>/compositional.csv`` and ``.json``.

``layer_fragment`` gives a layer's summary on the index page (how often a
formula beats the single label, by how much, the formulas' lengths);
``layer_formulas`` reads a layer's table once, and ``unit_fragment`` gives the
formula line of one unit card (with its runner-ups). Nothing is shown for a
layer whose compositional stage has not finished (no stamp). Every text taken
from data is escaped.
"""

import json
from html import escape

import pandas as pd

from dissect.artifacts import read_json
from dissect.layout import RunLayout
from reports.links import relative


def layer_formulas(layout: RunLayout, layer: str) -> dict[int, dict]:
    """Unit -> its row of compositional.csv, or {} when the stage has not finished for the layer."""
    if not layout.stamp("compositional", layer).exists():
        return {}
    table = pd.read_csv(layout.compositional_csv(layer), keep_default_na=False)
    return {int(row["unit"]): row for row in table.to_dict("records")}


def unit_fragment(row: dict | None) -> str:
    """A unit card's formula line: the formula, its IoU against the single label's, and the runner-ups."""
    if row is None:
        return ""
    runners = "".join(f"<li>{escape(r['formula'])} <span class='iou'>{r['iou']:.3f}</span></li>"
                      for r in json.loads(row["runner_ups"]))
    runner_list = f"<details><summary>runner-ups</summary><ol>{runners}</ol></details>" if runners else ""
    return (f"<div class='formula'>formula: <b>{escape(str(row['formula']))}</b> IoU {float(row['iou']):.3f} "
            f"(single label {escape(str(row['single_label']))} {float(row['single_iou']):.3f}, "
            f"{float(row['gain']):+.3f}){runner_list}</div>")


def layer_fragment(layout: RunLayout, layer: str) -> str:
    """A layer's compositional summary for the index page, or "" when the stage has not finished."""
    if not layout.stamp("compositional", layer).exists():
        return ""
    summary = read_json(layout.compositional_json(layer))
    settings = summary["settings"]
    lengths = ", ".join(f"{count} of length {length}" for length, count in summary["length_counts"].items())
    link = escape(relative(layout.compositional_csv(layer), layout.report_dir))
    images = summary.get("images", {})
    sampled = (f"Searched on a seeded sample of {images['searched']} of the {images['valid']} valid images "
               f"(compositional.max_images), counted exactly there. " if images.get("sampled") else "")
    return (f"<h3>Formulas of concepts</h3><p>Beam search (beam {settings['beam']}, up to {settings['max_length']} "
            f"concepts joined by OR, AND, AND NOT; Mu and Andreas 2020): a formula beats the single label for "
            f"<b>{summary['formula_beats_single']} of {summary['units']}</b> units, by {summary['mean_gain']:.3f} IoU "
            f"on average (median {summary['median_relative_gain']:.0%} more than the single label's). Mean IoU "
            f"{summary['mean_iou']:.3f} against {summary['mean_single_iou']:.3f}. Best formulas: {lengths}. "
            f"{sampled}<a href='{link}'>compositional.csv</a></p>")
