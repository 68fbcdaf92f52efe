"""Tests of dissect.layers: layer names and the forward-hook LayerRecorder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from dissect.layers import LayerRecorder, UnknownLayerError, get_layer, layer_kind, layer_names


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


@pytest.fixture(scope="module")
def alexnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.alexnet().eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """(2, 3, 227, 227) random images."""
    return torch.randn(2, 3, 227, 227, generator=torch.Generator().manual_seed(1))


def test_layer_names_are_named_modules_without_root(resnet18: nn.Module) -> None:
    names = layer_names(resnet18)
    assert names[:4] == ["conv1", "bn1", "relu", "maxpool"]
    assert "layer4.1.conv2" in names and "" not in names
    assert len(names) == sum(1 for _ in resnet18.modules()) - 1


def test_get_layer_resolves_nested_names(resnet18: nn.Module, alexnet: nn.Module) -> None:
    assert get_layer(resnet18, "layer4.1.conv2") is resnet18.layer4[1].conv2
    assert get_layer(resnet18, "layer4") is resnet18.layer4
    assert get_layer(alexnet, "features.10") is alexnet.features[10]
    for name in layer_names(resnet18):
        assert get_layer(resnet18, name) is resnet18.get_submodule(name)


def test_unknown_layer_lists_siblings_and_close_names(resnet18: nn.Module) -> None:
    with pytest.raises(UnknownLayerError) as info:
        get_layer(resnet18, "layer4.9.conv2")
    message = str(info.value)
    assert "The children of layer 'layer4' are: ['layer4.0', 'layer4.1']" in message
    assert "'layer4.1.conv2'" in message and "'layer4.0.conv2'" in message
    assert "layer_names(model)" in message

    with pytest.raises(UnknownLayerError, match=r"Close names: \[.*'layer4.1.conv1'"):
        get_layer(resnet18, "layer4.1.conv3")
    with pytest.raises(UnknownLayerError, match=r"children of the model are: \['conv1', 'bn1'"):
        get_layer(resnet18, "")


def test_recorder_copies_output_before_inplace_relu(alexnet: nn.Module, images: torch.Tensor) -> None:
    # features.11 is ReLU(inplace=True): without a copy the conv5 output would be clipped.
    with LayerRecorder(alexnet, ["features.10", "classifier.4"]) as recorder:
        with torch.no_grad():
            logits = alexnet(images)
        outputs = recorder.outputs

    with torch.no_grad():
        conv5 = alexnet.features[:11](images)
        pool5 = F.max_pool2d(F.relu(conv5), kernel_size=3, stride=2)  # (2, 256, 6, 6)
        flat = torch.flatten(pool5, 1)
        fc1 = F.relu(F.linear(flat, alexnet.classifier[1].weight, alexnet.classifier[1].bias))
        fc2 = F.linear(fc1, alexnet.classifier[4].weight, alexnet.classifier[4].bias)
    assert outputs["features.10"].shape == (2, 256, 13, 13)
    torch.testing.assert_close(outputs["features.10"], conv5)
    assert (outputs["features.10"] < 0).any()
    torch.testing.assert_close(outputs["classifier.4"], fc2)
    assert (outputs["classifier.4"] < 0).any()
    fc3 = F.linear(F.relu(fc2), alexnet.classifier[6].weight, alexnet.classifier[6].bias)
    torch.testing.assert_close(fc3, logits)


def test_run_stop_early_matches_full_forward_and_skips_later_layers(
    resnet18: nn.Module, images: torch.Tensor
) -> None:
    layers = ["layer3.0.conv1", "layer2", "layer1.1.bn2"]
    with LayerRecorder(resnet18, layers) as recorder:
        full = recorder.run(images)
    fc_calls: list[int] = []
    handle = resnet18.fc.register_forward_hook(lambda m, a, o: fc_calls.append(1))
    try:
        with LayerRecorder(resnet18, layers, stop_early=True) as recorder:
            early = recorder.run(images)
            assert fc_calls == []  # the forward pass stopped before the classifier
            resnet18(images[:1])  # a direct call is not stopped
            assert fc_calls == [1]
    finally:
        handle.remove()
    assert list(early) == layers == list(full)
    for name in layers:
        torch.testing.assert_close(early[name], full[name], rtol=0, atol=0)
    with torch.no_grad():
        stem = resnet18.maxpool(F.relu(resnet18.bn1(resnet18.conv1(images))))
        torch.testing.assert_close(full["layer2"], resnet18.layer2(resnet18.layer1(stem)))


def test_dtype_cast_and_new_pass_replaces_outputs(resnet18: nn.Module, images: torch.Tensor) -> None:
    with LayerRecorder(resnet18, ["avgpool", "fc"], dtype=torch.float16) as recorder:
        first = recorder.run(images)
        with torch.no_grad():
            logits = resnet18(images[:1])  # each forward pass starts a new recording
        second = recorder.outputs
    assert first["fc"].dtype == torch.float16 and first["fc"].shape == (2, 1000)
    assert second["fc"].shape == (1, 1000)
    torch.testing.assert_close(second["fc"], logits.half())
    torch.testing.assert_close(first["fc"][:1], second["fc"])


class Reuse(nn.Module):
    """Applies the same block twice: (N, 4) -> (N, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.block(x)))


def test_reused_module_raises_naming_it() -> None:
    model = Reuse()
    with LayerRecorder(model, ["block"]) as recorder:
        with pytest.raises(RuntimeError, match=r"Layer 'block' \(Linear\) was called more than once"):
            recorder.run(torch.randn(3, 4))
    with LayerRecorder(model, ["head"]) as recorder:
        assert recorder.run(torch.randn(3, 4))["head"].shape == (3, 2)


class TupleOut(nn.Module):
    """Returns a (features, logits) tuple from (N, 4) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.body(x)


def test_non_tensor_output_raises_naming_layer() -> None:
    model = nn.Sequential()
    model.add_module("pair", TupleOut())
    with LayerRecorder(model, ["pair"]) as recorder:
        with pytest.raises(TypeError, match=r"Layer 'pair' \(TupleOut\) returned a tuple, not a tensor"):
            recorder.run(torch.randn(3, 4))


def test_layer_not_called_is_reported() -> None:
    model = torchvision.models.googlenet(aux_logits=True, init_weights=False).eval()
    with LayerRecorder(model, ["inception3a", "aux1.fc2"]) as recorder:
        with pytest.raises(RuntimeError, match=r"\['aux1.fc2'\] were not called"):
            recorder.run(torch.randn(1, 3, 64, 64))


def test_hooks_removed_on_exit_even_after_error(alexnet: nn.Module) -> None:
    def hook_counts() -> list[int]:
        return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in alexnet.modules()]

    before = hook_counts()
    with pytest.raises(ValueError, match="boom"):
        with LayerRecorder(alexnet, ["features.0", "classifier.6"]):
            assert sum(hook_counts()) == sum(before) + 3  # two layer hooks and a pre-hook
            raise ValueError("boom")
    assert hook_counts() == before
    recorder = LayerRecorder(alexnet, ["features.0"])
    with pytest.raises(RuntimeError, match="inside a `with LayerRecorder"):
        recorder.run(torch.randn(1, 3, 64, 64))


def test_recorder_validates_layer_list(alexnet: nn.Module) -> None:
    with pytest.raises(UnknownLayerError, match="features.13"):
        LayerRecorder(alexnet, ["features.13"])
    with pytest.raises(ValueError, match=r"repeated: \['features.0'\]"):
        LayerRecorder(alexnet, ["features.0", "features.0"])
    with pytest.raises(ValueError, match="non-empty sequence"):
        LayerRecorder(alexnet, "features.0")


def test_layer_kind() -> None:
    assert layer_kind(torch.zeros(2, 8, 5, 5)) == "map"
    assert layer_kind(torch.zeros(2, 8)) == "vector"
    assert layer_kind(torch.zeros(2, 8, 1, 1)) == "vector"  # a pooled output, e.g. ResNet avgpool
    with pytest.raises(ValueError, match=r"shape \(2, 197, 768\) is neither"):
        layer_kind(torch.zeros(2, 197, 768))
