"""Shared fixtures: small probe sets made from scikit-image's photos, tiny models, Hydra configs."""

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from dissect.embedded_model import SmallCNN
from dissect.layout import RunLayout
from dissect.stamps import write_stamp

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def photo_crops(n_images: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """n_images random square crops of scikit-image's colour photos, resized to (size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    crops = []
    for i in range(n_images):
        photo = photos[i % len(photos)]
        side = int(rng.integers(min(photo.shape[:2]) // 3, min(photo.shape[:2])))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
        crops.append(np.asarray(crop))
    return crops


def write_image_folder(root: Path, n_images: int, size: int = 64, seed: int = 0, png_every: int = 3) -> Path:
    """A plain probe folder of n_images photo crops in two subfolders: every png_every-th a PNG, the rest JPEG."""
    for i, crop in enumerate(photo_crops(n_images, size, seed)):
        is_png = png_every > 0 and i % png_every == 0
        path = root / ("a" if i % 2 else "b") / f"img{i:04d}.{'png' if is_png else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop).save(path)
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("folder"), n_images=40)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded SmallCNN(num_classes=4, width=4) state_dict, so every run loads the same weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(SmallCNN(num_classes=4, width=4).state_dict(), path)
    return path


def tiny_overrides(probe_root: Path, out_dir: Path, checkpoint: Path) -> list[str]:
    """Hydra overrides for a fast run: tiny SmallCNN at 64 px on a plain folder, small chunks."""
    return [
        "model=default",
        "model.module.num_classes=4",
        "+model.module.width=4",
        f"model.checkpoint={checkpoint}",
        "model.input_size=64",
        "layers=[features.conv2,features.conv4,classifier.fc1]",
        "dataset=folder",
        f"dataset.root={probe_root}",
        f"out_dir={out_dir}",
        "extract.batch_size=4",
        "extract.num_workers=0",
        "extract.chunk_mib=0.01",
    ]


@pytest.fixture
def compose_config() -> Callable[[list[str]], DictConfig]:
    """Compose the project's real Hydra configuration with overrides."""

    def _compose(overrides: list[str]) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)

    return _compose


def write_activation_store(run_dir: Path, image_ids: list[str], maps: dict[str, np.ndarray],
                           valid: np.ndarray | None = None) -> Path:
    """An extract-stage store written by hand, and its stamp: maps[layer] is (N, U, h, w); maxima are computed here."""
    import zarr

    layout = RunLayout(run_dir)
    root = zarr.open_group(layout.activations, mode="w")
    ids = root.create_array("image_ids", shape=(len(image_ids),), dtype=str)
    ids[:] = np.array(image_ids, dtype=object)
    root.create_array("valid", data=np.ones(len(image_ids), bool) if valid is None else valid)
    layers = {}
    for name, values in maps.items():
        group = root.require_group(name)
        group.create_array("maps", data=values.astype(np.float16), chunks=(7, *values.shape[1:]))
        group.create_array("maxima", data=values.astype(np.float16).max(axis=(2, 3)).astype(np.float32))
        layers[name] = {"kind": "map", "shape": list(values.shape[1:]), "module": "Conv2d"}
    root.attrs.update({"layers": layers, "layer_order": list(maps), "complete": True})
    write_stamp(layout.stamp("extract"), {
        "written_by": "tests/conftest.py write_activation_store",
        "image_ids": list(image_ids),
        "layers": {name: {"shape": list(values.shape),
                          "sha256": hashlib.sha256(np.ascontiguousarray(values.astype(np.float16))).hexdigest()}
                   for name, values in maps.items()},
        "valid": None if valid is None else np.asarray(valid, bool).tolist(),
    }, 1)
    return run_dir


@pytest.fixture(scope="module")
def two_workers():
    """A LocalCluster of 2 worker processes (1 thread each) on 127.0.0.1 only; yields it, stops every process.

    Point a config at it with ``cluster_override(cluster)``.
    """
    import os
    import signal

    from dissect.cluster import local_cluster
    from dissect.settings import LocalClusterSettings

    cluster = local_cluster(LocalClusterSettings(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                                 dashboard_address=None))
    pids = {worker.process.pid for worker in cluster.workers.values()}
    try:
        yield cluster
    finally:
        pids |= {worker.process.pid for worker in cluster.workers.values()} - {None}  # restarted after a kill
        cluster.close()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def on_cluster(cfg: DictConfig, cluster, **changes) -> DictConfig:
    """A copy of ``cfg`` (with ``changes`` merged) whose ``cluster`` section points at the running ``cluster``."""
    from omegaconf import OmegaConf

    assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
    copy = OmegaConf.merge(cfg, changes)
    copy.cluster = OmegaConf.create({"kind": "address", "address": cluster.scheduler_address, "timeout_s": 30})
    return copy
