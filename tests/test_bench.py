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
        # the floor is a lower bound on time, so no sampler can beat it
        assert row["floor_over_best"] >= 1
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
