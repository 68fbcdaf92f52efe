"""Choosing the torch device a stage runs on."""

import torch


def pick_device(requested: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cpu``/``cuda``/``cuda:N`` as given (checked)."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise ValueError(f"device={requested!r} is not a torch device; allowed: auto, cpu, cuda, cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={requested!r} was asked for but CUDA is not available here; use device=auto or cpu")
    return device
