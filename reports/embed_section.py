"""The report's representation-map section: t-SNE and UMAP pictures of the embed stage, with how to read them.

``render(run_dir, report_dir)`` returns an HTML fragment for
``<run_dir>/report/index.html`` (image paths relative to ``report_dir``), or
None when the run has no embed output. When the layer carries no information
(constant features) the section is the embed stage's sentence saying so,
without pictures or tables. Every data-derived text is escaped.
"""

from html import escape
from pathlib import Path
from typing import Any

from dissect.artifacts import read_json
from dissect.layout import EMBED_METHOD_TITLES, EMBED_METHODS, RunLayout
from reports.links import relative

CAUTIONS = (
    "In a t-SNE map the sizes of clusters and the distances between clusters carry little meaning: t-SNE "
    "evens out densities, so a tight and a diffuse group can look alike, and separated groups can sit at "
    "arbitrary distances from one another. Read which images lie close together, not how far apart groups are.",
    "The picture depends on the perplexity (here {perplexity:g}): small values break data into spurious "
    "clumps, large ones merge groups. A structure worth trusting persists across several perplexities "
    "(and, for UMAP, across n_neighbors).",
)
READING_LINK = "https://distill.pub/2016/misread-tsne/"
OPENING = ('<section class="section" id="embed">', "<h2>Representation map</h2>")


def render(run_dir: Path, report_dir: Path) -> str | None:
    """The HTML fragment of the representation-map section, or None when ``run_dir`` has no embed summary."""
    layout = RunLayout(Path(run_dir))
    if not layout.stamp("embed").is_file():
        return None
    summary = read_json(layout.embed_json)
    if "no_information" in summary:
        return "\n".join([*OPENING, f"<p>{escape(summary['no_information'])}</p>", "</section>"])
    settings, used = summary["settings"], summary["used"]
    parts = [
        *OPENING,
        f"<p>{intro(summary)}</p>",
        "<h3>How to read it</h3>",
        "<ul>",
        *(f"<li>{escape(text.format(perplexity=used['perplexity']))}</li>" for text in CAUTIONS),
        f'<li>See <a href="{escape(READING_LINK)}">How to use t-SNE effectively</a> (Wattenberg, Viégas and '
        "Johnson, 2016).</li>",
        "</ul>",
        trust_table(summary),
        *(figure(relative(layout.embed_picture("scatter", method), report_dir),
                 f"{EMBED_METHOD_TITLES[method]} of {settings['layer']}, coloured by each image's label (for a "
                 "Broden probe set: its scene, else its largest object, else its texture)")
          for method in EMBED_METHODS),
        *(figure(relative(layout.embed_picture("thumbnails", method), report_dir),
                 f"{EMBED_METHOD_TITLES[method]} layout snapped to a {settings['thumbnail_grid']}x"
                 f"{settings['thumbnail_grid']} grid, one image per cell") for method in EMBED_METHODS),
        figure(relative(layout.embed_neighbours_png, report_dir),
               f"{used['queries']} query images (left) and their {used['neighbours']} nearest neighbours in "
               f"the original {summary['features']}-d features of {settings['layer']} (Euclidean; not the map)"),
        f'<p>Data: <a href="{escape(relative(layout.embed_coords, report_dir))}">{layout.embed_coords.name}</a> '
        f'(coordinates and labels), <a href="{escape(relative(layout.embed_neighbours_csv, report_dir))}">'
        f'{layout.embed_neighbours_csv.name}</a>.</p>',
        settings_table(settings, used),
        "</section>",
    ]
    return "\n".join(parts)


def intro(summary: dict[str, Any]) -> str:
    """Escaped sentences: what was projected, how much variance PCA kept, and what was left out or clipped."""
    pca, asked = summary["pca"], summary["used"]["pca_components"]
    left_out = summary["invalid_images_left_out"]
    non_finite = summary.get("non_finite_images_left_out", 0)  # absent from summaries of older runs
    text = (f"Layer {summary['settings']['layer']} ({summary['layer_kind']}): {summary['images']} probe images, "
            f"{summary['features']} features, reduced by PCA to {pca['components']} components that keep "
            f"{100 * pca['explained_variance_total']:.1f}% of the variance, then laid out by t-SNE and UMAP.")
    if pca["components"] < asked:
        text += (f" PCA keeps only {pca['components']} of the {asked} components asked: the features have only "
                 f"{pca['components']} informative dimensions.")
    if left_out:
        text += f" {left_out} unreadable images are left out."
    if non_finite:
        text += f" {non_finite} images with non-finite features (float16 overflow) are left out."
    return escape(text)


def trust_table(summary: dict[str, Any]) -> str:
    """Trustworthiness of each layout (1 = every 2-D neighbour is a true neighbour) and the seconds it took."""
    trust, seconds = summary["trustworthiness"], summary["seconds"]
    rows = "".join(f"<tr><td>{EMBED_METHOD_TITLES[m]}</td><td>{trust[m]:.3f}</td>"
                   f"<td>{seconds[m]:.1f}</td></tr>" for m in EMBED_METHODS)
    return (f"<table class=\"data\"><caption>Trustworthiness: {escape(trust['computed_on'])}</caption>"
            f"<tr><th>method</th><th>trustworthiness</th><th>seconds</th></tr>{rows}</table>")


def settings_table(settings: dict[str, Any], used: dict[str, Any]) -> str:
    """Every setting, with the value used where N or D clipped it."""
    rows = "".join(
        f"<tr><td>{escape(key)}</td><td>{escape(str(value))}</td>"
        f"<td>{escape(str(used[key])) if key in used and used[key] != value else ''}</td></tr>"
        for key, value in settings.items())
    return ("<table class=\"data\"><caption>Settings (embed.*)</caption>"
            f"<tr><th>key</th><th>value</th><th>used</th></tr>{rows}</table>")


def figure(src: str, caption: str) -> str:
    """A lazily loaded picture with its escaped caption."""
    return (f'<figure class="figure"><img src="{escape(src)}" loading="lazy" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")
