"""Which floating-point precision to train in on this machine."""

from __future__ import annotations

import contextlib

import torch


def bf16_is_fast(device: torch.device | str = "cpu") -> bool:
    """bf16 matrix units: GPUs that compute in bf16 natively (Ampere, sm_80, and later; an older GPU, V100 or T4,
    only emulates it, slower than fp32), and CPUs with AMX tiles (~5x fp32 matmul throughput)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def auto_precision(accelerator: str = "auto") -> str:
    """The Lightning `precision` for this machine and `trainer.accelerator`: bf16-mixed where bf16 is fast on the
    device that trains (`auto`: a GPU if there is one), else 32-true."""
    if accelerator not in ("auto", "cpu", "gpu", "cuda"):
        return "32-true"  # mps, tpu, ...: Lightning's default
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if bf16_is_fast("cuda" if on_gpu else "cpu") else "32-true"


def autocast(device: torch.device | str):
    """bf16 autocast on `device` where bf16 is fast (plain loops outside Lightning); a no-op elsewhere."""
    device = torch.device(device)
    if bf16_is_fast(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
