"""The model as the methods see it: a prepared copy, the explained layer's unit maxima, forward-pass order."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from dissect.layers import get_layer
from dissect.stages.attribute.errors import AttributionError


class _StopForward(Exception):
    """Raised from a hook once the explained layer has run, to skip the rest of the forward pass."""


class PreparedModel(nn.Module):
    """A model ready for attribution (see ``prepare_model``); layer names are those of ``net``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised images -> the model's output."""
        return self.net(x)

    def layer(self, name: str) -> nn.Module:
        """The submodule of the model named ``name`` (dotted, as in ``named_modules``)."""
        return get_layer(self.net, name)


def call_counts(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Run ``model`` once on ``example``: calls per module name, in first-call order.

    Names are dotted paths of ``model.named_modules()``; the root is left out.
    """
    counts: dict[str, int] = {}

    def counter(name: str) -> Callable[[nn.Module, Any, Any], None]:
        return lambda module, args, output: counts.__setitem__(name, counts.get(name, 0) + 1)

    handles = [module.register_forward_hook(counter(name)) for name, module in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def prepare_model(model: nn.Module) -> PreparedModel:
    """A copy of ``model`` on which every method is correct, in eval mode, parameters frozen, channels-last.

    Convolution weights are stored channels-last (with channels-last inputs,
    ``compute_maps``, a forward and backward pass of a convolutional network
    runs about 1.5x faster on the CPU). The ``inplace`` flag of every module is
    turned off, so that layer methods see the outputs they record unchanged.
    """
    net = copy.deepcopy(model).eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    for module in net.modules():
        if getattr(module, "inplace", None) is True:
            module.inplace = False
    return PreparedModel(net).to(memory_format=torch.channels_last)


class UnitMaxima(nn.Module):
    """The maxima of a layer's units: (N, 3, S, S) -> (N, U), the spatial max of each (N, U, h, w) map.

    The forward pass stops once the layer has run; a (N, D) vector layer is
    returned as it is. The hook is registered at each call, after any hook of
    Captum's, so it sees (and ends) the output Captum's layer methods record.
    """

    def __init__(self, model: PreparedModel, layer: str) -> None:
        super().__init__()
        self.model = model
        self.layer_name = layer
        model.layer(layer)  # an unknown name fails here; not kept as an attribute, which would register it twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recorded: list[torch.Tensor] = []

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            recorded.append(output)
            raise _StopForward

        handle = self.model.layer(self.layer_name).register_forward_hook(hook)
        try:
            self.model(x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not recorded:
            raise AttributionError(f"layer {self.layer_name!r} was not called in the forward pass")
        output = recorded[0]
        if not isinstance(output, torch.Tensor) or output.ndim not in (2, 4):
            raise AttributionError(f"layer {self.layer_name!r} gives {type(output).__name__} "
                                   f"{getattr(output, 'shape', '')}; units need a (N, U, h, w) or (N, U) tensor")
        return output.amax(dim=(2, 3)) if output.ndim == 4 else output


@dataclass(frozen=True)
class Explained:
    """What the methods explain: ``module`` maps (N, 3, S, S) to (N, T) scores; ``grad_cam_layer`` lies inside it."""

    module: nn.Module
    grad_cam_layer: nn.Module | None


def explained(model: PreparedModel, layer: str | None, grad_cam_layer: str | None) -> Explained:
    """The scores of ``layer``'s units (``UnitMaxima``), or the model's outputs when ``layer`` is None."""
    module = model if layer is None else UnitMaxima(model, layer)
    return Explained(module, None if grad_cam_layer is None else model.layer(grad_cam_layer))


def forward_order(model: PreparedModel, example: torch.Tensor) -> list[str]:
    """Names of the modules of ``model.net`` in the order of their first call on ``example``."""
    return list(call_counts(model.net, example))


def last_conv(model: PreparedModel, example: torch.Tensor) -> str | None:
    """The last Conv2d called in the forward pass (the default Grad-CAM layer of classes), None if none."""
    modules = dict(model.net.named_modules())
    convs = [name for name in forward_order(model, example) if isinstance(modules[name], nn.Conv2d)]
    return convs[-1] if convs else None


def check_grad_cam_layers(pairs: pd.DataFrame, order: list[str]) -> None:
    """Unit layers and Grad-CAM layers must run in the forward pass, a Grad-CAM layer no later than its unit layer."""
    for layer, grad_cam_layer in pairs[["layer", "grad_cam_layer"]].drop_duplicates().itertuples(index=False):
        if layer and layer not in order:
            raise AttributionError(f"layer {layer!r} is not called in the forward pass of the model")
        if grad_cam_layer and grad_cam_layer not in order:
            raise AttributionError(f"attribute.grad_cam_layer={grad_cam_layer!r} is not called in the forward pass")
        if layer and grad_cam_layer and order.index(grad_cam_layer) > order.index(layer):
            raise AttributionError(f"attribute.grad_cam_layer={grad_cam_layer!r} runs after the unit layer "
                                   f"{layer!r}; choose a layer at or before it, or null for the unit's own layer")
