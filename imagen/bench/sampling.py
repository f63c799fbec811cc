"""Sampling throughput with classifier-free guidance: the KV-cache sampler vs full recompute vs Hugging Face
GPT-2 `generate` with the same depth, width and vocabulary, measured side by side in one run.

    python -m imagen.bench.sampling                      # CPU preset: the shapes size (8x8 tokens)
    python -m imagen.bench.sampling --preset gpu         # size B, 16x16 tokens, 16384 codes, bf16 (+ compiled)
    python -m imagen.bench.sampling --batch-sizes 1 16 64 --json out.json

Every method samples the same number of image tokens per image with guidance (a doubled batch: conditional and
unconditional rows); images/s counts images, not rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict

import torch

from imagen.models.ar_transformer import ARTransformer
from imagen.sampling.ar import SamplingSettings, decode_one_token, generate, generate_recompute

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


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run(
    preset: str, batch_sizes: list[int] | None, repeats: int, skip_recompute_above: int, compile_step: bool
):
    p = PRESETS[preset]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, p["dtype"])
    torch.manual_seed(0)
    model = ARTransformer.from_size(
        p["size"], vocab_size=p["vocab"], grid_size=(p["grid"], p["grid"]), text_dim=128
    )
    model = model.to(device=device, dtype=dtype).eval()
    gpt2 = hf_gpt2(model, dtype, device)
    settings = SamplingSettings(cfg_scale=3.0, temperature=1.0, top_k=100)
    n = model.config.num_image_tokens
    step = None
    if compile_step and device.type == "cuda":
        step = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    results = []
    for batch in batch_sizes or p["batch_sizes"]:
        states = torch.randn(batch, p["text_len"], 128, device=device, dtype=dtype)
        mask = torch.ones(batch, p["text_len"], dtype=torch.bool, device=device)
        row = {"batch": batch}
        row["kv_cache"] = batch / timed(lambda: generate(model, states, mask, settings), repeats, device)
        if step is not None:
            row["kv_cache_compiled"] = batch / timed(
                lambda: generate(model, states, mask, settings, decode_step=step), repeats, device
            )
        if batch <= skip_recompute_above:
            row["recompute"] = batch / timed(
                lambda: generate_recompute(model, states, mask, settings), repeats, device
            )
        # both halves attend to a context of equal size
        context = model.text_proj(torch.cat([states, states]))
        bos = torch.full((2 * batch, 1), model.config.vocab_size, device=device)
        processors = [cfg_processor(settings.cfg_scale)]

        def hf_generate():
            with torch.no_grad():
                gpt2.generate(
                    input_ids=bos, encoder_hidden_states=context, max_new_tokens=n, min_new_tokens=n, do_sample=True,
                    top_k=settings.top_k, logits_processor=processors, pad_token_id=0,
                )  # fmt: skip

        row["hf_gpt2_generate"] = batch / timed(hf_generate, repeats, device)
        best = max(v for k, v in row.items() if k.startswith("kv_cache"))
        row["ratio_vs_hf"] = best / row["hf_gpt2_generate"]
        if "recompute" in row:
            row["ratio_vs_recompute"] = row["kv_cache"] / row["recompute"]
        results.append(row)
        print(
            " | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
            flush=True,
        )
    return {
        "preset": preset,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "model": asdict(model.config),
        "params": model.num_params(),
        "tokens_per_image": n,
        "settings": asdict(settings),
        "images_per_second": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="*")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--skip-recompute-above", type=int, default=64, help="recompute is slow: skip larger batches"
    )
    parser.add_argument("--no-compile", action="store_true", help="GPU: skip the torch.compile'd decode step")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    report = run(args.preset, args.batch_sizes, args.repeats, args.skip_recompute_above, not args.no_compile)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
