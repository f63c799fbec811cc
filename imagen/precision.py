"""Which floating-point precision to train in on this machine."""

from __future__ import annotations

import contextlib

import torch


def bf16_is_fast(device: torch.device | str = "cpu") -> bool:
    """bf16 matrix units: GPUs that support bf16, and CPUs with AMX tiles (~5x fp32 matmul throughput)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def auto_precision() -> str:
    """The Lightning `precision` for this machine: bf16-mixed where bf16 is fast, else 32-true."""
    return "bf16-mixed" if bf16_is_fast("cuda" if torch.cuda.is_available() else "cpu") else "32-true"


def autocast(device: torch.device | str):
    """bf16 autocast on `device` where bf16 is fast (plain loops outside Lightning); a no-op elsewhere."""
    device = torch.device(device)
    if bf16_is_fast(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
