"""The performance suite: every figure of the GPU-performance targets, measured side by side in one run on one card.

    python -m imagen.bench                       # GPU preset on a GPU (sizes B and L), else the CPU preset
    python -m imagen.bench --preset cpu --out DIR
    python -m imagen.bench --preset gpu --out $OUT --budget-s 420

Sections, in this order (the most important first, so a run cut short by its budget still answers them):
ceilings (measured matmul FLOP/s and copy bandwidth), correctness checks of the cached and compiled samplers,
sampling (KV cache eager and compiled, full recompute, HF GPT-2 `generate`, the bandwidth/compute floor), AR
training (tokens/s, MFU, compile speedup, Lightning overhead), the autoencoder (encode, decode, train step).
Sampling at batch 64 and three training steps of each size also run under the profiler: the kernels that take
their time (`profile` in their entries). Writes OUT/bench.json and OUT/targets.md (the targets with the measured
ratios) after every measurement, each atomically (a temporary file renamed over it), so that a run cut short keeps
its last complete figures; SIGTERM (the suite's time limit) ends the run with the section it cut recorded in
`errors`. A section (and each loop of a training section) starts only while the budget has room for it, else it
is listed in `not_measured` (`skipped` inside an entry). Prints the table at the end. bench.json records the
commit, whether the tree differed from it (`git_dirty`) and `source_sha256`, the digest of the source that ran
(`python -m imagen.bench.common` computes it for a checkout; BENCHMARKS.md: matching it to a commit).
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from imagen.bench import autoencoder as autoencoder_bench
from imagen.bench import sampling as sampling_bench
from imagen.bench import training as training_bench
from imagen.bench.common import Budget, device_name, measure_ceilings, strict_json
from imagen.files import REPO_ROOT, source_digest, write_text_atomic
from imagen.models.ar_transformer import ARTransformer
from imagen.sampling.ar import (
    SamplingSettings,
    compiled_decode_step,
    generate,
    generate_recompute,
    reusable_cache,
)

PRESETS = {
    "gpu": {
        "ceilings": {"matmul_size": 8192, "copy_mib": 1024},
        "repeats": 1,  # after one warm-up run; the eager baselines at batch 1 take seconds per call
        "compile": True,
        "grid": 16,
        "vocab": 16384,
        "text_length": 32,
        # 32,768 and 16,384 image tokens per step, twice the batches of the H200 run of 2026-11-27 (MFU 39% / 41%): the
        # costs that do not grow with the batch (the optimizer's pass over the weights, kernel launches) weigh less
        "training": [{"size": "B", "batch": 128}, {"size": "L", "batch": 64}],
        "train_steps": 15,
        "train_warmup": 10,  # compiled steps settle after a few recompiles (5 were too few for size L)
        "text_dim": 768,
        "sampling": [
            # the batches whose targets the H200 run missed first (KV / recompute, floor / best at 64 and 256)
            {"size": "B", "batch_sizes": [64, 256, 16, 1], "recompute_up_to": 64},
            {"size": "L", "batch_sizes": [1, 64], "recompute_up_to": 0},
        ],
        "autoencoder": {"size": "f16", "image_size": 256, "batch": 64, "train_batch": 16},
        # where the time goes: one sampling call at this batch and three training steps, under the profiler
        "profile_sampling_batch": 64,
        "profile_training": True,
    },
    "cpu": {
        "ceilings": {"matmul_size": 512, "copy_mib": 64, "loops": 2},
        "repeats": 1,
        "compile": False,
        "grid": 4,
        "vocab": 64,
        "text_length": 8,
        "training": [{"size": "tiny", "batch": 4}],
        "train_steps": 2,
        "train_warmup": 1,
        "text_dim": 32,
        "sampling": [{"size": "tiny", "batch_sizes": [1, 4], "recompute_up_to": 4}],
        "autoencoder": {"size": "tiny", "image_size": 32, "batch": 4, "train_batch": 2},
        "profile_sampling_batch": 4,
        "profile_training": True,
    },
}
# seconds a section needs left in the budget to start (its parts are gated again inside: sampling per batch size,
# training per loop); the first training size starts if its eager loop fits, a later one only with room to compile
SECTION_S = {"sampling": 60, "first training": 30, "training": 90, "autoencoder": 20}


def correctness_checks(device: torch.device, compile_step: bool) -> dict:
    """On this device: cached sampling = full recompute (fp32 without TF32, greedy, the cache read in blocks of 16
    and whole), and the compiled step = the eager one at three batch sizes, from one compilation, with no step left
    out of CUDA graphs; then the same with guidance stopped halfway (`cfg_until`: one more compilation, for the
    unguided steps), twice on one kept cache. The attended lengths are multiples of 16, as in the benchmark (16x16
    tokens, blocks of 64): the fused attention kernels' alignment test on a length would otherwise be a guard that
    compiles the step twice."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # an exact token match must not hinge on rounding near-ties
    try:
        return _correctness_checks(device, compile_step)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _correctness_checks(device: torch.device, compile_step: bool) -> dict:
    torch.manual_seed(0)
    model = ARTransformer.from_size("tiny", vocab_size=64, grid_size=(8, 8), text_dim=32).to(device).eval()

    def text(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.ones(batch, 8, dtype=torch.bool, device=device)
        mask[0, 5:] = False
        return torch.randn(batch, 8, 32, device=device), mask

    states, mask = text(3)
    greedy = SamplingSettings(cfg_scale=2.0, temperature=0.0)
    recomputed = generate_recompute(model, states, mask, greedy)
    result = {
        "kv_cache_equals_recompute": all(
            bool((generate(model, states, mask, greedy, attend_block=block) == recomputed).all())
            for block in (16, None)
        )
    }
    if compile_step:
        torch._dynamo.reset()
        counters.clear()
        step, sampled, same = compiled_decode_step(), SamplingSettings(cfg_scale=2.0, top_k=10), True
        for batch in (3, 32, 24):
            states, mask = text(batch)
            eager, compiled = (
                generate(
                    model, states, mask, sampled, torch.Generator(device).manual_seed(0), s, attend_block=16
                )
                for s in (None, step)
            )
            same = same and bool((eager == compiled).all())
        result["compiled_equals_eager"] = same
        result["compilations"] = counters["stats"]["unique_graphs"]  # 1 expected
        result["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]  # 0 expected
        # guidance stopped halfway: the second half decodes the conditional rows on views of the cache's buffers, twice
        # on one cache (as the stage keeps it), so the second call replays the graphs the first recorded on the views
        stopped, caches, same = replace(sampled, cfg_until=0.5), {}, True
        for seed in (0, 1):
            eager = generate(
                model, states, mask, stopped, torch.Generator(device).manual_seed(seed), attend_block=16
            )
            cache = reusable_cache(caches, model, states, stopped)
            compiled = generate(
                model,
                states,
                mask,
                stopped,
                torch.Generator(device).manual_seed(seed),
                step,
                cache,
                attend_block=16,
            )
            same = same and bool((eager == compiled).all())
        result["cfg_until_compiled_equals_eager"] = same
        # 1 expected
        result["cfg_until_compilations"] = counters["stats"]["unique_graphs"] - result["compilations"]
        # 0 expected
        result["cfg_until_cudagraph_skips"] = (
            counters["inductor"]["cudagraph_skips"] - result["cudagraph_skips"]
        )
    return result


class Terminated(BaseException):
    """SIGTERM (the suite's time limit): passes the sections' handlers, which catch only `Exception`."""


def raise_terminated(signum, frame) -> None:
    raise Terminated(signal.Signals(signum).name)


def git(*command: str) -> str | None:
    try:
        out = subprocess.run(["git", *command], capture_output=True, text=True, timeout=10, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str:
    """HEAD: on a lent GPU machine, the session's starting commit, not necessarily what ran (`source_sha256` is)."""
    return (git("rev-parse", "--short", "HEAD") or "").strip() or "unknown"


def git_dirty() -> bool | None:
    """Whether the working tree differs from HEAD (`git status --porcelain`); None without git."""
    status = git("status", "--porcelain")
    return None if status is None else bool(status.strip())


def target_rows(report: dict) -> list[tuple[str, str, str, bool | None]]:
    """(target, goal, measured, met) for every target the report can answer; unmeasured ones say so."""
    rows: list[tuple[str, str, str, bool | None]] = []

    gpu = report.get("preset") == "gpu"  # the goals are set for the GPU preset; CPU figures are smoke values

    def add(name: str, goal: str, value: float | None, ok: bool | None, fmt: str = "{:.2f}") -> None:
        met = ok if gpu and value is not None else None
        rows.append((name, goal, "not measured" if value is None else fmt.format(value), met))

    for entry in report.get("sampling", []):
        size = entry.get("size")
        by_batch = {r["batch"]: r for r in entry.get("images_per_second", []) if "skipped" not in r}
        for batch, goal in ((1, 8), (64, 5)):
            v = by_batch.get(batch, {}).get("ratio_vs_hf")
            add(
                f"sampling {size} batch {batch}: best / HF generate",
                f">= {goal}x",
                v,
                v is not None and v >= goal,
            )
        v = by_batch.get(64, {}).get("kv_cache_vs_recompute")
        if v is not None or size == report.get("sampling", [{}])[0].get("size"):
            add(f"sampling {size} batch 64: KV cache / recompute", ">= 8x", v, v is not None and v >= 8)
        for batch in (64, 256):
            v = by_batch.get(batch, {}).get("floor_over_best")
            add(f"sampling {size} batch {batch}: floor / best", "<= 3x", v, v is not None and v <= 3)
    mfu_goal = {"B": 0.4, "L": 0.5}
    for entry in report.get("training", []):
        size = entry.get("size")
        best = max(
            (entry[k]["mfu"] for k in ("plain_compiled", "lightning", "plain_eager") if k in entry),
            default=None,
        )
        goal = mfu_goal.get(size)
        add(f"training {size}: MFU (best loop)", f">= {goal:.0%}" if goal else "-", best,
            None if goal is None else best is not None and best >= goal, "{:.1%}")  # fmt: skip
        v = entry.get("lightning_overhead")
        add(
            f"training {size}: Lightning / plain step time",
            "<= 1.05x",
            v,
            v is not None and v <= 1.05,
            "{:.3f}",
        )
        v = entry.get("compile_speedup")
        add(f"training {size}: compiled speedup over eager", ">= 1.2x", v, v is not None and v >= 1.2)
    share = report.get("autoencoder_decode_share")
    add("autoencoder decode / time per image", "<= 10%", share, share is not None and share <= 0.10, "{:.1%}")
    return rows


def print_targets(rows) -> str:
    lines = ["| target | goal | measured | met |", "| --- | --- | --- | --- |"]
    for name, goal, measured, ok in rows:
        lines.append(f"| {name} | {goal} | {measured} | {'-' if ok is None else 'yes' if ok else 'NO'} |")
    return "\n".join(lines)


FLOOR_COLUMNS = {"kv_cache": "KV eager", "kv_cache_compiled": "KV compiled", "recompute": "recompute",
                 "hf_gpt2_generate": "HF generate"}  # fmt: skip


def floor_table(report: dict) -> str:
    """Each sampling method's time per image over the floor's (`floor_over_<method>`), by size and batch; "" when
    no floor was measured."""
    lines = []
    for entry in report.get("sampling", []):
        for row in entry.get("images_per_second", []):
            if "floor" in row:
                cells = [
                    f"{row[f'floor_over_{k}']:.2f}x" if f"floor_over_{k}" in row else "-"
                    for k in FLOOR_COLUMNS
                ]
                lines.append(f"| {entry.get('size')} | {row['batch']} | {' | '.join(cells)} |")
    if not lines:
        return ""
    return "\n".join([
        "Sampling, time per image / the floor's (1.0 = at the bandwidth/compute floor; `floor_over_<method>`):",
        "",
        f"| size | batch | {' | '.join(FLOOR_COLUMNS.values())} |",
        "|" + " --- |" * (2 + len(FLOOR_COLUMNS)),
        *lines,
    ])  # fmt: skip


def targets_text(report: dict) -> str:
    """targets.md: the targets, each sampling method against the floor, and how the figures were taken."""
    parts = [print_targets(target_rows(report)), floor_table(report)]
    timing = report.get("ceilings", {}).get("timing", "-")
    dirty = {True: " + uncommitted changes", False: "", None: " (dirty: unknown)"}[report.get("git_dirty")]
    parts.append("\n".join([
        f"- MFU: {training_bench.MFU_CONVENTION}.",
        f"- Timing: repeats={report.get('repeats')}, timed runs per figure after the warm-up (their median); "
        f"the ceilings: {timing}.",
        f"- Source: commit {report.get('commit')}{dirty}, sha256 {report.get('source_sha256')} "
        "(`python -m imagen.bench.common`).",
    ]))  # fmt: skip
    return "\n\n".join(part for part in parts if part) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--out", default="bench_out", help="folder for bench.json and targets.md")
    parser.add_argument(
        "--budget-s", type=float, default=420, help="stop starting new measurements after this"
    )
    parser.add_argument("--sections", nargs="*", default=["checks", "sampling", "training", "autoencoder"])
    parser.add_argument("--sizes", nargs="*", help="only these model sizes (sampling and training)")
    parser.add_argument(
        "--sampling-batch-sizes", type=int, nargs="*", help="replace the preset's batch sizes"
    )
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (after the warm-up)")
    sampling_bench.add_decode_arguments(parser)
    args = parser.parse_args(argv)
    p = dict(PRESETS[args.preset])
    if args.sizes:
        p["sampling"] = [e for e in p["sampling"] if e["size"] in args.sizes]
        p["training"] = [e for e in p["training"] if e["size"] in args.sizes]
    if args.sampling_batch_sizes:
        p["sampling"] = [{**e, "batch_sizes": args.sampling_batch_sizes} for e in p["sampling"]]
    if args.repeats:
        p["repeats"] = args.repeats
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    report: dict = {
        "preset": args.preset,
        "device": device_name(device),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "git_dirty": git_dirty(),
        "source_sha256": source_digest(),
        "repeats": p["repeats"],
        "command": " ".join([Path(sys.executable).name, "-m", "imagen.bench", *(argv or sys.argv[1:])]),
        "errors": {},
        "not_measured": {
            "data": "JPEG loader and token cache: `python -m imagen.bench.loader`, a step of imagen.bench.gpu_suite"
        },
    }

    def save() -> None:
        write_text_atomic(out / "bench.json", strict_json(report))
        write_text_atomic(out / "targets.md", targets_text(report))

    running: dict = {}  # the section in progress: name and start

    def section(name: str, fn) -> None:
        if name != "ceilings" and name.split()[0] not in args.sections:
            return
        running.update(name=name, start=time.monotonic())
        try:
            fn()
        except Exception as error:  # one failing section must not lose the others' figures
            report["errors"][name] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
        report.setdefault("section_seconds", {})[name] = round(time.monotonic() - running.pop("start"), 1)
        running.clear()
        print(f"[bench] {name}: {report['section_seconds'][name]} s", flush=True)
        save()

    def gated(name: str, needs: float, fn) -> None:
        """`section(name, fn)` while the budget has `needs` seconds left, else listed as not measured."""
        if name.split()[0] not in args.sections:
            return
        if budget.allows(needs):
            section(name, fn)
        else:
            report["not_measured"][name] = "time budget"
            print(f"[bench] {name}: skipped (time budget)", flush=True)

    def ceilings() -> None:
        report["ceilings"] = measure_ceilings(device, **p["ceilings"])
        print(f"[bench] ceilings: {report['ceilings']}", flush=True)

    def checks() -> None:
        report["checks"] = correctness_checks(device, p["compile"] and device.type == "cuda")
        print(f"[bench] checks: {report['checks']}", flush=True)

    def progress(kind: str) -> Callable[[dict], None]:
        """Saves a section's result as it fills in: a run cut short by a time limit keeps what it measured."""
        entries = report.setdefault(kind, [])

        def save_partial(result: dict) -> None:
            if not any(entry is result for entry in entries):
                entries.append(result)
            save()

        return save_partial

    def sampling(entry: dict) -> None:
        sampling_bench.run_size(
            entry["size"], p["grid"], p["vocab"], p["text_length"],
            torch.bfloat16 if device.type == "cuda" else torch.float32, entry["batch_sizes"], device,
            repeats=p["repeats"], recompute_up_to=entry["recompute_up_to"],
            compile_step=p["compile"] and device.type == "cuda", ceilings=report["ceilings"], budget=budget,
            log=lambda line: print(f"[bench] {line}", flush=True), attend_block=args.attend_block or None,
            decode_math=args.decode_math, profile_batch=p["profile_sampling_batch"], progress=progress("sampling"),
        )  # fmt: skip

    def training(entry: dict) -> None:
        result = training_bench.run(
            entry["size"], entry["batch"], p["train_steps"], p["train_warmup"], p["grid"], p["vocab"],
            p["text_length"], p["text_dim"], report["ceilings"]["matmul_flops"], device, p["compile"], budget,
            profile=p["profile_training"], progress=progress("training"),
        )  # fmt: skip
        print(
            f"[bench] training: {json.dumps({k: v for k, v in result.items() if k != 'profile'})}", flush=True
        )

    def autoencoder() -> None:
        result = autoencoder_bench.run(**p["autoencoder"], device=device, repeats=p["repeats"])
        report["autoencoder"] = result
        print(f"[bench] autoencoder: {json.dumps(result)}", flush=True)
        first = next(
            (r for r in (report.get("sampling") or [{}])[0].get("images_per_second", []) if r["batch"] == 64),
            None,
        )
        best = (
            max((first[k] for k in ("kv_cache", "kv_cache_compiled") if k in first), default=None)
            if first
            else None
        )
        if best is not None:
            decode = 1 / result["decode_images_per_s"]
            report["autoencoder_decode_share"] = decode / (1 / best + decode)

    def run_sections() -> None:
        section("ceilings", ceilings)
        section("checks", checks)
        sampling_entries, training_entries = list(p["sampling"]), list(p["training"])
        # the first size of each first (the targets' main figures), then the autoencoder, then the larger sizes
        if sampling_entries:
            first = sampling_entries.pop(0)
            gated(f"sampling {first['size']}", SECTION_S["sampling"], lambda: sampling(first))
        if training_entries:
            first = training_entries.pop(0)
            gated(f"training {first['size']}", SECTION_S["first training"], lambda: training(first))
        gated("autoencoder", SECTION_S["autoencoder"], autoencoder)
        for kind, entries, run_entry in (
            ("training", training_entries, training),
            ("sampling", sampling_entries, sampling),
        ):
            for entry in entries:
                gated(f"{kind} {entry['size']}", SECTION_S[kind], lambda e=entry, f=run_entry: f(e))

    # SIGTERM (gpu_suite's limit, SIGKILL 20 s later) raises `Terminated`: the cut section is recorded, then saved
    handles_sigterm = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_terminated) if handles_sigterm else None
    try:
        run_sections()
    except Terminated as signal_name:
        name = running.get("name", "between sections")
        report["errors"][name] = (
            f"terminated by {signal_name} (the time limit); what it measured before is kept"
        )
        report["terminated"] = name
        if "start" in running:
            report.setdefault("section_seconds", {})[name] = round(time.monotonic() - running["start"], 1)
        print(f"[bench] {report['errors'][name]}", flush=True)
        save()
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        if handles_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    save()
    print(targets_text(report), flush=True)
    return report


if __name__ == "__main__":
    main()
