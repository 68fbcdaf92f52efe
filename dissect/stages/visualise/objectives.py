"""What the visualise stage maximises: a unit of a layer, an output class, or a whole layer (deep dream).

A ``Target`` names one objective. Every row of an optimised batch has its own
target, and every target of a batch reads the same layer (``layer``; None for
the model's output), so one forward pass, stopped once that layer has run,
gives every row's value:

==========  ==================================  ============================================
kind        layer output                        objective of row b
==========  ==================================  ============================================
unit        (B, U, h, w) map, ``mean``          mean over (h, w) of channel ``index``
unit        (B, U, h, w) map, ``centre``        channel ``index`` at (h // 2, w // 2)
unit        (B, D) or (B, D, 1, 1) vector       element ``index``
class       (B, K) logits (the model's output)  logit ``index`` (pre-softmax, Simonyan et al. 2014)
layer       any                                 squared L2 norm of the row's activations
==========  ==================================  ============================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dissect.errors import ConfigError
from dissect.stages.attribute.model import PreparedModel


@dataclass(frozen=True)
class Target:
    """One objective: ``kind`` (unit, class, layer), the ``layer`` it reads (None: the output), ``index`` (unit or class)."""

    kind: str
    layer: str | None
    index: int | None = None


class _StopForward(Exception):
    """Raised from a hook once the objective's layer has run, to skip the rest of the forward pass."""


def layer_output(model: PreparedModel, layer: str | None, x: torch.Tensor) -> torch.Tensor:
    """The output of ``layer`` (None: the model's output) on (B, 3, S, S) normalised images, gradients kept."""
    if layer is None:
        return model(x)
    recorded: list[torch.Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        recorded.append(output)
        raise _StopForward

    handle = model.layer(layer).register_forward_hook(hook)
    try:
        model(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not recorded or not isinstance(recorded[0], torch.Tensor):
        raise ConfigError(f"visualise: layer {layer!r} gives no tensor in the forward pass; choose a layer "
                          "whose output is a (N, U, h, w) or (N, U) tensor")
    return recorded[0]


def objective_values(output: torch.Tensor, targets: list[Target], unit_objective: str) -> torch.Tensor:
    """(B,) objective of each row of ``output`` (the targets' layer output, B rows) for its target."""
    values = []
    for row, target in enumerate(targets):
        out = output[row]
        if target.kind == "layer":
            values.append(out.float().pow(2).sum())
        elif out.ndim == 3 and out.shape[1:] != (1, 1):
            channel = out[target.index]
            if unit_objective == "centre":
                values.append(channel[channel.shape[0] // 2, channel.shape[1] // 2])
            else:
                values.append(channel.mean())
        else:
            values.append(out.flatten()[target.index])
    return torch.stack(values).float()


def objective(model: PreparedModel, x: torch.Tensor, targets: list[Target], unit_objective: str) -> torch.Tensor:
    """(B,) objective values of (B, 3, S, S) normalised images, one target per row (all reading one layer)."""
    layers = {target.layer for target in targets}
    if len(layers) != 1:
        raise ValueError(f"the targets of one batch must read one layer, got {sorted(map(str, layers))}")
    return objective_values(layer_output(model, targets[0].layer, x), targets, unit_objective)


def output_size(model: PreparedModel, layer: str | None, input_size: int, device: torch.device) -> int:
    """The number of units (channels or elements) of ``layer``'s output, or of classes when ``layer`` is None."""
    with torch.no_grad():
        output = layer_output(model, layer, torch.zeros(1, 3, input_size, input_size, device=device))
    return int(output.shape[1])
