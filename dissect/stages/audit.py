"""The audit stage: dead and always-on units, activation sparsity and first-layer filters.

Activations (one pass over ``<out_dir>/activations.zarr``, chunk by chunk along
the image axis, so no layer is ever held whole in memory; invalid images are
left out). The pass runs on the run's dask cluster (``dissect.cluster``): one
task per block of whole Zarr chunks (about ``BLOCK_MIB`` MiB, fixed by the
array's chunking alone) returns that block's partial ``UnitTally``, and the
client sums the partial tallies in block order, so the float sums are the same
whichever worker ran a block and however many workers there are.

For every unit u of every layer in ``layers`` (a map layer's values are its
(h, w) positions per image, a vector layer has one value per image):

- ``firing_rate``: share of valid probe images on which u *fires*, i.e. its
  maximum over the image's positions is > 0 (for a map layer this is
  ``maxima > 0``);
- ``mean``, ``max``: mean and maximum of all its values (all positions of all
  valid images);
- ``zero_share``: share of its values that are <= 0;
- ``dead``: it never fires on the probe set (firing_rate == 0);
- ``nearly_dead``: it fires, but on fewer than ``audit.nearly_dead_share`` of
  the images;
- ``always_on``: it is > 0 at more than ``audit.always_on_share`` of all
  positions of all images (1 - zero_share > always_on_share).

"Fires" means > 0 and "zero" means <= 0 whether the layer was recorded before
or after its ReLU: the conv output before a ReLU (AlexNet ``features.10``, the
embedded model's ``features.conv4``) is <= 0 exactly where the ReLU outputs 0,
so a unit is dead in the same sense either way. For layers not followed by a
ReLU (logits, batch-norm outputs) these flags say only where values are
positive.

Per layer: share of dead, nearly dead and always-on units, the activation
sparsity (share of all its values that are <= 0) and a histogram of the
per-unit firing rates over [0, 1] (``audit.histogram_bins`` bins).

Weights (one light pass over ``load_model(cfg.model)``): for every Conv2d and
Linear, the mean and (population) standard deviation over output units of the
L2 norm of each unit's weights, the share of near-zero units (norm at most
``NEAR_ZERO_NORM`` times the layer's median norm) and the mean bias. The first
Conv2d in ``named_modules`` order is drawn as a grid of its filters and scored
for smoothness by its *high-frequency share*: the share of each filter's
spectral energy (|2-D DFT|^2 summed over input channels, the DC term included)
at spatial frequencies above ``HIGH_FREQUENCY_CUT`` cycles per pixel (half the
Nyquist frequency). A smooth filter (a blob, a low-frequency edge) keeps most
of its energy below the cut and scores near 0; white noise spreads it evenly
over the frequency grid and scores the share of grid points above the cut
(0.83 for 11x11 kernels, 0.80 for 5x5). The first layer is called noisy when the
median score of its filters exceeds ``NOISY_FILTER_SHARE``.

Verdicts: a layer with at least ``DEAD_SHARE_WARNING`` of its units dead is
flagged as a symptom of a learning rate that was too high (dying ReLUs:
large updates push a unit's weights and bias to where it is negative on every
input, after which it gets no gradient and never recovers); a noisy first
layer as a sign of an untrained model or a learning rate that kept the filters
from settling.

Outputs in ``<out_dir>/audit/``: ``units.csv`` (layer, unit, firing_rate,
mean, max, zero_share, dead, nearly_dead, always_on), ``layers.csv``,
``weights.csv``, ``firing_rates_<layer>.png``, ``first_layer_filters.png``,
``audit.json`` (the figures and verdicts) and, last, the stage's stamp
(inputs: the settings and the extract stage's stamp)
"""

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pandas as pd
import torch
import zarr
from distributed import Client
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from dissect.artifacts import chunk_blocks, open_activations, write_json_atomic
from dissect.cluster import check_worker_paths, dask_client, results_in_window
from dissect.errors import DissectError
from dissect.layout import RunLayout
from dissect.models import load_model
from dissect.settings import AuditSettings, section
from dissect.stamps import is_current, stamp_digest, start, write_stamp

log = logging.getLogger(__name__)

#: The version of this stage's output format.
FORMAT = 1

#: A layer with at least this share of dead units gets a bad verdict.
DEAD_SHARE_WARNING = 0.4
#: Spatial frequency (cycles per pixel) above which a filter's energy counts as high-frequency.
HIGH_FREQUENCY_CUT = 0.25
#: The first layer is noisy when the median high-frequency share of its filters exceeds this.
NOISY_FILTER_SHARE = 0.5
#: A unit's weights are near zero when their L2 norm is at most this share of the layer's median norm.
NEAR_ZERO_NORM = 0.01
#: The filter grid is enlarged (nearest neighbour) to at least this width in pixels.
GRID_MIN_WIDTH = 512
#: A task tallies about this many MiB of a layer's stored values (whole chunks, at least one).
BLOCK_MIB = 32.0


class AuditError(DissectError):
    """The audit cannot run with this configuration or run directory."""


@dataclass
class UnitTally:
    """Running per-unit sums of one layer over the valid images seen so far.

    Attributes:
        fired: (U,) images on which the unit's maximum is > 0.
        total: (U,) sum of all its values (float64).
        maximum: (U,) largest value (-inf before any image).
        zeros: (U,) number of values <= 0.
        images: valid images seen.
        positions: values per unit and image (h * w for a map layer, 1 for a vector layer).
    """

    fired: np.ndarray
    total: np.ndarray
    maximum: np.ndarray
    zeros: np.ndarray
    images: int
    positions: int

    @classmethod
    def empty(cls, units: int, positions: int) -> "UnitTally":
        """A tally of no images for a layer of ``units`` units with ``positions`` values per image."""
        return cls(np.zeros(units, np.int64), np.zeros(units, np.float64), np.full(units, -np.inf, np.float32),
                   np.zeros(units, np.int64), 0, positions)

    def add(self, values: np.ndarray) -> None:
        """Count a block of values (n, U, positions) of n valid images."""
        block = values.astype(np.float32)
        self.fired += (block.max(axis=2) > 0).sum(axis=0)
        self.total += block.sum(axis=(0, 2), dtype=np.float64)
        if len(block):
            self.maximum = np.maximum(self.maximum, block.max(axis=(0, 2)))
        self.zeros += (block <= 0).sum(axis=(0, 2))
        self.images += len(block)

    def merge(self, other: "UnitTally") -> None:
        """Add the counts of another tally of the same layer (the sums in this order: self + other)."""
        self.fired += other.fired
        self.total += other.total
        self.maximum = np.maximum(self.maximum, other.maximum)
        self.zeros += other.zeros
        self.images += other.images


def stored_values(store: zarr.Group, layer: str) -> zarr.Array:
    """A layer's stored array: (N, U, h, w) maps of a map layer, (N, D) activations of a vector layer."""
    kind = store.attrs["layers"][layer]["kind"]
    return store[layer]["maps" if kind == "map" else "activations"]


def block_tally(store_path: str, layer: str, first: int, last: int) -> UnitTally:
    """Partial tally of the valid images first..last of a layer, one Zarr chunk at a time (runs on a dask worker)."""
    store = zarr.open_group(store_path, mode="r")
    array = stored_values(store, layer)
    units, positions = array.shape[1], math.prod(array.shape[2:])
    valid = store["valid"][first:last]
    tally = UnitTally.empty(units, positions)
    step = array.chunks[0]
    for begin in range(first, last, step):
        end = min(begin + step, last)
        block = array[begin:end][valid[begin - first:end - first]]
        tally.add(block.reshape(len(block), units, positions))
    return tally


def layer_tallies(client: Client, store_path: str, layers: list[str], block_mib: float) -> dict[str, UnitTally]:
    """The tally of every layer over the valid images: block tasks of all layers (a bounded window), summed in block order.

    The blocks are ``chunk_blocks(array, block_mib)``, set by the array's
    chunking only, so the result does not depend on the cluster.
    """
    store = zarr.open_group(store_path, mode="r")
    blocks = {layer: chunk_blocks(stored_values(store, layer), block_mib) for layer in layers}
    calls = [(store_path, layer, first, last) for layer in layers for first, last in blocks[layer]]
    numbers = [number for layer in layers for number in range(len(blocks[layer]))]
    parts: dict[str, dict[int, UnitTally]] = {layer: {} for layer in layers}
    with tqdm(total=sum(last - first for _, _, first, last in calls), desc="audit", unit="img") as bar:
        for call, part in results_in_window(client, block_tally, calls):
            _, layer, first, last = calls[call]
            parts[layer][numbers[call]] = part
            bar.update(last - first)
    tallies = {}
    for layer in layers:
        array = stored_values(store, layer)
        tally = tallies[layer] = UnitTally.empty(array.shape[1], math.prod(array.shape[2:]))
        for number in range(len(blocks[layer])):
            tally.merge(parts[layer][number])
        if tally.images == 0:
            raise AuditError(f"the activations hold no valid image for layer {layer!r}; nothing to audit")
    return tallies


def unit_table(layer: str, tally: UnitTally, nearly_dead_share: float, always_on_share: float) -> pd.DataFrame:
    """One row per unit: layer, unit, firing_rate, mean, max, zero_share, dead, nearly_dead, always_on."""
    values = tally.images * tally.positions
    firing_rate = tally.fired / tally.images
    zero_share = tally.zeros / values
    dead = tally.fired == 0
    return pd.DataFrame({
        "layer": layer,
        "unit": np.arange(len(tally.fired)),
        "firing_rate": firing_rate,
        "mean": tally.total / values,
        "max": tally.maximum.astype(np.float64),
        "zero_share": zero_share,
        "dead": dead,
        "nearly_dead": ~dead & (firing_rate < nearly_dead_share),
        "always_on": 1 - zero_share > always_on_share,
    })


def layer_verdict(layer: str, units: pd.DataFrame, images: int) -> tuple[bool, str]:
    """(healthy, plain-language verdict) of one layer from its unit table."""
    dead_share = float(units["dead"].mean())
    nearly_share = float(units["nearly_dead"].mean())
    if dead_share >= DEAD_SHARE_WARNING:
        return False, (f"{dead_share:.0%} of {layer} units are dead (never positive on the {images} probe "
                       "images): a symptom of a learning rate that was too high (dying ReLUs)")
    return True, (f"{layer}: {dead_share:.0%} of units dead and {nearly_share:.0%} nearly dead, "
                  f"below the {DEAD_SHARE_WARNING:.0%} warning level")


def layer_summary(layer: str, kind: str, units: pd.DataFrame, tally: UnitTally, bins: int) -> dict[str, Any]:
    """Per-layer figures, the firing-rate histogram and the verdict."""
    counts, edges = np.histogram(units["firing_rate"], bins=bins, range=(0.0, 1.0))
    healthy, verdict = layer_verdict(layer, units, tally.images)
    return {
        "layer": layer,
        "kind": kind,
        "units": len(units),
        "valid_images": tally.images,
        "dead": int(units["dead"].sum()),
        "nearly_dead": int(units["nearly_dead"].sum()),
        "always_on": int(units["always_on"].sum()),
        "dead_share": float(units["dead"].mean()),
        "nearly_dead_share": float(units["nearly_dead"].mean()),
        "always_on_share": float(units["always_on"].mean()),
        "sparsity": float(tally.zeros.sum() / (tally.images * tally.positions * len(units))),
        "mean_firing_rate": float(units["firing_rate"].mean()),
        "firing_rate_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "healthy": healthy,
        "verdict": verdict,
    }


def weight_table(module: nn.Module) -> pd.DataFrame:
    """One row per Conv2d / Linear: layer, kind, units, fan_in, norm_mean, norm_std, near_zero_share, bias_mean."""
    rows = []
    for name, layer in module.named_modules():
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        weight = layer.weight.detach().to("cpu")
        norms = weight.reshape(len(weight), -1).norm(dim=1).double().numpy()
        rows.append({
            "layer": name,
            "kind": type(layer).__name__,
            "units": len(norms),
            "fan_in": int(weight[0].numel()),
            "norm_mean": float(norms.mean()),
            "norm_std": float(norms.std()),
            "near_zero_share": float((norms <= NEAR_ZERO_NORM * np.median(norms)).mean()),
            "bias_mean": float(layer.bias.detach().double().mean()) if layer.bias is not None else math.nan,
        })
    return pd.DataFrame(rows, columns=["layer", "kind", "units", "fan_in", "norm_mean", "norm_std",
                                       "near_zero_share", "bias_mean"])


def first_conv(module: nn.Module) -> tuple[str, np.ndarray] | None:
    """(name, weight (O, C, kh, kw) float64) of the first Conv2d in named_modules order, or None."""
    for name, layer in module.named_modules():
        if isinstance(layer, nn.Conv2d):
            return name, layer.weight.detach().to("cpu", torch.float64).numpy()
    return None


def high_frequency_mask(kh: int, kw: int) -> np.ndarray:
    """(kh, kw) bool: the 2-D DFT bins (numpy's fft2 order) whose frequency exceeds HIGH_FREQUENCY_CUT cycles/pixel."""
    return np.hypot(np.fft.fftfreq(kh)[:, None], np.fft.fftfreq(kw)[None, :]) > HIGH_FREQUENCY_CUT


def high_frequency_share(filters: np.ndarray) -> np.ndarray:
    """(O, C, kh, kw) filters -> (O,) share of each filter's spectral energy above HIGH_FREQUENCY_CUT.

    Energy is |fft2|^2 summed over the C input channels, DC included. Smooth
    filters score near 0, white noise near ``high_frequency_mask(kh, kw).mean()``;
    a filter with no energy (all zeros) scores NaN.
    """
    energy = (np.abs(np.fft.fft2(filters, axes=(-2, -1))) ** 2).sum(axis=1)
    total = energy.sum(axis=(1, 2))
    high = energy[:, high_frequency_mask(*filters.shape[-2:])].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, high / total, np.nan)


def grid_shape(n_tiles: int) -> tuple[int, int]:
    """(rows, columns) of the most nearly square grid with columns = ceil(sqrt(n_tiles))."""
    columns = math.ceil(math.sqrt(n_tiles))
    return math.ceil(n_tiles / columns), columns


def filter_grid(filters: np.ndarray, gap: int = 1) -> np.ndarray:
    """(O, C, kh, kw) filters -> (rows*(kh+gap)+gap, columns*(kw+gap)+gap, 3) float image in [0, 1].

    Filter i is tile (i // columns, i % columns) at rows gap + r*(kh+gap) ..,
    columns gap + c*(kw+gap) ..; each filter is scaled to [0, 1] on its own
    (its minimum to 0, maximum to 1; a constant filter is 0.5 grey). With C = 3
    the channels are shown as RGB, otherwise their mean as grey. Gaps are white.
    """
    n, channels, kh, kw = filters.shape
    tiles = filters.transpose(0, 2, 3, 1) if channels == 3 else np.repeat(filters.mean(axis=1)[..., None], 3, axis=3)
    low = tiles.min(axis=(1, 2, 3), keepdims=True)
    span = tiles.max(axis=(1, 2, 3), keepdims=True) - low
    scaled = np.where(span > 0, (tiles - low) / np.where(span > 0, span, 1), 0.5)
    rows, columns = grid_shape(n)
    grid = np.ones((rows * (kh + gap) + gap, columns * (kw + gap) + gap, 3))
    for i, tile in enumerate(scaled):
        top, left = gap + (i // columns) * (kh + gap), gap + (i % columns) * (kw + gap)
        grid[top:top + kh, left:left + kw] = tile
    return grid


def save_filter_grid(grid: np.ndarray, path: Path) -> None:
    """Write a filter grid as PNG, enlarged by an integer factor (nearest neighbour) to >= GRID_MIN_WIDTH px."""
    scale = max(1, math.ceil(GRID_MIN_WIDTH / grid.shape[1]))
    matplotlib.image.imsave(path, np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1))


def first_layer_summary(name: str, filters: np.ndarray) -> dict[str, Any]:
    """Smoothness figures and the verdict of the first conv layer's filters (O, C, kh, kw)."""
    share = high_frequency_share(filters)
    median = float(np.nanmedian(share)) if np.isfinite(share).any() else math.nan
    noisy = bool(median > NOISY_FILTER_SHARE)
    if noisy:
        verdict = (f"the first-layer filters ({name}) look like noise: median {median:.0%} of their energy lies "
                   f"at high spatial frequencies (white noise: {high_frequency_mask(*filters.shape[-2:]).mean():.0%}, "
                   f"smooth filters: below {NOISY_FILTER_SHARE:.0%}); the model is untrained or undertrained, or "
                   "its learning rate kept the filters from settling")
    else:
        verdict = (f"the first-layer filters ({name}) are smooth: median {median:.0%} of their energy at high "
                   f"spatial frequencies (noisy above {NOISY_FILTER_SHARE:.0%})")
    return {
        "layer": name,
        "filters": int(filters.shape[0]),
        "in_channels": int(filters.shape[1]),
        "kernel": [int(filters.shape[2]), int(filters.shape[3])],
        "high_frequency_share": [None if math.isnan(s) else float(s) for s in share],
        "high_frequency_share_median": median,
        "white_noise_share": float(high_frequency_mask(*filters.shape[-2:]).mean()),
        "noisy": noisy,
        "verdict": verdict,
    }


def save_histogram(summary: dict[str, Any], nearly_dead_share: float, path: Path) -> None:
    """Bar plot of a layer's per-unit firing-rate histogram, with the nearly-dead limit marked."""
    edges = np.array(summary["firing_rate_histogram"]["edges"])
    counts = summary["firing_rate_histogram"]["counts"]
    figure = Figure(figsize=(6, 3.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#337ab7", edgecolor="white")
    axes.axvline(nearly_dead_share, color="#a94442", linestyle="--", linewidth=1, label="nearly dead below")
    axes.set_xlim(0, 1)
    axes.set_xlabel("firing rate (share of probe images with max > 0)")
    axes.set_ylabel("units")
    axes.set_title(f"{summary['layer']}: {summary['dead']} dead of {summary['units']} units")
    axes.legend(loc="upper center", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def model_verdict(layers: list[dict[str, Any]], first_layer: dict[str, Any] | None) -> dict[str, Any]:
    """{'healthy': bool, 'remarks': [bad findings], 'text': one paragraph} for the whole model."""
    remarks = [layer["verdict"] for layer in layers if not layer["healthy"]]
    if first_layer is not None and first_layer["noisy"]:
        remarks.append(first_layer["verdict"])
    text = "; ".join(remarks) if remarks else (
        f"no symptom found: no layer has {DEAD_SHARE_WARNING:.0%} or more dead units"
        + ("" if first_layer is None else " and the first-layer filters are smooth"))
    return {"healthy": not remarks, "remarks": remarks, "text": text[:1].upper() + text[1:] + "."}


def audited_layers(store: zarr.Group, requested: list[str]) -> list[str]:
    """The requested layers, all of which the store must hold."""
    missing = [name for name in requested if name not in store.attrs["layers"]]
    if not requested or missing:
        raise AuditError(f"layers {missing or requested} cannot be audited; the store holds "
                         f"{store.attrs['layer_order']}")
    return requested


def check(cfg: DictConfig) -> None:
    """Refuse bad audit settings before any stage runs."""
    section(cfg.audit, AuditSettings)


def run(cfg: DictConfig) -> Path:
    """Audit the units of ``cfg.layers`` and the model's weights; return the audit directory."""
    layout = RunLayout(Path(cfg.out_dir))
    run_dir = layout.root
    store = open_activations(run_dir)
    layers = audited_layers(store, [str(name) for name in cfg.layers])
    audit_settings = section(cfg.audit, AuditSettings)
    nearly_dead_share, always_on_share = audit_settings.nearly_dead_share, audit_settings.always_on_share
    bins = audit_settings.histogram_bins
    settings = {"layers": layers, "nearly_dead_share": nearly_dead_share, "always_on_share": always_on_share,
                "histogram_bins": bins}
    inputs = {"settings": settings, "extract": stamp_digest(layout.stamp("extract"), "extract")}
    audit_dir = layout.audit_dir
    if is_current(layout.stamp("audit"), inputs, FORMAT, "audit"):
        return audit_dir
    audit_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_model(cfg.model)
    stored_model = store.attrs.get("model")
    if stored_model is not None and stored_model != loaded.description:
        raise AuditError(f"the activations in {run_dir} come from the model {stored_model}, not from the configured "
                         f"{loaded.description}; audit with the model config used for extract")
    with dask_client(cfg.cluster) as client:
        check_worker_paths(client, [layout.activations])
        tallies = layer_tallies(client, str(layout.activations), layers, BLOCK_MIB)
    start(layout, "audit")
    tables, summaries = [], []
    for layer in layers:
        tally = tallies[layer]
        units = unit_table(layer, tally, nearly_dead_share, always_on_share)
        summary = layer_summary(layer, store.attrs["layers"][layer]["kind"], units, tally, bins)
        save_histogram(summary, nearly_dead_share, layout.firing_rates_png(layer))
        tables.append(units)
        summaries.append(summary)
    pd.concat(tables).to_csv(layout.audit_units_csv, index=False, float_format="%.17g")
    pd.DataFrame([{k: v for k, v in s.items() if k != "firing_rate_histogram"}
                  for s in summaries]).to_csv(layout.audit_layers_csv, index=False, float_format="%.17g")
    weight_table(loaded.module).to_csv(layout.audit_weights_csv, index=False, float_format="%.17g")
    conv = first_conv(loaded.module)
    first_layer = None
    if conv is not None:
        save_filter_grid(filter_grid(conv[1]), layout.first_layer_filters_png)
        first_layer = first_layer_summary(*conv)
    verdict = model_verdict(summaries, first_layer)
    write_json_atomic(layout.audit_json, {
        "settings": settings,
        "thresholds": {"dead_share_warning": DEAD_SHARE_WARNING, "high_frequency_cut": HIGH_FREQUENCY_CUT,
                       "noisy_filter_share": NOISY_FILTER_SHARE, "near_zero_norm": NEAR_ZERO_NORM},
        "layer_order": layers,
        "layers": {s["layer"]: s for s in summaries},
        "first_layer": first_layer,
        "verdict": verdict,
    })
    write_stamp(layout.stamp("audit"), inputs, FORMAT)
    log.info("audit: %s", verdict["text"])
    return audit_dir
