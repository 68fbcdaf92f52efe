"""Receptive fields of units: from layer geometry, with a gradient-based fallback.

A unit at map position (y, x) of a layer sees the input square of side ``size``
centred on ``(offset + y * stride, offset + x * stride)`` (model-input pixels;
the square may reach beyond the image, it is then clipped).

Geometry: when the modules executed up to the layer form a plain chain (each
consumes the previous one's output, as in AlexNet or VGG features), the field
follows from kernel size, stride, padding and dilation of every Conv2d and
pooling module on the way, with the usual recurrences
``size += (kernel - 1) * dilation * jump``, ``offset += ((kernel - 1) / 2 * dilation - padding) * jump``,
``jump *= stride``. Otherwise (residual or inception branches) the field is
measured: the bounding box of input pixels with a non-zero gradient for the
unit at the map's centre, over a few random inputs, and the stride is the input
size over the map size.
"""

from dataclasses import dataclass

import torch
from torch import nn

#: Modules that keep the spatial geometry (element-wise or per-channel).
GEOMETRY_NEUTRAL = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.BatchNorm2d,
                    nn.Dropout, nn.Dropout2d, nn.Identity, nn.LocalResponseNorm, nn.GroupNorm, nn.InstanceNorm2d)
#: Modules whose geometry is known: a kernel sliding with a stride.
SLIDING = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


@dataclass(frozen=True)
class ReceptiveField:
    """Side ``size``, ``stride`` between neighbouring units and ``offset`` (centre of unit (0, 0)), in input px."""

    size: float
    stride: float
    offset: float
    method: str

    def box(self, y: int, x: int, input_size: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) in input pixels of the field of the unit at (y, x), clipped to the image."""
        half = self.size / 2
        cy, cx = self.offset + y * self.stride, self.offset + x * self.stride
        top, left = max(0, round(cy - half + 0.5)), max(0, round(cx - half + 0.5))
        bottom, right = min(input_size, round(cy + half + 0.5)), min(input_size, round(cx + half + 0.5))
        return top, left, bottom, right


def _pair(value: int | tuple[int, ...]) -> int:
    """The single value of a square parameter; rectangular kernels are not handled by geometry."""
    if isinstance(value, tuple):
        if len(set(value)) != 1:
            raise ValueError("non-square kernel")
        return int(value[0])
    return int(value)


def geometry_field(modules: list[nn.Module]) -> ReceptiveField:
    """Receptive field of the output of a chain of sliding and geometry-neutral modules."""
    size, jump, offset = 1.0, 1.0, 0.5  # pixel centres at 0.5, 1.5, ...
    for module in modules:
        if isinstance(module, GEOMETRY_NEUTRAL):
            continue
        kernel, stride = _pair(module.kernel_size), _pair(module.stride)
        padding = _pair(module.padding) if not isinstance(module.padding, str) else None
        if padding is None:
            raise ValueError("string padding")
        dilation = _pair(module.dilation) if isinstance(module, (nn.Conv2d, nn.MaxPool2d)) else 1
        size += (kernel - 1) * dilation * jump
        offset += ((kernel - 1) / 2 * dilation - padding) * jump
        jump *= stride
    return ReceptiveField(size=size, stride=jump, offset=offset - 0.5, method="geometry")


def _executed_chain(model: nn.Module, layer: nn.Module, input_size: int) -> list[nn.Module] | None:
    """Leaf modules run up to ``layer`` if they form a plain chain of known geometry, else None."""
    order: list[tuple[nn.Module, int, int]] = []

    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
            order.append((module, inputs[0].data_ptr(), output.data_ptr()))

    leaves = [m for m in model.modules() if not list(m.children())]
    if not list(layer.children()):
        targets = [layer]
    else:
        targets = [m for m in layer.modules() if not list(m.children())]
    handles = [m.register_forward_hook(record) for m in leaves]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for handle in handles:
            handle.remove()
    last = max((k for k, (m, _, _) in enumerate(order) if m in targets), default=None)
    if last is None:
        return None
    chain = order[: last + 1]
    for (_, _, previous_out), (module, module_in, _) in zip(chain, chain[1:]):
        if module_in != previous_out:
            return None
    modules = [m for m, _, _ in chain]
    if not all(isinstance(m, SLIDING + GEOMETRY_NEUTRAL) for m in modules):
        return None
    return modules


def gradient_field(model: nn.Module, layer: nn.Module, input_size: int, trials: int = 3) -> ReceptiveField:
    """Measured field: the bounding box of input pixels that move the centre unit of ``layer``'s map."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.append(output))
    rows = torch.zeros(input_size, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    try:
        for _ in range(trials):
            captured.clear()
            image = torch.randn(1, 3, input_size, input_size, generator=generator, requires_grad=True)
            model(image)
            output = captured[0]
            h, w = output.shape[-2:]
            output[0, :, h // 2, w // 2].sum().backward()
            moved = image.grad.abs().sum(dim=(0, 1)) > 0
            rows |= moved.any(dim=1)
    finally:
        handle.remove()
    touched = torch.nonzero(rows).flatten()
    size = float(touched[-1] - touched[0] + 1)
    stride = input_size / h
    centre = float(touched[0] + touched[-1] + 1) / 2 - 0.5
    return ReceptiveField(size=size, stride=stride, offset=centre - (h // 2) * stride, method="gradient")


def receptive_field(model: nn.Module, layer: nn.Module, input_size: int) -> ReceptiveField:
    """The receptive field of ``layer``'s units: by geometry when the path is a plain chain, else measured."""
    chain = _executed_chain(model, layer, input_size)
    if chain is not None:
        try:
            return geometry_field(chain)
        except ValueError:
            pass
    was_training = model.training
    in_place = [m for m in model.modules() if getattr(m, "inplace", False)]
    model.eval()
    for module in in_place:  # an in-place op after the layer would rewrite the captured output
        module.inplace = False
    try:
        return gradient_field(model, layer, input_size)
    finally:
        model.train(was_training)
        for module in in_place:
            module.inplace = True
