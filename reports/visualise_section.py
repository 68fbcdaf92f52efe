"""The visualise stage in the report, read from ``<run_dir>/visualise/`` (units.csv, dream.csv, viewer.csv, json).

``render`` gives the index page's section (what was synthesised and how fast,
the class images, the deep dreams with their objective per octave, links to
the grid and viewer pages); ``unit_images`` reads a layer's rows once and
``unit_fragment`` gives a unit card's images with the objective reached
against the unit's best probe image; ``pages`` gives the extra pages (one
grid of synthesised images per layer, one page of maps per viewed image).
Nothing is shown before the stage has finished (no stamp). Every text taken
from data is escaped.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

import pandas as pd

from dissect.artifacts import read_json
from dissect.layout import RunLayout
from reports.links import layer_file, relative, unit_anchor

#: Side of a synthesised image on a unit card and on the grid pages, in CSS pixels.
THUMB = 112


def finished(layout: RunLayout) -> bool:
    """Whether the visualise stage's outputs are current (its stamp exists)."""
    return layout.stamp("visualise").exists()


def _image(layout: RunLayout, relative_path: str, alt: str, side: int = THUMB) -> str:
    link = escape(relative(layout.root / relative_path, layout.report_dir), quote=True)
    return f"<img loading='lazy' src='{link}' width='{side}' height='{side}' alt='{escape(alt, quote=True)}'>"


def _caption(row: dict) -> str:
    """The objective reached, against the best probe image's, and the flat flag."""
    best = row["best_probe"]
    against = "" if pd.isna(best) else f" · best probe image {float(best):.3g}"
    flat = " <span class='verdict-bad'>flat: nothing drives it</span>" if row["flat"] else ""
    return f"{escape(str(row['objective']))} {float(row['reached']):.3g}{against}{flat}"


def unit_images(layout: RunLayout, layer: str) -> dict[int, list[dict]]:
    """Unit -> its rows of units.csv for ``layer`` (every copy), or {} before the stage has finished."""
    if not finished(layout):
        return {}
    table = pd.read_csv(layout.visualise_units_csv, keep_default_na=False, na_values=[""])
    rows: dict[int, list[dict]] = {}
    for row in table[(table["kind"] == "unit") & (table["layer"] == layer)].to_dict("records"):
        rows.setdefault(int(row["index"]), []).append(row)
    return rows


def unit_fragment(layout: RunLayout, rows: list[dict] | None) -> str:
    """A unit card's synthesised images with their objective, or "" when the unit was not visualised."""
    if not rows:
        return ""
    figures = "".join(f"<figure style='display:inline-block;vertical-align:top;margin:4px'>"
                      f"{_image(layout, row['image'], 'synthesised image of unit ' + str(row['index']))}"
                      f"<figcaption class='concepts'>{_caption(row)}</figcaption></figure>" for row in rows)
    return f"<div class='visualise'><b>What it wants to see</b> ({escape(str(rows[0]['param']))}):<br>{figures}</div>"


def render(run_dir: Path, report_dir: Path) -> str:
    """The index page's section, or "" before the stage has finished."""
    layout = RunLayout(run_dir)
    if not finished(layout):
        return ""
    summary = read_json(layout.visualise_json)
    settings = summary["settings"]
    units = pd.read_csv(layout.visualise_units_csv, keep_default_na=False, na_values=[""])
    per_image = summary["seconds_per_image"]
    exceeds = summary["exceeds_probe"]
    intro = (f"<p>Images synthesised by gradient ascent on the input with the weights frozen ({settings['param']} "
             f"parameterisation, {settings['steps']} steps): {summary['images']['units']} of units, "
             f"{summary['images']['classes']} of classes, "
             f"{'&ndash;' if per_image is None else f'{per_image:.2f}'} s per image in batches of up to "
             f"{settings['batch_size']}. The objective reached exceeds the unit's best probe image for "
             f"<b>{exceeds['exceeding']} of {exceeds['compared']}</b> units; "
             f"{len(summary['flat'])} image(s) came out flat (dead units give flat images).</p>")
    layers = sorted(set(units.loc[units["kind"] == "unit", "layer"]))
    links = " · ".join(f"<a href='{escape(layout.report_visualise_page(layer).name)}'>{escape(layer)}</a>"
                       for layer in layers)
    classes = units[units["kind"] == "class"].to_dict("records")
    class_figures = "".join(f"<figure style='display:inline-block;vertical-align:top;margin:4px'>"
                            f"{_image(layout, row['image'], 'class ' + str(row['index']))}"
                            f"<figcaption class='concepts'>class {int(row['index'])}: {_caption(row)}</figcaption>"
                            "</figure>" for row in classes)
    parts = [f"<section class='section' id='visualise'><h2>What units want to see</h2>{intro}",
             f"<p>Grids per layer: {links or 'none'}</p>" if layers else "",
             f"<h3>Classes (pre-softmax logit)</h3>{class_figures}" if classes else "",
             _dream_part(layout), _viewer_part(layout), "</section>"]
    return "".join(parts)


def _dream_part(layout: RunLayout) -> str:
    """The deep dreams: each picture (image, then dream) with its objective per octave."""
    table = pd.read_csv(layout.visualise_dream_csv, keep_default_na=False)
    if table.empty:
        return ""
    parts = [f"<h3>Deep dream of layer {escape(str(table['layer'].iloc[0]))}</h3>"]
    for _, rows in table.groupby("dream"):
        octaves = " · ".join(f"{int(r.size)} px: {r.start:.3g} &rarr; {r.end:.3g}" for r in rows.itertuples())
        first = rows.iloc[0]
        link = escape(relative(layout.root / first["image"], layout.report_dir), quote=True)
        parts.append(f"<figure><img loading='lazy' src='{link}' alt='deep dream of {escape(str(first['source']))}'>"
                     f"<figcaption class='concepts'>{escape(str(first['source']))}: squared L2 norm per octave "
                     f"{octaves}</figcaption></figure>")
    return "".join(parts)


def _viewer_part(layout: RunLayout) -> str:
    """Links to the viewer page of each viewed image."""
    table = pd.read_csv(layout.visualise_viewer_csv, keep_default_na=False)
    if table.empty:
        return ""
    images = table.drop_duplicates("image_index")
    links = " · ".join(f"<a href='{escape(layout.report_viewer_page(int(r.image_index)).name)}'>"
                       f"{escape(str(r.image_id))}</a>" for r in images.itertuples())
    return f"<h3>Activation maps of chosen images</h3><p>{links}</p>"


def pages(layout: RunLayout, labels: dict[str, dict[int, str]]) -> dict[Path, tuple[str, str]]:
    """Path -> (title, body HTML) of the grid page of each visualised layer and the page of each viewed image.

    ``labels``: layer -> unit -> its dissection label, for the captions.
    """
    if not finished(layout):
        return {}
    out: dict[Path, tuple[str, str]] = {}
    units = pd.read_csv(layout.visualise_units_csv, keep_default_na=False, na_values=[""])
    for layer, rows in units[units["kind"] == "unit"].groupby("layer"):
        figures = []
        for row in rows.to_dict("records"):
            unit = int(row["index"])
            label = labels.get(layer, {}).get(unit, "")
            card = escape(f"{layer_file(layer)}#{unit_anchor(layer, unit)}", quote=True)
            figures.append(f"<figure style='display:inline-block;vertical-align:top;margin:4px;width:{THUMB + 40}px'>"
                           f"{_image(layout, row['image'], 'unit ' + str(unit))}<figcaption class='concepts'>"
                           f"<a href='{card}'>unit {unit}</a> {escape(label)} ({escape(str(row['reason']))})<br>"
                           f"{_caption(row)}</figcaption></figure>")
        body = (f"<h1>Layer {escape(layer)}: what its units want to see</h1><p><a href='index.html'>back to the "
                f"overview</a></p><div>{''.join(figures)}</div>")
        out[layout.report_visualise_page(layer)] = (f"{layer} visualisations", body)
    viewer = pd.read_csv(layout.visualise_viewer_csv, keep_default_na=False)
    for index, rows in viewer.groupby("image_index"):
        parts = [f"<h1>Activation maps of {escape(str(rows['image_id'].iloc[0]))}</h1>"
                 "<p><a href='index.html'>back to the overview</a></p>"]
        for row in rows.to_dict("records"):
            strongest = ", ".join(f"{u} {labels.get(row['layer'], {}).get(u, '')}".strip()
                                  for u in json.loads(row["strongest"]))
            maps = escape(relative(layout.root / row["maps_png"], layout.report_dir), quote=True)
            overlay = escape(relative(layout.root / row["overlay_png"], layout.report_dir), quote=True)
            parts.append(f"<h2>Layer {escape(row['layer'])}</h2><p>{int(row['units'])} units, tiles scaled per "
                         f"{escape(row['normalise'])}; {int(row['black_tiles'])} black (never positive on this "
                         f"image). Strongest: {escape(strongest)}.</p>"
                         f"<figure><img loading='lazy' src='{overlay}' alt='strongest units over the image'></figure>"
                         f"<figure><img loading='lazy' src='{maps}' alt='every unit map of {escape(row['layer'])}'>"
                         "</figure>")
        out[layout.report_viewer_page(int(index))] = (f"maps of {rows['image_id'].iloc[0]}", "".join(parts))
    return out
