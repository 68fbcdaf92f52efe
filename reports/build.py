"""The HTML report of a run: a static, self-contained site built from the stage outputs on disk.

``<out_dir>/report/index.html`` shows the run (model, weights, layers, probe
set, thresholds), per dissected layer the units, detectors and unique detectors
per category with a bar graph of detectors per concept, and the sections of the
other stages (audit, representation map, attributions, comparing explanations)
when their outputs exist. Each layer
has a page ``layer-<layer>.html`` with one card per unit (label, category, IoU,
best concept per category, top-k strip), sortable by IoU, unit and label,
filterable by category, with units below the IoU threshold set apart. No
server, no network, no model: it opens from the file system. Every text taken
from data is escaped.
"""

import logging
from html import escape
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from dissect.artifacts import open_activations, read_json
from dissect.broden import CATEGORIES
from reports import (attribute_section, audit_section, compositional_section, embed_section, explanations_section,
                     visualise_section)
from dissect.layout import RunLayout
from reports.links import layer_file, relative, unit_anchor

log = logging.getLogger(__name__)

CATEGORY_COLOURS = {"color": "#d9534f", "object": "#337ab7", "part": "#5bc0de", "material": "#8a6d3b",
                    "scene": "#5cb85c", "texture": "#9b59b6"}

STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1240px;padding:0 16px 40px;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:2em}
table.data{border-collapse:collapse;margin:8px 0}table.data td,table.data th{border:1px solid #ddd;padding:3px 8px;
text-align:left;font-size:.9em}table.data th{background:#f4f4f4}
.cards{display:flex;flex-direction:column;gap:10px}.card{border:1px solid #ccc;border-radius:6px;padding:8px}
.card.below{opacity:.55;background:#f7f7f7;border-style:dashed}.card h3{margin:0 0 4px;font-size:1em}
.badge{font-size:.75em;padding:1px 6px;border-radius:8px;color:#fff;margin-left:6px}.badge.below{background:#999}
.card img{max-width:100%;height:auto;display:block;margin-top:6px}.concepts{font-size:.8em;color:#555}
.formula{font-size:.85em;margin-top:4px}.formula details{display:inline-block;margin-left:8px}
.controls{position:sticky;top:0;background:#fff;padding:8px 0;border-bottom:1px solid #ddd;z-index:1}
.verdict-bad{color:#a94442;font-weight:600}.verdict-ok{color:#3c763d}
figure{margin:10px 0}figure img{max-width:100%;height:auto}#js-errors{color:#a94442}
"""

ERROR_TRAP = """<script>window.addEventListener('error',function(e){var n=document.getElementById('js-errors');
n.textContent+=e.message+'\\n';});</script>"""

LAYER_SCRIPT = """<script>
(function(){
  var box=document.getElementById('cards'), sort=document.getElementById('sort'),
      cat=document.getElementById('category'), below=document.getElementById('show-below');
  var cards=Array.prototype.slice.call(box.children);
  function key(c){var d=c.dataset;return sort.value==='iou'?-parseFloat(d.iou):sort.value==='unit'?
    parseInt(d.unit,10):d.label;}
  function apply(){
    cards.sort(function(a,b){var x=key(a),y=key(b);if(x<y)return -1;if(x>y)return 1;
      return parseInt(a.dataset.unit,10)-parseInt(b.dataset.unit,10);});
    var shown=0;
    cards.forEach(function(c){var ok=(cat.value==='all'||c.dataset.category===cat.value)&&
      (below.checked||!c.classList.contains('below'));c.style.display=ok?'':'none';if(ok)shown++;box.appendChild(c);});
    document.getElementById('shown').textContent=shown;
  }
  [sort,cat,below].forEach(function(e){e.addEventListener('change',apply);});
  apply();
})();
</script>"""


def page(title: str, body: str) -> str:
    """A whole HTML document with the report's style and the script-error trap."""
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{STYLE}</style>{ERROR_TRAP}</head><body><pre id='js-errors'></pre>{body}</body></html>")


def key_value_table(rows: list[tuple[str, Any]]) -> str:
    """A two-column table of escaped keys and values."""
    cells = "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table class='data'>{cells}</table>"


def run_section(layout: RunLayout, layers: list[str]) -> str:
    """The run: model, weights, layers, probe set, preprocessing and thresholds."""
    attrs = dict(open_activations(layout.root).attrs)
    model, probe = attrs["model"], attrs["probe_set"]
    rows: list[tuple[str, Any]] = [
        ("model", model.get("arch") or model.get("target")),
        ("source", model["source"]), ("weights", model.get("weights")), ("checkpoint", model.get("checkpoint")),
        ("input size", model["input_size"]), ("mean / std", f"{model['mean']} / {model['std']}"),
        ("recorded layers", ", ".join(attrs["layer_order"])), ("dissected layers", ", ".join(layers)),
        ("probe set", f"{probe['name']} ({probe['kind']}, {probe['images']} images) at {probe['root']}"),
    ]
    if layout.skipped_images.exists():
        rows.append(("unreadable images", len(pd.read_csv(layout.skipped_images))))
    if layers:
        meta = read_json(layout.thresholds_json(layers[0]))
        summary = read_json(layout.tally_json(layers[0]))
        rows += [("threshold quantile", meta["quantile"]), ("IoU threshold", summary["iou_threshold"])]
    return f"<section class='section' id='run'><h2>Run</h2>{key_value_table(rows)}</section>"


def bar_graph(table: pd.DataFrame, iou_threshold: float) -> str:
    """Inline SVG: number of detectors per concept, grouped by category (colour) and sorted within it."""
    detectors = table[table["iou"] > iou_threshold]
    counts = detectors.groupby(["category", "label"]).size().reset_index(name="n")
    counts["order"] = counts["category"].map(CATEGORIES.index)
    counts = counts.sort_values(["order", "n", "label"], ascending=[True, False, True])
    if counts.empty:
        return "<p>No detector in this layer.</p>"
    bar, gap, height = 18, 4, 150
    top = max(int(counts["n"].max()), 1)
    width = len(counts) * (bar + gap) + 40
    parts = [f"<svg class='bars' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height + 110}' "
             f"role='img' aria-label='detectors per concept'>"]
    for k, row in enumerate(counts.itertuples()):
        x = 30 + k * (bar + gap)
        h = row.n / top * height
        colour = CATEGORY_COLOURS[row.category]
        parts.append(f"<rect x='{x}' y='{height - h + 10:.1f}' width='{bar}' height='{h:.1f}' fill='{colour}'>"
                     f"<title>{escape(str(row.label))} ({escape(row.category)}): {row.n}</title></rect>")
        parts.append(f"<text x='{x + bar / 2}' y='{height - h + 6:.1f}' font-size='10' text-anchor='middle'>"
                     f"{row.n}</text>")
        parts.append(f"<text transform='translate({x + bar / 2},{height + 16}) rotate(60)' font-size='10'>"
                     f"{escape(str(row.label))}</text>")
    parts.append("</svg>")
    legend = " ".join(f"<span style='color:{CATEGORY_COLOURS[c]}'>&#9632; {c}</span>" for c in CATEGORIES)
    return "".join(parts) + f"<p>{legend}</p>"


def layer_summary(layout: RunLayout, layer: str) -> str:
    """A layer's counts per category, its bar graph and links to its files and page."""
    summary = read_json(layout.tally_json(layer))
    table = pd.read_csv(layout.tally_csv(layer), keep_default_na=False)
    head = "<tr><th>category</th><th>detectors</th><th>unique detectors</th></tr>"
    rows = "".join(f"<tr><td>{c}</td><td>{summary['detectors_by_category'][c]}</td>"
                   f"<td>{summary['unique_detectors_by_category'][c]}</td></tr>" for c in CATEGORIES)
    total = (f"<tr><th>all</th><th>{summary['detectors']} of {summary['units']} units</th>"
             f"<th>{summary['unique_detectors']}</th></tr>")
    files = " · ".join(f"<a href='{escape(relative(path, layout.report_dir))}'>{path.name}</a>"
                       for path in (layout.tally_csv(layer), layout.tally_json(layer), layout.iou_npy(layer),
                                    layout.concepts_csv(layer), layout.topk_csv(layer)))
    return (f"<section class='section' id='layer-{escape(layer)}'><h2>Layer {escape(layer)}</h2>"
            f"<p><a href='{escape(layer_file(layer))}'>All {summary['units']} unit cards</a> · {files}</p>"
            f"<table class='data'>{head}{rows}{total}</table>"
            f"<h3>Detectors per concept (IoU &gt; {summary['iou_threshold']})</h3>"
            f"{bar_graph(table, summary['iou_threshold'])}{compositional_section.layer_fragment(layout, layer)}"
            "</section>")


def unit_card(layer: str, row: pd.Series, iou_threshold: float, strip: str | None, extra: str) -> str:
    """One unit's card: label, category, IoU, best concept per category, the top-k strip and ``extra`` (HTML:
    its formula of concepts and attribution maps, where those stages ran)."""
    below = row["iou"] <= iou_threshold
    badge = f"<span class='badge below'>below IoU {iou_threshold}</span>" if below else ""
    colour = CATEGORY_COLOURS.get(row["category"], "#777")
    per_category = " · ".join(f"{c}: {escape(str(row[f'{c}-label']))} {row[f'{c}-iou']:.3f}"
                              for c in CATEGORIES if row[f"{c}-label"] != "")
    image = (f"<img loading='lazy' src='{escape(strip)}' width='1138' height='226' "
             f"alt='top images of unit {row['unit']}'>") if strip else "<p>No top-k strip (run stages=[topk]).</p>"
    return (f"<div class='card{' below' if below else ''}' id='{escape(unit_anchor(layer, int(row['unit'])))}' "
            f"data-unit='{int(row['unit'])}' data-iou='{row['iou']:.6f}' data-label='{escape(str(row['label']))}' "
            f"data-category='{escape(str(row['category']))}'>"
            f"<h3>unit {int(row['unit'])}: {escape(str(row['label']))} "
            f"<span class='badge' style='background:{colour}'>{escape(str(row['category']))}</span> "
            f"IoU {row['iou']:.3f}{badge}</h3><div class='concepts'>{per_category}</div>{image}{extra}</div>")


def layer_page(layout: RunLayout, layer: str) -> str:
    """The page of one layer: controls and every unit's card."""
    summary = read_json(layout.tally_json(layer))
    table = pd.read_csv(layout.tally_csv(layer), keep_default_na=False)
    threshold = summary["iou_threshold"]
    has_strips = layout.stamp("topk", layer).exists()
    formulas = compositional_section.layer_formulas(layout, layer)
    synthesised = visualise_section.unit_images(layout, layer)
    cards = []
    for _, row in table.iterrows():
        unit = int(row["unit"])
        strip = layout.topk_strip(layer, unit)
        extra = (compositional_section.unit_fragment(formulas.get(unit))
                 + visualise_section.unit_fragment(layout, synthesised.get(unit))
                 + attribute_section.unit_fragment(layout.root, layer, unit))
        cards.append(unit_card(layer, row, threshold, relative(strip, layout.report_dir) if has_strips else None,
                               extra))
    options = "".join(f"<option value='{c}'>{c}</option>" for c in CATEGORIES)
    controls = (f"<div class='controls'>Sort by <select id='sort'><option value='iou'>IoU</option>"
                f"<option value='unit'>unit</option><option value='label'>label</option></select> "
                f"Category <select id='category'><option value='all'>all</option>{options}</select> "
                f"<label><input type='checkbox' id='show-below' checked> show units below IoU {threshold}</label> "
                f"· <span id='shown'></span> shown · <a href='index.html'>back to the overview</a></div>")
    body = (f"<h1>Layer {escape(layer)}: {summary['units']} units, {summary['detectors']} detectors</h1>"
            f"{controls}<div class='cards' id='cards'>{''.join(cards)}</div>{LAYER_SCRIPT}")
    return page(f"{layer} units", body)


def unit_labels(layout: RunLayout, layer: str) -> dict[int, str]:
    """Unit -> its label in the layer's tally.csv."""
    table = pd.read_csv(layout.tally_csv(layer), keep_default_na=False)
    return {int(unit): str(label) for unit, label in zip(table["unit"], table["label"])}


def dissected_layers(layout: RunLayout, layers: list[str]) -> list[str]:
    """The layers of ``layers`` that have a finished tally."""
    return [layer for layer in layers if layout.stamp("tally", layer).exists()]


def build_report(run_dir: Path, layers: list[str]) -> Path:
    """Write index.html and the layer pages under <run_dir>/report/; return the index path."""
    layout = RunLayout(Path(run_dir))
    run_dir = layout.root
    attrs = dict(open_activations(run_dir).attrs)
    report_dir = layout.report_dir
    report_dir.mkdir(parents=True, exist_ok=True)
    dissected = dissected_layers(layout, layers)
    title = f"Dissection of {attrs['model'].get('arch') or attrs['model'].get('target')} on {attrs['probe_set']['name']}"
    sections = [run_section(layout, dissected)] + [layer_summary(layout, layer) for layer in dissected]
    for render in (audit_section.render, embed_section.render, visualise_section.render, attribute_section.render,
                   explanations_section.render):
        fragment = render(run_dir, report_dir)
        if fragment:
            sections.append(fragment)
    nav = " · ".join(f"<a href='{escape(layer_file(layer))}'>{escape(layer)}</a>" for layer in dissected)
    for layer in dissected:
        layout.report_layer_page(layer).write_text(layer_page(layout, layer), encoding="utf-8")
    for path, (page_title, body) in visualise_section.pages(layout, {layer: unit_labels(layout, layer)
                                                                      for layer in dissected}).items():
        path.write_text(page(page_title, body), encoding="utf-8")
    layout.report_index.write_text(page(title, f"<h1>{escape(title)}</h1><p>Unit pages: {nav}</p>"
                                        + "".join(sections)), encoding="utf-8")
    return layout.report_index


def run(cfg: DictConfig) -> Path:
    """The report step of the pipeline: rebuild the report from what is on disk."""
    index = build_report(Path(cfg.out_dir), [str(layer) for layer in cfg.layers])
    log.info("report: %s", index)
    return index
