"""The comparison page of finished runs: hand-made run directories, tables against hand-counted values, the CLI,
the page in headless Chromium."""

import html
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from browser import console_errors, open_page
from conftest import REPO, write_activation_store
from PIL import Image

from dissect.artifacts import write_json_atomic
from dissect.broden import CATEGORIES
from dissect.compare import main
from dissect.layout import RunLayout
from dissect.stamps import write_stamp

HOSTILE = "random<b>&"
NAMES = ["early", "late", HOSTILE]

# Planted tallies: (unit, category, label, best IoU) per layer, and each run's tally.iou_threshold.
EARLY_TALLY = {
    "conv5": [(0, "object", "dog", 0.10), (1, "object", "dog", 0.05), (2, "color", "red", 0.04),
              (3, "texture", "striped", 0.20)],
    "conv10": [(0, "scene", "street", 0.30), (1, "part", "wheel", 0.01), (2, "material", "NA", 0.06)],
}
LATE_TALLY = {
    "conv5": [(0, "object", "dog", 0.12), (1, "object", "cat", 0.11), (2, "color", "red", 0.09),
              (3, "object", "dog", 0.50)],
    "conv10": [(0, "scene", "street", 0.10), (1, "part", "wheel", 0.20), (2, "part", "leg", 0.30)],
}
# Planted audits: (dead, nearly dead) flags per unit of each layer.
EARLY_AUDIT = {"conv5": ([False, True, False, False], [False, False, True, False]),
               "conv10": ([False, False, False], [False, False, False])}
RANDOM_AUDIT = {"conv5": ([True, False, True, True], [False, True, False, False]),
                "conv10": ([False, True], [False, False]),  # 2 units, not 3: not comparable with early
                "conv7": ([True, True], [False, False])}


def write_tally(layout: RunLayout, layer: str, rows: list[tuple], iou_threshold: float) -> None:
    """A finished tally of one layer: tally.csv, concepts.csv and tally.json in the tally stage's columns."""
    layout.layer_dir(layer).mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows, columns=["unit", "category", "label", "iou"])
    for category in CATEGORIES:
        mine = table["category"] == category
        table[f"{category}-label"] = table["label"].where(mine, "")
        table[f"{category}-iou"] = table["iou"].where(mine, 0.0)
    table.to_csv(layout.tally_csv(layer), index=False, float_format="%.6f")
    concepts = sorted(set(zip(table["label"], table["category"])))
    pd.DataFrame({"column": range(len(concepts)), "number": range(1, len(concepts) + 1),
                  "name": [name for name, _ in concepts], "category": [c for _, c in concepts]}
                 ).to_csv(layout.concepts_csv(layer), index=False)
    write_json_atomic(layout.tally_json(layer), {"layer": layer, "units": len(table), "iou_threshold": iou_threshold})
    write_stamp(layout.stamp("tally", layer), {"written_by": "test_compare"}, 1)


def write_audit(layout: RunLayout, flags: dict[str, tuple[list[bool], list[bool]]], noisy: bool) -> None:
    """A finished audit: units.csv with the given dead and nearly dead flags, audit.json and the stamp."""
    layout.audit_dir.mkdir(parents=True)
    rows = [{"layer": layer, "unit": u, "firing_rate": 0.0 if d else 0.5, "mean": 0.0, "max": 0.0,
             "zero_share": 0.5, "dead": d, "nearly_dead": n, "always_on": False}
            for layer, (dead, nearly) in flags.items() for u, (d, n) in enumerate(zip(dead, nearly))]
    pd.DataFrame(rows).to_csv(layout.audit_units_csv, index=False)
    first = {"layer": "conv1", "noisy": noisy, "high_frequency_share_median": 0.7 if noisy else 0.2,
             "white_noise_share": 0.8}
    write_json_atomic(layout.audit_json, {"layer_order": list(flags), "first_layer": first,
                                          "thresholds": {"dead_share_warning": 0.4}})
    write_stamp(layout.stamp("audit"), {"written_by": "test_compare"}, 1)


@pytest.fixture()
def runs(tmp_path: Path) -> list[Path]:
    """Three run directories: early (store, tally, audit, report), late (tally, no audit), random (audit only)."""
    early = RunLayout(tmp_path / "early")
    maps = {layer: np.ones((2, len(rows), 1, 1)) for layer, rows in EARLY_TALLY.items()}
    write_activation_store(early.root, ["a.jpg", "b.jpg"], maps)  # its layer order: conv5, then conv10
    for layer, rows in EARLY_TALLY.items():
        write_tally(early, layer, rows, 0.04)
    write_audit(early, EARLY_AUDIT, noisy=False)
    early.report_dir.mkdir()
    early.report_index.write_text("<!DOCTYPE html><title>early</title>", encoding="utf-8")
    late = RunLayout(tmp_path / "late")  # no activation store (deleted): its layers go by name
    write_stamp(late.stamp("extract"), {"written_by": "test_compare"}, 1)
    for layer, rows in LATE_TALLY.items():
        write_tally(late, layer, rows, 0.1)
    random = RunLayout(tmp_path / "random")
    write_stamp(random.stamp("extract"), {"written_by": "test_compare"}, 1)
    write_audit(random, RANDOM_AUDIT, noisy=True)
    return [early.root, late.root, random.root]


def test_tables_equal_the_hand_counted_detectors_and_dead_units(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*map(str, runs), "--names", ",".join(NAMES), "--out", str(out)]) == 0
    detectors = pd.read_csv(out / "detectors.csv")
    # early at IoU > 0.04: conv5 dog, dog, striped (red at 0.04 is not above); conv10 street and "NA" (a label)
    # late at IoU > 0.1: conv5 dog, cat, dog (red at 0.09 is not); conv10 wheel, leg (street at 0.10 is not)
    zero = dict.fromkeys(CATEGORIES, 0)
    expected = pd.DataFrame([
        {"layer": "conv5", "run": "early", "units": 4, "iou_threshold": 0.04, "detectors": 3, "unique_detectors": 2,
         **{f"unique_{c}": n for c, n in (zero | {"object": 1, "texture": 1}).items()}},
        {"layer": "conv5", "run": "late", "units": 4, "iou_threshold": 0.1, "detectors": 3, "unique_detectors": 2,
         **{f"unique_{c}": n for c, n in (zero | {"object": 2}).items()}},
        {"layer": "conv10", "run": "early", "units": 3, "iou_threshold": 0.04, "detectors": 2, "unique_detectors": 2,
         **{f"unique_{c}": n for c, n in (zero | {"scene": 1, "material": 1}).items()}},
        {"layer": "conv10", "run": "late", "units": 3, "iou_threshold": 0.1, "detectors": 2, "unique_detectors": 2,
         **{f"unique_{c}": n for c, n in (zero | {"part": 2}).items()}},
    ])
    pd.testing.assert_frame_equal(detectors, expected)

    audit = pd.read_csv(out / "audit.csv", keep_default_na=False)
    # layer order: early's store (conv5, conv10), then random's new layer conv7; late has no audit, so random is
    # compared with early: conv5 dead early {1}, random {0, 2, 3} -> died 3, came back 1; conv10 has 3 units in
    # early and 2 in random: not comparable
    assert audit.to_dict("records") == [
        {"layer": "conv5", "run": "early", "units": 4, "dead": 1, "nearly_dead": 1, "dead_share": 0.25,
         "nearly_dead_share": 0.25, "compared_with": "", "died": "", "came_back": ""},
        {"layer": "conv5", "run": HOSTILE, "units": 4, "dead": 3, "nearly_dead": 1, "dead_share": 0.75,
         "nearly_dead_share": 0.25, "compared_with": "early", "died": "3", "came_back": "1"},
        {"layer": "conv10", "run": "early", "units": 3, "dead": 0, "nearly_dead": 0, "dead_share": 0.0,
         "nearly_dead_share": 0.0, "compared_with": "", "died": "", "came_back": ""},
        {"layer": "conv10", "run": HOSTILE, "units": 2, "dead": 1, "nearly_dead": 0, "dead_share": 0.5,
         "nearly_dead_share": 0.0, "compared_with": "early", "died": "", "came_back": ""},
        {"layer": "conv7", "run": HOSTILE, "units": 2, "dead": 2, "nearly_dead": 0, "dead_share": 1.0,
         "nearly_dead_share": 0.0, "compared_with": "", "died": "", "came_back": ""},
    ]

    table = pd.read_csv(out / "runs.csv")
    assert table.to_dict("records") == [
        {"run": "early", "run_dir": str(runs[0]), "tallied_layers": 2, "audited_layers": 2, "report": True},
        {"run": "late", "run_dir": str(runs[1]), "tallied_layers": 2, "audited_layers": 0, "report": False},
        {"run": HOSTILE, "run_dir": str(runs[2]), "tallied_layers": 0, "audited_layers": 3, "report": False},
    ]
    printed = capsys.readouterr().out
    assert f"- {HOSTILE} looks unhealthy: 100% of its conv7 units are dead" in printed
    assert f"- {HOSTILE} has noisy first-layer filters (conv1: median 70%" in printed


def test_names_default_to_directory_names_and_the_page_to_results_compare(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([str(runs[0]), str(runs[1])]) == 0
    written = tmp_path / "results" / "compare"
    assert sorted(path.name for path in written.iterdir()) == ["audit.csv", "detectors.csv", "index.html",
                                                               "runs.csv"]
    assert pd.read_csv(written / "runs.csv")["run"].tolist() == ["early", "late"]
    # only early has an audit: its rows, with nothing to compare them with
    audit = pd.read_csv(written / "audit.csv")
    assert audit["run"].tolist() == ["early", "early"] and audit["died"].isna().all()


def cli(*args: str) -> subprocess.CompletedProcess:
    """python -m dissect.compare with ``args``, run from the repository."""
    return subprocess.run([sys.executable, "-m", "dissect.compare", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=False)


def test_cli_refuses_a_directory_that_is_not_a_run_in_one_line(runs, tmp_path):
    not_a_run = tmp_path / "photos"
    not_a_run.mkdir()
    result = cli(str(runs[0]), str(not_a_run), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {not_a_run} is not a run directory: it has no ")
    assert not (tmp_path / "out").exists()
    assert main([str(runs[0]), str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    # two runs both called "run" need --names; one name per run
    for twin in ("a", "b"):
        write_stamp(RunLayout(tmp_path / twin / "run").stamp("extract"), {"written_by": "test_compare"}, 1)
    assert main([str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), "--out", str(tmp_path / "out")]) == 2
    assert main([*map(str, runs), "--names", "x,y", "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def bars(dom: str, chart: str) -> set[tuple[str, str, str]]:
    """(run, group, value) of every bar of one chart, from the bars' titles in the DOM."""
    svg = re.search(rf"<svg class=\"compare-bars\" id=\"{re.escape(chart)}\".*?</svg>", dom, re.DOTALL).group(0)
    titles = re.findall(r"<rect class=\"bar\" data-run=\"([^\"]*)\" data-group=\"([^\"]*)\".*?<title>(.*?)</title>",
                        svg, re.DOTALL)
    found = set()
    for run, group, title in titles:
        name, _, value = html.unescape(title).rpartition(": ")
        assert name == f"{html.unescape(run)} · {html.unescape(group)}"
        found.add((html.unescape(run), html.unescape(group), value))
    return found


def test_page_opens_in_chromium_and_shows_every_run_and_a_bar_per_run(runs, tmp_path):
    out = tmp_path / "out"
    assert main([*map(str, runs), "--names", ",".join(NAMES), "--out", str(out)]) == 0
    dom, stderr = open_page(out / "index.html", screenshot=tmp_path / "page.png")
    assert console_errors(stderr) == []
    assert '<pre id="js-errors"></pre>' in dom
    for name in ("early", "late", "random&lt;b&gt;&amp;"):
        assert dom.count(name) >= 3, name  # the runs table, the legends, the bars' titles
    assert "random<b>" not in dom
    # runs without a tally have no bar (random); without an audit none either (late)
    assert bars(dom, "chart-detectors") == {("early", "conv5", "3"), ("late", "conv5", "3"),
                                            ("early", "conv10", "2"), ("late", "conv10", "2")}
    legend = re.search(r"id=\"chart-detectors\".*?</svg><p class=\"legend\">(.*?)</p>", dom, re.DOTALL).group(1)
    assert "early" in legend and "late" in legend and "random" not in legend  # no tally: no place in the chart
    conv5 = bars(dom, "chart-categories-conv5")
    assert len(conv5) == 12 and {bar for bar in conv5 if bar[2] != "0"} == {
        ("early", "object", "1"), ("early", "texture", "1"), ("late", "object", "2")}
    assert bars(dom, "chart-dead") == {("early", "conv5", "25.0%"), (HOSTILE, "conv5", "75.0%"),
                                       ("early", "conv10", "0.0%"), (HOSTILE, "conv10", "50.0%"),
                                       (HOSTILE, "conv7", "100.0%")}
    runs_rows = re.search(r"<section class=\"section\" id=\"runs\">(.*?)</section>", dom, re.DOTALL).group(1)
    link = re.search(r"<a href=\"([^\"]+)\">report</a>", runs_rows).group(1)
    assert link == "../early/report/index.html" and (out / link).resolve() == RunLayout(runs[0]).report_index
    assert runs_rows.count("no report") == 2
    assert "missing (no finished audit)" in runs_rows and "missing (no finished tally)" in runs_rows
    assert "Missing tally: random&lt;b&gt;&amp;." in dom and "Missing audit: late." in dom
    assert "Missing layer" not in dom  # every run with a tally has both layers
    # the detector charts at the top were drawn in the runs' colours (early #1f77b4, late #ff7f0e; one of their
    # bars alone has 18 x 160 pixels); the dead-share chart lies below the screenshot's 1600 pixels
    pixels = np.asarray(Image.open(tmp_path / "page.png").convert("RGB")).reshape(-1, 3)
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        assert (pixels == colour).all(axis=1).sum() > 2000, colour
