"""The HTML report: built from disk, opened in headless Chromium, names escaped, size bounded."""

import html
import json
import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from browser import console_errors, open_page
from conftest import CONF_DIR, tiny_overrides
from data_prep.synthetic_broden import generate
from dissect.stages import extract, tally, thresholds, topk
from dissect.broden import CATEGORIES
from dissect.layout import RunLayout
from dissect.stamps import write_stamp
from reports.build import build_report, layer_page

HOSTILE = "<script>alert(1)</script>"
LAYERS = ["features.conv3", "features.conv4"]


@pytest.fixture(scope="module")
def dissected(tmp_path_factory, tiny_checkpoint):
    """A tiny full run (extract, thresholds, tally, topk) on a generated set whose label names hold HTML."""
    base = tmp_path_factory.mktemp("report")
    probe = generate(base / "broden", n_images=40, size=64, seed=5, workers=1)
    labels = pd.read_csv(probe / "label.csv", keep_default_na=False)
    labels["name"] = labels["name"].map(lambda name: f"{HOSTILE}{name}")
    labels.to_csv(probe / "label.csv", index=False)
    overrides = tiny_overrides(probe, base / "run", tiny_checkpoint) + [
        "dataset=default", f"dataset.root={probe}", "layers=[features.conv3,features.conv4]",
        "thresholds.quantile=0.02", "topk.k=4"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    for stage in (extract, thresholds, tally, topk):
        stage.run(cfg)
    return base / "run", build_report(base / "run", ["features.conv3", "features.conv4"])


def ink_share(screenshot) -> float:
    """The share of a screenshot's pixels that are not near white (some channel below 200)."""
    return float((np.asarray(Image.open(screenshot).convert("RGB")).min(axis=2) < 200).mean())


def test_report_opens_without_errors_and_shows_cards_and_bar_graph(dissected, tmp_path):
    run_dir, index = dissected
    dom, stderr = open_page(index, screenshot=tmp_path / "index.png")
    assert console_errors(stderr) == []
    assert re.search(r"<pre id=\"js-errors\"></pre>", dom)
    layout = RunLayout(run_dir)
    assert index == layout.report_index
    sections = dict(re.findall(r"<section class=\"section\" id=\"layer-([^\"]+)\">(.*?)</section>", dom, re.DOTALL))
    assert list(sections) == LAYERS
    with_detectors = 0
    for layer in LAYERS:
        table = pd.read_csv(layout.tally_csv(layer), keep_default_na=False)
        threshold = json.loads(layout.tally_json(layer).read_text())["iou_threshold"]
        detectors = [row for row in table.itertuples() if row.iou > threshold]
        section = sections[layer]
        assert re.search(r"<th>all</th><th>(\d+) of (\d+) units</th>", section).groups() == (str(len(detectors)),
                                                                                          str(len(table)))
        for category in CATEGORIES:
            shown = re.search(rf"<tr><td>{category}</td><td>(\d+)</td>", section).group(1)
            assert int(shown) == sum(row.category == category for row in detectors), (layer, category)
        # one bar per (label, category) of the detectors, its height the number of detectors of that concept
        bars = Counter((row.label, row.category) for row in detectors)
        titles = re.findall(r"<title>(.*?) \((\w+)\): (\d+)</title>", section, re.DOTALL)
        assert sorted((html.unescape(label), category, int(n)) for label, category, n in titles) == sorted(
            (label, category, n) for (label, category), n in bars.items()), layer
        assert section.count("<svg class=\"bars\"") == (1 if detectors else 0), layer
        assert section.count("No detector in this layer") == (0 if detectors else 1), layer
        with_detectors += bool(detectors)
    assert with_detectors == 2  # the fixture's data: both layers have a unit above the IoU threshold
    assert dom.count("<svg class=\"bars\"") == 2 and "No detector in this layer" not in dom
    assert ink_share(tmp_path / "index.png") > 0.01  # text drawn (3 % here; a blank page: 0)

    page_dom, page_stderr = open_page(layout.report_layer_page("features.conv4"),
                                      screenshot=tmp_path / "layer.png")
    assert console_errors(page_stderr) == []
    table = pd.read_csv(layout.tally_csv("features.conv4"), keep_default_na=False)
    threshold = json.loads(layout.tally_json("features.conv4").read_text())["iou_threshold"]
    heading = re.search(r"<h1>Layer features\.conv4: (\d+) units, (\d+) detectors</h1>", page_dom)
    assert heading and heading.groups() == (str(len(table)), str(sum(iou > threshold for iou in table["iou"])))
    assert len(re.findall(r"class=\"card( below)?\"", page_dom)) == len(table) == 32
    shown = re.search(r"<span id=\"shown\">(\d+)</span>", page_dom)
    assert shown and int(shown.group(1)) == len(table)  # the page script ran
    first_card_iou = float(re.search(r"data-iou=\"([0-9.]+)\"", page_dom).group(1))
    assert first_card_iou == pytest.approx(table["iou"].max(), abs=1e-6)  # sorted by IoU, best first
    assert page_dom.count("loading=\"lazy\"") == len(table)
    assert ink_share(tmp_path / "layer.png") > 0.3  # the top-k strips in view were drawn (70 % here)


def test_label_names_with_html_show_as_text(dissected):
    run_dir, index = dissected
    for page in (index, RunLayout(run_dir).report_layer_page("features.conv4")):
        dom, _ = open_page(page)
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
        assert "<script>alert(1)</script>" not in dom
        assert dom.count("<script>") == dom.count("</script>")


def test_a_2048_unit_layer_page_stays_small(dissected, tmp_path):
    run_dir, _ = dissected
    rng = np.random.default_rng(0)
    layout = RunLayout(tmp_path / "run")
    layout.layer_dir("big").mkdir(parents=True)
    table = pd.DataFrame({"unit": np.arange(2048), "category": rng.choice(CATEGORIES, 2048),
                          "label": [f"concept {k % 300}" for k in range(2048)], "iou": rng.uniform(0, 0.2, 2048)})
    for category in CATEGORIES:
        table[f"{category}-label"] = "some concept"
        table[f"{category}-iou"] = 0.01
    table.to_csv(layout.tally_csv("big"), index=False)
    layout.tally_json("big").write_text('{"units": 2048, "detectors": 1, "iou_threshold": 0.04}')
    write_stamp(layout.stamp("tally", "big"), {"written_by": "test_report"}, tally.FORMAT)  # the tally finished
    html = layer_page(layout, "big")
    assert len(re.findall(r"class='card( below)?'", html)) == 2048
    assert len(html.encode()) < 3 * 2**20
