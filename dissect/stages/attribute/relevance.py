"""Relevance methods: DeepLIFT's Rescale rule on every ReLU and max-pool call, and LRP through zennit.

DeepLIFT (Shrikumar et al. 2017) explains ``f(x) - f(x')`` against a reference
``x'``: the multiplier of each nonlinearity is ``delta out / delta in``
between the input and the reference instead of its gradient, so the map
``(x - x') * multiplier`` sums to ``f(x) - f(x')`` (summation to delta).
Captum's ``DeepLift`` sets those multipliers with hooks on ``nn.ReLU`` and
``nn.MaxPool2d`` modules, which misses ``F.relu`` (GoogLeNet, DenseNet) and
mixes the two calls of a ResNet block's reused ``self.relu`` (the module keeps
one input and one output). ``DeepLiftRules`` applies Captum's own rules
(``nonlinear`` for ReLU, ``maxpool`` for max pooling, eps 1e-10; overlapping pooling windows
add up their contributions, where Captum's unpooling keeps one) to the ReLU
and max-pool *functions* instead, call by call, like ``guided_relu``: the
input and the reference run as one doubled batch, and each call sees its own
pair of halves. On a network with one module per ReLU the maps equal Captum's
(``tests/test_attribute.py``). DeepLIFT-SHAP averages DeepLIFT over a set of
references (Captum's ``DeepLiftShap`` does the same): here the black image and
seeded uniform-noise images.

LRP (Bach et al. 2015) uses zennit's ``EpsilonPlusFlat`` composite, the
recommended rules for CNNs (Montavon et al. 2019, Kohlbrenner et al. 2020):
flat rule on the first layer, z+ on the other convolutions, epsilon on the
linear layers; batch normalisation is folded into the convolution before it
(zennit's canonizers) where the forward pass shows that it follows one, and a
torchvision ResNet block gets zennit's ResNet canonizer, which splits the
relevance of the residual sum in proportion to its two terms. Captum's
``LRP`` is not used: it needs every operation to be a module with a rule, so
it fails on ``F.relu``, on functional additions (ResNet) and on reused
modules. zennit's rules sit on the convolution and linear modules, and a ReLU
applied as a function passes relevance exactly as its rule would (the rules
give no relevance to a zero activation). In-place ReLU calls are made out of
place while either method runs.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer

from dissect.stages.attribute.guided_relu import IN_PLACE, OUT_OF_PLACE

#: Captum's threshold below which a delta counts as zero and the gradient is used instead.
EPS = 1e-10


def _halves_cat(tensor: torch.Tensor) -> torch.Tensor:
    """(2B, ...) -> the input half minus the reference half, repeated for both halves (2B, ...)."""
    first, second = tensor.chunk(2)
    return torch.cat([first - second] * 2)


class _RescaleReLU(torch.autograd.Function):
    """ReLU on a doubled batch (inputs, references); backward: Captum's ``nonlinear`` rule."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        output = x.clamp(min=0)
        ctx.save_for_backward(x, output)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        x, output = ctx.saved_tensors
        delta_in, delta_out = _halves_cat(x), _halves_cat(output)
        gradient = grad_output * (x > 0)
        return torch.where(delta_in.abs() < EPS, gradient, grad_output * delta_out / delta_in)


def _unpool_sum(values: torch.Tensor, indices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(N, C, h, w) values at max-pool ``indices`` (flat positions in each input plane) -> (N, C, H, W), summed.

    Where windows overlap (AlexNet's and ResNet's 3 x 3, stride 2) one input
    can be the maximum of several windows; its values add up. (Captum's
    ``max_unpool2d`` keeps one of them, which breaks summation to delta there.)
    """
    out = values.new_zeros(shape[0], shape[1], shape[2] * shape[3])
    return out.scatter_add_(2, indices.flatten(2), values.flatten(2)).reshape(shape)


class _RescaleMaxPool2d(torch.autograd.Function):
    """Max pooling on a doubled batch; backward: Captum's ``maxpool`` rule (unpooled output deltas / input deltas)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, kernel_size: Any, stride: Any, padding: Any, dilation: Any,
                ceil_mode: bool) -> torch.Tensor:
        output, indices = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
        ctx.save_for_backward(x, output, indices)
        ctx.pool = (kernel_size, stride, padding, dilation, ceil_mode)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, output, indices = ctx.saved_tensors
        kernel_size, stride, padding, dilation, ceil_mode = ctx.pool
        delta_in = _halves_cat(x)
        out, out_ref = output.chunk(2)
        cross_max = torch.max(out, out_ref)
        delta_out = torch.cat([cross_max - out_ref, out - cross_max])
        first, second = _unpool_sum(grad_output * delta_out, indices, x.shape).chunk(2)
        unpooled = torch.cat([first + second] * 2)
        with torch.enable_grad():  # the plain gradient of max pooling, used where the input delta is zero
            leaf = x.detach().requires_grad_(True)
            pooled = F.max_pool2d(leaf, kernel_size, stride, padding, dilation, ceil_mode)
            (gradient,) = torch.autograd.grad(pooled, leaf, grad_output)
        return torch.where(delta_in.abs() < EPS, gradient, unpooled / delta_in), None, None, None, None, None


class DeepLiftRules(TorchFunctionMode):
    """Inside ``with DeepLiftRules():`` every ReLU and max-pool call of a doubled batch gets DeepLIFT's multipliers.

    The batch is the inputs followed by their references (2B rows). In-place
    ReLU calls run out of place; the forward values are unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        if func in OUT_OF_PLACE or func in IN_PLACE:
            return _RescaleReLU.apply(args[0])
        if func is F.max_pool2d and not kwargs.get("return_indices", False) and len(args) <= 2:
            kernel_size = args[1] if len(args) > 1 else kwargs["kernel_size"]
            stride = kwargs.get("stride") or kernel_size
            return _RescaleMaxPool2d.apply(args[0], kernel_size, stride, kwargs.get("padding", 0),
                                           kwargs.get("dilation", 1), kwargs.get("ceil_mode", False))
        return func(*args, **kwargs)


class OutOfPlaceReLUs(TorchFunctionMode):
    """Inside ``with OutOfPlaceReLUs():`` in-place ReLU calls (``F.relu(x, inplace=True)``, ``relu_``) run out of place."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        if func in OUT_OF_PLACE or func in IN_PLACE:
            return torch.relu(args[0])
        return func(*args, **(kwargs or {}))


def deeplift(module: nn.Module, inputs: torch.Tensor, references: torch.Tensor, targets: torch.Tensor
             ) -> torch.Tensor:
    """(B, 3, S, S) inputs and references, (B,) targets of ``module``'s (B, T) output -> (B, 3, S, S) DeepLIFT map.

    The map sums to ``f(x)[target] - f(x')[target]`` when every nonlinearity
    is a ReLU or a max pooling and the output is linear in them (a class logit);
    a unit's spatial maximum is differentiated as the gradient does.
    """
    both = torch.cat([inputs, references]).detach().requires_grad_(True)
    with torch.enable_grad(), DeepLiftRules():
        output = module(both)
    # the target of both halves, as Captum: the max-pool rule adds up the gradients of the two halves
    rows = torch.arange(len(both), device=output.device)
    selected = output[rows, targets.repeat(2)].sum()
    gradient = torch.autograd.grad(selected, both)[0][:len(inputs)]
    return (inputs - references) * gradient


def deeplift_shap(module: nn.Module, inputs: torch.Tensor, references: torch.Tensor, targets: torch.Tensor
                  ) -> torch.Tensor:
    """(B, 3, S, S) inputs, (K, 3, S, S) references -> (B, 3, S, S): DeepLIFT averaged over the K references."""
    maps = [deeplift(module, inputs, reference.expand_as(inputs), targets) for reference in references]
    return torch.stack(maps).mean(0)


def shap_references(black: torch.Tensor, count: int, seed: int, normalise: Any) -> torch.Tensor:
    """(count, 3, S, S): the black image ``black`` (1, 3, S, S) and count - 1 seeded uniform-noise images, normalised."""
    generator = torch.Generator().manual_seed(seed)
    size = black.shape[-1]
    noise = torch.randint(0, 256, (count - 1, 3, size, size), generator=generator, dtype=torch.uint8)
    return torch.cat([black, normalise(noise.to(black.device))])


def batch_norm_follows_linear(module: nn.Module, example: torch.Tensor) -> bool:
    """Whether every BatchNorm of ``module`` takes, as its input, the output of the conv or linear module called just before it.

    zennit's ``SequentialMergeBatchNorm`` folds a BatchNorm into the module
    before it in registration order; that is right only where the data flows
    so (not in DenseNet, whose BatchNorms follow a concatenation).
    """
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def record(mod: nn.Module, args: Any, output: Any) -> None:
        if isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            calls.append((mod, args[0], output))

    linear = (nn.Conv2d, nn.Linear)
    handles = [m.register_forward_hook(record) for m in module.modules()
               if isinstance(m, (*linear, nn.modules.batchnorm._BatchNorm))]
    try:
        with torch.no_grad(), OutOfPlaceReLUs():
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    for k, (mod, given, _) in enumerate(calls):
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if k == 0 or not isinstance(calls[k - 1][0], linear) or calls[k - 1][2] is not given:
                return False
    return True


#: Per model, the canonizers LRP uses (chosen by one forward pass of one image, once per model).
_CANONIZERS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def canonizers(net: nn.Module, example: torch.Tensor) -> list[Any]:
    """zennit's canonizers for ``net``: ResNet's for a torchvision ResNet, BatchNorm folding where it follows a
    conv or linear module in the forward pass of ``example`` (1, 3, S, S), else none (BatchNorm then passes
    relevance unchanged)."""
    if net not in _CANONIZERS:
        _CANONIZERS[net] = ("resnet" if isinstance(net, torchvision.models.ResNet) else
                            "merge" if batch_norm_follows_linear(net, example) else "none")
    return {"resnet": [ResNetCanonizer()], "merge": [SequentialMergeBatchNorm()], "none": []}[_CANONIZERS[net]]


def lrp(module: nn.Module, net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) inputs, (B,) targets -> (B, 3, S, S) LRP relevance (EpsilonPlusFlat) of ``module``'s output.

    ``net`` is the model inside ``module`` (the canonizers are chosen for it).
    The relevance at the output is the explained score itself, so the map sums
    to it where every rule conserves (no biases: biases and epsilon absorb some).
    """
    composite = EpsilonPlusFlat(canonizers=canonizers(net, inputs[:1]))
    x = inputs.detach().requires_grad_(True)
    with torch.enable_grad(), composite.context(module), OutOfPlaceReLUs():
        output = module(x)
        rows = torch.arange(len(x), device=output.device)
        seed = torch.zeros_like(output)
        seed[rows, targets] = output[rows, targets].detach()
        (relevance,) = torch.autograd.grad(output, x, seed)
    return relevance
