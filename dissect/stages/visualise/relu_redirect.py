"""Gradients through ReLUs that are off: the "redirected ReLU gradient" of Lucid's ``render_vis``.

Started from a near-grey image, a unit after a ReLU (or one that reads only
ReLU'd inputs) is often off everywhere, its gradient exactly zero, and plain
gradient ascent never moves. Inside ``with RedirectedReLUs():`` every ReLU
call of the forward pass gets a backward rule that, for each batch row whose
ordinary ReLU gradient is all zero, lets the gradient through where it would
*raise* the ReLU's input (``grad_output < 0``: descending the negated
objective raises it), and blocks it where it would push an off input further
down. Rows with any ordinary gradient keep it unchanged, so the rule only
helps a row out of the flat region and never changes a row that has a
gradient; rows stay independent. A unit with zero weights still gets a zero
input gradient, so dead units stay flat. ReLUs are intercepted as functions,
call by call, as in ``dissect.stages.attribute.guided_relu``.
"""

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from dissect.stages.attribute.guided_relu import IN_PLACE, OUT_OF_PLACE


class _RedirectedReLU(torch.autograd.Function):
    """ReLU forward (in place when asked); the redirected backward pass (module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, in_place: bool) -> torch.Tensor:
        if in_place:
            output = x.clamp_(min=0)
            ctx.mark_dirty(x)
        else:
            output = x.clamp(min=0)
        ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (output,) = ctx.saved_tensors
        off = output <= 0
        ordinary = grad_output * ~off
        redirected = grad_output * ~(off & (grad_output > 0))
        if ordinary.ndim == 0:
            return (ordinary if bool(ordinary != 0) else redirected), None
        has_gradient = ordinary.flatten(1).abs().amax(1) > 0  # (B,)
        shape = (-1,) + (1,) * (ordinary.ndim - 1)
        return torch.where(has_gradient.view(shape), ordinary, redirected), None


class RedirectedReLUs(TorchFunctionMode):
    """Inside ``with RedirectedReLUs():`` every ReLU call has the redirected backward rule; forward values unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        if func in OUT_OF_PLACE or func in IN_PLACE:
            in_place = func in IN_PLACE or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
            return _RedirectedReLU.apply(args[0], in_place)
        return func(*args, **kwargs)
