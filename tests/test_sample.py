"""sample.py task=generate: files, grid and manifest for a trained checkpoint; clear errors for bad input."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, replace
from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image

from imagen.checkpoints import CheckpointError
from imagen.cli.sample import sample
from imagen.images import save_png, to_uint8
from imagen.sampling.ar import KVCache
from tests.conftest import TINY_SHAPES, train_tiny_stage
from tests.test_train import TINY_GENERATOR, TINY_JOINT, tiny_autoencoder_ckpt  # noqa: F401  (session fixture)


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


@pytest.fixture(scope="module")
def captioner_ckpt(tmp_path_factory, tiny_autoencoder_ckpt) -> Path:  # noqa: F811
    """A joint stage trained without the generation loss, whose caption decoding is not the default."""
    return train_tiny_stage(
        ["experiment=shapes_joint", *TINY_SHAPES, *TINY_JOINT, f"model.autoencoder_ckpt={tiny_autoencoder_ckpt}",
         "model.loss_weights.generation=0", "model.caption_decoding.generator_weight=0",
         "model.retrieval_generator_weight=null", "model.caption_decoding.length_penalty=0.5",
         "model.caption_decoding.max_length=7", "trainer.max_steps=2", "trainer.limit_val_batches=0"],
        tmp_path_factory.mktemp("tiny_captioner"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def ner_ckpt(tmp_path_factory) -> Path:
    return train_tiny_stage(
        ["experiment=ner_tiny", "trainer.max_steps=2", "callbacks.rich_progress_bar=null"],
        tmp_path_factory.mktemp("tiny_ner"),
    )


def edited_ckpt(path: Path, out: Path, edit) -> Path:
    """A copy of checkpoint `path` at `out`, its contents changed in place by `edit`."""
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, out)
    return out


def sample_cfg(make_cfg, tmp_path, *overrides: str):
    return make_cfg([f"out_dir={tmp_path / 'out'}", *overrides], config_name="sample")


def test_sample_writes_images_grid_and_manifest(make_cfg, generator_ckpt, tmp_path):
    prompts = '["a small red circle on the left","a large blue square above a small green triangle"]'
    cfg = sample_cfg(
        make_cfg,
        tmp_path,
        f"ckpt={generator_ckpt}",
        f"prompts={prompts}",
        "n=3",
        "cfg_scale=2.0",
        "top_k=20",
        "batch_size=4",
    )
    summary = sample(cfg)
    out = tmp_path / "out"
    assert summary["images"] == 6
    assert (out / "grid.png").is_file() and len(list((out / "images").glob("*.png"))) == 6
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt_index"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert [r["seed"] for r in rows] == [0, 2**32, 2**33, 0, 2**32, 2**33]  # seed + sample index x 2^32
    assert all(r["ckpt"] == str(generator_ckpt) and "unknown_words" not in r for r in rows)
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
                      "temperature=1.0", "top_k=0", "top_p=1.0", "cfg_until=0.5", "overwrite=true"))  # fmt: skip
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


def test_an_image_depends_on_its_prompt_and_seed_not_on_its_batch(make_cfg, generator_ckpt, tmp_path):
    prompts = '["a small red circle on the left","a large blue square above a small green triangle"]'
    runs = {}
    for name, overrides in {"batch_1": ["batch_size=1"], "batch_4": ["batch_size=4"]}.items():
        sample(sample_cfg(make_cfg, tmp_path / name, f"ckpt={generator_ckpt}", f"prompts={prompts}", "n=3", "seed=5",
                          "temperature=1.0", *overrides))  # fmt: skip
        runs[name] = {p.name: p.read_bytes() for p in (tmp_path / name / "out" / "images").glob("*.png")}
    assert len(runs["batch_1"]) == 6 and runs["batch_1"] == runs["batch_4"]
    for prompt in ("000", "001"):  # and the draws differ from sample to sample
        assert len({data for name, data in runs["batch_1"].items() if name.startswith(prompt)}) > 1
    # one image alone, from its record's seed
    row = [
        json.loads(line) for line in (tmp_path / "batch_4" / "out" / "samples.jsonl").read_text().splitlines()
    ][4]
    alone = tmp_path / "alone"
    sample(sample_cfg(make_cfg, alone, f"ckpt={generator_ckpt}", f"prompts=[{row['prompt']}]", "n=1",
                      f"seed={row['seed']}", "temperature=1.0"))  # fmt: skip
    assert (alone / "out" / "images" / "000_00.png").read_bytes() == runs["batch_4"]["001_01.png"]
    # the next seed gives new images, not the same ones shifted by one
    sample(sample_cfg(make_cfg, tmp_path / "seed_6", f"ckpt={generator_ckpt}", f"prompts={prompts}", "n=3", "seed=6",
                      "temperature=1.0"))  # fmt: skip
    next_seed = {p.read_bytes() for p in (tmp_path / "seed_6" / "out" / "images").glob("*.png")}
    assert not next_seed & set(runs["batch_1"].values())


def test_a_bad_setting_with_overwrite_leaves_the_earlier_outputs_in_place(make_cfg, generator_ckpt, tmp_path):
    sample(sample_cfg(make_cfg, tmp_path, f"ckpt={generator_ckpt}", "prompts=[a red circle]", "n=1"))
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*"))
    for setting, error in [("rerank_candidates=3", "needs a joint-stage checkpoint"),
                           ("rerank_candidates=0", "rerank_candidates=0 must be >= 1"),
                           ("seed=abc", "seed='abc' must be an integer"), ("seed=1.5", "seed=1.5 must be an integer"),
                           ("seed=null", "seed=None must be an integer"), ("seed=-1", "seed=-1 must be >= 0"),
                           (f"seed={2**63 - 2**32}", "too large for n=2")]:  # fmt: skip
        with pytest.raises(ValueError, match=error):
            sample(sample_cfg(make_cfg, tmp_path, f"ckpt={generator_ckpt}", "prompts=[a red circle]", "n=2",
                              "overwrite=true", setting))  # fmt: skip
        assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*")) == before


def test_an_interrupted_run_describes_every_image_it_saved(make_cfg, generator_ckpt, tmp_path):
    from imagen.stages.ar_generator import ARGeneratorStage

    decode, calls = ARGeneratorStage.decode_tokens, []

    def decode_then_stop(stage, tokens):
        calls.append(len(tokens))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return decode(stage, tokens)

    with (
        mock.patch.object(ARGeneratorStage, "decode_tokens", decode_then_stop),
        pytest.raises(KeyboardInterrupt),
    ):
        sample(sample_cfg(make_cfg, tmp_path, f"ckpt={generator_ckpt}", 'prompts=["a red circle","a blue square"]',
                          "n=3", "batch_size=2"))  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    saved = sorted(p.name for p in (tmp_path / "out" / "images").glob("*.png"))
    assert len(saved) == 4 and sorted(Path(r["file"]).name for r in rows) == saved


def test_words_the_caption_vocabulary_lacks_are_named(make_cfg, generator_ckpt, tmp_path, caplog):
    sample(sample_cfg(make_cfg, tmp_path, f"ckpt={generator_ckpt}", "prompts=[a small magenta circle]",
                      "n=1"))  # fmt: skip
    row = json.loads((tmp_path / "out" / "samples.jsonl").read_text())
    assert row["unknown_words"] == ["magenta"]
    assert "['magenta'] are not in the checkpoint's caption vocabulary" in caplog.text


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


def test_an_out_dir_with_an_earlier_runs_outputs_is_refused_or_overwritten(
    make_cfg, generator_ckpt, tmp_path
):
    out = tmp_path / "out"
    sample(sample_cfg(make_cfg, tmp_path, f"ckpt={generator_ckpt}", "prompts=[a red circle]", "n=2"))
    (out / "notes.txt").write_text("mine")  # not an output of sample.py: kept
    with pytest.raises(FileExistsError, match=f"out_dir={out} holds an earlier run's images, grid.png, "
                                              "samples.jsonl; .* overwrite=true"):  # fmt: skip
        sample(sample_cfg(make_cfg, tmp_path, f"ckpt={generator_ckpt}", "prompts=[a red circle]", "n=1"))
    assert len(list((out / "images").glob("*.png"))) == 2
    sample(
        sample_cfg(
            make_cfg, tmp_path, f"ckpt={generator_ckpt}", "prompts=[a red circle]", "n=1", "overwrite=true"
        )
    )
    rows = (out / "samples.jsonl").read_text().splitlines()
    assert len(rows) == 1 and [p.name for p in (out / "images").iterdir()] == ["000_00.png"]
    assert (out / "notes.txt").read_text() == "mine"
    # an images/ folder holding anything else is not sample.py's: refused even with overwrite=true, all kept
    (out / "images" / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=r"holds files sample.py did not write \(\['holiday.jpg'\]\)"):
        sample(
            sample_cfg(
                make_cfg, tmp_path, f"ckpt={generator_ckpt}", "prompts=[a red circle]", "overwrite=true"
            )
        )
    assert (out / "images" / "holiday.jpg").is_file() and (out / "samples.jsonl").is_file()


def test_prompts_file_is_utf8_with_or_without_a_byte_order_mark(make_cfg, tmp_path):
    from imagen.cli.sample_generate import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_bytes("a red circle\r\n\n  a café square \n".encode("utf-8-sig"))
    assert read_prompts(make_cfg([f"prompts_file={path}"], config_name="sample")) == [
        "a red circle",
        "a café square",
    ]
    path.write_bytes("a red circle\na café square\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"prompts_file={path}:2: not UTF-8 .*iconv"):
        read_prompts(make_cfg([f"prompts_file={path}"], config_name="sample"))


def test_a_joint_checkpoint_with_an_untrained_head_is_refused(make_cfg, captioner_ckpt, tmp_path, caplog):
    error = f"checkpoint {captioner_ckpt} was trained with model.loss_weights.generation=0: its generator is untrained"
    with pytest.raises(CheckpointError, match=error):
        sample(sample_cfg(make_cfg, tmp_path, f"ckpt={captioner_ckpt}", "prompts=[a red circle]", "n=1"))

    # a run that started from another's weights (model.init_from) keeps that run's generator: a warning
    def started_from_a_run(checkpoint):
        checkpoint["hyper_parameters"]["init_from"] = "earlier/last.ckpt"

    fine_tuned = edited_ckpt(captioner_ckpt, tmp_path / "fine_tuned.ckpt", started_from_a_run)
    summary = sample(sample_cfg(make_cfg, tmp_path, f"ckpt={fine_tuned}", "prompts=[a red circle]", "n=1"))
    assert summary["images"] == 1
    assert (
        "its generator is that of the run it started from (model.init_from=earlier/last.ckpt)" in caplog.text
    )

    # the mirror case: a joint checkpoint trained without the caption loss has no captioner
    def without_captions(checkpoint):
        checkpoint["imagen"]["loss_weights"]["caption"] = 0.0
        checkpoint["imagen"]["rerank"]["score"] = "match"

    no_captioner = edited_ckpt(captioner_ckpt, tmp_path / "no_captioner.ckpt", without_captions)
    image = save_png(to_uint8(torch.zeros(1, 3, 32, 32))[0], tmp_path / "images" / "a.png")
    with pytest.raises(CheckpointError, match="model.loss_weights.caption=0: its captioner is untrained"):
        sample(sample_cfg(make_cfg, tmp_path, f"ckpt={no_captioner}", "task=caption", f"images={image}"))


def test_caption_decoding_starts_from_the_checkpoints_settings(make_cfg, captioner_ckpt, tmp_path):
    from imagen.stages.joint import JointStage

    save_png(to_uint8(torch.zeros(1, 3, 32, 32))[0], tmp_path / "images" / "a.png")
    used = []

    def caption_images(self, images, decoding=None, generator=None):
        used.append(decoding)
        return ["a caption"] * len(images)

    with mock.patch.object(JointStage, "caption_images", caption_images):
        sample(sample_cfg(make_cfg, tmp_path, f"ckpt={captioner_ckpt}", "task=caption",
                          f"images={tmp_path / 'images'}", "beam_size=2"))  # fmt: skip
    recorded = JointStage.from_checkpoint(str(captioner_ckpt)).caption_decoding
    assert recorded.length_penalty == 0.5 and recorded.max_length == 7 and recorded.method == "beam"
    assert used == [replace(recorded, beam_size=2)]  # only the setting given changes
    assert json.loads((tmp_path / "out" / "captions.jsonl").read_text())["decoding"] == "beam"


def test_caption_reads_every_image_extension_in_subfolders_as_evaluation_does(
    make_cfg, captioner_ckpt, tmp_path, caplog
):
    from imagen.data.image_text import Preprocess
    from imagen.data.preprocess import open_image, resize_crop, to_tensor
    from imagen.stages.joint import JointStage

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    pixels = to_uint8(torch.rand(4, 3, 256, 256) * 2 - 1)  # (4, 256, 256, 3)
    for image, name in zip(pixels, ["a.jpg", "b.tif", "c.gif", "sub/d.png"], strict=True):
        Image.fromarray(image).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    seen = []

    def caption_images(self, images, decoding=None, generator=None):
        seen.append(images)
        return ["a caption"] * len(images)

    with mock.patch.object(JointStage, "caption_images", caption_images):
        summary = sample(
            sample_cfg(make_cfg, tmp_path, f"ckpt={captioner_ckpt}", "task=caption", f"images={folder}")
        )
    rows = [json.loads(line) for line in (tmp_path / "out" / "captions.jsonl").read_text().splitlines()]
    names = ["a.jpg", "b.tif", "c.gif", "sub/d.png"]  # subfolders included, in path order
    assert summary["captions"] == 4 and [r["relative_path"] for r in rows] == names
    assert [r["file"] for r in rows] == [str(folder / r["relative_path"]) for r in rows]
    assert "1 files are not images by extension" in caplog.text and "['notes.txt']" in caplog.text
    # the JPEG is decoded as evaluation decodes it: at a reduced size (draft), not in full and then resized
    data, size = (folder / "a.jpg").read_bytes(), seen[0].shape[-1]
    assert torch.equal(seen[0][0], Preprocess(size, max_pixels=None)(data, ["x"], "a.jpg")["image"])
    assert not torch.equal(seen[0][0], to_tensor(resize_crop(open_image(data, "a.jpg", None), size, False)))


def test_an_image_that_cannot_be_read_is_skipped_as_a_bad_sample_not_an_abort(tmp_path):
    from imagen.cli.sample_caption import read_image
    from imagen.data.bad_samples import BadSample

    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(path)
    assert read_image(path, 8).shape == (3, 8, 8)
    with pytest.raises(BadSample, match=r"gone.png: missing_image"):
        read_image(tmp_path / "gone.png", 8)
    with mock.patch.object(Path, "read_bytes", side_effect=OSError(5, "Input/output error")):
        with pytest.raises(BadSample, match=r"x.png: unreadable_file \(.*Input/output error"):
            read_image(path, 8)


def test_sample_settings_errors_name_the_key(make_cfg, generator_ckpt, captioner_ckpt, tmp_path):
    generate = [f"ckpt={generator_ckpt}", "prompts=[x]"]
    with pytest.raises(ValueError, match="n=0 must be >= 1"):
        sample(sample_cfg(make_cfg, tmp_path, *generate, "n=0"))
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        sample(sample_cfg(make_cfg, tmp_path, *generate, "batch_size=0"))
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        sample(sample_cfg(make_cfg, tmp_path, f"ckpt={captioner_ckpt}", "task=caption", f"images={tmp_path}",
                          "batch_size=0"))  # fmt: skip
    with pytest.raises(ValueError, match="device='gpu' is not a device; use auto, cpu, cuda or cuda:N"):
        sample(sample_cfg(make_cfg, tmp_path, *generate, "device=gpu"))
    with (
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.device_count", return_value=2),
        pytest.raises(ValueError, match=r"device=cuda:2: this machine has 2 GPUs \(cuda:0 ...\)"),
    ):
        sample(sample_cfg(make_cfg, tmp_path, *generate, "device=cuda:2"))
    # a run directory is not an exported folder: the error says so and points at its last checkpoint
    run = generator_ckpt.parent.parent
    with pytest.raises(CheckpointError, match=f"checkpoint {run} is a folder without model.safetensors, so not an "
                                              f"exported checkpoint.*e.g. the run's {generator_ckpt}"):  # fmt: skip
        sample(sample_cfg(make_cfg, tmp_path, f"ckpt={run}", "prompts=[x]"))


def test_ner_sample_errors_name_the_key_and_the_checkpoint(make_cfg, ner_ckpt, tmp_path):
    with (
        mock.patch("torch.cuda.is_available", return_value=False),
        pytest.raises(ValueError, match="device=cuda: CUDA is not available on this machine; use device=cpu"),
    ):
        sample(sample_cfg(make_cfg, tmp_path, "task=ner", f"ckpt={ner_ckpt}", "text=Hello", "device=cuda"))

    def extra_key(checkpoint):
        checkpoint["state_dict"]["net.extra.weight"] = torch.zeros(2)

    bad = edited_ckpt(ner_ckpt, tmp_path / "bad.ckpt", extra_key)
    with pytest.raises(CheckpointError, match=f"checkpoint ckpt={bad} does not match NerTagger:\n  unexpected keys: "
                                              "extra.weight"):  # fmt: skip
        sample(sample_cfg(make_cfg, tmp_path, "task=ner", f"ckpt={bad}", "text=Hello"))
    # entities.jsonl of an earlier run is not overwritten without overwrite=true
    sample(sample_cfg(make_cfg, tmp_path, "task=ner", f"ckpt={ner_ckpt}", "text=Hello"))
    with pytest.raises(FileExistsError, match="holds an earlier run's entities.jsonl"):
        sample(sample_cfg(make_cfg, tmp_path, "task=ner", f"ckpt={ner_ckpt}", "text=Hello"))
    sample(sample_cfg(make_cfg, tmp_path, "task=ner", f"ckpt={ner_ckpt}", "text=Hi there", "overwrite=true"))
    assert json.loads((tmp_path / "out" / "entities.jsonl").read_text())["text"] == "Hi there"


GENERATE_SETTING_ERRORS = [
    ("cfg_scale=high", "cfg_scale='high' must be a number; the guidance scale: 0 samples unconditionally"),
    ("cfg_scale=-3", "cfg_scale=-3 must be >= 0; the guidance scale: 0 samples unconditionally (the prompt is "
                     "ignored), 1 conditionally without guidance, above 1 with guidance"),
    ("cfg_scale=inf", "cfg_scale=inf must be a finite number"),
    ("temperature=hot", "temperature='hot' must be a number; 0: greedy"),
    ("temperature=-1", "temperature=-1 must be >= 0; 0: greedy"),
    ("top_k=2.5", "top_k=2.5 must be an integer; 0: no top-k cut-off"),
    ("top_k=-1", "top_k=-1 must be >= 0; 0: no top-k cut-off"),
    ("top_p=abc", "top_p='abc' must be a number; 1: no nucleus cut-off"),
    ("top_p=1.5", "top_p=1.5 must be in (0, 1]; 1: no nucleus cut-off"),
    ("cfg_until=abc", "cfg_until='abc' must be a number"),
    ("cfg_until=0", "cfg_until=0 must be in (0, 1]"),
    ("overwrite=yes", "overwrite='yes' must be true or false"),
    ("trust_checkpoint=no", "trust_checkpoint='no' must be true or false"),
]  # fmt: skip


@pytest.mark.parametrize(
    "setting, message", GENERATE_SETTING_ERRORS, ids=[s for s, _ in GENERATE_SETTING_ERRORS]
)
def test_a_bad_sampling_setting_is_named_before_the_model_is_loaded(
    make_cfg, generator_ckpt, tmp_path, setting, message
):
    from imagen.cli import sample_generate
    from imagen.cli.checks import ConfigError

    with (
        mock.patch.object(sample_generate, "load_generator", wraps=sample_generate.load_generator) as load,
        pytest.raises(ConfigError, match=re.escape(message)),
    ):
        sample(
            sample_cfg(make_cfg, tmp_path, f"ckpt={generator_ckpt}", "prompts=[a red circle]", "n=1", setting)
        )
    assert not load.called and not (tmp_path / "out").exists()


CAPTION_SETTING_ERRORS = [
    ("decoding=beam beam_size=2.5", "beam_size=2.5 must be an integer; the beams kept"),
    ("decoding=beam beam_size=0", "beam_size=0 must be >= 1"),
    ("decoding=beams", "decoding='beams' is not a caption decoding method; use decoding=greedy, beam or nucleus"),
    ("decoding=nucleus caption_top_p=2", "caption_top_p=2 must be in (0, 1]; nucleus decoding's cut-off, e.g. "
                                         "caption_top_p=0.9"),
    ("decoding=nucleus caption_top_p=0", "caption_top_p=0 must be in (0, 1]"),
    ("decoding=nucleus caption_temperature=-1", "caption_temperature=-1 must be >= 0; 0: greedy, e.g. "
                                                "caption_temperature=1.0"),
    ("decoding=nucleus caption_temperature=hot", "caption_temperature='hot' must be a number"),
    ("decoding=beam caption_match_weight=-1", "caption_match_weight=-1 must be >= 0"),
    ("decoding=beam caption_generator_weight=x", "caption_generator_weight='x' must be a number"),
]  # fmt: skip


@pytest.mark.parametrize(
    "settings, message", CAPTION_SETTING_ERRORS, ids=[s for s, _ in CAPTION_SETTING_ERRORS]
)
def test_a_bad_caption_setting_is_named_before_the_model_is_loaded(
    make_cfg, captioner_ckpt, tmp_path, settings, message
):
    from imagen.cli import sample_caption
    from imagen.cli.checks import ConfigError

    image = save_png(to_uint8(torch.zeros(1, 3, 32, 32))[0], tmp_path / "images" / "a.png")
    with (
        mock.patch.object(sample_caption, "read_checkpoint", wraps=sample_caption.read_checkpoint) as read,
        pytest.raises(ConfigError, match=re.escape(message)),
    ):
        sample(sample_cfg(make_cfg, tmp_path, f"ckpt={captioner_ckpt}", "task=caption", f"images={image}",
                          *settings.split()))  # fmt: skip
    assert not read.called and not (tmp_path / "out").exists()


@pytest.mark.parametrize("task", ["generate", "caption"])
@pytest.mark.parametrize("inside", [False, True], ids=["a_file", "inside_a_file"])
def test_an_out_dir_that_is_a_file_is_named_before_the_model_is_loaded(make_cfg, tmp_path, task, inside):
    from imagen.cli import sample_caption, sample_generate
    from imagen.cli.checks import ConfigError

    file = tmp_path / "notes.txt"
    file.write_text("mine")
    out_dir = file / "samples" if inside else file
    image = save_png(to_uint8(torch.zeros(1, 3, 32, 32))[0], tmp_path / "images" / "a.png")
    problem = f"lies inside {file}, which is not a folder" if inside else "exists and is not a folder"
    task_args = (
        ["prompts=[a red circle]", "n=1"] if task == "generate" else ["task=caption", f"images={image}"]
    )
    with (
        mock.patch.object(sample_generate, "load_generator", side_effect=AssertionError("model loaded")),
        mock.patch.object(sample_caption, "read_checkpoint", side_effect=AssertionError("model loaded")),
        pytest.raises(ConfigError, match=re.escape(f"out_dir={out_dir} {problem}; choose another out_dir")),
    ):
        sample(
            make_cfg([f"ckpt={tmp_path / 'x.ckpt'}", *task_args, f"out_dir={out_dir}"], config_name="sample")
        )
    assert file.read_text() == "mine"


@pytest.mark.parametrize("content", ["", "\n  \n\n"], ids=["empty", "blank"])
def test_a_prompts_file_without_prompts_is_named(make_cfg, generator_ckpt, tmp_path, content):
    from imagen.cli.checks import ConfigError

    path = tmp_path / "prompts.txt"
    path.write_text(content)
    with pytest.raises(
        ConfigError, match=re.escape(f"prompts_file={path} holds no prompts (it is empty or blank)")
    ):
        sample(sample_cfg(make_cfg, tmp_path, f"ckpt={generator_ckpt}", f"prompts_file={path}"))
    assert not (tmp_path / "out").exists()


def test_cfg_scale_0_is_unconditional_1_conditional_and_below_0_an_error():
    from imagen.sampling.ar import SamplingSettings, guide

    cond, uncond = torch.randn(2, 5), torch.randn(2, 5)
    logits = torch.cat([cond, uncond])
    assert torch.allclose(guide(logits, 0.0), uncond) and torch.allclose(guide(logits, 1.0), cond)
    assert not SamplingSettings(cfg_scale=1.0).guided and SamplingSettings(cfg_scale=0.0).guided
    with pytest.raises(
        ValueError, match=re.escape("cfg_scale must be >= 0 (0: unconditional, 1: conditional")
    ):
        SamplingSettings(cfg_scale=-0.5)
