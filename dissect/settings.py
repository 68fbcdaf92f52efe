"""Typed settings: the schema of ``conf/config.yaml``, one dataclass per stage section.

The dataclasses are registered in Hydra's ConfigStore as ``schema``, the first
entry of the config's defaults list, so the configuration layer itself refuses
a misspelled key or a value of the wrong type and names the key
(``python -m dissect`` prints it in one line). The values, and the comments
that explain them, live in ``conf/config.yaml``; the types live here, and so do
the value rules that types cannot express (``__post_init__``, raising
``ConfigError`` naming the key and what is allowed). A stage reads its section
with ``section(cfg.<stage>, <Settings>)``, which runs those rules.

The ``model``, ``dataset`` and ``cluster`` groups are checked where they are used
(``dissect.models``, ``dissect.probe``, ``dissect.cluster``): their keys depend
on the source or kind. The ``attribute`` section is typed here and validated by the attribute
stage's ``read_settings``, which also fills the keys left null from its device
defaults.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dissect.errors import ConfigError

Settings = TypeVar("Settings")


def require(section: str, rules: list[tuple[str, Any, bool, str]]) -> None:
    """Raise ConfigError for the first (key, value, ok, allowed) rule that fails."""
    for key, value, ok, allowed in rules:
        if not ok:
            raise ConfigError(f"{section}.{key}={value!r} is not allowed; it must be {allowed}")


@dataclass
class ExtractSettings:
    batch_size: int = MISSING
    num_workers: Any = MISSING  # auto, or a number
    chunk_mib: float = MISSING
    device: str = MISSING
    amp: bool = MISSING

    def __post_init__(self) -> None:
        workers_ok = self.num_workers == "auto" or (isinstance(self.num_workers, int) and self.num_workers >= 0)
        require("extract", [("batch_size", self.batch_size, self.batch_size >= 1, "an integer >= 1"),
                            ("num_workers", self.num_workers, workers_ok, "auto or an integer >= 0"),
                            ("chunk_mib", self.chunk_mib, self.chunk_mib > 0, "a number > 0")])


@dataclass
class ThresholdsSettings:
    quantile: float = MISSING
    block_images: int = MISSING
    memory_mib: float = MISSING

    def __post_init__(self) -> None:
        require("thresholds", [("quantile", self.quantile, 0 < self.quantile < 1,
                                "strictly between 0 and 1 (0.005 is standard)"),
                               ("block_images", self.block_images, self.block_images >= 1, "an integer >= 1"),
                               ("memory_mib", self.memory_mib, self.memory_mib > 0,
                                "a number of MiB > 0 (1024 is standard)")])


@dataclass
class TallySettings:
    iou_threshold: float = MISSING
    block_images: int = MISSING
    strict: bool = MISSING
    mask_cache: str = MISSING

    def __post_init__(self) -> None:
        require("tally", [("iou_threshold", self.iou_threshold, 0 <= self.iou_threshold < 1,
                           "in [0, 1) (0.04 is standard)"),
                          ("block_images", self.block_images, self.block_images >= 1, "an integer >= 1"),
                          ("mask_cache", self.mask_cache, bool(self.mask_cache.strip()), "a folder path")])


@dataclass
class CompositionalSettings:
    beam: int = MISSING
    max_length: int = MISSING
    length_penalty: float = MISSING
    runner_ups: int = MISSING
    units_per_task: int = MISSING
    max_images: int | None = MISSING  # 0 or null: every valid image
    sample_seed: int = MISSING

    def __post_init__(self) -> None:
        require("compositional", [
            ("beam", self.beam, self.beam >= 1, "an integer >= 1 (5 is standard)"),
            ("max_length", self.max_length, 1 <= self.max_length <= 10, "an integer in [1, 10] (3 is standard)"),
            ("length_penalty", self.length_penalty, 0 <= self.length_penalty < 1, "a number in [0, 1)"),
            ("runner_ups", self.runner_ups, self.runner_ups >= 0, "an integer >= 0"),
            ("units_per_task", self.units_per_task, self.units_per_task >= 1, "an integer >= 1"),
            ("max_images", self.max_images, self.max_images is None or self.max_images >= 0,
             "an integer >= 0 (0 or null: every image)"),
            ("sample_seed", self.sample_seed, 0 <= self.sample_seed < 2**32, "an integer in [0, 2**32)")])


@dataclass
class TopkSettings:
    k: int = MISSING

    def __post_init__(self) -> None:
        require("topk", [("k", self.k, self.k >= 1, "an integer >= 1")])


@dataclass
class AuditSettings:
    nearly_dead_share: float = MISSING
    always_on_share: float = MISSING
    histogram_bins: int = MISSING

    def __post_init__(self) -> None:
        require("audit", [("nearly_dead_share", self.nearly_dead_share, 0 <= self.nearly_dead_share <= 1,
                           "a share in [0, 1]"),
                          ("always_on_share", self.always_on_share, 0 <= self.always_on_share <= 1,
                           "a share in [0, 1]"),
                          ("histogram_bins", self.histogram_bins, self.histogram_bins >= 1, "an integer >= 1")])


#: Fewest images a representation map is drawn from.
MIN_EMBED_IMAGES = 4


@dataclass
class EmbedSettings:
    layer: str = MISSING
    pca_components: int = MISSING
    perplexity: float = MISSING
    n_neighbors: int = MISSING
    min_dist: float = MISSING
    tsne_early_iterations: int = MISSING
    tsne_iterations: int = MISSING
    seed: int = MISSING
    trustworthiness_sample: int = MISSING
    trustworthiness_neighbors: int = MISSING
    thumbnail_grid: int = MISSING
    queries: int = MISSING
    neighbours: int = MISSING

    def __post_init__(self) -> None:
        require("embed", [
            ("pca_components", self.pca_components, self.pca_components >= 2, "an integer >= 2"),
            ("perplexity", self.perplexity, self.perplexity > 0, "a number > 0 (5 to 50 is usual)"),
            ("n_neighbors", self.n_neighbors, self.n_neighbors >= 2, "an integer >= 2"),
            ("min_dist", self.min_dist, 0 <= self.min_dist <= 1, "a number in [0, 1]"),
            ("tsne_early_iterations", self.tsne_early_iterations, self.tsne_early_iterations >= 0,
             "an integer >= 0"),
            ("tsne_iterations", self.tsne_iterations, self.tsne_iterations >= 1, "an integer >= 1"),
            ("seed", self.seed, 0 <= self.seed < 2**32, "an integer in [0, 2**32)"),
            ("trustworthiness_sample", self.trustworthiness_sample, self.trustworthiness_sample >= MIN_EMBED_IMAGES,
             f"an integer >= {MIN_EMBED_IMAGES}"),
            ("trustworthiness_neighbors", self.trustworthiness_neighbors, self.trustworthiness_neighbors >= 1,
             "an integer >= 1"),
            ("thumbnail_grid", self.thumbnail_grid, self.thumbnail_grid >= 1, "an integer >= 1"),
            ("queries", self.queries, self.queries >= 1, "an integer >= 1"),
            ("neighbours", self.neighbours, self.neighbours >= 1, "an integer >= 1")])


@dataclass
class AttributeSection:
    """Types only; ``dissect.stages.attribute.read_settings`` holds the value rules and the device defaults."""

    units: str = MISSING
    top_units: int | None = MISSING
    unit_label: str | None = MISSING
    unit_pairs: list[Any] = MISSING
    images_per_unit: int | None = MISSING
    class_target: Any = MISSING  # predicted, a class index, or null
    class_images: Any = MISSING  # a number of images, or a list of image ids
    methods: Any = MISSING  # all, or a list of method names
    grad_cam_layer: str | None = MISSING
    ig_steps: int | None = MISSING
    ig_internal_batch: int = MISSING
    occlusion_window: int = MISSING
    occlusion_stride: int | None = MISSING
    lime_segments: int = MISSING
    lime_samples: int | None = MISSING
    shap_references: int = MISSING
    batch_size: int = MISSING
    randomisation_pairs: int | None = MISSING
    randomisation_steps: int | None = MISSING
    max_correlation: float = MISSING
    seed: int = MISSING
    device: str = MISSING
    device_defaults: dict[str, dict[str, Any]] = MISSING


#: What the visualise stage maximises for a unit of a map layer: the mean of its channel, or its centre position.
UNIT_OBJECTIVES = ("mean", "centre")
#: How the visualise stage parameterises the synthesised image.
IMAGE_PARAMETERISATIONS = ("fourier", "pixel")
#: How the map viewer scales its tiles: each unit by its own maximum on the image, or all by the layer's.
VIEWER_NORMALISATIONS = ("unit", "layer")
#: The unit selections shared by the attribute and visualise stages.
UNIT_SELECTIONS = ("top", "label", "pairs", "none")


@dataclass
class FourierSettings:
    """Olah et al. (2017): a Fourier-basis image in decorrelated colour, squashed by a sigmoid, transformed at random."""

    size: int = MISSING
    lr: float = MISSING
    decay_power: float = MISSING
    init_sd: float = MISSING
    pad: int = MISSING
    jitter: int = MISSING
    scale_range: float = MISSING
    rotate_degrees: float = MISSING

    def __post_init__(self) -> None:
        require("visualise.fourier", [
            ("size", self.size, self.size >= 8, "an integer >= 8 (pixels of the parameterised image)"),
            ("lr", self.lr, self.lr > 0, "a number > 0"),
            ("decay_power", self.decay_power, self.decay_power >= 0, "a number >= 0"),
            ("init_sd", self.init_sd, self.init_sd > 0, "a number > 0"),
            ("pad", self.pad, self.pad >= 0, "an integer >= 0"),
            ("jitter", self.jitter, self.jitter >= 0, "an integer >= 0"),
            ("scale_range", self.scale_range, 0 <= self.scale_range < 1, "a number in [0, 1)"),
            ("rotate_degrees", self.rotate_degrees, 0 <= self.rotate_degrees <= 180, "a number in [0, 180]")])


@dataclass
class PixelSettings:
    """Yosinski et al. (2015): pixels with L2 decay, a Gaussian blur every few steps and clipping of weak pixels."""

    lr: float = MISSING
    l2_decay: float = MISSING
    blur_every: int = MISSING
    blur_sigma: float = MISSING
    norm_percentile: float = MISSING
    contribution_percentile: float = MISSING

    def __post_init__(self) -> None:
        require("visualise.pixel", [
            ("lr", self.lr, self.lr > 0, "a number > 0"),
            ("l2_decay", self.l2_decay, 0 <= self.l2_decay < 1, "a number in [0, 1)"),
            ("blur_every", self.blur_every, self.blur_every >= 0, "an integer >= 0 (0: never)"),
            ("blur_sigma", self.blur_sigma, self.blur_sigma >= 0, "a number of pixels >= 0"),
            ("norm_percentile", self.norm_percentile, 0 <= self.norm_percentile < 100, "a percentile in [0, 100)"),
            ("contribution_percentile", self.contribution_percentile, 0 <= self.contribution_percentile < 100,
             "a percentile in [0, 100)")])


@dataclass
class DreamSettings:
    """Deep dream: gradient ascent of a layer's squared L2 norm from real images, octave by octave."""

    images: Any = MISSING  # a number of probe images, or a list of probe image ids or image paths
    layer: str | None = MISSING  # null: the middle dissected layer
    octaves: int = MISSING
    octave_scale: float = MISSING
    steps: int = MISSING
    lr: float = MISSING
    jitter: int = MISSING

    def __post_init__(self) -> None:
        images_ok = (isinstance(self.images, int) and self.images >= 0) or isinstance(self.images, (list, tuple))
        require("visualise.dream", [
            ("images", self.images, images_ok, "a number of probe images >= 0, or a list of image ids or paths"),
            ("octaves", self.octaves, self.octaves >= 1, "an integer >= 1"),
            ("octave_scale", self.octave_scale, self.octave_scale > 1, "a number > 1"),
            ("steps", self.steps, self.steps >= 1, "an integer >= 1"),
            ("lr", self.lr, self.lr > 0, "a number > 0"),
            ("jitter", self.jitter, self.jitter >= 0, "an integer >= 0")])


@dataclass
class ViewerSettings:
    """The per-image activation-map viewer: every unit's map of a layer as a tile, and the strongest over the image."""

    images: Any = MISSING  # a number of probe images, or a list of probe image ids
    layers: list[str] | None = MISSING  # null: every dissected map layer
    normalise: str = MISSING
    overlay_units: int = MISSING

    def __post_init__(self) -> None:
        images_ok = (isinstance(self.images, int) and self.images >= 0) or isinstance(self.images, (list, tuple))
        require("visualise.viewer", [
            ("images", self.images, images_ok, "a number of probe images >= 0, or a list of image ids"),
            ("normalise", self.normalise, self.normalise in VIEWER_NORMALISATIONS,
             f"one of {', '.join(VIEWER_NORMALISATIONS)}"),
            ("overlay_units", self.overlay_units, self.overlay_units >= 1, "an integer >= 1")])


@dataclass
class VisualiseSettings:
    """The visualise stage (``dissect.stages.visualise``): what to synthesise, how, and what to view."""

    units: str = MISSING
    top_units: int = MISSING
    unit_label: str | None = MISSING
    unit_pairs: list[Any] = MISSING
    dead_units: int = MISSING
    objective: str = MISSING
    classes: list[int] = MISSING
    param: str = MISSING
    copies: int = MISSING
    steps: int = MISSING
    batch_size: int = MISSING
    redirect_relu: bool = MISSING
    batch_invariant: bool = MISSING
    seed: int = MISSING
    device: str = MISSING
    fourier: FourierSettings = MISSING
    pixel: PixelSettings = MISSING
    dream: DreamSettings = MISSING
    viewer: ViewerSettings = MISSING

    def __post_init__(self) -> None:
        pairs_ok = all(isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[1], int) and p[1] >= 0
                       for p in self.unit_pairs)
        require("visualise", [
            ("units", self.units, self.units in UNIT_SELECTIONS, f"one of {', '.join(UNIT_SELECTIONS)}"),
            ("units", self.units, self.units != "label" or bool(self.unit_label),
             "label only with visualise.unit_label (a concept name such as red-c)"),
            ("top_units", self.top_units, self.top_units >= 1, "an integer >= 1"),
            ("unit_pairs", self.unit_pairs, pairs_ok, "a list of [layer, unit] pairs, e.g. [[features.relu3,5]]"),
            ("dead_units", self.dead_units, self.dead_units >= 0, "an integer >= 0"),
            ("objective", self.objective, self.objective in UNIT_OBJECTIVES, f"one of {', '.join(UNIT_OBJECTIVES)}"),
            ("classes", self.classes, all(c >= 0 for c in self.classes), "a list of class indices >= 0"),
            ("param", self.param, self.param in IMAGE_PARAMETERISATIONS,
             f"one of {', '.join(IMAGE_PARAMETERISATIONS)}"),
            ("copies", self.copies, self.copies >= 1, "an integer >= 1 (images per unit, from different seeds)"),
            ("steps", self.steps, self.steps >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size, self.batch_size >= 1, "an integer >= 1"),
            ("seed", self.seed, 0 <= self.seed < 2**31, "an integer in [0, 2**31)")])
#: The explainers the explanations stage runs itself (``dissect.stages.explanations``).
STAGE_EXPLAINERS = ("grid", "statistical", "two_level", "elbow", "lime")


@dataclass
class ExplanationsSettings:
    explainers: Any = MISSING  # all, or a list of STAGE_EXPLAINERS
    mask_share: float = MISSING
    grid_cells: int = MISSING
    grid_keep: Any = MISSING  # a count of cells (int >= 1) or a share of them (float in (0, 1))
    statistical_lambda: float = MISSING
    lime_superpixels: int = MISSING
    lime_seeds: list[int] = MISSING
    blur_sigma: float = MISSING
    insertion_sigma: float = MISSING
    steps: int = MISSING
    compare_run: str | None = MISSING
    overlays: int = MISSING
    seed: int = MISSING
    batch_size: int = MISSING

    def __post_init__(self) -> None:
        chosen = list(STAGE_EXPLAINERS) if self.explainers == "all" else self.explainers
        explainers_ok = (isinstance(chosen, (list, tuple)) and len(chosen) > 0
                         and all(name in STAGE_EXPLAINERS for name in chosen))
        keep = self.grid_keep
        keep_ok = (not isinstance(keep, bool) and (isinstance(keep, int) and keep >= 1
                                                   or isinstance(keep, float) and 0 < keep < 1))
        seeds_ok = len(self.lime_seeds) == 2 and self.lime_seeds[0] != self.lime_seeds[1]
        require("explanations", [
            ("explainers", self.explainers, explainers_ok, f"all, or a non-empty list of {', '.join(STAGE_EXPLAINERS)}"),
            ("mask_share", self.mask_share, 0 < self.mask_share < 1, "a share of the pixels strictly between 0 and 1"),
            ("grid_cells", self.grid_cells, 2 <= self.grid_cells <= 64, "an integer in [2, 64] (10: cells of side "
                                                                        "max(H, W) / 10)"),
            ("grid_keep", keep, keep_ok, "a number of cells (an integer >= 1) or a share of them (in (0, 1))"),
            ("statistical_lambda", self.statistical_lambda, self.statistical_lambda >= 0, "a number >= 0"),
            ("lime_superpixels", self.lime_superpixels, self.lime_superpixels >= 1, "an integer >= 1"),
            ("lime_seeds", self.lime_seeds, seeds_ok, "two different seeds, e.g. [0, 1]"),
            ("blur_sigma", self.blur_sigma, self.blur_sigma > 0, "a Gaussian sigma in pixels > 0"),
            ("insertion_sigma", self.insertion_sigma, self.insertion_sigma > 0, "a Gaussian sigma in pixels > 0"),
            ("steps", self.steps, 2 <= self.steps <= 256, "an integer in [2, 256] (16 to 32 on a CPU)"),
            ("overlays", self.overlays, self.overlays >= 0, "an integer >= 0"),
            ("batch_size", self.batch_size, self.batch_size >= 1, "an integer >= 1")])

    @property
    def explainer_names(self) -> tuple[str, ...]:
        """The chosen explainers in table order."""
        chosen = STAGE_EXPLAINERS if self.explainers == "all" else self.explainers
        return tuple(name for name in STAGE_EXPLAINERS if name in chosen)


@dataclass
class LocalClusterSettings:
    """``cluster=local``: a dask LocalCluster on this machine."""

    kind: str = "local"
    n_workers: int = MISSING
    threads_per_worker: int | None = MISSING  # null: the machine's cores shared out between the workers
    processes: bool = MISSING  # false: one in-process worker (no start-up, no pickling)
    host: str = MISSING
    dashboard_address: str | None = MISSING

    def __post_init__(self) -> None:
        threads_ok = self.threads_per_worker is None or self.threads_per_worker >= 1
        require("cluster", [("n_workers", self.n_workers, self.n_workers >= 1, "an integer >= 1"),
                            ("n_workers", self.n_workers, self.processes or self.n_workers == 1,
                             "1 when cluster.processes=false (threads share one worker)"),
                            ("threads_per_worker", self.threads_per_worker, threads_ok, "null or an integer >= 1")])


@dataclass
class SlurmClusterSettings:
    """``cluster=slurm``: dask workers in SLURM jobs (dask_jobqueue.SLURMCluster)."""

    kind: str = "slurm"
    queue: str | None = MISSING
    account: str | None = MISSING
    jobs: int = MISSING
    maximum_jobs: int | None = MISSING
    cores: int = MISSING
    memory: str = MISSING
    processes: int = MISSING
    gpus_per_job: int = MISSING
    walltime: str = MISSING
    job_extra_directives: list[str] = MISSING
    job_script_prologue: list[str] = MISSING
    local_directory: str | None = MISSING
    log_directory: str | None = MISSING
    interface: str | None = MISSING
    scheduler_host: str | None = MISSING
    python: str | None = MISSING
    dashboard_address: str | None = MISSING
    wait_for_workers_s: float = MISSING

    def __post_init__(self) -> None:
        maximum_ok = self.maximum_jobs is None or self.maximum_jobs >= self.jobs
        require("cluster", [("jobs", self.jobs, self.jobs >= 1, "an integer >= 1"),
                            ("maximum_jobs", self.maximum_jobs, maximum_ok, f"null or an integer >= jobs={self.jobs}"),
                            ("cores", self.cores, self.cores >= 1, "an integer >= 1"),
                            ("processes", self.processes, 1 <= self.processes <= self.cores,
                             f"an integer in [1, cores={self.cores}]"),
                            ("gpus_per_job", self.gpus_per_job, self.gpus_per_job >= 0, "an integer >= 0"),
                            ("wait_for_workers_s", self.wait_for_workers_s, self.wait_for_workers_s > 0,
                             "a number of seconds > 0")])


@dataclass
class AddressClusterSettings:
    """``cluster=address``: a running dask scheduler."""

    kind: str = "address"
    address: str = MISSING
    timeout_s: float = MISSING

    def __post_init__(self) -> None:
        require("cluster", [("address", self.address, "://" in self.address or ":" in self.address,
                             "a scheduler address such as tcp://host:8786"),
                            ("timeout_s", self.timeout_s, self.timeout_s > 0, "a number of seconds > 0")])


@dataclass
class CudaClusterSettings:
    """``cluster=cuda``: one worker per GPU of this node (dask_cuda.LocalCUDACluster)."""

    kind: str = "cuda"
    n_workers: int | None = MISSING  # null: every visible GPU
    visible_devices: str | None = MISSING  # for example "0,1"; null: CUDA_VISIBLE_DEVICES or all
    threads_per_worker: int = MISSING
    host: str = MISSING
    dashboard_address: str | None = MISSING
    local_directory: str | None = MISSING

    def __post_init__(self) -> None:
        require("cluster", [("n_workers", self.n_workers, self.n_workers is None or self.n_workers >= 1,
                             "null or an integer >= 1"),
                            ("threads_per_worker", self.threads_per_worker, self.threads_per_worker >= 1,
                             "an integer >= 1")])


#: ``cluster.kind`` -> the settings of that kind of cluster (one file per kind in conf/cluster/).
CLUSTER_KINDS: dict[str, type] = {"local": LocalClusterSettings, "slurm": SlurmClusterSettings,
                                  "address": AddressClusterSettings, "cuda": CudaClusterSettings}


@dataclass
class Config:
    """The whole configuration of ``python -m dissect``."""

    model: Any = MISSING
    dataset: Any = MISSING
    cluster: Any = MISSING  # one of CLUSTER_KINDS, by its `kind` key (dissect.cluster)
    layers: list[str] = MISSING
    run_name: str = MISSING
    out_dir: str = MISSING
    stages: Any = MISSING  # all, or a list of stage names
    extract: ExtractSettings = MISSING
    thresholds: ThresholdsSettings = MISSING
    tally: TallySettings = MISSING
    compositional: CompositionalSettings = MISSING
    topk: TopkSettings = MISSING
    audit: AuditSettings = MISSING
    embed: EmbedSettings = MISSING
    attribute: AttributeSection = MISSING
    visualise: VisualiseSettings = MISSING
    explanations: ExplanationsSettings = MISSING


def section(values: DictConfig | dict, settings_type: type[Settings]) -> Settings:
    """A config section as its typed dataclass, its value rules checked; errors name the key."""
    try:
        if isinstance(values, DictConfig):  # resolve interpolations such as ${model.embed_layer} in place
            values = OmegaConf.to_container(values, resolve=True)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(settings_type), values))
    except OmegaConfBaseException as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise ConfigError(f"configuration error: {' '.join(lines[:3])}") from error


def checkpoint_tag(checkpoint: str | None) -> str:
    """``-<file stem>`` of a checkpoint path, or "" without one: runs of two checkpoints get two directories."""
    return f"-{Path(str(checkpoint)).stem}" if checkpoint else ""


ConfigStore.instance().store(name="schema", node=Config)
OmegaConf.register_new_resolver("checkpoint_tag", checkpoint_tag, replace=True)
