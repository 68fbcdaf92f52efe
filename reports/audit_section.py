"""The audit section of the HTML report (``<run_dir>/report/index.html``).

Built from ``<run_dir>/audit/`` (the audit stage): the model's verdict, a table
of the per-layer figures with each layer's verdict, the firing-rate histograms,
the dead units of each layer (linked to their cards on the layer pages where
the layer was dissected), the first-layer filter grid with its smoothness
score and the weight statistics. Every text taken from data is escaped.
"""

from html import escape
from pathlib import Path

import pandas as pd

from dissect.artifacts import read_json
from dissect.layout import RunLayout
from reports.links import layer_file, relative, unit_anchor


def verdict_class(healthy: bool) -> str:
    """The CSS class of a verdict."""
    return "verdict-ok" if healthy else "verdict-bad"


def layers_table(summary: dict) -> str:
    """Per-layer figures with each layer's verdict."""
    head = ("<tr><th>layer</th><th>kind</th><th>units</th><th>valid images</th><th>dead</th><th>nearly dead</th>"
            "<th>always on</th><th>dead share</th><th>sparsity (share &le; 0)</th><th>mean firing rate</th>"
            "<th>verdict</th></tr>")
    rows = []
    for layer in summary["layer_order"]:
        s = summary["layers"][layer]
        rows.append(f"<tr><td>{escape(layer)}</td><td>{escape(s['kind'])}</td><td>{s['units']}</td>"
                    f"<td>{s['valid_images']}</td><td>{s['dead']}</td><td>{s['nearly_dead']}</td>"
                    f"<td>{s['always_on']}</td><td>{s['dead_share']:.1%}</td><td>{s['sparsity']:.1%}</td>"
                    f"<td>{s['mean_firing_rate']:.3f}</td>"
                    f"<td class='{verdict_class(s['healthy'])}'>{escape(s['verdict'])}</td></tr>")
    return f"<table class='data'>{head}{''.join(rows)}</table>"


def dead_units(run_dir: Path, summary: dict, units: pd.DataFrame) -> str:
    """Per layer, its dead units: links to their cards when the layer has a page of cards, else numbers."""
    items = []
    for layer in summary["layer_order"]:
        dead = units.loc[(units["layer"] == layer) & units["dead"], "unit"].astype(int).tolist()
        if not dead:
            items.append(f"<li>{escape(layer)}: none</li>")
            continue
        if RunLayout(run_dir).stamp("tally", layer).exists():  # the layer has a page of unit cards
            page = layer_file(layer)
            listed = ", ".join(f"<a href='{escape(page)}#{escape(unit_anchor(layer, u))}'>{u}</a>" for u in dead)
        else:
            listed = ", ".join(str(u) for u in dead)
        items.append(f"<li>{escape(layer)} ({len(dead)} of {summary['layers'][layer]['units']}): {listed}</li>")
    return f"<h3>Dead units (never positive on the probe set)</h3><ul>{''.join(items)}</ul>"


def histograms(layout: RunLayout, report_dir: Path, summary: dict) -> str:
    """The firing-rate histogram of every layer."""
    figures = []
    for layer in summary["layer_order"]:
        image = layout.firing_rates_png(layer)
        figures.append(f"<figure><img src='{escape(relative(image, report_dir))}' "
                       f"alt='firing rates of {escape(layer)}'><figcaption>Per-unit firing rates of "
                       f"{escape(layer)} (share of probe images on which the unit's maximum is &gt; 0)"
                       f"</figcaption></figure>")
    return "<h3>Firing rates</h3>" + "".join(figures)


def first_layer(layout: RunLayout, report_dir: Path, summary: dict) -> str:
    """The first conv layer's filter grid, its smoothness score and verdict."""
    first = summary["first_layer"]
    if first is None:
        return "<h3>First-layer filters</h3><p>The model has no Conv2d layer.</p>"
    image = relative(layout.first_layer_filters_png, report_dir)
    kernel = "x".join(str(k) for k in first["kernel"])
    return (f"<h3>First-layer filters: {escape(first['layer'])}</h3>"
            f"<figure><img src='{escape(image)}' alt='filters of {escape(first['layer'])}'>"
            f"<figcaption>{first['filters']} filters of {kernel} over {first['in_channels']} input channels, each "
            f"scaled to [0, 1] on its own. Median high-frequency energy share "
            f"{first['high_frequency_share_median']:.1%} (white noise {first['white_noise_share']:.1%}).</figcaption>"
            f"</figure><p class='{verdict_class(not first['noisy'])}'>{escape(first['verdict'])}</p>")


def weights_table(weights: pd.DataFrame) -> str:
    """Per Conv2d/Linear layer: L2 norm of the output units' weights, near-zero share and mean bias."""
    head = ("<tr><th>layer</th><th>kind</th><th>units</th><th>fan-in</th><th>norm mean</th><th>norm std</th>"
            "<th>near-zero share</th><th>bias mean</th></tr>")
    rows = "".join(f"<tr><td>{escape(str(r.layer))}</td><td>{escape(str(r.kind))}</td><td>{r.units}</td>"
                   f"<td>{r.fan_in}</td><td>{r.norm_mean:.4g}</td><td>{r.norm_std:.4g}</td>"
                   f"<td>{r.near_zero_share:.1%}</td><td>{r.bias_mean:.4g}</td></tr>"
                   for r in weights.itertuples())
    return f"<h3>Weights</h3><table class='data'>{head}{rows}</table>"


def render(run_dir: Path, report_dir: Path) -> str | None:
    """The audit section as an HTML fragment, or None when the run has no finished audit."""
    layout = RunLayout(Path(run_dir))
    if not layout.stamp("audit").exists():
        return None
    summary = read_json(layout.audit_json)
    units = pd.read_csv(layout.audit_units_csv)
    weights = pd.read_csv(layout.audit_weights_csv)
    verdict = summary["verdict"]
    files = " · ".join(f"<a href='{escape(relative(path, report_dir))}'>{path.name}</a>"
                       for path in (layout.audit_units_csv, layout.audit_layers_csv, layout.audit_weights_csv,
                                    layout.audit_json))
    return (f"<section class='section' id='audit'><h2>Model audit</h2>"
            f"<p class='{verdict_class(verdict['healthy'])}'>{escape(verdict['text'])}</p><p>{files}</p>"
            f"{layers_table(summary)}{dead_units(Path(run_dir), summary, units)}"
            f"{histograms(layout, report_dir, summary)}{first_layer(layout, report_dir, summary)}"
            f"{weights_table(weights)}</section>")
