"""Choosing the torch device a stage runs on."""

import torch

from dissect.errors import DeviceError


def pick_device(requested: str, key: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cpu``/``cuda``/``cuda:N`` as given (checked).

    ``key`` is the config key the value came from (``extract.device``), named in the error.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise DeviceError(f"{key}={requested!r} is not a torch device; allowed: auto, cpu, cuda, cuda:N") from error
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"{key}={requested!r}: the stages run on cpu or cuda; allowed: auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{key}={requested!r} was asked for but CUDA is not available here; "
                          f"use {key}=auto or {key}=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"{key}={requested!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                          f"allowed: cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device
