"""Every GPU check and benchmark in one short run, for a session that is lent a GPU for a few minutes.

    python -m imagen.bench.gpu_suite --out $OUT [--budget-s 500] [--work /tmp/imagen_gpu]

Runs, each in its own process with its own time limit, logging to OUT/<name>.log:
1. the performance suite, GPU preset (`python -m imagen.bench`: ceilings, sampler checks, sampling, training,
   autoencoder), which writes OUT/bench.json and OUT/targets.md;
2. a short autoencoder run on the GPU (bf16-mixed): the stage trains, validates and tests on CUDA;
3. a short generator run on its checkpoint: training, sampling during validation and the test metrics on CUDA;
4. `sample.py` on that checkpoint in bf16 with the compiled decode step (the deployment path), images to OUT/sample;
5. the data loader benchmark (`python -m imagen.bench.loader`: JPEG decoding per worker and the token cache, on
   the machine's CPUs), which writes OUT/loader.json: whether the host feeds the card.
Run directories and caches go under --work; OUT gets only the few files worth bringing back, and
OUT/summary.json (return codes, seconds, the runs' metrics).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def step(name: str, command: list[str], out: Path, timeout: float) -> dict:
    start = time.time()
    with open(out / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    result = {"name": name, "command": " ".join(command), "rc": rc, "seconds": round(time.time() - start, 1)}
    print(json.dumps(result), flush=True)
    return result


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def read_jsonl(path: Path) -> list[dict] | None:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else None


def stage_dirs(work: Path) -> tuple[Path, Path]:
    """The run directories of the autoencoder and generator steps."""
    return work / "autoencoder", work / "generator"


def build_plan(args: argparse.Namespace, out: Path, work: Path) -> list[tuple[str, list[str], float]]:
    """(name, command, share of the budget) of each step, in order."""
    python = sys.executable
    train = [
        python,
        "train.py",
        "trainer=gpu",
        "extras.print_config=false",
        f"paths.cache_dir={work / 'cache'}",
    ]
    ae_dir, gen_dir = stage_dirs(work)
    bench_budget = 0.85 * args.bench_share * args.budget_s  # it stops starting measurements in time to finish
    stage_share = (1 - args.bench_share - args.loader_share - args.sample_share) / 2
    prompts = '["a small red circle on the left","a large blue square above a small green triangle"]'
    return [
        ("bench", [python, "-m", "imagen.bench", "--preset", "gpu", "--out", str(out),
                   "--budget-s", str(round(bench_budget)), *args.bench_args.split()], args.bench_share),
        ("autoencoder", [*train, "experiment=shapes_autoencoder", "trainer.max_steps=500",
                         "trainer.val_check_interval=250", f"hydra.run.dir={ae_dir}"], stage_share),
        ("generator", [*train, "experiment=shapes_generator", "data.num_train=20000", "trainer.max_steps=300",
                       "trainer.val_check_interval=150", f"model.autoencoder_ckpt={ae_dir}/checkpoints/last.ckpt",
                       f"hydra.run.dir={gen_dir}"], stage_share),
        ("sample", [python, "sample.py", f"ckpt={gen_dir}/checkpoints/last.ckpt", f"prompts={prompts}", "n=16",
                    "decode_dtype=bfloat16", f"out_dir={out / 'sample'}", f"hydra.run.dir={work / 'sample'}"],
         args.sample_share),
        ("loader", [python, "-m", "imagen.bench.loader", "--workers", "0", "4", "--seconds", "3",
                    "--json", str(out / "loader.json")], args.loader_share),
    ]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder for logs, run directories and summary.json")
    parser.add_argument("--budget-s", type=float, default=500, help="seconds for all steps together")
    parser.add_argument("--work", default="/tmp/imagen_gpu", help="run directories and caches")
    parser.add_argument("--bench-args", default="", help="extra arguments for `python -m imagen.bench`")
    parser.add_argument(
        "--bench-share", type=float, default=0.56, help="fraction of the budget for the bench"
    )
    parser.add_argument("--loader-share", type=float, default=0.06, help="fraction for the loader benchmark")
    parser.add_argument("--sample-share", type=float, default=0.08, help="fraction for sample.py")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget_s
    plan = build_plan(args, out, work)
    results = []
    for i, (name, command, share) in enumerate(plan):
        # a step may overrun its share by half, but never into the time held back for the steps after it
        left = deadline - time.time() - sum(s for *_, s in plan[i + 1 :]) * args.budget_s
        if left < 30:
            results.append({"name": name, "rc": "skipped: out of time"})
            continue
        results.append(step(name, command, out, timeout=min(left, share * args.budget_s * 1.5)))
    ae_dir, gen_dir = stage_dirs(work)
    summary = {
        "steps": results,
        "autoencoder_metrics": read_json(ae_dir / "metrics.json"),
        "generator_metrics": read_json(gen_dir / "metrics.json"),
        "sample_manifest": read_jsonl(out / "sample" / "samples.jsonl"),
        "loader": read_json(out / "loader.json"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    failed = [r["name"] for r in results if r["rc"] != 0]
    print("failed or skipped: " + ", ".join(failed) if failed else "all steps passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
