"""sample.py task=generate: files, grid and manifest for a trained checkpoint; clear errors for bad input."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from unittest import mock

import pytest
import torch

from imagen.checkpoints import CheckpointError
from imagen.cli.sample import sample
from imagen.sampling.ar import KVCache
from tests.conftest import TINY_SHAPES, train_tiny_stage
from tests.test_train import TINY_GENERATOR, tiny_autoencoder_ckpt  # noqa: F401  (session fixture)


@pytest.fixture(scope="module")
def generator_ckpt(tmp_path_factory, tiny_autoencoder_ckpt) -> Path:  # noqa: F811
    return train_tiny_stage(
        [
            "experiment=shapes_generator",
            *TINY_SHAPES,
            *TINY_GENERATOR,
            f"model.autoencoder_ckpt={tiny_autoencoder_ckpt}",
            "trainer.max_steps=3",
            "trainer.limit_val_batches=0",
        ],  # fmt: skip
        tmp_path_factory.mktemp("tiny_generator"),
    )


def sample_cfg(make_cfg, tmp_path, *overrides: str):
    return make_cfg([f"out_dir={tmp_path / 'out'}", *overrides], config_name="sample")


def test_sample_writes_images_grid_and_manifest(make_cfg, generator_ckpt, tmp_path):
    prompts = '["a small red circle on the left","a large blue square above a small green triangle"]'
    cfg = sample_cfg(
        make_cfg, tmp_path, f"ckpt={generator_ckpt}", f"prompts={prompts}", "n=3", "cfg_scale=2.0", "top_k=20"
    )
    summary = sample(cfg)
    out = tmp_path / "out"
    assert summary["images"] == 6
    assert (out / "grid.png").is_file() and len(list((out / "images").glob("*.png"))) == 6
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt_index"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert rows[0]["settings"]["cfg_scale"] == 2.0 and rows[0]["settings"]["top_k"] == 20
    assert all((out / r["file"]).is_file() and r["scores"]["mean_token_logprob"] < 0 for r in rows)


def test_sample_defaults_to_the_checkpoints_settings(make_cfg, generator_ckpt, tmp_path):
    from imagen.cli.sample_generate import load_generator

    recorded = asdict(load_generator(str(generator_ckpt), trust=False).sampling)
    assert recorded["top_p"] is not None  # experiment=shapes_generator validates with a nucleus cut-off
    sample(sample_cfg(make_cfg, tmp_path, f"ckpt={generator_ckpt}", "prompts=[a red circle]", "n=1"))
    row = json.loads((tmp_path / "out" / "samples.jsonl").read_text())
    assert row["settings"] == recorded
    # one setting given: the others stay the checkpoint's; top_k=0 and top_p=1 turn the cut-offs off
    sample(sample_cfg(make_cfg, tmp_path, f"ckpt={generator_ckpt}", "prompts=[a red circle]", "n=1",
                      "temperature=1.0", "top_k=0", "top_p=1.0", "cfg_until=0.5"))  # fmt: skip
    row = json.loads((tmp_path / "out" / "samples.jsonl").read_text())
    assert row["settings"] == {**recorded, "temperature": 1.0, "top_k": None, "top_p": 1.0, "cfg_until": 0.5}


def test_sample_is_reproducible_for_a_seed(make_cfg, generator_ckpt, tmp_path):
    files = []
    for name in ("a", "b"):
        cfg = make_cfg([f"out_dir={tmp_path / name}", f"ckpt={generator_ckpt}", "prompts=[a small red circle]", "n=2",
                        "seed=5"], config_name="sample")  # fmt: skip
        sample(cfg)
        files.append([(tmp_path / name / "images" / f"000_0{i}.png").read_bytes() for i in range(2)])
    assert files[0] == files[1]


def test_sample_errors_name_the_problem(make_cfg, generator_ckpt, tiny_autoencoder_ckpt, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="no prompts"):
        sample(sample_cfg(make_cfg, tmp_path, f"ckpt={generator_ckpt}"))
    with pytest.raises(CheckpointError, match="no such file"):
        sample(sample_cfg(make_cfg, tmp_path, f"ckpt={tmp_path / 'missing.ckpt'}", "prompts=[x]"))
    with pytest.raises(CheckpointError, match="autoencoder"):
        sample(sample_cfg(make_cfg, tmp_path, f"ckpt={tiny_autoencoder_ckpt}", "prompts=[x]"))
    with pytest.raises(ValueError, match="compile_decode='yes': must be auto, true or false"):
        sample(sample_cfg(make_cfg, tmp_path, f"ckpt={generator_ckpt}", "prompts=[x]", "compile_decode=yes"))
    with pytest.raises(ValueError, match=r"decode_dtype='float16': must be one of \['bfloat16', 'float32'\]"):
        sample(
            sample_cfg(make_cfg, tmp_path, f"ckpt={generator_ckpt}", "prompts=[x]", "decode_dtype=float16")
        )
    with pytest.raises(ValueError, match="rerank_candidates=-2 must be >= 1"):
        sample(
            sample_cfg(make_cfg, tmp_path, f"ckpt={generator_ckpt}", "prompts=[x]", "rerank_candidates=-2")
        )


def test_one_prompt_without_list_brackets_is_one_prompt(make_cfg, tmp_path):
    from imagen.cli.sample_generate import read_prompts

    # Hydra reads `prompts=a small red circle` as one string: one prompt, not one per character
    assert read_prompts(make_cfg(["prompts=a small red circle"], config_name="sample")) == [
        "a small red circle"
    ]


def test_sample_decodes_in_bfloat16(make_cfg, generator_ckpt, tmp_path):
    # the generator's weights and its KV cache in bf16 (the text encoder and the autoencoder stay as they were)
    from imagen.cli.sample_generate import load_generator

    stages = []

    def load(*args, **kwargs):
        stages.append(load_generator(*args, **kwargs))
        return stages[-1]

    with (
        mock.patch.object(KVCache, "allocate", wraps=KVCache.allocate) as allocate,
        mock.patch("imagen.cli.sample_generate.load_generator", load),
    ):
        summary = sample(sample_cfg(make_cfg, tmp_path, f"ckpt={generator_ckpt}", "prompts=[a red circle]", "n=2",
                                    "decode_dtype=bfloat16"))  # fmt: skip
    assert allocate.call_args.args[4] == torch.bfloat16
    (stage,) = stages
    assert {p.dtype for p in stage.net.parameters()} == {torch.bfloat16}
    assert {p.dtype for m in (stage.text_encoder, stage.autoencoder) for p in m.parameters()} == {
        torch.float32
    }
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert summary["images"] == 2 and all(r["decode_dtype"] == "bfloat16" for r in rows)
    assert all(
        math.isfinite(r["scores"]["mean_token_logprob"]) and r["scores"]["mean_token_logprob"] < 0
        for r in rows
    )


def test_compile_decode_compiles_the_sampler_on_a_gpu_only_when_auto():
    from imagen.cli.sample_generate import compile_decode

    assert compile_decode("auto", torch.device("cuda")) and not compile_decode("auto", torch.device("cpu"))
    assert compile_decode(True, torch.device("cpu")) and not compile_decode(False, torch.device("cuda"))
