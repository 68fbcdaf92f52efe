"""What the attribute stage runs on a dask worker: its model, loaded once per worker, and one task's model work.

A task gets plain, picklable arguments: the ``ModelSpec`` (the model config as
a dict, the requested ``attribute.device``, the seed), the rows of the pair
table it explains, their (B, 3, S, S) uint8 images and the method settings.
The worker resolves the device itself (``auto``: its GPU when it has one) and
keeps the prepared model in ``dissect.cluster.worker_state`` under
``ModelSpec.key``, so it is loaded once per worker process, not once per task;
the model work of a task holds ``device_lock``, so the threads of one worker
run one model pass at a time.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from distributed import get_worker

from dissect.cluster import device_lock, worker_state
from dissect.devices import pick_device
from dissect.models import LoadedModel, load_model
from dissect.probe import Preprocessing
from dissect.stages.attribute.checks import randomised_maps
from dissect.stages.attribute.methods import MethodSettings, compute_maps, stored_form
from dissect.stages.attribute.model import PreparedModel, prepare_model


@dataclass(frozen=True)
class ModelSpec:
    """How a worker builds the stage's model.

    ``config``: the model config as a plain dict, its checkpoint an absolute
    path; ``device``: ``attribute.device`` as configured (resolved on the
    worker); ``seed``: ``attribute.seed``, with which weights that no
    checkpoint sets are drawn (``load_seeded``).
    """

    config: dict[str, Any]
    device: str
    seed: int

    def key(self, device: torch.device) -> str:
        """The ``worker_state`` key of the model prepared on ``device``.

        It holds everything the prepared model depends on: the model config,
        the seed, the device, and the checkpoint file's size and modification
        time (a long-lived worker reloads a checkpoint rewritten in place).
        """
        checkpoint = self.config.get("checkpoint")
        stat = os.stat(checkpoint) if checkpoint else None
        return "attribute model " + json.dumps(
            {"model": self.config, "seed": self.seed, "device": str(device),
             "checkpoint": None if stat is None else [stat.st_size, stat.st_mtime_ns]}, sort_keys=True, default=str)


def load_seeded(config: Mapping[str, Any], seed: int) -> LoadedModel:
    """``load_model`` with torch's CPU generator seeded by ``seed`` (and left as it was afterwards).

    Weights that no checkpoint or pretrained file sets (``model.weights=null``
    without a checkpoint, a re-sized head) are then the same in every process
    that loads the model, so the workers explain the model this process
    scored the pairs with.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_model(config)


def worker_model(spec: ModelSpec) -> tuple[PreparedModel, torch.device]:
    """This process's prepared model of ``spec`` on its device, loaded on first use."""
    device = pick_device(spec.device, "attribute.device")
    model = worker_state(spec.key(device), lambda: prepare_model(load_seeded(spec.config, spec.seed).module.to(device)))
    return model, device


def share_model(spec: ModelSpec, model: PreparedModel, device: torch.device) -> None:
    """Hand this process's prepared model to an in-process worker, which then loads nothing."""
    worker_state(spec.key(device), lambda: model)


def worker_device(requested: str) -> tuple[int, str]:
    """(process id, device) of the worker this runs on, for ``attribute.device=requested``."""
    return os.getpid(), str(pick_device(requested, "attribute.device"))


@dataclass(frozen=True)
class Piece:
    """One task's result: ``values`` (B, S, S) float16 stored maps and ``scales`` (B,) float32 (``stored_form``).

    ``seconds``: the task's model work; ``worker`` and ``device``: the address of the worker that ran it and
    the device it ran on.
    """

    values: np.ndarray
    scales: np.ndarray
    seconds: float
    worker: str
    device: str


def maps_task(spec: ModelSpec, method: str, pairs: pd.DataFrame, images: torch.Tensor, settings: MethodSettings,
              preprocessing: Preprocessing) -> Piece:
    """The stored maps of ``method`` for one batch of pairs: (B, 3, S, S) uint8 images -> (B, S, S)."""
    model, device = worker_model(spec)
    with device_lock():
        started = time.perf_counter()
        maps = compute_maps(model, pairs, images, method, settings, preprocessing, settings.batch_size, device)
        seconds = time.perf_counter() - started
    return Piece(*stored_form(maps), seconds, get_worker().address, str(device))


def randomised_task(spec: ModelSpec, method: str, cascade: list[str], upto: int, pairs: pd.DataFrame,
                    images: torch.Tensor, settings: MethodSettings, preprocessing: Preprocessing) -> Piece:
    """The stored maps of ``method`` once ``upto`` cascade modules are re-initialised (``randomised_maps``).

    ``scales`` is empty: the randomisation check compares rankings only.
    """
    model, device = worker_model(spec)
    with device_lock():
        started = time.perf_counter()
        values = randomised_maps(model, cascade, upto, pairs, images, method, settings, preprocessing,
                                 settings.batch_size, device)
        seconds = time.perf_counter() - started
    return Piece(values, np.zeros(0, np.float32), seconds, get_worker().address, str(device))
