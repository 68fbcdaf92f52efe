"""The backward rules of the guided methods, applied to every ReLU of a forward pass.

Deconvolution (Zeiler and Fergus 2014) and guided backpropagation
(Springenberg et al. 2015) are the input gradient of a target with the
backward pass of each ReLU replaced:

- guided backpropagation: ``grad_in = max(grad_out, 0) * (output > 0)``;
- deconvolution: ``grad_in = max(grad_out, 0)`` (the forward mask is ignored).

Captum implements both with backward hooks on ``nn.ReLU`` modules, so it
misses ReLUs applied as functions (``F.relu`` in torchvision's GoogLeNet and
DenseNet) and mixes the calls of a module used twice (the ``self.relu`` of a
torchvision ResNet block). ``GuidedReLUs`` instead intercepts the ReLU
*functions* through ``torch.overrides.TorchFunctionMode``: ``nn.ReLU`` modules
call ``F.relu`` too, so every ReLU of the forward pass, whichever way it is
applied and however often a module is reused, gets the rule, call by call.
"""

from typing import Any

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

RULES = ("guided_backprop", "deconvolution")
#: The ReLU functions of torch; ``nn.ReLU.forward`` calls ``F.relu``.
OUT_OF_PLACE = frozenset({F.relu, torch.relu, torch.Tensor.relu})
IN_PLACE = frozenset({torch.relu_, torch.Tensor.relu_})


class _RuleReLU(torch.autograd.Function):
    """ReLU forward (in place when asked); the backward pass of ``rule`` (one of ``RULES``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rule: str, in_place: bool) -> torch.Tensor:
        if in_place:
            output = x.clamp_(min=0)
            ctx.mark_dirty(x)
        else:
            output = x.clamp(min=0)
        ctx.rule = rule
        ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad_output.clamp(min=0)
        if ctx.rule == "guided_backprop":  # deconvnet ignores the forward mask
            (output,) = ctx.saved_tensors
            grad = grad * (output > 0)
        return grad, None, None


class GuidedReLUs(TorchFunctionMode):
    """Inside ``with GuidedReLUs(rule):`` every ReLU call has the backward rule ``rule`` (one of ``RULES``).

    The forward values are those of ReLU, so outputs are unchanged; only
    gradients through ReLUs change. ``F.relu(x, inplace=True)``,
    ``torch.relu_`` and ``Tensor.relu_`` stay in place.
    """

    def __init__(self, rule: str) -> None:
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"rule={rule!r}; allowed: {', '.join(RULES)}")
        self.rule = rule

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        if func in OUT_OF_PLACE or func in IN_PLACE:
            in_place = func in IN_PLACE or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
            return _RuleReLU.apply(args[0], self.rule, in_place)
        return func(*args, **kwargs)


#: Rectifier-like activations other than ReLU, for which the guided rules are not defined.
OTHER_ACTIVATIONS = {F.relu6: "relu6", F.hardtanh: "hardtanh", F.leaky_relu: "leaky_relu", F.prelu: "prelu",
                     F.elu: "elu", F.selu: "selu", F.celu: "celu", F.gelu: "gelu", F.silu: "silu",
                     F.mish: "mish", F.hardswish: "hardswish", F.softplus: "softplus"}


class _ActivationCensus(TorchFunctionMode):
    """Counts the calls of ``OTHER_ACTIVATIONS`` in a forward pass (``nn`` activation modules call them too)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        name = OTHER_ACTIVATIONS.get(func)
        if name:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def other_activations(model: torch.nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Calls per activation function other than ReLU in the forward pass of ``example`` (N, 3, S, S); {} if none."""
    with _ActivationCensus() as census, torch.no_grad():
        model(example)
    return census.calls
