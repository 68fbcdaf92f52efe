"""The "Comparing explanations" section of the report, read from ``<run_dir>/explanations/`` (no model is run).

It shows the explainers' model calls and seconds per image against LIME's,
the Jaccard comparisons (the mean matrix between methods; per image and
compared pair for seeds, blur and models, with the mean, five lowest and five
highest), the overlay pictures (A red, B green, both yellow), and the
deletion/insertion AUC per method next to the random map's and to the
attribute stage's randomisation check. Every text taken from data is escaped.
"""

from html import escape
from pathlib import Path

import pandas as pd

from dissect.artifacts import read_json
from dissect.layout import RunLayout
from reports.attribute_section import _link, _number

#: What each comparison kind compares, for its heading.
KIND_TITLES = {"methods": "Between methods on the same image",
               "seeds": "Between runs: LIME with two seeds, and each deterministic explainer twice (control: 1)",
               "blur": "Between each image and its Gaussian-blurred copy",
               "models": "Between two models on the same images"}


def timing_table(explainers: dict) -> str:
    """Explainer, model calls per image, seconds per image, and LIME's seconds over its own."""
    head = ("<tr><th>explainer</th><th>model calls / image</th><th>seconds / image</th>"
            "<th>LIME's seconds / this explainer's</th></tr>")
    rows = "".join(f"<tr><td>{escape(name)}</td><td>{_number(entry['model_calls_per_image'], 0)}</td>"
                   f"<td>{_number(entry['seconds_per_image'], 4)}</td>"
                   f"<td>{_number(entry['lime_over_explainer'], 1)}</td></tr>" for name, entry in explainers.items())
    return f"<table class='data' id='explainer-timing'>{head}{rows}</table>"


def images_cell(entries: list[dict]) -> str:
    """``image_id (J)`` for each of a comparison's lowest or highest images."""
    return ", ".join(f"{escape(str(e['image_id']))} ({e['jaccard']:.2f})" for e in entries)


def summary_table(kind: str, entries: list[dict]) -> str:
    """Per compared pair: images, mean Jaccard, five lowest and five highest images."""
    head = "<tr><th>A</th><th>B</th><th>images</th><th>mean Jaccard</th><th>lowest five</th><th>highest five</th></tr>"
    rows = "".join(f"<tr><td>{escape(e['a'])}</td><td>{escape(e['b'])}</td><td>{e['images']}</td>"
                   f"<td>{_number(e['mean'])}</td><td>{images_cell(e['lowest'])}</td>"
                   f"<td>{images_cell(e['highest'])}</td></tr>" for e in entries)
    return f"<table class='data' id='jaccard-{kind}'>{head}{rows}</table>"


def method_matrix(entries: list[dict]) -> str:
    """The mean Jaccard between every two methods as a symmetric matrix (1 on the diagonal)."""
    names = list(dict.fromkeys([e["a"] for e in entries] + [e["b"] for e in entries]))
    mean = {(e["a"], e["b"]): e["mean"] for e in entries}
    mean.update({(b, a): value for (a, b), value in list(mean.items())})
    head = "<tr><th></th>" + "".join(f"<th>{escape(n)}</th>" for n in names) + "</tr>"
    rows = "".join(f"<tr><th>{escape(a)}</th>" + "".join(
        f"<td>{'1' if a == b else _number(mean.get((a, b)), 2)}</td>" for b in names) + "</tr>" for a in names)
    return f"<table class='data' id='jaccard-matrix'>{head}{rows}</table>"


def per_image_table(table: pd.DataFrame) -> str:
    """Every row of a Jaccard table (one image and compared pair), with the blur and model columns where present."""
    columns = [c for c in ("image_id", "a", "b", "jaccard", "predicted_sharp", "predicted_blurred",
                           "probability_sharp", "probability_blurred", "target", "other_target") if c in table]
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    rows = "".join("<tr>" + "".join(
        f"<td>{_number(row[c]) if c in ('jaccard', 'probability_sharp', 'probability_blurred') else escape(str(row[c]))}"
        "</td>" for c in columns) + "</tr>" for _, row in table.iterrows())
    return f"<details><summary>per image ({len(table)} rows)</summary><table class='data'><tr>{head}</tr>{rows}</table></details>"


def overlay_figures(run_dir: Path, overlays: list[dict], kind: str) -> str:
    """The overlay pictures of one comparison kind, each captioned with its pair, image and Jaccard."""
    figures = [f"<figure style='display:inline-block;margin:4px'><img loading='lazy' width='128' height='128' "
               f"src='{_link(run_dir, run_dir / entry['path'])}' alt='overlay {escape(entry['a'])} and "
               f"{escape(entry['b'])}'><figcaption style='font-size:.75em;max-width:128px'>{escape(entry['a'])} vs "
               f"{escape(entry['b'])}, {escape(str(entry['image_id']))}: J {_number(entry['jaccard'], 2)}"
               "</figcaption></figure>" for entry in overlays if entry["kind"] == kind]
    return f"<div class='overlays'>{''.join(figures)}</div>" if figures else ""


def faithfulness_table(faithfulness: dict, attribute_summary: dict | None) -> str:
    """Per method: deletion and insertion AUC (random map's in its own row), and the randomisation check."""
    methods = (attribute_summary or {}).get("methods", {})
    head = ("<tr><th>method</th><th>deletion AUC (lower is better)</th><th>insertion AUC (higher is better)</th>"
            "<th>against the random map</th><th>Spearman after randomisation</th><th>randomisation verdict</th></tr>")
    rows = []
    for method, entry in faithfulness.items():
        check = methods.get(method, {}).get("randomisation")
        verdict = ("not checked" if check is None else "<span class='verdict-bad'>barely changes</span>"
                   if check["flagged"] else "<span class='verdict-ok'>changes with the weights</span>")
        both = entry["deletion_below_random"] and entry["insertion_above_random"]
        against = ("&ndash;" if method == "random" else "<span class='verdict-ok'>better on both</span>" if both
                   else "<span class='verdict-bad'>not better on both</span>")
        rows.append(f"<tr><td>{escape(method)}</td><td>{_number(entry['deletion_auc'])}</td>"
                    f"<td>{_number(entry['insertion_auc'])}</td><td>{against}</td>"
                    f"<td>{_number(check and check['final_spearman'])}</td><td>{verdict}</td></tr>")
    return f"<table class='data' id='faithfulness'>{head}{''.join(rows)}</table>"


def render(run_dir: Path, report_dir: Path) -> str | None:
    """The "Comparing explanations" section; None when the explanations stage has not finished."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    if not layout.stamp("explanations").exists():
        return None
    summary = read_json(layout.explanations_json)
    attribute_summary = read_json(layout.attribute_json) if layout.attribute_json.exists() else None
    files = [layout.explanations_pairs_csv, layout.explainers_csv, *(layout.jaccard_csv(kind) for kind in summary["jaccard"]),
             layout.faithfulness_csv, layout.curves_csv, layout.explanations_json, layout.explanations_masks]
    links = " · ".join(f"<a href='{_link(run_dir, path)}'>{path.name}</a>" for path in files if path.exists())
    control = summary["deterministic_control"]
    lime = summary["lime_seeds"]
    settings = summary["settings"]
    parts = [f"<section class='section' id='explanations'><h2>Comparing explanations</h2>"
             f"<p>{summary['pairs']} class image(s) · {links}</p>"
             f"<p>Binary masks: an attribution map keeps its top {settings['mask_share']:.0%} of pixels, LIME its "
             f"top {settings['lime_superpixels']} superpixels, the occlusion explainers their kept cells. "
             "Jaccard = |A and B| / |A or B|.</p>",
             f"<p class='{'verdict-ok' if control['all_one'] else 'verdict-bad'}'>Control: the deterministic "
             f"explainers gave Jaccard {'1' if control['all_one'] else 'below 1 (a bug)'} between two runs "
             f"({control['rows']} comparisons). LIME with two seeds: {lime['below_one']} of {lime['rows']} image(s) "
             "below 1.</p>",
             "<h3>Explainers against LIME: model calls and seconds per image</h3>", timing_table(summary["explainers"])]
    for kind, entries in summary["jaccard"].items():
        parts.append(f"<h3>{escape(KIND_TITLES[kind])}</h3>")
        if kind == "blur":
            blur = summary["blur"]
            parts.append(f"<p>Gaussian blur of sigma {blur['sigma']} px; the predicted class changed on "
                         f"{blur['prediction_changed']} of {blur['images']} image(s).</p>")
        if kind == "models" and summary.get("compare_run"):
            parts.append(f"<p>Other run: {escape(summary['compare_run'])} (each model explains its own class).</p>")
        if kind == "methods":
            parts.append(method_matrix(entries))
        parts.append(summary_table(kind, entries))
        if kind != "methods" and layout.jaccard_csv(kind).exists():
            parts.append(per_image_table(pd.read_csv(layout.jaccard_csv(kind), keep_default_na=False)))
        parts.append(overlay_figures(run_dir, summary["overlays"], kind))
    parts.append("<h3>Faithfulness: deletion and insertion (Petsiuk et al. 2018)</h3>"
                 f"<p>{escape(summary['faithfulness_meaning'])}; {settings['steps']} steps. The last two columns are "
                 "the attribute stage's randomisation check of the same method.</p>"
                 + faithfulness_table(summary["faithfulness"], attribute_summary))
    if layout.curves_png.exists():
        parts.append(f"<figure><img loading='lazy' src='{_link(run_dir, layout.curves_png)}' "
                     "alt='mean deletion and insertion curves'></figure>")
    return "".join(parts) + "</section>"
