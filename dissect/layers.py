"""Name the layers of a model and record their outputs with forward hooks.

Layers are named by their dotted path in the module tree, as in
``model.named_modules()``: ``features.10`` (AlexNet conv5), ``layer4.1.conv2``
(ResNet-18). ``layer_names(model)`` lists them all.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from dissect.errors import ConfigError

_N_CLOSE = 8


class UnknownLayerError(ConfigError):
    """A layer name does not name a submodule of the model."""


class _StopForward(Exception):
    """Raised from a hook to abort a forward pass once every layer is recorded."""


def layer_names(model: nn.Module) -> list[str]:
    """Dotted names of all submodules of ``model`` (the root excluded), in ``named_modules`` order."""
    return [name for name, _ in model.named_modules() if name]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule of ``model`` with dotted name ``name`` (e.g. ``layer4.1.conv2``).

    Raises:
        UnknownLayerError: if no submodule has that name; the message lists close
            names and the children of the deepest parent that exists.
    """
    module = model
    parent = ""
    for part in name.split("."):
        children = dict(module.named_children())
        if part not in children:
            raise UnknownLayerError(_unknown_layer_message(model, name, parent, children))
        module = children[part]
        parent = f"{parent}.{part}" if parent else part
    return module


def _unknown_layer_message(
    model: nn.Module, name: str, parent: str, children: dict[str, nn.Module]
) -> str:
    """Explain that ``name`` is unknown, listing close names and the children of ``parent``."""
    all_names = layer_names(model)
    close = difflib.get_close_matches(name, all_names, n=_N_CLOSE, cutoff=0.6)
    where = f"layer {parent!r}" if parent else "the model"
    child_names = [f"{parent}.{child}" if parent else child for child in children]
    return (
        f"Unknown layer {name!r} in {type(model).__name__}. "
        f"Close names: {close}. The children of {where} are: {child_names}. "
        f"dissect.layers.layer_names(model) lists all {len(all_names)} layer names."
    )


def layer_kind(output: torch.Tensor) -> str:
    """Kind of a layer output: 'map' for (N, C, h, w) feature maps with h * w > 1, 'vector' for (N, D)
    and for pooled (N, C, 1, 1) outputs."""
    if output.ndim == 4:
        return "vector" if output.shape[2:] == (1, 1) else "map"
    if output.ndim == 2:
        return "vector"
    raise ValueError(
        f"Layer output of shape {tuple(output.shape)} is neither a (N, C, h, w) feature map "
        "nor a (N, D) vector; choose a layer with one of these output shapes."
    )


class LayerRecorder:
    """Record the outputs of named layers of a model during its forward pass.

    Use as a context manager; hooks are registered on entry and removed on exit.
    After ``model(x)`` (or ``recorder.run(x)``), ``outputs[name]`` holds a detached
    copy of each layer's output, taken when the layer returns, so that later
    in-place operations (e.g. AlexNet's ``ReLU(inplace=True)`` after ``features.10``)
    do not change it. Each forward pass of the model starts a new recording.

    Example::

        with LayerRecorder(model, ["features.10", "classifier.4"], stop_early=True) as rec:
            outputs = rec.run(images)  # {"features.10": (N, 256, 13, 13), ...}

    Args:
        model: the model whose layers are recorded.
        layers: dotted layer names (see ``layer_names``), without duplicates.
        dtype: if given, outputs are cast to it (e.g. ``torch.float16`` to save memory).
        stop_early: if True, ``run`` aborts the forward pass as soon as every layer
            has been recorded, so later layers are not computed. A module reused
            later in the forward pass is then not detected.

    Raises:
        UnknownLayerError: if a layer name is unknown.
        TypeError: during the forward pass, if a layer's output is not a tensor.
        RuntimeError: during the forward pass, if a recorded module is called more
            than once in one forward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        dtype: torch.dtype | None = None,
        stop_early: bool = False,
    ) -> None:
        if isinstance(layers, str) or len(layers) == 0:
            raise ValueError(f"layers must be a non-empty sequence of layer names, got {layers!r}.")
        if len(set(layers)) != len(layers):
            repeated = sorted({name for name in layers if list(layers).count(name) > 1})
            raise ValueError(f"layers must not repeat names; repeated: {repeated}.")
        self.model = model
        self.layers = list(layers)
        self.modules = {name: get_layer(model, name) for name in self.layers}
        self.dtype = dtype
        self.stop_early = stop_early
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self._running = False

    def __enter__(self) -> LayerRecorder:
        if self._handles:
            raise RuntimeError("LayerRecorder is already active; it cannot be entered twice.")
        self._handles.append(self.model.register_forward_pre_hook(self._start_pass))
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run ``model(x)`` without gradients and return the recorded outputs.

        Args:
            x: model input, e.g. images of shape (N, 3, S, S).

        Returns:
            Layer name -> detached output copy, e.g. (N, C, h, w) or (N, D), in the
            order of ``layers``.
        """
        if not self._handles:
            raise RuntimeError(
                "LayerRecorder.run must be called inside a `with LayerRecorder(...)` block."
            )
        self._running = True
        try:
            with torch.no_grad():
                self.model(x)
        except _StopForward:
            pass
        finally:
            self._running = False
        not_run = [name for name in self.layers if name not in self.outputs]
        if not_run:
            raise RuntimeError(
                f"Layer(s) {not_run} were not called during the forward pass of "
                f"{type(self.model).__name__} (e.g. training-only heads in eval mode); "
                "choose layers that the forward pass uses."
            )
        return {name: self.outputs[name] for name in self.layers}

    def _start_pass(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook of the model: forget the outputs of the previous pass."""
        self.outputs = {}

    def _make_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        """Forward hook recording a copy of the output of layer ``name``."""

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"Layer {name!r} ({type(module).__name__}) returned a {type(output).__name__}, "
                    "not a tensor; choose a layer whose output is a single tensor "
                    "(e.g. one of its submodules)."
                )
            if name in self.outputs:
                raise RuntimeError(
                    f"Layer {name!r} ({type(module).__name__}) was called more than once in one "
                    "forward pass (a reused module), so its output is ambiguous; choose a layer "
                    "that is called once."
                )
            dtype = self.dtype if self.dtype is not None else output.dtype
            self.outputs[name] = output.detach().to(dtype=dtype, copy=True)
            if self.stop_early and self._running and len(self.outputs) == len(self.layers):
                raise _StopForward

        return hook
