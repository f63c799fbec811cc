"""AR training throughput: tokens/s and MFU, eager vs `torch.compile`, plain PyTorch loop vs the Lightning Trainer.

Both loops run the same steps on the same model: bf16 autocast, teacher-forced cross-entropy with caption
dropout, backward, AdamW (fused on GPU, decay on >= 2-D weights) from pre-tokenized data (image token ids and
pre-encoded text states, as a token cache supplies them). MFU = model FLOPs per second (`flops_per_sample`, x3
for training) / the measured matmul ceiling; causal attention's scores and weighted values are counted in full
(the PaLM convention: no halving for the mask), as `MFU_CONVENTION` says in each result.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from imagen.bench.common import profile_lines, profile_ops, synchronize
from imagen.models.ar_transformer import ARTransformer
from imagen.stages.optim import build_optimizer

COND_DROP_PROB = 0.1
# seconds each part of `run` may take at most on the GPU preset (data, warm-up and timed steps; the compilation for
# "plain_compiled"): a part starts only while the budget has that much left, else it is recorded under `skipped`
COST_S = {"plain_eager": 20, "plain_compiled": 60, "profile": 10, "lightning": 30}
MFU_CONVENTION = (
    "model FLOPs x3 (forward + backward, no activation recompute) / the measured matmul peak; causal "
    "attention counted in full (PaLM convention)"
)


def token_data(model: ARTransformer, samples: int, text_length: int) -> TensorDataset:
    c = model.config
    tokens = torch.randint(0, c.vocab_size, (samples, c.num_image_tokens))
    states = torch.randn(samples, text_length, c.text_dim)
    return TensorDataset(tokens, states)


def make_optimizer(model: ARTransformer) -> torch.optim.Optimizer:
    return build_optimizer(functools.partial(torch.optim.AdamW, lr=1e-4, betas=(0.9, 0.95)), model, 0.05)


def loss_of(model: ARTransformer, tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
    return model(tokens, states, mask, targets=tokens, cond_drop_prob=COND_DROP_PROB)[1]


def plain_loop(model: ARTransformer, loader: DataLoader, warmup: int, device: torch.device) -> float:
    """Seconds per step over the steps after `warmup`."""
    optimizer = make_optimizer(model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    start = None
    for step, (tokens, states) in enumerate(loader):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        tokens, states = tokens.to(device, non_blocking=True), states.to(device, non_blocking=True)
        with autocast:
            loss = loss_of(model, tokens, states)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return (time.perf_counter() - start) / (len(loader) - warmup)


class TrainingBenchModule(pl.LightningModule):
    """The same step as `plain_loop` inside Lightning (bf16-mixed comes from the Trainer's precision)."""

    def __init__(self, model: ARTransformer):
        super().__init__()
        self.net = model

    def training_step(self, batch, batch_idx):
        tokens, states = batch
        loss = loss_of(self.net, tokens, states)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return make_optimizer(self.net)


class StepTimer(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            synchronize(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps = batch_idx + 1 - self.warmup

    def on_train_end(self, trainer, pl_module):
        synchronize(pl_module.device)
        self.end = time.perf_counter()


def lightning_loop(model: ARTransformer, loader: DataLoader, warmup: int, device: torch.device) -> float:
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        accelerator=device.type, devices=1, precision="bf16-mixed", max_steps=len(loader), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(TrainingBenchModule(model), loader)
    return (timer.end - timer.start) / timer.steps


def run(
    size: str, batch: int, steps: int, warmup: int, grid: int, vocab: int, text_length: int, text_dim: int,
    peak_flops: float, device: torch.device, compile_model: bool, budget=None, profile: bool = False,
    progress: Callable[[dict], None] | None = None,
) -> dict:  # fmt: skip
    """Plain eager, plain compiled and Lightning (compiled where `compile_model`) for one model size; with
    `profile`, three steps of the plain loop (compiled where it was) run under the profiler (`profile_ops`). Each
    part starts only while `budget` has its `COST_S` left (else `skipped`). `progress(result)` after each loop: the
    result so far (the same dict, filled in)."""
    torch.manual_seed(0)
    model = ARTransformer.from_size(size, vocab_size=vocab, grid_size=(grid, grid), text_dim=text_dim).to(
        device
    )
    flops_per_step = 3 * model.flops_per_sample(text_length) * batch
    tokens_per_step = batch * model.config.num_image_tokens
    result = {"size": size, "params": model.num_params(), "batch": batch, "tokens_per_step": tokens_per_step}
    result["train_flops_per_step"] = flops_per_step
    result["mfu_convention"] = MFU_CONVENTION

    def allows(part: str) -> bool:
        if budget is None or budget.allows(COST_S[part]):
            return True
        result.setdefault("skipped", {})[part] = "time budget"
        print(f"[bench] training {size} {part}: skipped (time budget)", flush=True)
        if progress is not None:
            progress(result)
        return False

    def record(name: str, seconds_per_step: float) -> None:
        result[name] = {
            "step_ms": 1e3 * seconds_per_step,
            "tokens_per_s": tokens_per_step / seconds_per_step,
            "mfu": flops_per_step / seconds_per_step / peak_flops,
        }
        if progress is not None:
            progress(result)

    if not allows("plain_eager"):
        return result
    data = token_data(model, batch * (warmup + steps), text_length)
    pin = device.type == "cuda"
    loader = DataLoader(data, batch_size=batch, shuffle=False, drop_last=True, pin_memory=pin)
    record("plain_eager", plain_loop(model, loader, warmup, device))
    if compile_model and allows("plain_compiled"):
        torch._dynamo.reset()  # compile for this size alone: another size's graphs would be recompiled mid-timing
        model.compile_blocks()
        record("plain_compiled", plain_loop(model, loader, warmup, device))
        result["compile_speedup"] = result["plain_eager"]["step_ms"] / result["plain_compiled"]["step_ms"]
    reference = "plain_compiled" if "plain_compiled" in result else "plain_eager"
    if profile and allows("profile"):
        steps = DataLoader(Subset(data, range(3 * batch)), batch_size=batch, drop_last=True, pin_memory=pin)
        result["profile_of"] = reference
        result["profile"] = profile_ops(lambda: plain_loop(model, steps, 0, device), device)
        for line in profile_lines(result["profile"]):
            print(f"[bench] training {size} {reference} profile | {line}", flush=True)
    if allows("lightning"):
        record("lightning", lightning_loop(model, loader, warmup, device))
        result["lightning_overhead"] = result["lightning"]["step_ms"] / result[reference]["step_ms"]
        result["lightning_compared_with"] = reference
    return result
