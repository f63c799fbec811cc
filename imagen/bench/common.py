"""Timing, ceilings and device helpers shared by the benchmark scripts."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_ceilings(device: torch.device, matmul_size: int, copy_mib: int) -> dict:
    """The card's measured ceilings: matmul FLOP/s (bf16 on GPU, fp32 on CPU) and copy bandwidth (bytes read +
    written per second). Ratios elsewhere are taken against these, not against datasheet numbers."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = matmul_size
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: torch.mm(a, b), repeats=10, device=device, warmup=3)
    src = torch.empty(copy_mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_seconds = timed(lambda: dst.copy_(src), repeats=10, device=device, warmup=3)
    return {
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_size": n,
        "matmul_flops": 2 * n**3 / seconds,
        "copy_bytes_per_s": 2 * src.numel() / copy_seconds,
    }


def profile_ops(fn: Callable[[], object], device: torch.device, rows: int = 15) -> dict:
    """One run of `fn` under `torch.profiler`: the `rows` kernels with the most time on the GPU (on a CPU: the
    operators with the most self time), with their share of the total, to show where a step's time goes. A failure
    comes back as {"error": ...}, so that the figures measured beside it are kept."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    try:
        synchronize(device)
        with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
            fn()
            synchronize(device)
    except Exception as error:  # noqa: BLE001 (the profile is an aid; the section's timings stand without it)
        return {"error": f"{type(error).__name__}: {error}"}
    if cuda:  # the kernels themselves (with CUDA graphs, the ones inside each replayed graph)
        events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
        microseconds = [e.self_device_time_total for e in events]
    else:
        events = list(prof.key_averages())
        microseconds = [e.self_cpu_time_total for e in events]
    total = sum(microseconds) or 1
    ranked = sorted(zip(microseconds, events, strict=True), key=lambda pair: -pair[0])[:rows]
    return {
        "time": "GPU kernel time" if cuda else "CPU self time",
        "total_ms": total / 1e3,
        "top": [
            {"name": e.key[:120], "calls": e.count, "ms": us / 1e3, "share": us / total} for us, e in ranked
        ],
    }


def profile_lines(profile: dict, rows: int = 10) -> list[str]:
    """`profile_ops`'s result as log lines, the largest first."""
    if "error" in profile:
        return [f"profiler failed: {profile['error']}"]
    lines = [f"{profile['time']}: {profile['total_ms']:.1f} ms in all"]
    for entry in profile["top"][:rows]:
        lines.append(f"  {entry['share']:6.1%} {entry['ms']:9.2f} ms {entry['calls']:6d}x  {entry['name']}")
    return lines


class Budget:
    """Wall-clock budget for a whole suite: sections ask whether time is left before they start a measurement."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds
