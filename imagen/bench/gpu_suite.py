"""Every GPU check and benchmark in one short run, for a session that is lent a GPU for a few minutes.

    python -m imagen.bench.gpu_suite --out $OUT [--budget-s 500] [--work /tmp/imagen_gpu]
    python -m imagen.bench.gpu_suite --out $OUT --bench-args="--decode-math"   # `=`: the value starts with --

Runs, each in its own process with its own time limit (SIGTERM 20 s before it, which a training run answers by
writing its checkpoint, and SIGKILL at it), logging to WORK/logs/<name>.log:
1. the performance suite, GPU preset (`python -m imagen.bench`: ceilings, sampler checks, sampling, training,
   autoencoder), which writes OUT/bench.json (after every measurement) and OUT/targets.md;
2. a short autoencoder run on the GPU (bf16-mixed): the stage trains, validates and tests on CUDA;
3. a short generator run on its checkpoint: training, sampling during validation and the test metrics on CUDA;
4. `sample.py` on that checkpoint in bf16 with the compiled decode step (the deployment path);
5. the data loader benchmark (`python -m imagen.bench.loader`: JPEG decoding per worker and the token cache, on
   the machine's CPUs): whether the host feeds the card.
Run directories and caches go under --work (a fresh run starts every stage from scratch: `ckpt_path=null`). OUT
gets four files, rewritten after every step, so that a run cut short keeps what it did: bench.json, targets.md,
summary.json (return codes, seconds, the runs' metrics, the loader's figures) and suite.tar.gz (the logs, the
stages' metrics, the loader's JSON and the sampled images).

On a machine without network, the packages its image lacks travel as wheels (BENCHMARKS.md, "Running the suite
on a lent GPU").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from imagen.files import write_text_atomic

GRACE_S = 20  # between SIGTERM and SIGKILL


def step(name: str, command: list[str], logs: Path, timeout: float) -> dict:
    """Run `command` with its output in logs/<name>.log; SIGTERM when the grace period (`GRACE_S`, or a quarter of a
    short step's time) before `timeout` begins, SIGKILL at `timeout`."""
    start = time.time()
    grace = min(GRACE_S, timeout / 4)
    with open(logs / f"{name}.log", "w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        try:
            rc = process.wait(timeout=timeout - grace)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            rc = "timeout"
    result = {"name": name, "command": " ".join(command), "rc": rc, "seconds": round(time.time() - start, 1)}
    print(json.dumps(result), flush=True)
    return result


def read_step_output(path: Path, lines: bool = False) -> dict | list[dict] | None:
    """A step's JSON file (`lines`: JSON lines); None if it wrote none, {"unreadable": ...} for a file or line cut
    off while being written (the lines before it are kept)."""
    if not path.is_file():
        return None
    records = path.read_text().splitlines() if lines else [path.read_text()]
    read = []
    for number, record in enumerate(records, 1):
        try:
            read.append(json.loads(record))
        except json.JSONDecodeError as error:
            read.append({"unreadable": f"{path}{f' line {number}' if lines else ''}: {error}"})
            break
    return read if lines else read[0]


def stage_dirs(work: Path) -> tuple[Path, Path]:
    """The run directories of the autoencoder and generator steps."""
    return work / "autoencoder", work / "generator"


def report(out: Path, work: Path, results: list[dict]) -> None:
    """OUT/summary.json and OUT/suite.tar.gz from what the steps have left so far."""
    ae_dir, gen_dir = stage_dirs(work)
    summary = {
        "steps": results,
        "autoencoder_metrics": read_step_output(ae_dir / "metrics.json"),
        "generator_metrics": read_step_output(gen_dir / "metrics.json"),
        "sample_manifest": read_step_output(work / "sample_out" / "samples.jsonl", lines=True),
        "loader": read_step_output(work / "loader.json"),
    }
    # through a temporary file, as the archive: a suite killed meanwhile leaves the last complete one
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    packed = [work / "logs", work / "loader.json", work / "sample_out", ae_dir / "metrics.json",
              gen_dir / "metrics.json"]  # fmt: skip
    with tarfile.open(out / ".suite.tar.gz", "w:gz") as tar:
        for path in packed:
            if path.exists():
                tar.add(path, arcname=str(path.relative_to(work)))
    os.replace(out / ".suite.tar.gz", out / "suite.tar.gz")


def build_plan(args: argparse.Namespace, out: Path, work: Path) -> list[tuple[str, list[str], float]]:
    """(name, command, share of the budget) of each step, in order."""
    python = sys.executable
    train = [
        python,
        "train.py",
        "trainer=gpu",
        "ckpt_path=null",
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
                       "trainer.val_check_interval=150", "model.test_prompts=128",
                       f"model.autoencoder_ckpt={ae_dir}/checkpoints/last.ckpt", f"hydra.run.dir={gen_dir}"],
         stage_share),
        ("sample", [python, "sample.py", f"ckpt={gen_dir}/checkpoints/last.ckpt", f"prompts={prompts}", "n=16",
                    "decode_dtype=bfloat16", f"out_dir={work / 'sample_out'}", "overwrite=true",  # a rerun on a warm machine
                    f"hydra.run.dir={work / 'sample'}"],
         args.sample_share),
        ("loader", [python, "-m", "imagen.bench.loader", "--workers", "0", "4", "--seconds", "3",
                    "--json", str(work / "loader.json")], args.loader_share),
    ]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="bench.json, targets.md, summary.json, suite.tar.gz")
    parser.add_argument("--budget-s", type=float, default=500, help="seconds for all steps together")
    parser.add_argument("--work", default="/tmp/imagen_gpu", help="run directories and caches")
    parser.add_argument("--bench-args", default="", help="extra arguments for `python -m imagen.bench`")
    parser.add_argument(
        "--bench-share", type=float, default=0.56, help="fraction of the budget for the bench"
    )
    parser.add_argument("--loader-share", type=float, default=0.06, help="fraction for the loader benchmark")
    parser.add_argument("--sample-share", type=float, default=0.08, help="fraction for sample.py")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget_s
    plan = build_plan(args, out, work)
    results: list[dict] = []
    for i, (name, command, share) in enumerate(plan):
        # a step may overrun its share by half, but never into the time held back for the steps after it
        left = deadline - time.time() - sum(s for *_, s in plan[i + 1 :]) * args.budget_s
        if left < min(30, 0.5 * share * args.budget_s):
            results.append({"name": name, "rc": "skipped: out of time"})
        else:
            results.append(step(name, command, work / "logs", timeout=min(left, share * args.budget_s * 1.5)))
        report(out, work, results)
    failed = [r["name"] for r in results if r["rc"] != 0]
    print("failed or skipped: " + ", ".join(failed) if failed else "all steps passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
