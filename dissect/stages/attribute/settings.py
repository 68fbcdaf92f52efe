"""The ``attribute`` config section, validated, with the device defaults of its costly keys."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dissect.settings import UNIT_SELECTIONS
from dissect.stages.attribute.errors import AttributionError
from dissect.stages.attribute.methods import (
    METHODS,
    MethodSettings,
)


@dataclass(frozen=True)
class AttributeSettings:
    """The validated ``attribute`` config (see README for the meaning of each key)."""

    units: str
    top_units: int
    unit_label: str | None
    unit_pairs: tuple[tuple[str, int], ...]
    images_per_unit: int
    class_target: str | int | None
    class_images: int | tuple[str, ...]
    methods: tuple[str, ...]
    grad_cam_layer: str | None
    ig_steps: int
    ig_internal_batch: int
    occlusion_window: int
    occlusion_stride: int
    lime_segments: int
    lime_samples: int
    shap_references: int
    batch_size: int
    randomisation_pairs: int
    randomisation_steps: int
    max_correlation: float
    seed: int
    device: str

    def method_settings(self) -> MethodSettings:
        """The knobs of the methods, as ``compute_maps`` takes them."""
        return MethodSettings(**{f.name: getattr(self, f.name) for f in fields(MethodSettings)})


SETTING_KEYS = tuple(f.name for f in fields(AttributeSettings))


#: The keys that cost time: null in the config takes the value of ``attribute.device_defaults.<cpu|cuda>``.
DEVICE_DEFAULT_KEYS = ("top_units", "images_per_unit", "class_images", "ig_steps", "occlusion_stride",
                       "lime_samples", "randomisation_pairs", "randomisation_steps")


DEVICE_DEFAULTS = "device_defaults"


def read_settings(cfg: Mapping[str, Any], device_type: str) -> tuple[AttributeSettings, dict[str, Any]]:
    """Validate the ``attribute`` config for a device of type ``device_type`` (cpu, cuda).

    Returns the settings and the keys that were null, with the device default
    each one took. Errors name the key and what is allowed.
    """
    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    missing = [key for key in (*SETTING_KEYS, DEVICE_DEFAULTS) if key not in config]
    unknown = sorted(str(key) for key in config if key not in (*SETTING_KEYS, DEVICE_DEFAULTS))
    if missing or unknown:
        raise AttributionError(f"attribute config: missing key(s) {missing}, unknown key(s) {unknown}; "
                               f"the keys are {[*SETTING_KEYS, DEVICE_DEFAULTS]}")
    table = config.pop(DEVICE_DEFAULTS).get("cuda" if device_type == "cuda" else "cpu") or {}
    filled = {key: table.get(key) for key in DEVICE_DEFAULT_KEYS if config[key] is None}
    absent = [key for key, value in filled.items() if value is None]
    if absent:
        raise AttributionError(f"attribute.{absent[0]} is null but attribute.{DEVICE_DEFAULTS}."
                               f"{'cuda' if device_type == 'cuda' else 'cpu'} has no value for it; set either")
    config.update(filled)
    if config["units"] not in UNIT_SELECTIONS:
        raise AttributionError(f"attribute.units={config['units']!r}; allowed: {', '.join(UNIT_SELECTIONS)}")
    if config["units"] == "label" and not config["unit_label"]:
        raise AttributionError("attribute.units=label needs attribute.unit_label (a concept name such as red-c)")
    methods = list(METHODS) if config["methods"] == "all" else list(config["methods"] or [])
    unknown_methods = [m for m in methods if m not in METHODS]
    if unknown_methods or not methods:
        raise AttributionError(f"attribute.methods={config['methods']!r} names unknown or no methods "
                               f"{unknown_methods}; allowed: all, or a list of {', '.join(METHODS)}")
    target = config["class_target"]
    if not (target is None or target == "predicted" or (isinstance(target, int) and target >= 0)):
        raise AttributionError(f"attribute.class_target={target!r}; allowed: predicted, a class index >= 0, or null")
    images = config["class_images"]
    if not (isinstance(images, int) and images >= 0 or isinstance(images, list)):
        raise AttributionError(f"attribute.class_images={images!r}; allowed: a number of images, or a list of ids")
    for key in ("top_units", "images_per_unit", "ig_steps", "ig_internal_batch", "occlusion_window",
                "occlusion_stride", "lime_segments", "lime_samples", "shap_references", "batch_size",
                "randomisation_steps"):
        if isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] < 1:
            raise AttributionError(f"attribute.{key}={config[key]!r}; allowed: an integer >= 1")
    if config["occlusion_stride"] > config["occlusion_window"]:
        raise AttributionError(f"attribute.occlusion_stride={config['occlusion_stride']} exceeds "
                               f"attribute.occlusion_window={config['occlusion_window']}; allowed: a stride "
                               "no larger than the window (pixels between windows would never be occluded)")
    if not isinstance(config["randomisation_pairs"], int) or config["randomisation_pairs"] < 0:
        raise AttributionError(f"attribute.randomisation_pairs={config['randomisation_pairs']!r}; "
                               "allowed: an integer >= 0 (0 skips the check)")
    pairs = []
    for entry in config["unit_pairs"] or []:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], int)):
            raise AttributionError(f"attribute.unit_pairs entry {entry!r}; allowed: [layer, unit], "
                                   "e.g. unit_pairs=[[features.10,3]]")
        pairs.append((str(entry[0]), int(entry[1])))
    return AttributeSettings(
        units=config["units"], top_units=config["top_units"], unit_label=config["unit_label"],
        unit_pairs=tuple(pairs), images_per_unit=config["images_per_unit"], class_target=target,
        class_images=images if isinstance(images, int) else tuple(str(i) for i in images),
        methods=tuple(m for m in METHODS if m in methods), grad_cam_layer=config["grad_cam_layer"],
        ig_steps=config["ig_steps"], ig_internal_batch=config["ig_internal_batch"],
        occlusion_window=config["occlusion_window"], occlusion_stride=config["occlusion_stride"],
        lime_segments=config["lime_segments"], lime_samples=config["lime_samples"], shap_references=config["shap_references"],
        batch_size=config["batch_size"], randomisation_pairs=config["randomisation_pairs"],
        randomisation_steps=config["randomisation_steps"], max_correlation=float(config["max_correlation"]),
        seed=int(config["seed"]), device=str(config["device"])), filled
