"""Timing, ceilings and device helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from collections.abc import Callable

import torch

from imagen.files import REPO_ROOT, source_digest


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


def seconds_per_call(
    fn: Callable[[], object], device: torch.device, calls: int = 20, loops: int = 5, warmup_s: float = 0.2
) -> float:
    """Best seconds per call of `fn` over `loops` loops of `calls` back-to-back calls, each loop timed between two
    synchronizes (so neither the synchronize nor a launch gap counts per call), after at least `warmup_s` of the
    same loops untimed (clocks up, caches and library heuristics settled): a throughput ceiling, not a latency."""
    synchronize(device)
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        for _ in range(calls):
            fn()
        synchronize(device)
    best = math.inf
    for _ in range(loops):
        synchronize(device)
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        best = min(best, (time.perf_counter() - begin) / calls)
    return best


def measure_ceilings(
    device: torch.device,
    matmul_size: int,
    copy_mib: int,
    calls: int = 20,
    loops: int = 5,
    warmup_s: float = 0.2,
) -> dict:
    """The card's measured ceilings: matmul FLOP/s (bf16 on GPU, fp32 on CPU) and copy bandwidth (bytes read +
    written per second), each from `seconds_per_call`. Ratios elsewhere are taken against these, not against
    datasheet numbers (so a low peak would inflate MFU: hence the warm-up and the best of several loops)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = matmul_size
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = seconds_per_call(lambda: torch.mm(a, b, out=out), device, calls, loops, warmup_s)
    src = torch.empty(copy_mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_seconds = seconds_per_call(lambda: dst.copy_(src), device, calls, loops, warmup_s)
    return {
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_size": n,
        "matmul_flops": 2 * n**3 / seconds,
        "copy_bytes_per_s": 2 * src.numel() / copy_seconds,
        "timing": f"best of {loops} loops of {calls} calls, after >= {warmup_s} s of warm-up",
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


def strict_json(value: object) -> str:
    """`value` as indented strict JSON: every non-finite float (NaN from a ratio with a failed term, inf) as null."""

    def finite(v: object) -> object:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), indent=2, allow_nan=False)


if __name__ == "__main__":  # python -m imagen.bench.common [ROOT]: the source digest a bench.json records
    print(source_digest(sys.argv[1] if len(sys.argv) > 1 else REPO_ROOT))
