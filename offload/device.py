"""The one place that decides which device sida computes on."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda when a GPU is visible, else cpu; asking for cuda without one is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; expected auto, cpu or cuda")
    return torch.device(name)
