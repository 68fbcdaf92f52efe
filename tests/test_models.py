"""Tests of dissect.models.load_model (no network: weights come from files made here)."""

from __future__ import annotations

import json
import os
import urllib.error
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.hub
import torchvision
from omegaconf import OmegaConf
from torch import nn

from dissect.models import LoadedModel, ModelLoadError, load_model

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def tv_config(arch: str, input_size: int = 224, **overrides: Any) -> dict[str, Any]:
    """A torchvision model config with random init unless overridden."""
    config: dict[str, Any] = {
        "name": arch,
        "source": "torchvision",
        "arch": arch,
        "weights": None,
        "checkpoint": None,
        "input_size": input_size,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "default_layers": ["whatever"],
    }
    config.update(overrides)
    return config


def assert_same_state(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """Assert ``module``'s parameters and buffers equal ``expected`` (same keys and values)."""
    state = module.state_dict()
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    ("arch", "input_size"),
    [
        ("alexnet", 227),
        ("vgg16", 224),
        ("resnet18", 224),
        ("resnet50", 224),
        ("googlenet", 224),
        ("densenet161", 224),
        ("inception_v3", 299),
    ],
)
def test_random_init_builds_quietly_in_eval_mode(arch: str, input_size: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. GoogLeNet's init_weights FutureWarning
        loaded = load_model(tv_config(arch, input_size))
    assert not loaded.module.training
    assert all(not m.training for m in loaded.module.modules())
    with torch.no_grad():
        logits = loaded.module(torch.randn(1, 3, input_size, input_size))
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (1, 1000)


def test_num_classes_sets_output_size() -> None:
    loaded = load_model(tv_config("resnet18", num_classes=365))
    with torch.no_grad():
        assert loaded.module(torch.randn(2, 3, 64, 64)).shape == (2, 365)
    assert loaded.description["num_classes"] == 365


def test_preprocessing_and_description_carried_through_from_omegaconf() -> None:
    cfg = OmegaConf.create(
        tv_config(
            "alexnet", 227, name="alexnet_imagenet", mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3]
        )
    )
    loaded = load_model(cfg)
    assert isinstance(loaded, LoadedModel)
    assert loaded.name == "alexnet_imagenet"
    assert loaded.input_size == 227
    assert loaded.mean == (0.5, 0.4, 0.3)
    assert loaded.std == (0.2, 0.25, 0.3)
    assert json.loads(json.dumps(loaded.description)) == {
        "source": "torchvision",
        "arch": "alexnet",
        "weights": None,
        "checkpoint": None,
        "num_classes": None,
        "input_size": 227,
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.25, 0.3],
    }


def test_checkpoint_with_data_parallel_prefix_under_state_dict(tmp_path: Path) -> None:
    saved = torchvision.models.resnet18(num_classes=365).state_dict()
    path = tmp_path / "resnet18_places365.pth.tar"
    data_parallel = {f"module.{key}": value for key, value in saved.items()}
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": data_parallel}, path)

    loaded = load_model(tv_config("resnet18", checkpoint=str(path), num_classes=365))

    assert_same_state(loaded.module, saved)
    assert loaded.description["checkpoint"] == str(path)
    assert loaded.description["weights"] is None


@pytest.mark.parametrize("wrapper_key", [None, "model_state_dict", "model"])
def test_checkpoint_bare_or_wrapped_state_dict(tmp_path: Path, wrapper_key: str | None) -> None:
    saved = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(saved if wrapper_key is None else {wrapper_key: saved, "optimizer": {}}, path)
    assert_same_state(load_model(tv_config("resnet18", checkpoint=str(path))).module, saved)


def test_checkpoint_with_wrapped_submodule_and_no_num_batches_tracked(tmp_path: Path) -> None:
    # Places365 AlexNet/VGG wrap only `features` in DataParallel; old PyTorch saved no
    # BatchNorm `num_batches_tracked`.
    saved = torchvision.models.mobilenet_v2().state_dict()
    old_style = {
        key.replace("features.", "features.module.", 1): value
        for key, value in saved.items()
        if not key.endswith("num_batches_tracked")
    }
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(old_style, path)

    loaded = load_model(tv_config("mobilenet_v2", checkpoint=str(path)))

    assert_same_state(loaded.module, saved)  # num_batches_tracked filled with 0, as saved


def test_densenet_checkpoint_with_old_key_names(tmp_path: Path) -> None:
    saved = torchvision.models.densenet121().state_dict()
    old_style = {
        key.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): value
        for key, value in saved.items()
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in old_style
    path = tmp_path / "densenet121_old.pth"
    torch.save({"state_dict": old_style}, path)
    assert_same_state(load_model(tv_config("densenet121", checkpoint=str(path))).module, saved)


def test_googlenet_checkpoint_with_aux_heads_loads_and_drops_them(tmp_path: Path) -> None:
    saved = torchvision.models.googlenet(aux_logits=True, init_weights=False).state_dict()
    path = tmp_path / "googlenet.pth"
    torch.save(saved, path)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = load_model(tv_config("googlenet", checkpoint=str(path))).module

    assert module.aux1 is None and module.aux2 is None
    assert_same_state(module, {k: v for k, v in saved.items() if not k.startswith("aux")})


def test_checkpoint_with_other_num_classes_explains_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "places.pth"
    torch.save(torchvision.models.resnet18(num_classes=365).state_dict(), path)
    with pytest.raises(ModelLoadError) as info:
        load_model(tv_config("resnet18", checkpoint=str(path)))
    message = str(info.value)
    assert "fc.weight: checkpoint (365, 512) vs model (1000, 512)" in message
    assert "fc.bias" in message
    assert "model.num_classes=365" in message


def test_checkpoint_of_other_arch_lists_missing_and_unexpected_keys(tmp_path: Path) -> None:
    path = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), path)
    pattern = r"missing key\(s\) \['conv1.weight'.*unexpected key\(s\) \['features.0.weight'"
    with pytest.raises(ModelLoadError, match=pattern):
        load_model(tv_config("resnet18", checkpoint=str(path)))


def test_checkpoint_holding_no_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "not_weights.pth"
    torch.save({"epoch": 3, "notes": "hello"}, path)
    with pytest.raises(ModelLoadError, match=r"neither a state_dict.*\['epoch', 'notes'\]"):
        load_model(tv_config("resnet18", checkpoint=str(path)))


def test_missing_checkpoint_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.pth"
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_model(tv_config("resnet18", checkpoint=str(path)))
    assert str(path) in str(info.value)


def test_weights_and_checkpoint_together_rejected(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ModelLoadError, match="model.weights=null"):
        load_model(tv_config("resnet18", weights="IMAGENET1K_V1", checkpoint=str(path)))


def test_unknown_arch_lists_close_and_allowed_names() -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(tv_config("resnet19"))
    message = str(info.value)
    assert "Did you mean ['resnet18'" in message
    assert "Allowed:" in message and "'googlenet'" in message and "'densenet161'" in message


def test_unknown_weights_lists_allowed_names() -> None:
    with pytest.raises(ModelLoadError, match=r"allowed: \['IMAGENET1K_V1', 'DEFAULT'\]"):
        load_model(tv_config("resnet18", weights="PLACES365"))


def _offline(monkeypatch: pytest.MonkeyPatch, torch_home: Path) -> list[str]:
    """Point the torch hub cache at ``torch_home`` and make downloads fail; return tried URLs."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    tried: list[str] = []

    def no_network(url: str, *args: Any, **kwargs: Any) -> None:
        tried.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tried


def test_offline_weights_download_failure_suggests_alternatives(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tried = _offline(monkeypatch, tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load_model(tv_config("resnet18", weights="DEFAULT"))
    message = str(info.value)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    assert tried == [url]
    cached = os.path.join(str(tmp_path), "hub", "checkpoints", os.path.basename(url))
    assert cached in message
    assert "model.checkpoint=/path/to/file.pth" in message
    assert "model.weights=null" in message
    assert "URLError" in message


def test_weights_found_in_local_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tried = _offline(monkeypatch, tmp_path)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    saved = torchvision.models.resnet18().state_dict()
    torch.save(saved, cache / os.path.basename(url))

    loaded = load_model(tv_config("resnet18", weights="ResNet18_Weights.DEFAULT"))

    assert tried == []
    assert_same_state(loaded.module, saved)
    assert loaded.description["weights"] == "ResNet18_Weights.IMAGENET1K_V1"


def test_weights_with_wrong_num_classes_rejected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _offline(monkeypatch, tmp_path)
    with pytest.raises(ModelLoadError, match="num_classes"):
        load_model(tv_config("resnet18", weights="IMAGENET1K_V1", num_classes=365))


def target_config(checkpoint: str | None = None) -> dict[str, Any]:
    """A config building a tiny (N, 3, S, S) -> (N, 5) convnet from Hydra `_target_`s."""
    return {
        "name": "tiny",
        "source": "target",
        "module": {
            "_target_": "torch.nn.Sequential",
            "_args_": [
                {
                    "_target_": "torch.nn.Conv2d",
                    "in_channels": 3,
                    "out_channels": 4,
                    "kernel_size": 3,
                },
                {"_target_": "torch.nn.ReLU"},
                {"_target_": "torch.nn.AdaptiveAvgPool2d", "output_size": 1},
                {"_target_": "torch.nn.Flatten"},
                {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 5},
            ],
        },
        "checkpoint": checkpoint,
        "input_size": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    }


def test_target_module_built_by_hydra_and_checkpoint_loaded(tmp_path: Path) -> None:
    reference = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    )
    path = tmp_path / "tiny.pt"
    torch.save({"model": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)

    loaded = load_model(OmegaConf.create(target_config(str(path))))

    assert not loaded.module.training
    assert_same_state(loaded.module, reference.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), reference(x))
    assert loaded.description["target"] == "torch.nn.Sequential"
    assert loaded.input_size == 32 and loaded.std == (0.25, 0.25, 0.25)


def test_embedded_checkpoint_of_the_previous_recipe_names_the_keys_to_set(tmp_path: Path) -> None:
    """A SmallCNN checkpoint without batch norm and with 29 outputs (the old default) against today's config."""
    from dissect.embedded_model import SmallCNN

    path = tmp_path / "old.pt"
    torch.save(SmallCNN(num_classes=29, batch_norm=False).state_dict(), path)
    config = {"name": "embedded", "source": "target", "checkpoint": str(path), "input_size": 224,
              "mean": [0.5] * 3, "std": [0.25] * 3,
              "module": {"_target_": "dissect.embedded_model.SmallCNN", "num_classes": 36}}
    with pytest.raises(ModelLoadError) as info:
        load_model(OmegaConf.create(config))
    message = str(info.value)
    assert "missing key(s) ['features.bn1.weight'" in message
    assert "model.module.num_classes=29" in message
    config["module"].update(num_classes=29, batch_norm=False)
    assert_same_state(load_model(OmegaConf.create(config)).module, torch.load(path, weights_only=True))


def test_target_that_is_not_a_module_rejected() -> None:
    config = target_config()
    config["module"] = {"_target_": "builtins.dict", "a": 1}
    with pytest.raises(ModelLoadError, match="built a dict, not a torch.nn.Module"):
        load_model(config)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"source": "timm"}, r"model.source must be one of \['torchvision', 'target'\], got 'timm'"),
        ({"mean": [0.5, 0.5]}, r"model.mean must be a list of 3 numbers"),
        ({"std": [0.2, 0.0, 0.2]}, r"model.std must be a list of 3 positive numbers"),
        ({"input_size": "224"}, r"model.input_size must be a positive int"),
        ({"wieghts": None}, r"Unknown model config key\(s\) \['wieghts'\]; allowed keys are"),
        (
            {"module": {"_target_": "torch.nn.Identity"}},
            r"model.module is not used with model.source='torchvision'",
        ),
        ({"builder_kwargs": {"dropout_rate": 0.1}}, r"could not build 'resnet18' with arguments"),
    ],
)
def test_invalid_config_explained(overrides: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ModelLoadError, match=pattern):
        load_model(tv_config("resnet18", **overrides))
