"""The shapes generator's training step on CPU: the project's kernels against the generic ones, side by side.

    python -m imagen.bench.cpu_step                      # size `shapes`, batch 32, bf16 autocast where AMX is present
    python -m imagen.bench.cpu_step --steps 5 --rounds 1 --json out.json
    python -m imagen.bench.cpu_step --compile           # also the compiled blocks (model.compile=true)

One step = text encoder (the GRU of `model/text_encoder=scratch`) + ARTransformer forward, cross-entropy with caption
dropout, backward, AdamW, on random image tokens and captions (what the stage does after encoding the images).
Variants, alternated in rounds in one process so that both see the same machine load:
- `project`: `attention` (plain matmuls on CPU), exact GELU, fused AdamW;
- `generic`: `scaled_dot_product_attention` (math backend; the fused CPU kernel is slower still in backward), the
  tanh GELU, the GRU in bf16 under autocast (`rnn_precision` off), and AdamW's default multi-tensor path;
- `compiled` (with `--compile`): `project` with each Transformer block compiled by `torch.compile` (inductor), as
  `model.compile=true` trains (a copy of the same weights; compiling happens in the untimed warm-up step).
Prints the median seconds per step of each and their ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import imagen.models.ar_transformer as ar_transformer
import imagen.models.text_encoder as text_encoder
from imagen.bench.common import device_name
from imagen.models.ar_transformer import ARTransformer
from imagen.models.text_encoder import ScratchTextEncoder
from imagen.precision import autocast
from imagen.stages.optim import param_groups

WORDS = (
    "a small large red green blue circle square triangle left of right above below there is and it".split()
)


def sdpa_math_attention(q, k, v, mask, dropout: float = 0.0) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None
        )


def step_seconds(variant: str, model: nn.ModuleDict, batches: list, steps: int) -> float:
    """Median seconds per training step of `variant` over `steps` steps (after one warm-up step)."""
    generic = variant == "generic"
    gelus = [m for m in model.modules() if isinstance(m, nn.GELU)]
    for gelu in gelus:
        gelu.approximate = "tanh" if generic else "none"
    optimizer = torch.optim.AdamW(
        param_groups(list(model.named_parameters()), 0.05), lr=1e-4, fused=not generic
    )
    patches = contextlib.ExitStack()
    if generic:  # the modules call these functions by name
        patches.enter_context(mock.patch.object(ar_transformer, "attention", sdpa_math_attention))
        patches.enter_context(mock.patch.object(text_encoder, "attention", sdpa_math_attention))
        patches.enter_context(mock.patch.object(text_encoder, "rnn_precision", contextlib.nullcontext))
    times = []
    with patches:
        for i in range(steps + 1):
            tokens, captions = batches[i % len(batches)]
            start = time.perf_counter()
            with autocast("cpu"):
                text = model["text_encoder"](captions)
                _, loss = model["net"](tokens, text.states, text.mask, targets=tokens, cond_drop_prob=0.1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    for gelu in gelus:
        gelu.approximate = "none"
    return sorted(times[1:])[steps // 2]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m imagen.bench.cpu_step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", default="shapes", help="a name in AR_SIZES")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two variants")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--compile", action="store_true", help="also time the compiled blocks")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    text = ScratchTextEncoder(mixer="gru")
    text.fit_tokenizer([" ".join(WORDS)])
    model = nn.ModuleDict(
        {"text_encoder": text, "net": ARTransformer.from_size(args.size, text_dim=text.dim)}
    )
    grid = model["net"].config.num_image_tokens
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randint(0, model["net"].config.vocab_size, (args.batch, grid), generator=g),
            [
                " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (9,), generator=g))
                for _ in range(args.batch)
            ],
        )
        for _ in range(4)
    ]
    models = {"project": model, "generic": model}
    if args.compile:
        models["compiled"] = copy.deepcopy(model)
        models["compiled"]["net"].compile_blocks()
    seconds: dict[str, list[float]] = {variant: [] for variant in models}
    for _ in range(args.rounds):
        for variant, variant_model in models.items():
            kernels = "generic" if variant == "generic" else "project"
            seconds[variant].append(step_seconds(kernels, variant_model, batches, args.steps))
    best = {variant: min(values) for variant, values in seconds.items()}
    out = {
        "device": device_name(torch.device("cpu")),
        "size": args.size,
        "batch": args.batch,
        "bf16_autocast": isinstance(autocast("cpu"), torch.autocast),
        "seconds_per_step": seconds,
        "speedup": best["generic"] / best["project"],
    }
    if args.compile:
        out["compile_speedup"] = best["project"] / best["compiled"]
    print(f"{out['device']}, size {args.size}, batch {args.batch}, bf16 autocast: {out['bf16_autocast']}")
    for variant, values in seconds.items():
        print(f"  {variant:8s} s/step per round: {', '.join(f'{v:.3f}' for v in values)}")
    print(f"  speedup (best round, generic / project): {out['speedup']:.2f}x")
    if args.compile:
        print(f"  speedup (best round, project / compiled): {out['compile_speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
