"""The performance suite's CPU preset runs end to end, so the GPU preset's code cannot rot between GPU runs."""

from __future__ import annotations

import json
import math
from unittest import mock

import pytest
import torch

from imagen.bench.__main__ import correctness_checks, main
from imagen.stages.ar_generator import has_cpp_compiler


def test_cpu_preset_measures_every_section(tmp_path):
    report = main(["--preset", "cpu", "--out", str(tmp_path)])
    assert report["errors"] == {}
    assert json.loads((tmp_path / "bench.json").read_text())["preset"] == "cpu"
    assert report["ceilings"]["matmul_flops"] > 0 and report["ceilings"]["copy_bytes_per_s"] > 0
    assert report["checks"] == {"kv_cache_equals_recompute": True}
    rows = report["sampling"][0]["images_per_second"]
    assert [r["batch"] for r in rows] == [1, 4]
    for row in rows:
        for key in ("kv_cache", "recompute", "hf_gpt2_generate", "floor"):
            assert row[key] > 0, key
        # the floor is a lower bound on time, so no sampler can beat it; each method is given against it
        assert row["floor_over_best"] >= 1
        for key in ("kv_cache", "recompute", "hf_gpt2_generate"):
            assert row[f"floor_over_{key}"] >= 1, key
    # where the time goes: operators (kernels on a GPU) by their time, the largest first, their shares of the whole
    for entry in (rows[1], report["training"][0]):
        top = entry["profile"]["top"]
        assert top and [t["ms"] for t in top] == sorted((t["ms"] for t in top), reverse=True)
        assert 0 < sum(t["share"] for t in top) <= 1 + 1e-9
    (training,) = report["training"]
    assert any(t["name"] in ("aten::mm", "aten::addmm") for t in training["profile"]["top"])
    assert training["plain_eager"]["tokens_per_s"] > 0 and 0 < training["plain_eager"]["mfu"] < 1
    assert math.isfinite(training["lightning_overhead"])
    assert report["autoencoder"]["decode_images_per_s"] > 0
    table = (tmp_path / "targets.md").read_text()
    assert "| sampling tiny batch 1: best / HF generate | >= 8x |" in table
    assert "| size | batch | KV eager | KV compiled | recompute | HF generate |" in table
    assert f"| tiny | 4 | {rows[1]['floor_over_kv_cache']:.2f}x | - |" in table
    assert "causal attention counted in full (PaLM convention)" in table and "repeats=1," in table
    assert training["mfu_convention"] in table


def test_cpu_step_benchmark_times_the_variants_and_restores_the_attention(tmp_path):
    import imagen.models.ar_transformer as ar_transformer
    import imagen.models.text_encoder as text_encoder
    from imagen.bench.cpu_step import main as cpu_step_main

    out = cpu_step_main(["--size", "tiny", "--batch", "2", "--steps", "1", "--rounds", "1", "--compile",
                         "--json", str(tmp_path / "step.json")])  # fmt: skip
    assert set(out["seconds_per_step"]) == {"project", "generic", "compiled"}
    assert all(len(v) == 1 and v[0] > 0 for v in out["seconds_per_step"].values())
    assert math.isfinite(out["compile_speedup"])
    assert json.loads((tmp_path / "step.json").read_text())["speedup"] == out["speedup"]
    # the generic variant's patches are undone: the project's attention and GRU precision are back
    assert ar_transformer.attention.__name__ == "attention"
    assert text_encoder.rnn_precision.__name__ == "rnn_precision"


def test_gpu_sampler_checks_run_on_cpu_with_inductor():
    # the checks a GPU run makes of the compiled sampler step; here inductor compiles for CPU (no CUDA graphs, so
    # the one step left out of them is expected, and one more for the unguided step after `cfg_until`)
    if not has_cpp_compiler():
        pytest.skip("inductor on CPU needs a C++ compiler")
    checks = correctness_checks(torch.device("cpu"), compile_step=True)
    assert checks == {
        "kv_cache_equals_recompute": True,
        "compiled_equals_eager": True,
        "compilations": 1,
        "cudagraph_skips": 1,
        "cfg_until_compiled_equals_eager": True,
        "cfg_until_compilations": 1,
        "cfg_until_cudagraph_skips": 1,
    }


def test_sampling_bench_measures_guidance_stopped_early_beside_full_guidance():
    from imagen.bench.sampling import run_size
    from imagen.sampling.ar import generate

    with mock.patch("imagen.bench.sampling.generate", wraps=generate) as sampled:
        report = run_size("tiny", 4, 64, 8, torch.float32, [2], torch.device("cpu"), repeats=1, recompute_up_to=0,
                          hf_up_to=0, cfg_until=0.5)  # fmt: skip
    assert {call.args[3].cfg_until for call in sampled.call_args_list} == {1.0, 0.5}
    (row,) = report["images_per_second"]
    # the other figures guide every token
    assert report["cfg_until"] == 0.5 and report["settings"]["cfg_until"] == 1.0
    assert row["kv_cache"] > 0 and row["kv_cache_cfg_until"] > 0
    assert math.isfinite(row["kv_cache_cfg_until_speedup"])


def test_gpu_suite_steps_compose_and_share_the_whole_budget(make_cfg, tmp_path):
    # the suite runs only on a lent GPU: a misspelt override must show here, not there
    from imagen.bench.gpu_suite import build_plan, parse_args

    plan = build_plan(parse_args(["--out", str(tmp_path / "out")]), tmp_path / "out", tmp_path / "work")
    assert [name for name, *_ in plan] == ["bench", "autoencoder", "generator", "sample", "loader"]
    assert sum(share for *_, share in plan) == pytest.approx(1.0)
    for name, command, _ in plan:
        if command[1] in ("train.py", "sample.py"):
            overrides = [o for o in command[2:] if not o.startswith(("hydra.", "paths.cache_dir", "extras."))]
            cfg = make_cfg(overrides, config_name=command[1].removesuffix(".py"))
            assert cfg.get("trainer", {}).get("accelerator", "gpu") == "gpu", name


def test_a_section_cut_short_keeps_what_it_measured(tmp_path):
    # bench.json is written after every measurement (a GPU run is killed at its time limit); here the Lightning loop
    # fails after the plain loop was timed, and the plain loop's figures stay in the report and on disk
    import imagen.bench.training as training_bench

    with mock.patch.object(training_bench, "lightning_loop", side_effect=RuntimeError("killed")):
        report = main(["--preset", "cpu", "--out", str(tmp_path), "--sections", "training"])
    assert report["errors"] == {"training tiny": "RuntimeError: killed"}
    (saved,) = json.loads((tmp_path / "bench.json").read_text())["training"]
    assert saved["plain_eager"]["tokens_per_s"] > 0 and "lightning" not in saved
    assert "| training tiny: MFU (best loop) |" in (tmp_path / "targets.md").read_text()


def test_a_failing_profiler_is_reported_beside_the_figures():
    from imagen.bench.common import profile_lines, profile_ops

    def fails():
        raise RuntimeError("CUPTI unavailable")

    profile = profile_ops(fails, torch.device("cpu"))
    assert profile == {"error": "RuntimeError: CUPTI unavailable"}
    assert profile_lines(profile) == ["profiler failed: RuntimeError: CUPTI unavailable"]


def test_gpu_suite_brings_back_four_files_and_stops_a_step_with_sigterm_first(tmp_path, monkeypatch):
    # a lent GPU machine returns at most 8 files from OUT; a step past its time gets SIGTERM (a training run then
    # writes its checkpoint) before SIGKILL, and what every step left is packed after each step
    import sys
    import tarfile

    import imagen.bench.gpu_suite as gpu_suite

    on_term = ("import signal, sys, time\n"
               "signal.signal(signal.SIGTERM, lambda *a: (print('terminated'), sys.exit(3)))\n"
               "print('started')\ntime.sleep(60)")  # fmt: skip
    plan = [
        ("bench", [sys.executable, "-c", "print('measured')"], 0.5),
        ("generator", [sys.executable, "-c", on_term], 0.5),
    ]
    monkeypatch.setattr(gpu_suite, "build_plan", lambda *args: plan)
    monkeypatch.setattr(gpu_suite, "GRACE_S", 1)
    out, work = tmp_path / "out", tmp_path / "work"
    rc = gpu_suite.main(["--out", str(out), "--work", str(work), "--budget-s", "4"])
    assert rc == 1
    # bench.json and targets.md come from the real bench step
    assert sorted(p.name for p in out.iterdir()) == ["suite.tar.gz", "summary.json"]
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert [(s["name"], s["rc"]) for s in steps] == [("bench", 0), ("generator", "timeout")]
    with tarfile.open(out / "suite.tar.gz") as tar:
        logs = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    assert logs["logs/bench.log"] == "measured\n"
    assert logs["logs/generator.log"] == "started\nterminated\n"


def test_the_autoencoder_section_stands_when_sampling_measured_nothing(tmp_path):
    import imagen.bench.sampling as sampling_bench

    with mock.patch.object(sampling_bench, "run_size", side_effect=RuntimeError("out of memory")):
        report = main(["--preset", "cpu", "--out", str(tmp_path), "--sections", "sampling", "autoencoder"])
    assert report["errors"] == {"sampling tiny": "RuntimeError: out of memory"}
    assert report["autoencoder"]["decode_images_per_s"] > 0 and "autoencoder_decode_share" not in report


def test_gpu_suite_reads_what_a_step_cut_off_while_writing_left(tmp_path):
    from imagen.bench.gpu_suite import read_step_output

    assert read_step_output(tmp_path / "none.json") is None
    (tmp_path / "cut.json").write_text('{"val/psnr": 3')
    assert read_step_output(tmp_path / "cut.json")["unreadable"].startswith(f"{tmp_path / 'cut.json'}: ")
    (tmp_path / "samples.jsonl").write_text('{"image": "a.png"}\n{"image": "b.png"}\n{"ima')
    records = read_step_output(tmp_path / "samples.jsonl", lines=True)
    assert records[:2] == [{"image": "a.png"}, {"image": "b.png"}]
    assert len(records) == 3 and records[2]["unreadable"].startswith(f"{tmp_path / 'samples.jsonl'} line 3: ")


def test_a_failing_cached_sampler_leaves_the_other_methods_and_strict_json(tmp_path):
    # eager KV sampling out of memory at a batch: recompute, HF generate and the floor of that batch and of the later
    # batches stay, each ratio only where both its terms were measured, and bench.json has no bare NaN
    import imagen.bench.sampling as sampling_bench

    def refuse(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    with mock.patch.object(sampling_bench, "generate", side_effect=refuse):
        main(["--preset", "cpu", "--out", str(tmp_path), "--sections", "sampling"])

    def no_constant(name):
        raise AssertionError(f"bare {name} in bench.json")

    report = json.loads((tmp_path / "bench.json").read_text(), parse_constant=no_constant)
    assert report["errors"] == {}
    rows = report["sampling"][0]["images_per_second"]
    assert [r["batch"] for r in rows] == [1, 4]
    for row in rows:
        assert row["kv_cache_error"] == "RuntimeError: CUDA out of memory"
        assert row["recompute"] > 0 and row["hf_gpt2_generate"] > 0 and row["floor"] > 0
        assert row["floor_over_recompute"] > 0 and row["floor_over_hf_gpt2_generate"] > 0
        unmeasured = {"ratio_vs_hf", "kv_cache_vs_recompute", "floor_over_best", "floor_over_kv_cache"}
        assert not unmeasured & set(row)


def test_strict_json_writes_non_finite_floats_as_null():
    from imagen.bench.common import strict_json

    text = strict_json({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


def test_sigterm_keeps_the_complete_files_and_names_the_cut_section(tmp_path):
    # gpu_suite stops the bench with SIGTERM at its limit: the section it cut is recorded, what was measured before it
    # is kept, and both files are complete (written to a temporary file, then renamed over the old one)
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import os, signal, sys, time\n"
        "from unittest import mock\n"
        "import imagen.bench.training as training_bench\n"
        "from imagen.bench.__main__ import main\n"
        "def killed(*args):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(60)\n"
        "with mock.patch.object(training_bench, 'lightning_loop', killed):\n"
        "    main(['--preset', 'cpu', '--out', sys.argv[1], '--sections', 'training'])\n"
    )
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", script, str(out)], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 143, done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "targets.md"]
    report = json.loads((out / "bench.json").read_text())
    assert report["terminated"] == "training tiny"
    assert report["errors"]["training tiny"].startswith("terminated by SIGTERM")
    (training,) = report["training"]
    assert training["plain_eager"]["tokens_per_s"] > 0 and "lightning" not in training
    assert "| training tiny: MFU (best loop) |" in (out / "targets.md").read_text()


def test_sections_past_the_budget_are_skipped_not_started(tmp_path):
    from imagen.files import source_digest

    report = main(["--preset", "cpu", "--out", str(tmp_path), "--budget-s", "0", "--sections", "training",
                   "autoencoder"])  # fmt: skip
    assert report["not_measured"]["training tiny"] == "time budget"
    assert report["not_measured"]["autoencoder"] == "time budget"
    assert not report.get("training") and "autoencoder" not in report and report["errors"] == {}
    # what ran: the digest of the source (a lent GPU machine's git metadata is the session's starting commit)
    assert report["source_sha256"] == source_digest() and report["git_dirty"] in (True, False)


def test_training_loops_past_the_budget_are_skipped_not_started():
    from imagen.bench.training import run

    class EagerOnly:  # room for the first part asked about (the eager loop), none after it
        asked = 0

        def allows(self, seconds):
            self.asked += 1
            return self.asked == 1

    result = run("tiny", 2, 2, 1, 4, 64, 8, 32, 1e12, torch.device("cpu"), compile_model=False, budget=EagerOnly(),
                 profile=True)  # fmt: skip
    assert result["plain_eager"]["tokens_per_s"] > 0
    assert "lightning" not in result and "profile" not in result
    assert result["skipped"] == {"profile": "time budget", "lightning": "time budget"}


def test_the_matmul_ceiling_is_a_warmed_up_loop_of_calls():
    # a card's first calls run slower (clocks, heuristics): a peak timed on them would inflate MFU
    import time

    from imagen.bench.common import measure_ceilings

    calls = []

    def mm(*args, **kwargs):
        calls.append(None)
        time.sleep(0.02 if len(calls) <= 15 else 0.001)

    with mock.patch("torch.mm", mm):
        ceilings = measure_ceilings(torch.device("cpu"), matmul_size=64, copy_mib=1)
    assert 2 * 64**3 / ceilings["matmul_flops"] < 0.005  # seconds per call: the fast ones
    assert len(calls) >= 15 + 5 * 20 and "best of 5 loops of 20 calls" in ceilings["timing"]


def test_source_digest_covers_the_code_and_config_that_run(tmp_path):
    import shutil

    from imagen.files import source_digest

    files = {"imagen/a.py": "a = 1\n", "imagen/sub/b.py": "b = 2\n", "conf/x.yaml": "x: 1\n",
             "conf/local/y.yaml": "y: 1\n", "imagen/__pycache__/a.pyc": "", "README.md": "r\n"}  # fmt: skip
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    digest = source_digest(tmp_path)
    shutil.copytree(tmp_path, tmp_path.parent / "copy")
    assert source_digest(tmp_path.parent / "copy") == digest
    # not run, or not carried to a lent machine (git ignores conf/local): no change
    for name in ("README.md", "conf/local/y.yaml", "imagen/__pycache__/a.pyc"):
        (tmp_path / name).write_text("changed\n")
    assert source_digest(tmp_path) == digest
    (tmp_path / "imagen/sub/b.py").write_text("b = 3\n")
    assert source_digest(tmp_path) != digest
    (tmp_path / "imagen/sub/b.py").write_text("b = 2\n")
    # an installed package: the configs inside it as imagen/conf/, with its package marker
    installed = tmp_path.parent / "site"
    shutil.copytree(tmp_path / "imagen", installed / "imagen")
    shutil.copytree(tmp_path / "conf", installed / "imagen" / "conf")
    (installed / "imagen/conf/__init__.py").write_text("")
    assert source_digest(installed) == digest
    (installed / "imagen/conf/x.yaml").write_text("x: 2\n")
    assert source_digest(installed) != digest
    (tmp_path / "imagen/a.py").rename(tmp_path / "imagen/c.py")
    assert source_digest(tmp_path) != digest


def test_a_batch_that_fails_outside_the_methods_leaves_the_next_batches():
    # out of memory allocating the KV cache at the large batch: the batch is recorded with its floor, the next runs
    from imagen.bench.sampling import KVCache, run_size

    allocate = KVCache.allocate

    def refuse_large(model, rows, *args, **kwargs):
        if rows == 8:
            raise RuntimeError("CUDA out of memory")
        return allocate(model, rows, *args, **kwargs)

    ceilings = {"copy_bytes_per_s": 1e10, "matmul_flops": 1e11}
    with mock.patch.object(KVCache, "allocate", side_effect=refuse_large):
        report = run_size("tiny", 4, 64, 8, torch.float32, [4, 2], torch.device("cpu"), repeats=1, recompute_up_to=0,
                          hf_up_to=0, ceilings=ceilings)  # fmt: skip
    large, small = report["images_per_second"]
    assert large["error"] == "RuntimeError: CUDA out of memory" and large["floor"] > 0
    assert small["kv_cache"] > 0 and small["floor_over_kv_cache"] == small["floor_over_best"] > 0
