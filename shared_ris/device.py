"""Devices and precision: which device a process uses, whether CUDA is there, and autocast."""

from __future__ import annotations

import contextlib

import torch

from .errors import SharedRISError


def check_device(device: str | torch.device | None) -> None:
    """One-line error when a CUDA device is asked for on a machine without CUDA."""
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SharedRISError(f"--device {device} asked for, but CUDA is not available; use --device cpu")


def pick_device(local_rank: int = 0, device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else this process's GPU, else the CPU."""
    if device is not None:
        check_device(device)
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def amp_for(device: torch.device, amp: str) -> str:
    """The recipe's ``train.amp`` on CUDA; fp32 elsewhere (CPU autocast was slower, BENCHMARKS.md)."""
    return amp if device.type == "cuda" else "fp32"


def autocast(device: torch.device, amp: str):
    """bf16 / fp16 autocast on CUDA, as the recipe's ``train.amp`` says; a no-op on the CPU."""
    if device.type == "cuda" and amp in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
    return contextlib.nullcontext()
