"""Build the vision model to dissect from a Hydra model config.

A model config names the model and says where it comes from:

* ``source: torchvision`` builds ``arch`` with torchvision's model builders, with
  torchvision ``weights`` (resolved, downloaded and cached by torchvision itself) or
  from a local ``checkpoint``;
* ``source: target`` instantiates any ``nn.Module`` from the Hydra ``_target_``
  config in ``module``, optionally loading a local ``checkpoint``.

It also carries the preprocessing the model expects (``input_size``, ``mean``,
``std``). Nothing is downloaded at import time.
"""

from __future__ import annotations

import difflib
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import hydra.utils
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchvision.models import WeightsEnum

from dissect.errors import DissectError

SOURCES = ("torchvision", "target")
CONFIG_KEYS = (
    "name",
    "source",
    "arch",
    "weights",
    "checkpoint",
    "num_classes",
    "module",
    "builder_kwargs",
    "input_size",
    "mean",
    "std",
    "default_layers",
    "embed_layer",
)
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")

# Builder arguments that make some torchvision architectures build quietly without
# torchvision weights. GoogLeNet and Inception v3 warn unless init_weights is given;
# GoogLeNet's auxiliary heads are dropped when torchvision loads its own weights, so
# they are left out here too.
_RANDOM_INIT_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"init_weights": True},
}
# Auxiliary classifier heads (only used in training mode) of the architectures
# above; when loading a checkpoint they are built exactly when it holds them.
_AUX_HEADS: dict[str, tuple[str, ...]] = {
    "googlenet": ("aux1", "aux2"),
    "inception_v3": ("AuxLogits",),
}
# Old DenseNet checkpoints name 'norm.1' what torchvision now calls 'norm1'.
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)
_N_KEYS_SHOWN = 5


class ModelLoadError(DissectError):
    """The model config cannot be turned into a model."""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to dissect, with the preprocessing it expects.

    Attributes:
        module: the model, in eval mode (``requires_grad`` left as built).
        name: the model's name from the config.
        input_size: side S of the square (3, S, S) images the model takes.
        mean: per-channel RGB mean used to normalise inputs in [0, 1].
        std: per-channel RGB standard deviation used to normalise inputs.
        description: JSON-serialisable record of how the model was built.
    """

    module: nn.Module
    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: dict[str, Any]


def load_model(cfg: Mapping[str, Any]) -> LoadedModel:
    """Build the model described by a model config, in eval mode.

    Args:
        cfg: an OmegaConf/Hydra model config or a plain mapping with the keys in
            ``CONFIG_KEYS``: ``name``, ``source`` ('torchvision' or 'target'),
            ``arch`` and ``weights`` (torchvision), ``checkpoint`` (local file or
            null), ``num_classes`` and ``builder_kwargs`` (extra arguments of the
            torchvision builder), ``module`` (Hydra ``_target_`` config for source
            'target'), ``input_size``, ``mean``, ``std``; ``default_layers`` and
            ``embed_layer`` are used by the stages, not here.

    Returns:
        The model with its preprocessing and a description of how it was built.

    Raises:
        ModelLoadError: when the config is invalid or the model, its weights or
            its checkpoint cannot be loaded.
    """
    config = _as_dict(cfg)
    name = config.get("name")
    if not isinstance(name, str) or not name:
        raise ModelLoadError(f"model.name must be a non-empty string, got {name!r}.")
    input_size = _input_size(config.get("input_size"))
    mean = _rgb_triple("mean", config.get("mean"), positive=False)
    std = _rgb_triple("std", config.get("std"), positive=True)
    checkpoint = _checkpoint_path(config.get("checkpoint"))

    source = config.get("source")
    if source == "torchvision":
        module, description = _build_torchvision(config, checkpoint)
    elif source == "target":
        module, description = _build_target(config, checkpoint)
    else:
        raise ModelLoadError(f"model.source must be one of {list(SOURCES)}, got {source!r}.")

    module.eval()
    description.update(
        checkpoint=None if checkpoint is None else str(checkpoint),
        input_size=input_size,
        mean=list(mean),
        std=list(std),
    )
    return LoadedModel(
        module=module,
        name=name,
        input_size=input_size,
        mean=mean,
        std=std,
        description=description,
    )


def _as_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Return the config as a plain dict with interpolations resolved, checking its keys."""
    if isinstance(cfg, DictConfig):
        config = OmegaConf.to_container(cfg, resolve=True)
    elif isinstance(cfg, Mapping):
        config = dict(cfg)
    else:
        raise ModelLoadError(f"The model config must be a mapping, got {type(cfg).__name__}.")
    unknown = sorted(str(key) for key in config if key not in CONFIG_KEYS)
    if unknown:
        raise ModelLoadError(
            f"Unknown model config key(s) {unknown}; allowed keys are {list(CONFIG_KEYS)}."
        )
    return config


def _input_size(value: Any) -> int:
    """Validate ``input_size``: a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelLoadError(f"model.input_size must be a positive int, got {value!r}.")
    return value


def _rgb_triple(key: str, value: Any, positive: bool) -> tuple[float, float, float]:
    """Validate ``mean`` or ``std``: a list of 3 floats (positive ones for ``std``)."""
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        and (not positive or all(v > 0 for v in value))
    )
    if not ok:
        kind = "positive numbers" if positive else "numbers"
        raise ModelLoadError(f"model.{key} must be a list of 3 {kind} (R, G, B), got {value!r}.")
    return (float(value[0]), float(value[1]), float(value[2]))


def _checkpoint_path(value: Any) -> str | None:
    """Resolve ``checkpoint`` to an absolute path of an existing file, or None."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ModelLoadError(f"model.checkpoint must be a file path or null, got {value!r}.")
    path = hydra.utils.to_absolute_path(os.path.expanduser(value))
    if not os.path.isfile(path):
        raise ModelLoadError(f"model.checkpoint file {path!r} does not exist.")
    return path


def _reject_keys(config: dict[str, Any], keys: tuple[str, ...], source: str) -> None:
    """Raise if any of ``keys`` is set (not null) for a source that does not use it."""
    set_keys = [key for key in keys if config.get(key) is not None]
    if set_keys:
        raise ModelLoadError(
            f"model.{set_keys[0]} is not used with model.source={source!r}; set it to null."
        )


def _build_torchvision(
    config: dict[str, Any], checkpoint: str | None
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a torchvision classifier from weights, a checkpoint or random init."""
    _reject_keys(config, ("module",), "torchvision")
    arch = _torchvision_arch(config.get("arch"))
    num_classes = config.get("num_classes")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0
    ):
        raise ModelLoadError(f"model.num_classes must be a positive int or null, got {num_classes!r}.")
    user_kwargs = config.get("builder_kwargs") or {}
    if not isinstance(user_kwargs, dict):
        raise ModelLoadError(f"model.builder_kwargs must be a mapping or null, got {user_kwargs!r}.")

    weights_name = config.get("weights")
    description: dict[str, Any] = {"source": "torchvision", "arch": arch, "num_classes": num_classes}
    if weights_name is not None:
        if checkpoint is not None:
            raise ModelLoadError(
                f"model.weights={weights_name!r} and model.checkpoint={checkpoint!r} are both set; "
                "set model.weights=null to load the checkpoint."
            )
        weights = _torchvision_weights(arch, weights_name)
        kwargs = dict(user_kwargs)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        module = _get_model(arch, weights, kwargs)
        description["weights"] = f"{type(weights).__name__}.{weights.name}"
        return module, description

    state_dict = None if checkpoint is None else _read_state_dict(checkpoint, arch)
    kwargs = {**_builder_quirks(arch, state_dict), **user_kwargs}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    module = _get_model(arch, None, kwargs)
    if state_dict is not None:
        _load_state_dict(module, state_dict, checkpoint, "model.num_classes")
        if arch == "googlenet" and "aux_logits" not in user_kwargs:
            _drop_googlenet_aux(module)
    description["weights"] = None
    return module, description


def _torchvision_arch(arch: Any) -> str:
    """Check that ``arch`` names a torchvision classification model."""
    allowed = torchvision.models.list_models(module=torchvision.models)
    if arch in allowed:
        return arch
    close = difflib.get_close_matches(str(arch), allowed, n=5, cutoff=0.5)
    hint = f" Did you mean {close}?" if close else ""
    raise ModelLoadError(
        f"Unknown torchvision architecture model.arch={arch!r}.{hint} Allowed: {allowed}."
    )


def _torchvision_weights(arch: str, weights_name: Any) -> WeightsEnum:
    """Resolve a weights name ('IMAGENET1K_V1', 'DEFAULT' or 'ResNet18_Weights.DEFAULT')."""
    weights_enum = torchvision.models.get_model_weights(arch)
    allowed = list(weights_enum.__members__)
    short = str(weights_name).removeprefix(weights_enum.__name__ + ".")
    if short not in weights_enum.__members__:
        raise ModelLoadError(
            f"Unknown weights model.weights={weights_name!r} for {arch!r}; "
            f"allowed: {allowed} or null for random initialisation."
        )
    return weights_enum[short]


def _get_model(arch: str, weights: WeightsEnum | None, kwargs: dict[str, Any]) -> nn.Module:
    """Call torchvision's builder, turning download and argument errors into ModelLoadError."""
    try:
        return torchvision.models.get_model(arch, weights=weights, **kwargs)
    except OSError as error:  # urllib's URLError and socket errors are OSErrors
        if weights is None:
            raise
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise ModelLoadError(
            f"Could not download the weights {type(weights).__name__}.{weights.name} for {arch!r} "
            f"from {weights.url} ({type(error).__name__}: {error}) and they are not in the "
            f"torch hub cache at {cached}; put the file there, or set "
            "model.checkpoint=/path/to/file.pth (with model.weights=null), or set "
            "model.weights=null for a randomly initialised model."
        ) from error
    except (TypeError, ValueError) as error:
        raise ModelLoadError(
            f"torchvision could not build {arch!r} with arguments {kwargs}: {error}"
        ) from error


def _builder_quirks(arch: str, state_dict: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """Builder arguments for ``arch`` without torchvision weights, given the checkpoint if any."""
    heads = _AUX_HEADS.get(arch)
    if heads is None:
        return {}
    if state_dict is None:
        return _RANDOM_INIT_KWARGS[arch]
    # The checkpoint overwrites the (slow) initialisation.
    has_aux = any(key.split(".")[0] in heads for key in state_dict)
    return {"aux_logits": has_aux, "init_weights": False}


def _drop_googlenet_aux(module: nn.Module) -> None:
    """Remove GoogLeNet's training-only auxiliary heads, as torchvision does for its weights."""
    module.aux_logits = False
    module.aux1 = None
    module.aux2 = None


def _build_target(config: dict[str, Any], checkpoint: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """Instantiate an ``nn.Module`` from a Hydra ``_target_`` config, then load a checkpoint."""
    _reject_keys(config, ("arch", "weights", "num_classes", "builder_kwargs"), "target")
    module_cfg = config.get("module")
    if not isinstance(module_cfg, dict) or "_target_" not in module_cfg:
        raise ModelLoadError(
            "model.module must be a Hydra config with a '_target_' key "
            f"(e.g. {{_target_: my_package.MyNet}}) for model.source='target', got {module_cfg!r}."
        )
    target = module_cfg["_target_"]
    try:
        module = hydra.utils.instantiate(module_cfg)
    except Exception as error:  # Hydra wraps any import or constructor error
        raise ModelLoadError(f"Could not instantiate model.module {target!r}: {error}") from error
    if not isinstance(module, nn.Module):
        raise ModelLoadError(
            f"model.module {target!r} built a {type(module).__name__}, not a torch.nn.Module."
        )
    if checkpoint is not None:
        _load_state_dict(module, _read_state_dict(checkpoint, arch=None), checkpoint, "model.module.num_classes")
    return module, {"source": "target", "target": target, "weights": None, "num_classes": None}


def _read_state_dict(path: str, arch: str | None) -> dict[str, torch.Tensor]:
    """Read a state_dict from a checkpoint file, normalising DataParallel and old key names.

    Accepts a bare state_dict or a dict holding one under one of ``STATE_DICT_KEYS``.
    """
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise ModelLoadError(
            f"Could not read checkpoint {path!r} with torch.load(weights_only=True): {error}. "
            "If it holds a whole pickled model, re-save it with torch.save(model.state_dict(), path)."
        ) from error
    state_dict = content
    if isinstance(content, Mapping):
        for key in STATE_DICT_KEYS:
            if isinstance(content.get(key), Mapping):
                state_dict = content[key]
                break
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state_dict.values()
    ):
        found = list(content)[:_N_KEYS_SHOWN] if isinstance(content, Mapping) else type(content).__name__
        raise ModelLoadError(
            f"Checkpoint {path!r} is neither a state_dict (names to tensors) nor a dict holding one "
            f"under one of {list(STATE_DICT_KEYS)}; found {found}."
        )
    keys = {_strip_data_parallel(key): key for key in state_dict}
    if arch is not None and arch.startswith("densenet"):
        keys = {_OLD_DENSENET_KEY.sub(r"\1\2", new): old for new, old in keys.items()}
    return {new: state_dict[old] for new, old in keys.items()}


def _strip_data_parallel(key: str) -> str:
    """Drop the 'module' path components added by ``nn.DataParallel`` wrappers.

    Handles the whole model wrapped ('module.fc.weight') and a submodule wrapped
    ('features.module.0.weight', as in the Places365 AlexNet and VGG checkpoints).
    """
    return ".".join(part for part in key.split(".") if part != "module")


def _load_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor], path: str, classes_key: str) -> None:
    """Load ``state_dict`` strictly, summarising any mismatch in a ModelLoadError."""
    expected = module.state_dict()
    # BatchNorm fills in 'num_batches_tracked' missing from checkpoints saved by old PyTorch.
    missing = [
        key for key in expected if key not in state_dict and not key.endswith("num_batches_tracked")
    ]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in state_dict
        if key in expected and state_dict[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{len(items)} {label} {items[:_N_KEYS_SHOWN]}"
            for label, items in (
                ("missing key(s)", missing),
                ("unexpected key(s)", unexpected),
                ("shape mismatch(es)", mismatched),
            )
            if items
        ]
        raise ModelLoadError(
            f"Checkpoint {path!r} does not match {type(module).__name__}: {'; '.join(problems)}. "
            f"{_num_classes_hint(state_dict, expected, classes_key)}"
        )
    module.load_state_dict(state_dict, strict=True)


def _num_classes_hint(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], classes_key: str) -> str:
    """Suggest a value for ``classes_key`` (the config key of the class count) when the output size differs."""
    sizes = {
        int(state_dict[key].shape[0])
        for key in state_dict
        if key in expected
        and state_dict[key].ndim >= 1
        and state_dict[key].shape[0] != expected[key].shape[0]
        and state_dict[key].shape[1:] == expected[key].shape[1:]
    }
    if len(sizes) == 1:
        n_classes = sizes.pop()
        return f"If the checkpoint has {n_classes} classes, set {classes_key}={n_classes}."
    return f"Check the architecture, and {classes_key} if the checkpoint has a different number of classes."
