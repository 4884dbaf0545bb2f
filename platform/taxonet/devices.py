"""Devices: which torch device a run uses, and the mixed precision it runs under there. No Ray here.

Training (:mod:`taxonet.train.loop`), evaluation and serving share these so that "auto" and "amp" mean the same
thing everywhere: bf16 autocast and channels_last are CUDA-only (on a CPU they slow eager PyTorch down).
"""

from __future__ import annotations

import contextlib

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" → the first CUDA device when there is one, else the CPU; anything else as torch understands it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but no CUDA device is visible")
    return resolved


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``amp`` is on; a no-op context elsewhere."""
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """An image batch on ``device`` (asynchronously from pinned memory), channels_last on CUDA when asked for."""
    images = images.to(device, non_blocking=True)
    if channels_last and device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images
