"""Sampling throughput with classifier-free guidance: the KV-cache sampler vs full recompute vs Hugging Face
GPT-2 `generate` with the same depth, width and vocabulary, measured side by side in one run.

    python -m imagen.bench.sampling                      # CPU preset: the shapes size (8x8 tokens)
    python -m imagen.bench.sampling --preset gpu         # size B, 16x16 tokens, 16384 codes, bf16 (+ compiled)
    python -m imagen.bench.sampling --batch-sizes 1 16 64 --json out.json
    python -m imagen.bench.sampling --preset gpu --attend-block 0 --decode-math   # variants of the cached step
    python -m imagen.bench.sampling --cfg-until 0.5      # also: guidance for the first half of the tokens only

Every method samples the same number of image tokens per image with guidance (a doubled batch: conditional and
unconditional rows); images/s counts images, not rows.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from imagen.bench.common import device_name, profile_lines, profile_ops, strict_json, timed
from imagen.files import write_text_atomic
from imagen.models.ar_transformer import ARTransformer
from imagen.sampling.ar import KVCache, SamplingSettings, compiled_decode_step, generate, generate_recompute

PRESETS = {
    "cpu": {
        "size": "shapes",
        "grid": 8,
        "vocab": 1000,
        "text_len": 16,
        "dtype": "float32",
        "batch_sizes": [1, 16, 64],
    },
    "gpu": {
        "size": "B",
        "grid": 16,
        "vocab": 16384,
        "text_len": 32,
        "dtype": "bfloat16",
        "batch_sizes": [1, 16, 64, 256],
    },
}


def hf_gpt2(model: ARTransformer, dtype: torch.dtype, device: torch.device):
    """A GPT-2 with cross-attention of the same depth, width, heads and vocabulary as `model`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    config = GPT2Config(
        vocab_size=c.vocab_size + 1, n_positions=c.num_image_tokens + 1, n_embd=c.dim, n_layer=c.layers,
        n_head=c.heads, add_cross_attention=True, bos_token_id=c.vocab_size, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval()


def cfg_processor(scale: float):
    """Mixes the conditional and unconditional halves of the batch like `imagen.sampling.ar.guide`."""
    from transformers import LogitsProcessor

    class CFG(LogitsProcessor):
        def __call__(self, input_ids, scores):
            cond, uncond = scores.float().chunk(2)
            guided = uncond + scale * (cond - uncond)
            return torch.cat([guided, guided]).to(scores.dtype)

    return CFG()


def decode_floor(
    model: ARTransformer, batch: int, text_length: int, bytes_per_value: int, ceilings: dict
) -> float:
    """Lower bound on seconds to sample `batch` images with guidance (2 rows per image): every decode step must
    read the weights it uses and the keys/values written so far (bandwidth) and do its matmuls (compute); the
    floor sums max(bytes / bandwidth, FLOPs / matmul peak) over the steps, from the measured ceilings."""
    c = model.config
    d, hidden, rows = c.dim, int(c.mlp_ratio * c.dim), 2 * batch
    cross = c.conditioning == "cross"
    weights = c.layers * (4 * d * d + 2 * d * hidden + (2 * d * d if cross else 0)) + d * c.vocab_size
    total = 0.0
    for i in range(c.num_image_tokens):
        keys = model.prefix_length + i + 1 + (text_length if cross else 0)
        kv_values = rows * c.layers * 2 * keys * d
        bytes_read = (weights + kv_values) * bytes_per_value
        flops = 2 * rows * weights + 4 * rows * c.layers * keys * d
        total += max(bytes_read / ceilings["copy_bytes_per_s"], flops / ceilings["matmul_flops"])
    return total


CACHED = ("kv_cache", "kv_cache_compiled")  # the cached samplers, eager and compiled
METHODS = (*CACHED, "recompute", "hf_gpt2_generate")


def add_ratios(row: dict, floor: float | None = None) -> None:
    """The ratios between the images/s a batch measured, each only where both its terms were measured (a method that
    failed, out of memory at a large batch, leaves the others' ratios): `ratio_vs_hf` and `kv_cache_vs_recompute`
    for the fastest cached sampler, `kv_cache_eager_vs_recompute`. With `floor` (the floor's images/s):
    `floor_over_<method>` = floor / method = the method's time per image over the floor's (1.0: at the floor) for
    every method measured, and `floor_over_best` for the fastest cached sampler."""
    best = max((row[k] for k in CACHED if k in row), default=None)

    def ratio(name: str, a: float | None, b: float | None) -> None:
        if a is not None and b is not None and math.isfinite(a) and math.isfinite(b) and b > 0:
            row[name] = a / b

    ratio("ratio_vs_hf", best, row.get("hf_gpt2_generate"))
    ratio("kv_cache_vs_recompute", best, row.get("recompute"))
    ratio("kv_cache_eager_vs_recompute", row.get("kv_cache"), row.get("recompute"))
    if floor is not None:
        row["floor"] = floor
        ratio("floor_over_best", floor, best)
        for key in METHODS:
            ratio(f"floor_over_{key}", floor, row.get(key))


def run_size(
    size: str, grid: int, vocab: int, text_length: int, dtype: torch.dtype, batch_sizes: list[int],
    device: torch.device, repeats: int = 3, recompute_up_to: int = 64, compile_step: bool = False,
    hf_up_to: int = 1 << 30, ceilings: dict | None = None, budget=None, log=print, attend_block: int | None = 64,
    decode_math: bool = False, cfg_until: float | None = None, profile_batch: int | None = None,
    progress: Callable[[dict], None] | None = None,
) -> dict:  # fmt: skip
    """Images/s of each method at each batch size for one model size; with `ceilings`, also the floor and each
    method's ratio to it (`add_ratios`). The cached samplers read their keys in blocks of `attend_block`
    (`generate`; None: the whole cache at every step); `decode_math`: their attention through SDPA's math backend
    (under `torch.compile`, plain matmuls and a softmax that inductor fuses) instead of the fused attention kernels.
    `cfg_until`: the cached samplers are also measured with guidance for that fraction of the tokens only
    (`*_cfg_until`, and their speedup over full guidance); every other figure guides all tokens. At
    `profile_batch`, one call of the fastest cached sampler runs under the profiler (`profile_ops`: the kernels
    that take its time). A failing method is recorded as `<method>_error`, a batch that fails outside them as
    `error`; the other methods and batches are measured all the same. `progress(result)` after each measurement:
    the result so far (the same dict, filled in), for a caller that saves it before a time limit cuts the run."""
    torch.manual_seed(0)
    torch._dynamo.reset()  # compile for this size alone (another size's graphs would count against the cache limit)
    model = ARTransformer.from_size(size, vocab_size=vocab, grid_size=(grid, grid), text_dim=128)
    model = model.to(device=device, dtype=dtype).eval()
    gpt2 = hf_gpt2(model, dtype, device)
    settings = SamplingSettings(cfg_scale=3.0, temperature=1.0, top_k=100)
    n = model.config.num_image_tokens
    step = compiled_decode_step() if compile_step else None
    rows = []
    result = {
        "size": size,
        "params": model.num_params(),
        "tokens_per_image": n,
        "vocab": vocab,
        "text_length": text_length,
        "dtype": str(dtype).removeprefix("torch."),
        "settings": asdict(settings),
        "attend_block": attend_block,
        "decode_attention": "math" if decode_math else "default",
        "cfg_until": cfg_until,
        "model": asdict(model.config),
        "images_per_second": rows,
    }
    if progress is not None:
        progress(result)

    def measure_batch(batch: int, row: dict) -> None:
        """Every method at one batch size, into `row` (its buffers are freed on return, also after a failure)."""
        states = torch.randn(batch, text_length, 128, device=device, dtype=dtype)
        mask = torch.ones(batch, text_length, dtype=torch.bool, device=device)
        eager_cache = KVCache.allocate(model, 2 * batch, text_length, device, dtype)
        cache = None

        def measure(key: str, fn, warmup: int = 1) -> None:
            try:
                row[key] = batch / timed(fn, repeats, device, warmup)
            except Exception as error:  # one failing method must not lose the others' figures
                row[f"{key}_error"] = f"{type(error).__name__}: {error}"
                log(f"sampling {size} batch {batch} {key}: {row[f'{key}_error']}")
            if progress is not None:
                progress(result)

        def cached(settings=settings, **kwargs):
            with sdpa_kernel(SDPBackend.MATH) if decode_math else contextlib.nullcontext():
                return generate(model, states, mask, settings, attend_block=attend_block, **kwargs)

        measure("kv_cache", lambda: cached(cache=eager_cache))
        if step is not None:
            cache = KVCache.allocate(model, 2 * batch, text_length, device, dtype)
            # two warm-up runs: the first compiles (for a new batch size) and the second records the CUDA graphs
            measure("kv_cache_compiled", lambda: cached(decode_step=step, cache=cache), warmup=2)
        if cfg_until is not None:
            stopped = replace(settings, cfg_until=cfg_until)
            measure("kv_cache_cfg_until", lambda: cached(cache=eager_cache, settings=stopped))
            if step is not None:
                measure(
                    "kv_cache_compiled_cfg_until",
                    lambda: cached(decode_step=step, cache=cache, settings=stopped),
                    warmup=2,
                )
            for key in CACHED:
                if key in row and f"{key}_cfg_until" in row:
                    row[f"{key}_cfg_until_speedup"] = row[f"{key}_cfg_until"] / row[key]
        if batch == profile_batch and any(k in row for k in CACHED):
            compiled = row.get("kv_cache_compiled", 0) > row.get("kv_cache", 0)
            row["profile_of"] = "kv_cache_compiled" if compiled else "kv_cache"
            run = (
                (lambda: cached(decode_step=step, cache=cache))
                if compiled
                else lambda: cached(cache=eager_cache)
            )
            row["profile"] = profile_ops(run, device)
            for line in profile_lines(row["profile"]):
                log(f"sampling {size} batch {batch} {row['profile_of']} profile | {line}")
        cache = eager_cache = None  # free for the methods below
        if batch <= recompute_up_to:
            measure("recompute", lambda: generate_recompute(model, states, mask, settings))
        if batch <= hf_up_to:
            # both halves attend to a context of equal size
            context = model.text_proj(torch.cat([states, states]))
            bos = torch.full((2 * batch, 1), model.config.vocab_size, device=device)
            processors = [cfg_processor(settings.cfg_scale)]

            def hf_generate():
                with torch.no_grad():
                    gpt2.generate(
                        input_ids=bos, encoder_hidden_states=context, max_new_tokens=n, min_new_tokens=n,
                        do_sample=True, top_k=settings.top_k, logits_processor=processors, pad_token_id=0,
                    )  # fmt: skip

            measure("hf_gpt2_generate", hf_generate)

    for batch in batch_sizes:
        if budget is not None and not budget.allows(30):
            log(f"sampling {size} batch {batch}: skipped (time budget)")
            rows.append({"batch": batch, "skipped": "time budget"})
            continue
        row: dict = {"batch": batch}
        rows.append(row)  # filled in as it is measured
        try:
            measure_batch(batch, row)
        except Exception as error:  # e.g. out of memory allocating a cache: the smaller batches still run
            row["error"] = f"{type(error).__name__}: {error}"
            log(f"sampling {size} batch {batch}: {row['error']}")
        floor = None
        if ceilings is not None:
            floor = batch / decode_floor(model, batch, text_length, dtype.itemsize, ceilings)
        add_ratios(row, floor)
        log(f"sampling {size} | " + " | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in row.items() if k != "profile"))  # fmt: skip
        if progress is not None:
            progress(result)
    return result


def run(
    preset: str, batch_sizes: list[int] | None, repeats: int, skip_recompute_above: int, compile_step: bool,
    attend_block: int | None = 64, decode_math: bool = False, grid: int | None = None, cfg_until: float | None = None,
) -> dict:  # fmt: skip
    p = {**PRESETS[preset], **({"grid": grid} if grid else {})}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = run_size(
        p["size"], p["grid"], p["vocab"], p["text_len"], getattr(torch, p["dtype"]), batch_sizes or p["batch_sizes"],
        device, repeats, skip_recompute_above, compile_step and device.type == "cuda", attend_block=attend_block,
        decode_math=decode_math, cfg_until=cfg_until,
    )  # fmt: skip
    return {"preset": preset, "device": device_name(device), **report}


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--attend-block",
        type=int,
        default=64,
        help="cached samplers read keys in blocks of this many (0: all)",
    )
    parser.add_argument(
        "--decode-math", action="store_true", help="cached samplers' attention through SDPA's math backend"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="*")
    parser.add_argument("--grid", type=int, help="tokens per side (replaces the preset's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--skip-recompute-above", type=int, default=64, help="recompute is slow: skip larger batches"
    )
    parser.add_argument("--no-compile", action="store_true", help="GPU: skip the torch.compile'd decode step")
    add_decode_arguments(parser)
    parser.add_argument(
        "--cfg-until",
        type=float,
        help="also measure the cached samplers guiding this fraction of tokens only",
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    report = run(
        args.preset, args.batch_sizes, args.repeats, args.skip_recompute_above, not args.no_compile,
        args.attend_block or None, args.decode_math, args.grid, args.cfg_until,
    )  # fmt: skip
    if args.json:
        write_text_atomic(Path(args.json), strict_json(report))


if __name__ == "__main__":
    main()
