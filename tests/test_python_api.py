"""The library used from Python (a notebook, a script): wrong inputs get an error naming the argument, never a silent
wrong result."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from imagen.models.autoencoder import Autoencoder
from imagen.models.text_encoder import CaptionTokenizer, check_captions
from imagen.sampling.ar import SamplingSettings
from imagen.sampling.caption import CaptionDecoding
from tests.test_ar_generator import text, tiny_model
from tests.test_train import tiny_autoencoder_ckpt, tiny_joint_ckpt  # noqa: F401  (session fixtures)


def test_a_float_text_mask_is_refused_not_added_to_the_attention_scores():
    model, (states, mask) = tiny_model(), text(2)
    tokens = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        model(tokens, states, mask)  # boolean: fine
        with pytest.raises(TypeError, match="text_mask is boolean .* not torch.float32"):
            model(tokens, states, mask.float())
        with pytest.raises(ValueError, match=r"text_mask of shape \(2, 4\)"):
            model(tokens, states, mask[:, :4])
        with pytest.raises(ValueError, match=r"one text row per token row"):
            model(tokens, states[:1], mask[:1])  # one text row broadcast over two images
        with pytest.raises(ValueError, match=r"at most 12 tokens"):
            model(torch.randint(0, 40, (2, 13)), states, mask)


def test_captions_must_be_a_list_of_strings():
    with pytest.raises(TypeError, match=r"not one string: pass \['a red circle'\]"):
        check_captions("a red circle")  # would be read one character per caption
    with pytest.raises(ValueError, match="no captions"):
        check_captions([])
    with pytest.raises(TypeError, match="got NoneType None"):
        check_captions(["a red circle", None])
    tokenizer = CaptionTokenizer()
    tokenizer.train(["a red circle", "a blue square"], vocab_size=32)
    with pytest.raises(TypeError, match="not one string"):
        tokenizer("a red circle", max_length=8)
    ids, mask = tokenizer(("a red circle",), max_length=8)
    assert ids.shape == mask.shape == (1, 5)
    assert check_captions(np.array(["a red circle", "a blue square"])) == ["a red circle", "a blue square"]
    assert check_captions(c for c in ["a red circle"]) == ["a red circle"]


def test_encode_leaves_a_vq_codebook_alone_and_checks_its_images():
    torch.manual_seed(0)
    model = Autoencoder.from_size("tiny", quantizer="vq")  # in training mode, as built
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    first = model.encode(images)  # a fresh codebook is initialized by its first batch (k-means), in any mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.equal(model.encode(images), first) and model.quantizer.training  # its mode restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"images of shape \(3, 32, 32\)"):
        model.encode(images[0])
    with pytest.raises(TypeError, match="not torch.uint8"):
        model.encode((images * 127.5 + 127.5).to(torch.uint8))
    gray = Autoencoder.from_size("tiny", quantizer="fsq", in_channels=1).eval()
    assert gray.encode(images[:, :1]).shape == (4, 8, 8)
    with pytest.raises(ValueError, match=r"encode reads \(B, 1, H, W\)"):
        gray.encode(images)


@pytest.mark.parametrize("quantizer", ["fsq", "lfq", "vq"])
def test_decode_refuses_token_ids_outside_the_codebook(quantizer):
    model = Autoencoder.from_size("tiny", quantizer=quantizer).eval()
    tokens = torch.zeros(1, 8, 8, dtype=torch.long)
    assert model.decode(tokens).shape == (1, 3, 32, 32)
    for bad in (-1, model.vocab_size):
        tokens[0, 3, 3] = bad
        with pytest.raises(
            ValueError, match=f"token ids from .* this autoencoder has ids 0 to {model.vocab_size - 1}"
        ):
            model.decode(tokens)
    with pytest.raises(ValueError, match=r"decode reads ids \(B, h, w\)"):
        model.decode(torch.zeros(1, 64, dtype=torch.long))


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"temperature": math.nan}, "temperature must be a finite number"),
        ({"cfg_scale": math.inf}, "cfg_scale must be a finite number"),
        ({"temperature": "0.5"}, "temperature must be a finite number; got '0.5'"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"top_p": math.nan}, "top_p must be a finite number"),
    ],
)
def test_sampling_settings_refuse_nan_and_wrong_types(settings, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**settings)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"length_penalty": math.nan}, "length_penalty must be a finite number"),
        ({"beam_size": 2.5}, "beam_size must be an integer"),
        ({"method": "greedy", "top_p": 0.0}, r"top_p must be in \(0, 1\]; got 0.0"),  # checked for any method
        ({"method": "nucleus", "temperature": -1}, "temperature must be >= 0; got -1"),
    ],
)
def test_caption_decoding_refuses_nan_and_wrong_types(settings, message):
    with pytest.raises(ValueError, match=message):
        CaptionDecoding(**settings)


def test_load_from_checkpoint_names_the_loader_that_rebuilds_a_stage(tiny_autoencoder_ckpt):  # noqa: F811
    from imagen.checkpoints import load_autoencoder
    from imagen.stages.ar_generator import ARGeneratorStage
    from imagen.stages.autoencoder import AutoencoderStage

    with pytest.raises(TypeError, match=r"missing .*'net'.* imagen.checkpoints.load_autoencoder\(path\)"):
        AutoencoderStage.load_from_checkpoint(tiny_autoencoder_ckpt)
    assert isinstance(load_autoencoder(tiny_autoencoder_ckpt), Autoencoder)
    with pytest.raises(TypeError, match=r"ARGeneratorStage.from_checkpoint\(path\)"):
        ARGeneratorStage.load_from_checkpoint(tiny_autoencoder_ckpt)
    stage = AutoencoderStage(net=load_autoencoder(tiny_autoencoder_ckpt), optimizer=torch.optim.AdamW)
    with pytest.raises(
        TypeError, match="cannot be called on an instance"
    ):  # Lightning's guard: it returns a new one
        stage.load_from_checkpoint(tiny_autoencoder_ckpt)


def test_a_generator_built_for_another_grid_is_refused(tmp_path):
    from imagen.models.ar_transformer import ARTransformer
    from imagen.models.text_encoder import ScratchTextEncoder
    from imagen.stages.ar_generator import ARGeneratorStage
    from tests.image_text_fixtures import write_autoencoder_ckpt

    ckpt = str(write_autoencoder_ckpt(tmp_path / "ae.ckpt"))  # factor 4: 32 px images are 8x8 tokens
    text_encoder = ScratchTextEncoder(dim=16, layers=1, heads=2, vocab_size=32)
    vocab = Autoencoder.from_size("tiny", quantizer="fsq").vocab_size
    net = ARTransformer.from_size("tiny", vocab_size=vocab, text_dim=16, grid_size=(4, 4))
    with pytest.raises(
        ValueError, match=r"grid_size=\(4, 4\) does not match data.image_size=32 .*: \(8, 8\)"
    ):
        ARGeneratorStage(net=net, text_encoder=text_encoder, autoencoder_ckpt=ckpt, image_size=32)
    prefix = ARTransformer.from_size("tiny", vocab_size=vocab, text_dim=16, grid_size=(8, 8), conditioning="prefix",
                                     max_text_length=16)  # fmt: skip
    with pytest.raises(ValueError, match="text_encoder.max_length=32 is over model.net.max_text_length=16"):
        ARGeneratorStage(net=prefix, text_encoder=text_encoder, autoencoder_ckpt=ckpt, image_size=32)
    net = ARTransformer.from_size("tiny", vocab_size=vocab, text_dim=16, grid_size=(8, 8))
    stage = ARGeneratorStage(net=net, text_encoder=text_encoder, autoencoder_ckpt=ckpt, image_size=32)
    with pytest.raises(ValueError, match=r"decode_tokens reads \(B, 64\), a 8x8 grid"):
        stage.decode_tokens(torch.zeros(2, 60, dtype=torch.long))


def test_reranking_refuses_zero_candidates_rather_than_taking_the_default(tiny_joint_ckpt):  # noqa: F811
    from imagen.stages.joint import JointStage

    stage = JointStage.from_checkpoint(str(tiny_joint_ckpt))
    for candidates in (0, -1, 2.5):
        with pytest.raises(ValueError, match=f"candidates={candidates}: the number of samples per caption"):
            stage.generate_reranked_tokens(["a red circle"], candidates=candidates)
    stage.rerank.candidates = 0  # the stage's default, from model.rerank.candidates
    with pytest.raises(ValueError, match="model.rerank.candidates=0"):
        stage.generate_reranked_tokens(["a red circle"])
    tokens, scores = stage.generate_reranked_tokens(["a red circle"], candidates=np.int64(2))
    assert tokens.shape == (1, stage.net.config.num_image_tokens) and scores.shape == (1,)


def test_the_readme_python_example_runs(tiny_joint_ckpt, tiny_autoencoder_ckpt):  # noqa: F811
    import re

    from tests.test_readme import REPO

    (example,) = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    example = example.replace("logs/quickstart/joint/checkpoints/last.ckpt", str(tiny_joint_ckpt))
    example = example.replace("logs/quickstart/autoencoder/checkpoints/last.ckpt", str(tiny_autoencoder_ckpt))
    names: dict = {}
    exec(compile(example, "README.md", "exec"), names)
    size = names["joint"].hparams.image_size
    assert names["images"].shape == (1, 3, size, size) and len(names["captions"]) == 1
    assert names["tokens"].shape == (1, names["joint"].net.config.num_image_tokens)
    assert names["autoencoder"].decode(names["grid"]).shape == names["images"].shape


def test_sampling_arguments_of_the_wrong_kind_are_named():
    from imagen.sampling.ar import generate

    model, (states, mask) = tiny_model(), text(2)
    with pytest.raises(TypeError, match="settings is a SamplingSettings, not dict"):
        generate(model, states, mask, {"temperature": 0.5})
    with pytest.raises(TypeError, match=r"seeds are an int64 tensor \(B,\).* got \[1, 2\]"):
        generate(model, states, mask, SamplingSettings(), seeds=[1, 2])
    with pytest.raises(TypeError, match="generator is a torch.Generator, not int"):
        generate(model, states, mask, SamplingSettings(), generator=7)
    assert generate(model, states, mask, SamplingSettings(), seeds=torch.tensor([1, 2])).shape == (2, 12)


def test_caption_decoding_of_the_wrong_kind_is_named(tiny_joint_ckpt):  # noqa: F811
    from imagen.stages.joint import JointStage

    stage = JointStage.from_checkpoint(str(tiny_joint_ckpt))
    images = torch.zeros(1, 3, stage.hparams.image_size, stage.hparams.image_size)
    with pytest.raises(TypeError, match="decoding is a CaptionDecoding, not str"):
        stage.caption_images(images, "beam")
    assert len(stage.caption_images(images, CaptionDecoding(method="beam", beam_size=2))) == 1


def test_a_ner_batch_without_a_scored_token_has_loss_zero_not_nan(tmp_path):
    from imagen.models.ner import NerTagger, NerTaggerConfig, load_encoder, tiny_random_encoder

    tagger = NerTagger(load_encoder(tiny_random_encoder(tmp_path / "enc")), NerTaggerConfig(num_labels=5))
    ids, attention = torch.randint(5, 20, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    labels = torch.full((2, 6), -100)
    _, loss = tagger(ids, attention, labels)
    assert loss.item() == 0.0
    labels[0, 1], labels[1, 2] = 3, 0  # the mean over the two scored tokens, as before
    logits, _ = tagger.eval()(ids, attention, labels)
    expected = torch.nn.functional.cross_entropy(logits[[0, 1], [1, 2]].float(), torch.tensor([3, 0]))
    assert torch.allclose(tagger(ids, attention, labels)[1], expected)


def test_recall_at_k_names_a_relevance_matrix_that_is_not_boolean():
    from imagen.metrics.retrieval import recall_at_k

    similarity = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    assert recall_at_k(similarity, torch.eye(2, dtype=torch.bool), ks=(1,)) == {1: 1.0}
    with pytest.raises(TypeError, match="relevant is a boolean matrix .* not torch.float32"):
        recall_at_k(similarity, torch.eye(2), ks=(1,))


def test_sampling_and_scoring_run_in_eval_mode_and_leave_each_module_in_its_own(tiny_joint_ckpt):  # noqa: F811
    from imagen.models.ar_transformer import Attention
    from imagen.stages.ar_generator import ARGeneratorStage
    from imagen.stages.joint import JointStage

    stage = JointStage.from_checkpoint(str(tiny_joint_ckpt))
    for module in stage.modules():  # dropout everywhere, so that a sample in training mode differs
        if isinstance(module, torch.nn.Dropout) or type(module).__name__ == "Dropout":
            module.p = 0.5
        if isinstance(module, Attention):
            module.dropout = 0.5
    captions, seeds = ["a red circle", "a blue square"], torch.tensor([3, 4])
    images = stage.generate_images(captions, seeds=seeds)
    tokens = stage.generate_tokens(stage.encode_text(captions), seeds=seeds)
    written = stage.caption_images(images)
    stage.train()  # as `trainer.fit` leaves it; the frozen autoencoder stays in eval mode
    modes = {name: module.training for name, module in stage.named_modules()}
    assert stage.training and not stage.autoencoder.training
    with torch.no_grad():  # the method itself in training mode: dropout changes the sample
        assert not torch.equal(
            ARGeneratorStage.generate_tokens.__wrapped__(stage, stage.encode_text(captions), seeds=seeds),
            tokens,
        )
    assert torch.equal(stage.generate_images(captions, seeds=seeds), images)
    assert stage.caption_images(images) == written
    assert torch.equal(stage.generate_tokens(stage.encode_text(captions), seeds=seeds), tokens)
    assert {name: module.training for name, module in stage.named_modules()} == modes


def test_a_bool_or_a_fraction_is_not_taken_for_an_integer_setting():
    from imagen.models.autoencoder import AutoencoderConfig
    from imagen.models.lora import LoraSettings
    from imagen.stages.joint import RerankSettings

    with pytest.raises(ValueError, match="model.lora.r must be an integer >= 1; got True"):
        LoraSettings(r=True)
    with pytest.raises(
        ValueError, match=r"model.net.channel_mult must be a list of integers >= 1.*\[True, 2\]"
    ):
        AutoencoderConfig(channel_mult=[True, 2])
    with pytest.raises(ValueError, match="model.rerank.candidates must be an integer >= 1; got 2.5"):
        RerankSettings(candidates=2.5)
    assert LoraSettings(r=np.int64(4)).r == 4 and RerankSettings(candidates=np.int64(2)).candidates == 2


def test_a_generator_with_non_finite_weights_is_named_not_sampled_as_token_zero():
    from imagen.sampling.ar import generate

    model, (states, mask) = tiny_model().eval(), text(2)
    with torch.no_grad():
        model.head.weight[0, 0] = math.nan
        with pytest.raises(
            FloatingPointError, match="logits are NaN or infinite: its weights are not finite"
        ):
            generate(model, states, mask, SamplingSettings(), seeds=torch.tensor([1, 2]))


def test_a_cache_allocated_for_another_model_is_not_reused():
    from dataclasses import replace

    from imagen.models.ar_transformer import ARTransformer
    from imagen.sampling.ar import KVCache, generate

    model, (states, mask) = tiny_model().eval(), text(2)
    other = ARTransformer(replace(model.config, layers=model.config.layers + 1))
    settings, seeds = SamplingSettings(), torch.tensor([1, 2])
    rows, length = 4, states.shape[1]  # guided: a doubled batch
    mine, theirs = (KVCache.allocate(m, rows, length, states.device) for m in (model, other))
    assert mine.fits(model, rows, length, states.device, torch.float32)
    assert not theirs.fits(model, rows, length, states.device, torch.float32)
    expected = generate(model, states, mask, settings, seeds=seeds)
    assert torch.equal(generate(model, states, mask, settings, seeds=seeds, cache=theirs), expected)
