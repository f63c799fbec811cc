"""Fine-tuning: freezing named submodules (every stage), LoRA adapters (generator, NER), the round-trip metric and
the new-concept experiment end to end."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import hydra
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException

from imagen.checkpoints import CheckpointError, read_checkpoint
from imagen.cli.checks import ConfigError, check_train_config
from imagen.cli.export import main as export_main
from imagen.cli.sample import sample
from imagen.cli.sample_ner import load_ner_model
from imagen.cli.train import train
from imagen.data.shapes import Scene, ShapeObject
from imagen.metrics.captions import preserved_attributes
from imagen.models.ar_transformer import ARTransformer
from imagen.models.lora import LoraSettings, add_lora, has_lora, merge_lora, merge_lora_state
from imagen.models.ner import load_encoder
from imagen.stages.ar_generator import ARGeneratorStage
from imagen.stages.finetune import FineTuningMixin
from imagen.stages.joint import JointStage
from tests.conftest import TINY_SHAPES
from tests.test_sample import generator_ckpt  # noqa: F401  (module fixture)
from tests.test_train import (  # noqa: F401  (session fixtures)
    TINY_AUTOENCODER,
    TINY_GENERATOR,
    TINY_JOINT,
    TINY_NEW_CONCEPT,
    tiny_autoencoder_ckpt,
    tiny_joint_ckpt,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


class Recorder(pl.Callback):
    """The stage's weights and optimized parameters when training starts, and the modes of `watch` per step."""

    def __init__(self, watch: list[str]):
        self.watch, self.modes = watch, []

    def on_train_start(self, trainer, stage):
        self.before = tensors(stage)
        self.optimized = {id(p) for o in trainer.optimizers for g in o.param_groups for p in g["params"]}

    def on_train_batch_start(self, trainer, stage, batch, batch_idx):
        self.modes.append([stage.get_submodule(name).training for name in self.watch])


def fit_briefly(cfg, recorder: Recorder, steps: int = 3) -> pl.LightningModule:
    """The configured stage and data, fitted for a few steps by a bare trainer (no checkpoints, no validation)."""
    pl.seed_everything(1)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    stage = hydra.utils.instantiate(cfg.model, _convert_="all")
    trainer = pl.Trainer(max_steps=steps, max_epochs=-1, limit_val_batches=0, callbacks=[recorder], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu")  # fmt: skip
    trainer.fit(stage, datamodule=datamodule)
    assert trainer.global_step == steps
    return stage


# -- freezing -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stage, overrides, frozen, trained",
    [
        ("autoencoder", ["experiment=shapes_autoencoder", *TINY_SHAPES, *TINY_AUTOENCODER], ["net.encoder"],
         "net.decoder."),
        ("generator", ["experiment=shapes_generator", *TINY_SHAPES, *TINY_GENERATOR], ["text_encoder", "net.blocks.0"],
         "net.blocks.1."),
        ("joint", ["experiment=shapes_joint", *TINY_SHAPES, *TINY_JOINT], ["image_text.encoder", "net"],
         "image_text.decoder."),
        ("ner", ["experiment=ner_tiny"], ["net.encoder.embeddings"], "net.encoder.encoder."),
    ],
)  # fmt: skip
def test_frozen_weights_stay_bit_identical(make_cfg, tiny_autoencoder_ckpt, stage, overrides, frozen, trained):  # noqa: F811  # fmt: skip
    if stage in ("generator", "joint"):
        overrides = [*overrides, f"model.autoencoder_ckpt={tiny_autoencoder_ckpt}"]
    recorder = Recorder(frozen)
    module = fit_briefly(make_cfg([*overrides, f"model.freeze=[{','.join(frozen)}]"]), recorder)
    after = tensors(module)
    prefixes = tuple(f"{name}." for name in frozen)
    frozen_keys = [k for k in recorder.before if k.startswith(prefixes)]
    assert frozen_keys and all(torch.equal(recorder.before[k], after[k]) for k in frozen_keys)
    assert any(not torch.equal(recorder.before[k], after[k]) for k in after if k.startswith(trained))
    # no gradient, not in the optimizer (so no weight decay either), in eval mode at every step
    frozen_params = [p for n, p in module.named_parameters() if n.startswith(prefixes)]
    assert not any(p.requires_grad or id(p) in recorder.optimized for p in frozen_params)
    assert recorder.modes and not any(any(modes) for modes in recorder.modes)


def test_freeze_names_are_checked(make_cfg, tiny_autoencoder_ckpt):  # noqa: F811
    ae = f"model.autoencoder_ckpt={tiny_autoencoder_ckpt}"
    base = ["experiment=shapes_generator", *TINY_SHAPES, *TINY_GENERATOR, ae]
    stage = hydra.utils.instantiate(make_cfg([*base, "model.freeze=[net.blocks.9]"]).model, _convert_="all")
    with pytest.raises(ValueError, match=r"model.freeze: ARGeneratorStage has no submodule 'net.blocks.9'; valid "
                                         r"top-level names: autoencoder, text_encoder, net"):  # fmt: skip
        stage.configure_model()
    with pytest.raises(ConfigError, match="model.freeze must be a list of submodule names"):
        check_train_config(make_cfg([*base, "model.freeze=net"]))
    with pytest.raises(ConfigError, match="model.lora.rank is not a LoRA setting; valid keys: r, alpha"):
        check_train_config(make_cfg([*base, "model.lora={rank: 4}"]))


# -- LoRA -----------------------------------------------------------------------------------------------------------


def test_merged_state_dict_equals_peft_merge():
    torch.manual_seed(0)
    net = ARTransformer.from_size("tiny", vocab_size=12, grid_size=(2, 2), text_dim=8)
    settings = LoraSettings(r=2, alpha=6.0, target_modules=["q", "kv", "proj", "mlp.0", "mlp.2"])
    plain_keys = set(net.state_dict())
    adapted = add_lora(net, settings)
    assert "blocks.0.attn.q" in adapted and "blocks.1.mlp.2" in adapted and "text_proj" not in adapted
    for name, p in net.named_parameters():
        if ".lora_B." in name:  # zero at start: give the adapters something to merge
            torch.nn.init.normal_(p, std=0.1)
    merged = merge_lora_state(net.state_dict(), settings)
    tokens, states = torch.randint(0, 12, (3, 4)), torch.randn(3, 5, 8)
    mask = torch.ones(3, 5, dtype=torch.bool)
    with_adapters = net(tokens, states, mask)[0]
    assert merge_lora(net) == len(adapted) and not has_lora(net)
    assert set(merged) == set(net.state_dict()) == plain_keys
    torch.testing.assert_close(merged, net.state_dict())
    torch.testing.assert_close(net(tokens, states, mask)[0], with_adapters)
    with pytest.raises(ValueError, match=r"model.lora.target_modules must name nn.Linear layers; these are not: "
                                         r"token_emb \(Embedding\)"):  # fmt: skip
        add_lora(net, LoraSettings(target_modules=["token_emb"]))
    with pytest.raises(ValueError, match=r"target_modules=\['qq'\]: Target modules \{'qq'\} not found"):
        add_lora(net, LoraSettings(target_modules=["qq"]))


def test_lora_refuses_to_train_a_pretrained_text_encoder_run_without_gradients(make_cfg, tiny_autoencoder_ckpt,  # noqa: F811
                                                                                  tmp_path):  # fmt: skip
    from tests.test_ar_generator import save_tiny_hf_encoder

    save_tiny_hf_encoder("bert", tmp_path / "bert")
    tiny = [o for o in TINY_GENERATOR if "text_encoder" not in o]
    base = ["experiment=shapes_generator", *TINY_SHAPES, *tiny, f"model.autoencoder_ckpt={tiny_autoencoder_ckpt}",
            "model/text_encoder=pretrained", f"model.text_encoder.pretrained={tmp_path / 'bert'}",
            "model.text_encoder.cache_dir=null", "model.lora={r: 4, trainable: [text_encoder]}"]  # fmt: skip
    stage = hydra.utils.instantiate(make_cfg(base).model, _convert_="all")
    with pytest.raises(ValueError, match="set model.text_encoder.freeze=false"):
        stage.apply_finetuning()
    stage = hydra.utils.instantiate(
        make_cfg([*base, "model.text_encoder.freeze=false"]).model, _convert_="all"
    )
    stage.apply_finetuning()  # trains, with gradients
    assert all(p.requires_grad for p in stage.text_encoder.parameters())


def test_lora_trains_adapters_only_and_its_checkpoint_round_trips(make_cfg, generator_ckpt, tiny_autoencoder_ckpt,  # noqa: F811
                                                                  tmp_path):  # fmt: skip
    run = tmp_path / "lora"
    cfg = make_cfg(["experiment=shapes_generator", *TINY_SHAPES, *TINY_GENERATOR,
                    f"model.autoencoder_ckpt={tiny_autoencoder_ckpt}", f"model.init_from={generator_ckpt}",
                    "model.lora={r: 4, alpha: 8}", "trainer.max_steps=3", "trainer.limit_val_batches=0", "test=false",
                    "logger=csv"], run_dir=run)  # fmt: skip
    _, objects = train(cfg)
    stage = objects["model"]
    base = read_checkpoint(generator_ckpt)["state_dict"]  # a plain run: loaded first, then wrapped
    after = tensors(stage)
    adapters = [k for k in after if ".lora_" in k]
    assert adapters and all(k.startswith("net.blocks.") for k in adapters)
    for key, value in after.items():  # every base weight (the text encoder's too) is the init checkpoint's
        if ".lora_" not in key:
            assert torch.equal(value, base[key.replace(".base_layer.", ".")]), key
    assert any(after[k].abs().sum() > 0 for k in adapters if ".lora_B." in k)  # zero at start: they trained
    trainable = {n for n, p in stage.named_parameters() if p.requires_grad}
    assert trainable == {k for k in adapters}

    ckpt = run / "checkpoints" / "last.ckpt"
    assert read_checkpoint(ckpt)["imagen"]["lora"]["r"] == 4
    loaded = ARGeneratorStage.from_checkpoint(str(ckpt))  # strict, with the adapters
    assert has_lora(loaded.net)
    text = loaded.encode_text(["a small red circle on the left"])
    tokens = torch.randint(0, loaded.autoencoder.vocab_size, (1, loaded.net.config.num_image_tokens))
    logits = loaded.net(tokens, text.states, text.mask)[0]
    torch.testing.assert_close(logits, stage.eval().net(tokens, text.states, text.mask)[0])

    exported = tmp_path / "export"  # merged: a plain generator that computes the same
    export_main([str(ckpt), str(exported)])
    plain = ARGeneratorStage.from_checkpoint(str(exported))
    assert not has_lora(plain.net) and read_checkpoint(exported)["imagen"]["lora"] is None
    torch.testing.assert_close(plain.net(tokens, text.states, text.mask)[0], logits, atol=1e-5, rtol=1e-5)
    # the LoRA checkpoint starts a plain run too (merged), and sample.py samples from it
    cfg = make_cfg(["experiment=shapes_generator", *TINY_SHAPES, *TINY_GENERATOR,
                    f"model.autoencoder_ckpt={tiny_autoencoder_ckpt}", f"model.init_from={ckpt}"])  # fmt: skip
    fresh = hydra.utils.instantiate(cfg.model, _convert_="all")
    fresh.configure_model()
    torch.testing.assert_close(tensors(fresh.net), tensors(plain.net))
    summary = sample(make_cfg([f"ckpt={ckpt}", "prompts=[a small red circle]", "n=2", f"out_dir={tmp_path / 's'}"],
                              config_name="sample"))  # fmt: skip
    assert summary["images"] == 2


def test_init_from_refuses_an_autoencoder_whose_tokens_mean_other_images(
    make_cfg,
    tiny_joint_ckpt,  # noqa: F811
    tiny_autoencoder_ckpt,  # noqa: F811
    tmp_path,
):
    """Same vocabulary size, other encoder: the strict load would pass and train on codes of other meaning. A
    decoder trained further keeps the tokens, and is accepted."""
    checkpoint = torch.load(tiny_autoencoder_ckpt, map_location="cpu", weights_only=True)
    weights = [k for k in checkpoint["state_dict"] if k.endswith("weight")]
    encoder_key = next(k for k in weights if k.startswith("net.encoder."))
    decoder_key = next(k for k in weights if k.startswith("net.decoder."))
    for part, key in (("decoder", decoder_key), ("encoder", encoder_key)):
        checkpoint["state_dict"][key] = checkpoint["state_dict"][key] + 0.01
        other = tmp_path / f"other_{part}.ckpt"
        torch.save(checkpoint, other)
        cfg = make_cfg(["experiment=shapes_joint", *TINY_SHAPES, *TINY_JOINT, f"model.autoencoder_ckpt={other}",
                        f"model.init_from={tiny_joint_ckpt}"])  # fmt: skip
        stage = hydra.utils.instantiate(cfg.model, _convert_="all")
        if part == "decoder":
            stage.configure_model()
            continue
        with pytest.raises(CheckpointError, match=rf"(?s)model.autoencoder_ckpt={other} is not the autoencoder "
                                                  rf"that model.init_from={tiny_joint_ckpt}.*{key[4:]}"):  # fmt: skip
            stage.configure_model()


def test_a_transformer_configured_differently_is_refused(make_cfg, tiny_joint_ckpt, tiny_autoencoder_ckpt):  # noqa: F811
    # RoPE has no weights: without the check, a checkpoint trained without it would load strictly and compute otherwise
    cfg = make_cfg(["experiment=shapes_joint", *TINY_SHAPES, *TINY_JOINT, "model.net.rope=false",
                    f"model.autoencoder_ckpt={tiny_autoencoder_ckpt}", f"model.init_from={tiny_joint_ckpt}"])  # fmt: skip
    stage = hydra.utils.instantiate(cfg.model, _convert_="all")
    with pytest.raises(
        ValueError, match=r"(?s)model.init_from: .* model\.net\.rope: checkpoint True, this run False"
    ):
        stage.configure_model()
    with pytest.raises(ValueError, match=r"(?s)ckpt_path: the checkpoint being resumed .* model\.net\.rope"):
        stage.on_load_checkpoint(torch.load(tiny_joint_ckpt, map_location="cpu", weights_only=True))
    # the captioner/matcher too: a checkpoint with code vectors into a run without them, named before any key list
    cfg = make_cfg(["experiment=shapes_joint", *TINY_SHAPES, *TINY_JOINT, "model.image_code_vectors=false",
                    f"model.autoencoder_ckpt={tiny_autoencoder_ckpt}", f"model.init_from={tiny_joint_ckpt}"])  # fmt: skip
    stage = hydra.utils.instantiate(cfg.model, _convert_="all")
    with pytest.raises(
        ValueError,
        match=r"(?s)model.image_code_vectors.*model\.image_text\.code_dim: checkpoint \d+, this run 0",
    ):
        stage.configure_model()


def test_an_autoencoder_quantizing_differently_is_refused(make_cfg, tiny_autoencoder_ckpt):  # noqa: F811
    # cosine codes have no weights of their own: without the check the checkpoint would load and give other tokens
    base = ["experiment=shapes_autoencoder", *TINY_SHAPES, *TINY_AUTOENCODER]
    cfg = make_cfg([*base, "+model.net.vq_cosine=false", f"model.init_from={tiny_autoencoder_ckpt}"])
    with pytest.raises(
        InstantiationException, match=r"(?s)model.init_from: .* model\.net\.vq_cosine: checkpoint True"
    ):
        hydra.utils.instantiate(cfg.model, _convert_="all")
    stage = hydra.utils.instantiate(make_cfg([*base, "+model.net.vq_cosine=false"]).model, _convert_="all")
    with pytest.raises(
        ValueError, match=r"(?s)ckpt_path: the checkpoint being resumed .* model\.net\.vq_cosine"
    ):
        stage.on_load_checkpoint(torch.load(tiny_autoencoder_ckpt, map_location="cpu", weights_only=True))
    # the codebook's EMA decay acts only while training: a fine-tune sets its own
    cfg = make_cfg([*base, "+model.net.vq_decay=0.5", f"model.init_from={tiny_autoencoder_ckpt}"])
    stage = hydra.utils.instantiate(cfg.model, _convert_="all")
    saved = torch.load(tiny_autoencoder_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    ours = stage.state_dict()
    for key in [key for key in saved if key.startswith("net.")]:
        torch.testing.assert_close(ours[key], saved[key], msg=key)


def test_a_finetune_may_set_its_own_dropout(make_cfg, tiny_joint_ckpt, tiny_autoencoder_ckpt):  # noqa: F811
    # dropout acts only while training: the checkpoint's weights load into a run that regularises its fine-tune
    cfg = make_cfg(["experiment=shapes_joint", *TINY_SHAPES, *TINY_JOINT, "model.net.dropout=0.1",
                    "+model.image_text.dropout=0.1", f"model.autoencoder_ckpt={tiny_autoencoder_ckpt}",
                    f"model.init_from={tiny_joint_ckpt}"])  # fmt: skip
    stage = hydra.utils.instantiate(cfg.model, _convert_="all")
    stage.configure_model()
    saved = torch.load(tiny_joint_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert stage.net.config.dropout == 0.1 and stage.image_text.config.dropout == 0.1
    torch.testing.assert_close(stage.net.head.weight, saved["net.head.weight"])


def test_resuming_with_other_lora_settings_is_refused(make_cfg, tiny_joint_ckpt, tiny_autoencoder_ckpt):  # noqa: F811
    cfg = make_cfg(["experiment=shapes_joint", *TINY_SHAPES, *TINY_JOINT, "model.lora={r: 4, alpha: 8}",
                    f"model.autoencoder_ckpt={tiny_autoencoder_ckpt}"])  # fmt: skip
    stage = hydra.utils.instantiate(cfg.model, _convert_="all")
    stage.configure_model()
    checkpoint = torch.load(tiny_joint_ckpt, map_location="cpu", weights_only=True)  # trained without LoRA
    with pytest.raises(
        ValueError, match=r"ckpt_path: .* model\.lora=None, this run has model\.lora=\{'r': 4"
    ):
        stage.on_load_checkpoint(checkpoint)


def test_lora_on_the_ner_encoder(make_cfg, tmp_path):
    run = tmp_path / "ner"
    cfg = make_cfg(["experiment=ner_tiny", "model.lora={r: 4, alpha: 8}", "trainer.max_epochs=2",
                    "trainer.check_val_every_n_epoch=2", "logger=csv"], run_dir=run)  # fmt: skip
    _, objects = train(cfg)
    stage = objects["model"]
    trainable = {n for n, p in stage.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("net.head.") for n in trainable)
    assert {n for n in trainable if ".lora_" in n} and {"net.head.weight", "net.head.bias"} <= trainable
    encoder = tensors(load_encoder(hydra.utils.instantiate(cfg.model.pretrained)))
    for key, value in tensors(stage.net.encoder).items():  # the encoder's own weights are the pretrained ones
        if ".lora_" not in key:
            assert torch.equal(value, encoder[key.replace(".base_layer.", ".")]), key
    checkpoint = read_checkpoint(run / "checkpoints" / "last.ckpt")
    model = load_ner_model(checkpoint)  # merged for prediction
    assert not has_lora(model.tagger)
    ids = torch.tensor([[2, 5, 7, 3]])
    mask = torch.ones_like(ids)
    expected = stage.eval().net(ids, mask)[0]
    torch.testing.assert_close(model.tagger(ids, mask)[0], expected, atol=1e-5, rtol=1e-5)


# -- the round trip -------------------------------------------------------------------------------------------------


def test_round_trip_counts_the_attributes_a_caption_keeps():
    one = Scene((ShapeObject("red", "circle", "small", "left"),))
    two = Scene((ShapeObject("red", "circle", "small", "left"), ShapeObject("blue", "square", "large", "right")),
                "left of")  # fmt: skip
    cases = [
        (one, "a small red circle on the left", (4, 4)),
        (one, "there is a large red circle in the center", (2, 4)),  # size and position lost
        (one, "a small red circle left of a large blue square", (3, 4)),  # an extra object costs nothing
        (one, "nonsense", (0, 4)),
        (two, "a small red circle left of a large blue square", (7, 7)),
        (two, "a large blue square right of a small red circle", (7, 7)),  # the inverse paraphrase
        (two, "a large blue square and a small red circle left of it", (7, 7)),
        (two, "a small red circle right of a large blue square", (6, 7)),  # the relation lost
        (two, "a small green circle left of a large blue triangle", (5, 7)),
        (two, "a large blue square on the right", (3, 7)),  # one object: its attributes, no relation
    ]
    for scene, caption, expected in cases:
        assert preserved_attributes(caption, scene) == expected, caption


# -- the new-concept fine-tune --------------------------------------------------------------------------------------


def test_new_concept_data_holds_few_new_examples_and_separate_prompt_groups(make_cfg):
    cfg = make_cfg(["data=shapes_new_concept", "data.num_train=20", "data.new_repeats=3", "data.num_replay=30",
                    "data.num_val=12", "data.num_val_heldout=6", "data.num_val_new=8", "data.use_judge=false"])  # fmt: skip
    data = hydra.utils.instantiate(cfg.data, _convert_="all")
    train = data.split("train")
    groups = [data.scene_group(s) for s in train.scenes]
    assert groups == ["seen"] * 30 + ["new"] * 60 and len(train.images) == 90
    # 20 examples, each 3 times: the repeats are the same images
    assert np.array_equal(train.images[50:], np.repeat(train.images[30:50], 2, axis=0))
    assert any("orange" in c for c in data.train_captions())
    for group, count in (("seen", 12), ("heldout", 6), ("new", 8)):
        captions, scenes, images = data.eval_prompts("val", group=group)
        assert len(captions) == len(scenes) == len(images) == count
        has_orange = [any(o.color == "orange" for o in s.objects) for s in scenes]
        assert all(has_orange) if group == "new" else not any(has_orange)
    cfg = make_cfg(["data=shapes_new_concept", "data.new_concept=[{color: pink}]"])
    with pytest.raises(InstantiationException, match=r"data.new_concept: \{'color': 'pink'\} names"):
        hydra.utils.instantiate(cfg.data)


def test_new_concept_finetune_reports_before_and_after(make_cfg, tiny_joint_ckpt, tmp_path):  # noqa: F811
    run = tmp_path / "finetune"
    cfg = make_cfg(["experiment=shapes_finetune_new_concept", *TINY_SHAPES, *TINY_JOINT, *TINY_NEW_CONCEPT,
                    f"model.init_from={tiny_joint_ckpt}", "data.use_judge=true", "data.judge_steps=20",
                    "trainer.max_steps=4", "logger=csv"], run_dir=run)  # fmt: skip
    metrics, _ = train(cfg)
    written = json.loads((run / "metrics.json").read_text())
    for name in ("judge_acc", "judge_acc_new", "judge_acc_heldout", "judge_acc_new_recon", "judge_acc_new_reranked",
                 "round_trip", "round_trip_new", "caption_acc_new"):  # fmt: skip
        for key in (f"test/{name}", f"before/test/{name}"):
            assert 0 <= written[key] <= 1, key
    assert written["before/test/nll_bits"] != written["test/nll_bits"]  # the fit moved the weights
    stage = JointStage.from_checkpoint(str(run / "checkpoints" / "last.ckpt"))
    vocab = stage.text_encoder.tokenizer.tokenizer.get_vocab()
    assert "orange" in vocab and "orange" not in read_tokenizer_words(tiny_joint_ckpt)


def test_new_words_start_at_the_mean_row_of_the_words_they_are_like(make_cfg, tiny_joint_ckpt, tmp_path):  # noqa: F811
    overrides = ["experiment=shapes_finetune_new_concept", *TINY_SHAPES, *TINY_JOINT, *TINY_NEW_CONCEPT,
                 f"model.init_from={tiny_joint_ckpt}", "test_before_fit=false", "test=false", "trainer.max_steps=1",
                 "trainer.limit_val_batches=0", "model.optimizer.lr=0", "model.weight_decay=0"]  # fmt: skip
    with pytest.raises(ValueError, match=r"model.new_words_like: 'pink' is not in the caption vocabulary"):
        train(make_cfg([*overrides, "model.new_words_like=[red,pink]"], run_dir=tmp_path / "unknown"))
    run = tmp_path / "like"
    train(make_cfg([*overrides, "model.new_words_like=[red,blue]"], run_dir=run))
    before = JointStage.from_checkpoint(str(tiny_joint_ckpt))
    after = JointStage.from_checkpoint(str(run / "checkpoints" / "last.ckpt"))
    tokenizer = after.text_encoder.tokenizer
    orange, red, blue = (tokenizer.token_id(word) for word in ("orange", "red", "blue"))
    # the text encoder's embedding and the captioner's (which shares its tokenizer) input and output rows
    for name in (
        "text_encoder.token_emb.weight",
        "image_text.caption_emb.weight",
        "image_text.caption_head.weight",
    ):
        old, new = before.state_dict()[name], after.state_dict()[name]
        torch.testing.assert_close(new[orange], (old[red] + old[blue]) / 2, msg=name)
        torch.testing.assert_close(new[red], old[red], msg=name)  # learning rate 0: nothing else moved


def test_added_words_leave_the_known_words_as_they_were():
    from imagen.models.text_encoder import CaptionTokenizer

    tokenizer = CaptionTokenizer()
    tokenizer.train(["a small stars shape", "a large circle"], vocab_size=100)
    before = tokenizer.tokenizer.encode("a stars shape").ids
    assert tokenizer.add_words(["A star on the left"], max_vocab=100) == ["left", "on", "star", "the"]
    # "star" is a word of its own, not a piece of "stars"; new words take the next ids, case-folded as the rest
    assert tokenizer.tokenizer.encode("a stars shape").ids == before
    star = tokenizer.token_id("star")
    assert star >= 10 and tokenizer.tokenizer.encode("A STAR stars").ids == [before[0], star, before[1]]
    restored = CaptionTokenizer.from_str(tokenizer.to_str())
    assert restored.tokenizer.encode("a star stars shape").ids == [before[0], star, *before[1:]]
    assert restored.vocab_size == tokenizer.vocab_size == 14
    with pytest.raises(ValueError, match="adding 1 words exceeds the text encoder's vocab_size=14"):
        tokenizer.add_words(["a red star"], max_vocab=14)


class SignalAtStep(pl.Callback):
    """Sends this process SIGTERM after training step `step`, as a preemption would: the run's `Preemption`
    callback then writes a checkpoint and stops."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, stage, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_resumed_finetune_keeps_the_before_fit_metrics_of_its_first_attempt(make_cfg, tiny_joint_ckpt, tmp_path,  # noqa: F811
                                                                               monkeypatch, caplog):  # fmt: skip
    run = tmp_path / "finetune"
    overrides = ["experiment=shapes_finetune_new_concept", *TINY_SHAPES, *TINY_JOINT, *TINY_NEW_CONCEPT,
                 f"model.init_from={tiny_joint_ckpt}", "data.use_judge=true", "data.judge_steps=20",
                 "trainer.max_steps=4", "logger=csv"]  # fmt: skip
    preempted = [
        *overrides,
        "+callbacks.preempt._target_=tests.test_finetune.SignalAtStep",
        "+callbacks.preempt.step=2",
    ]
    first, objects = train(make_cfg(preempted, run_dir=run))
    assert objects.get("preempted")
    before = {k: v for k, v in first.items() if k.startswith("before/")}
    assert before["before/test/judge_acc_new"] >= 0
    test_calls = []
    trainer_test = pl.Trainer.test
    monkeypatch.setattr(pl.Trainer, "test", lambda *a, **kw: test_calls.append(kw) or trainer_test(*a, **kw))
    with caplog.at_level(logging.INFO, logger="imagen"):
        train(make_cfg(overrides, run_dir=run))  # resumes from the checkpoint written at step 2
    assert "resuming from" in caplog.text and "test_before_fit skipped" in caplog.text
    assert len(test_calls) == 1, "the final test only"
    written = json.loads((run / "metrics.json").read_text())
    assert {k: v for k, v in written.items() if k.startswith("before/")} == before
    assert 0 <= written["test/judge_acc_new"] <= 1


def read_tokenizer_words(path: Path) -> set[str]:
    stage = JointStage.from_checkpoint(str(path))
    return set(stage.text_encoder.tokenizer.tokenizer.get_vocab())


class FrozenPartModule(FineTuningMixin, pl.LightningModule):
    """A trainable body beside a frozen model in eval mode inside a wrapper that stays in training mode (as a frozen
    pretrained text encoder)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
        self.frozen = torch.nn.Module()
        self.frozen.model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
        self.frozen.model.requires_grad_(False).eval()

    def training_step(self, batch, batch_idx):
        return self.body(self.frozen.model(batch[0])).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.body.parameters(), lr=0.1)


@pytest.mark.parametrize("trainable_in_eval", [False, True])
@pytest.mark.parametrize("steps", [1, 0])  # 0: a fit with nothing to train ends without on_train_start
def test_frozen_parts_in_eval_mode_are_said_once_and_other_modules_in_eval_mode_still_warn(
    trainable_in_eval, steps, caplog, recwarn
):
    import warnings

    module = FrozenPartModule()
    if trainable_in_eval:
        module.body[1].eval()  # a trainable part's dropout left off: the user should hear of it
    filters = list(warnings.filters)
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")  # fmt: skip
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    with caplog.at_level(logging.INFO, logger="imagen.stages.finetune"):
        trainer.fit(module, loader)
    eval_warnings = [
        str(w.message) for w in recwarn if "in eval mode at the start of training" in str(w.message)
    ]
    said = [r.getMessage() for r in caplog.records if "kept in eval mode" in r.getMessage()]
    if trainable_in_eval:
        assert (bool(eval_warnings) == (steps > 0)) and not said
        assert all(w.startswith("Found 4 module(s)") for w in eval_warnings)
    else:
        assert not eval_warnings
        assert said == ["frozen, so kept in eval mode while training: frozen.model (3 modules)"]
    assert warnings.filters == filters, (
        "the filter lasts from on_fit_start to on_train_start (or on_fit_end) only"
    )
