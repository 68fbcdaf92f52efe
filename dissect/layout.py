"""The run directory: the one place that knows where every artifact of a run lives.

Stages, reports and benchmarks take their paths from ``RunLayout``; no other
module spells a run-directory file name. Per-layer outputs live under
``layers/<layer>/``, so no layer name can collide with a stage folder::

    <out_dir>/
      activations.zarr/                extract: the activation store (Zarr v3)
      extract/fingerprint.json         extract: what the activations are made from (checked on resume)
      extract/chunks/chunk_<c>.json    extract: one marker per finished chunk (the unit of resume)
      extract/skipped_images.csv       extract: images that could not be read
      layers/<layer>/                  one folder per dissected layer
        thresholds.csv                 thresholds: unit, threshold
        thresholds.json                thresholds: quantile and counts
        tally.csv, iou.npy, concepts.csv, tally.json   tally: labels, IoU matrix, its columns, summary
        topk.csv, receptive_field.json, strips/unit_<u:05d>.jpg   topk
        compositional.csv, compositional.json   compositional: formulas of concepts per unit
      tally/parts/                     tally: finished blocks, the unit of resume
      tally/skipped_masks.csv          tally: images whose masks could not be read
      compositional/                   compositional: the sparse bit-packed concept masks of the searched
                                       images: sample.npy, annotated.npy, pair_offsets.npy,
                                       pair_concepts.npy, pair_pixels.npy, pair_words.npy (parts/ while packing)
      audit/                           audit: units.csv, layers.csv, weights.csv, audit.json, pictures
      embed/                           embed: coords.parquet, neighbours.csv, embed.json, pictures
      attribute/                       attribute: pairs.csv, maps.zarr, strips/, agreement.csv,
                                       randomisation.csv, attribute.json
      explanations/                    explanations: pairs.csv, masks.zarr, explainers.csv, jaccard_<kind>.csv,
                                       faithfulness.csv, curves.csv, curves.png, overlays/, explanations.json
      visualise/                       visualise: units.csv, dream.csv, viewer.csv, visualise.json,
                                       layers/<layer>/unit_<u:05d>_<copy>.png, classes/, dream/, viewer/
      report/index.html, report/layer-<layer>.html   report (and visualise-<layer>.html, viewer-<image>.html)
      <stage>/stamp.json, layers/<layer>/<stage>.stamp.json
                                       what each finished stage was computed from (``dissect.stamps``)
      logs/                            Hydra's logs, one folder per command
"""

from dataclasses import dataclass
from pathlib import Path

LAYERS = "layers"
#: The 2-D layouts of the embed stage, in the order they are made and shown.
EMBED_METHODS = ("tsne", "umap")
#: How the pictures and the report name each layout.
EMBED_METHOD_TITLES = {"tsne": "t-SNE", "umap": "UMAP"}


def layer_page_name(layer: str) -> str:
    """File name of a layer's page of unit cards in the report directory."""
    return f"layer-{layer}.html"


def chunk_marker_name(chunk: int) -> str:
    """The file name of chunk ``chunk``'s marker in ``RunLayout.extract_chunks`` (workers know only that folder)."""
    return f"chunk_{chunk:06d}.json"


@dataclass(frozen=True)
class RunLayout:
    """Every path of the run directory ``root``."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ------------------------------------------------------------------ extract

    @property
    def activations(self) -> Path:
        """The activation store (see README, "Run directory and Zarr layout")."""
        return self.root / "activations.zarr"

    @property
    def extract_fingerprint(self) -> Path:
        return self.root / "extract" / "fingerprint.json"

    @property
    def extract_chunks(self) -> Path:
        """The folder of chunk markers: one file per chunk of images whose rows are on disk in every array."""
        return self.root / "extract" / "chunks"

    def chunk_marker(self, chunk: int) -> Path:
        return self.extract_chunks / chunk_marker_name(chunk)

    @property
    def skipped_images(self) -> Path:
        return self.root / "extract" / "skipped_images.csv"

    # --------------------------------------------------------------- per layer

    def layer_dir(self, layer: str) -> Path:
        """The folder of a dissected layer's outputs."""
        return self.root / LAYERS / layer

    def thresholds_csv(self, layer: str) -> Path:
        return self.layer_dir(layer) / "thresholds.csv"

    def thresholds_json(self, layer: str) -> Path:
        return self.layer_dir(layer) / "thresholds.json"

    def tally_csv(self, layer: str) -> Path:
        return self.layer_dir(layer) / "tally.csv"

    def iou_npy(self, layer: str) -> Path:
        return self.layer_dir(layer) / "iou.npy"

    def concepts_csv(self, layer: str) -> Path:
        return self.layer_dir(layer) / "concepts.csv"

    def tally_json(self, layer: str) -> Path:
        """The tally summary of a layer (units, detectors, unique detectors per category)."""
        return self.layer_dir(layer) / "tally.json"

    def topk_csv(self, layer: str) -> Path:
        return self.layer_dir(layer) / "topk.csv"

    def receptive_field_json(self, layer: str) -> Path:
        return self.layer_dir(layer) / "receptive_field.json"

    def topk_strips(self, layer: str) -> Path:
        return self.layer_dir(layer) / "strips"

    def topk_strip(self, layer: str, unit: int) -> Path:
        """The top-k strip of one unit."""
        return self.topk_strips(layer) / f"unit_{unit:05d}.jpg"

    def compositional_csv(self, layer: str) -> Path:
        """Each unit's best formula of concepts, with its runner-ups (compositional stage)."""
        return self.layer_dir(layer) / "compositional.csv"

    def compositional_json(self, layer: str) -> Path:
        return self.layer_dir(layer) / "compositional.json"

    # ------------------------------------------------------------------- tally

    @property
    def tally_parts(self) -> Path:
        return self.root / "tally" / "parts"

    @property
    def skipped_masks(self) -> Path:
        return self.root / "tally" / "skipped_masks.csv"

    # ----------------------------------------------------------- compositional

    @property
    def concept_sample(self) -> Path:
        """(n,) int64: the probe-set index of each searched image, ascending (npy; the rows of the arrays below)."""
        return self.root / "compositional" / "sample.npy"

    @property
    def image_annotations(self) -> Path:
        """(n, n_categories) bool: which categories each searched image annotates (npy)."""
        return self.root / "compositional" / "annotated.npy"

    @property
    def pair_offsets(self) -> Path:
        """(n + 1,) int64: the (image, concept) pairs of searched image r are rows offsets[r]:offsets[r + 1] (npy)."""
        return self.root / "compositional" / "pair_offsets.npy"

    @property
    def pair_concepts(self) -> Path:
        """(P,) int32: the concept column (label number - 1) of each pair, ascending within an image (npy)."""
        return self.root / "compositional" / "pair_concepts.npy"

    @property
    def pair_pixels(self) -> Path:
        """(P,) int64: the pixels the pair's concept covers in its image (npy)."""
        return self.root / "compositional" / "pair_pixels.npy"

    @property
    def pair_words(self) -> Path:
        """(P, W) uint64: the pair's mask, bit p of word w = pixel 64 w + p, row-major (npy, memory-mapped)."""
        return self.root / "compositional" / "pair_words.npy"

    @property
    def pack_parts(self) -> Path:
        """Blocks of packed pairs written by the workers, joined into the arrays above and removed."""
        return self.root / "compositional" / "parts"

    # ------------------------------------------------------------------- audit

    @property
    def audit_dir(self) -> Path:
        return self.root / "audit"

    @property
    def audit_json(self) -> Path:
        return self.audit_dir / "audit.json"

    @property
    def audit_units_csv(self) -> Path:
        return self.audit_dir / "units.csv"

    @property
    def audit_layers_csv(self) -> Path:
        return self.audit_dir / "layers.csv"

    @property
    def audit_weights_csv(self) -> Path:
        return self.audit_dir / "weights.csv"

    @property
    def first_layer_filters_png(self) -> Path:
        return self.audit_dir / "first_layer_filters.png"

    def firing_rates_png(self, layer: str) -> Path:
        return self.audit_dir / f"firing_rates_{layer}.png"

    # ------------------------------------------------------------------- embed

    @property
    def embed_dir(self) -> Path:
        return self.root / "embed"

    @property
    def embed_json(self) -> Path:
        return self.embed_dir / "embed.json"

    @property
    def embed_coords(self) -> Path:
        return self.embed_dir / "coords.parquet"

    @property
    def embed_neighbours_csv(self) -> Path:
        return self.embed_dir / "neighbours.csv"

    @property
    def embed_neighbours_png(self) -> Path:
        return self.embed_dir / "neighbours.png"

    def embed_picture(self, kind: str, method: str) -> Path:
        """``kind`` scatter or thumbnails, ``method`` tsne or umap."""
        return self.embed_dir / f"{kind}_{method}.png"

    # --------------------------------------------------------------- attribute

    @property
    def attribute_dir(self) -> Path:
        return self.root / "attribute"

    @property
    def attribute_json(self) -> Path:
        return self.attribute_dir / "attribute.json"

    @property
    def attribute_pairs_csv(self) -> Path:
        return self.attribute_dir / "pairs.csv"

    @property
    def attribute_maps(self) -> Path:
        return self.attribute_dir / "maps.zarr"

    @property
    def attribute_agreement_csv(self) -> Path:
        return self.attribute_dir / "agreement.csv"

    @property
    def attribute_randomisation_csv(self) -> Path:
        return self.attribute_dir / "randomisation.csv"

    def attribute_unit_strip(self, layer: str, unit: int) -> Path:
        return self.attribute_dir / "strips" / LAYERS / layer / f"unit_{unit:05d}.png"

    def attribute_class_strip(self, image_index: int, target: int) -> Path:
        return self.attribute_dir / "strips" / "classes" / f"image_{image_index:06d}_class_{target}.png"

    # ------------------------------------------------------------ explanations

    @property
    def explanations_dir(self) -> Path:
        return self.root / "explanations"

    @property
    def explanations_json(self) -> Path:
        return self.explanations_dir / "explanations.json"

    @property
    def explanations_pairs_csv(self) -> Path:
        return self.explanations_dir / "pairs.csv"

    @property
    def explanations_masks(self) -> Path:
        """masks.zarr: per method a (pairs, S, S) bool mask array, per explainer its (pairs, S, S) heat map."""
        return self.explanations_dir / "masks.zarr"

    @property
    def explainers_csv(self) -> Path:
        return self.explanations_dir / "explainers.csv"

    def jaccard_csv(self, kind: str) -> Path:
        """The per-image Jaccard table of one comparison kind (methods, seeds, blur, models)."""
        return self.explanations_dir / f"jaccard_{kind}.csv"

    @property
    def faithfulness_csv(self) -> Path:
        return self.explanations_dir / "faithfulness.csv"

    @property
    def curves_csv(self) -> Path:
        return self.explanations_dir / "curves.csv"

    @property
    def curves_png(self) -> Path:
        return self.explanations_dir / "curves.png"

    def explanation_overlay(self, kind: str, first: str, second: str, image_index: int) -> Path:
        """Overlay of two masks of one image: A red, B green, both yellow."""
        return (self.explanations_dir / "overlays" / kind / f"{first}__{second}"
                / f"image_{image_index:06d}.png")
    # --------------------------------------------------------------- visualise

    @property
    def visualise_dir(self) -> Path:
        return self.root / "visualise"

    @property
    def visualise_json(self) -> Path:
        return self.visualise_dir / "visualise.json"

    @property
    def visualise_units_csv(self) -> Path:
        """One row per synthesised image (units and classes)."""
        return self.visualise_dir / "units.csv"

    @property
    def visualise_dream_csv(self) -> Path:
        """One row per deep-dream image and octave."""
        return self.visualise_dir / "dream.csv"

    @property
    def visualise_viewer_csv(self) -> Path:
        """One row per viewed image and layer."""
        return self.visualise_dir / "viewer.csv"

    def visualise_unit_image(self, layer: str, unit: int, copy: int) -> Path:
        return self.visualise_dir / LAYERS / layer / f"unit_{unit:05d}_{copy}.png"

    def visualise_class_image(self, target: int, copy: int) -> Path:
        return self.visualise_dir / "classes" / f"class_{target:05d}_{copy}.png"

    def visualise_dream_image(self, number: int, layer: str) -> Path:
        return self.visualise_dir / "dream" / f"dream_{number:03d}_{layer}.png"

    def visualise_viewer_maps(self, image_index: int, layer: str) -> Path:
        """Every unit's map of ``layer`` on probe image ``image_index``, as a grid of tiles."""
        return self.visualise_dir / "viewer" / f"image_{image_index:06d}" / f"{layer}_maps.png"

    def visualise_viewer_overlay(self, image_index: int, layer: str) -> Path:
        """The image and its strongest units' maps of ``layer`` over it."""
        return self.visualise_dir / "viewer" / f"image_{image_index:06d}" / f"{layer}_overlay.png"

    # ------------------------------------------------------------------ report

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def report_index(self) -> Path:
        return self.report_dir / "index.html"

    def report_layer_page(self, layer: str) -> Path:
        return self.report_dir / layer_page_name(layer)

    def report_visualise_page(self, layer: str) -> Path:
        """The grid of a layer's synthesised images."""
        return self.report_dir / f"visualise-{layer}.html"

    def report_viewer_page(self, image_index: int) -> Path:
        """Every dissected layer's maps on one probe image."""
        return self.report_dir / f"viewer-{image_index:06d}.html"

    @property
    def training_json(self) -> Path:
        """How the model of this run was trained, for runs made by ``make audit-demo``."""
        return self.root / "training.json"

    # ------------------------------------------------------------------ stamps

    def stamp(self, stage: str, layer: str | None = None) -> Path:
        """The stamp of a finished stage, beside its outputs (of one layer, for the per-layer stages)."""
        return self.layer_dir(layer) / f"{stage}.stamp.json" if layer else self.root / stage / "stamp.json"
