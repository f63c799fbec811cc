"""The AR generator: KV-cache sampler, guidance, decoding rules, text encoders, and the stage's training."""

from __future__ import annotations

import copy
import math
import os
import shutil
from dataclasses import replace
from unittest import mock

import pytest
import torch

from imagen.cli.train import train
from imagen.models.ar_transformer import ARTransformer
from imagen.sampling.ar import (
    SamplingSettings,
    candidate_seeds,
    decode_and_sample,
    generate,
    generate_recompute,
    guide,
    race_noise,
    reusable_cache,
    sample_token,
    with_unconditional,
)
from imagen.stages.ar_generator import ARGeneratorStage, has_cpp_compiler
from tests.conftest import TINY_SHAPES
from tests.test_train import TINY_GENERATOR, tiny_autoencoder_ckpt  # noqa: F401  (session fixture)


def tiny_model(conditioning: str = "cross", rope: bool = True, code_dim: int = 0) -> ARTransformer:
    torch.manual_seed(0)
    model = ARTransformer.from_size(
        "tiny",
        vocab_size=40,
        grid_size=(3, 4),
        text_dim=16,
        conditioning=conditioning,
        max_text_length=6,
        rope=rope,
        code_dim=code_dim,
    )
    if code_dim:
        model.set_code_vectors(torch.randn(40, code_dim))
    return model.eval()


def text(batch: int = 3):
    g = torch.Generator().manual_seed(1)
    states = torch.randn(batch, 5, 16, generator=g)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[1, 3:] = False  # a shorter caption: padding must not change anything
    return states, mask


@pytest.mark.parametrize(
    "conditioning,rope,code_dim",
    [("cross", True, 0), ("prefix", True, 0), ("cross", False, 0), ("cross", True, 6)],
)
@pytest.mark.parametrize(
    "settings",
    [
        SamplingSettings(cfg_scale=3.0, top_k=10),
        SamplingSettings(cfg_scale=1.0, temperature=0.8, top_p=0.9),
        SamplingSettings(cfg_scale=2.0, cfg_schedule="linear"),
        SamplingSettings(cfg_scale=3.0, top_k=10, cfg_until=0.5),  # tokens 6..11 unguided
        SamplingSettings(cfg_scale=2.0, cfg_schedule="linear", cfg_until=0.5),  # the ramp over tokens 0..5
    ],  # fmt: skip
)
# attend_block 5: self-attention reads 5, 10, then all 12 (18 with the text prefix) cache positions; None: all
@pytest.mark.parametrize("attend_block", [None, 5])
def test_kv_cache_sampling_equals_full_recompute(conditioning, rope, code_dim, settings, attend_block):
    model, (states, mask) = tiny_model(conditioning, rope, code_dim), text()
    cached = generate(
        model, states, mask, settings, torch.Generator().manual_seed(7), attend_block=attend_block
    )
    recomputed = generate_recompute(model, states, mask, settings, torch.Generator().manual_seed(7))
    assert cached.shape == (3, 12)
    assert torch.equal(cached, recomputed)


def test_seeded_draws_are_exponential_and_depend_on_the_seed_step_and_token_alone():
    from imagen.models.ar_transformer import lowbias32

    # a 32-bit fold of (1 << 32) would be this
    folded = int(lowbias32(torch.tensor(1, dtype=torch.int32))) % 2**32
    seeds = torch.tensor([5, 6, 5, 2**40 + 5, 2**32, folded])
    draws = race_noise((6, 2**16), "cpu", seeds=seeds, step=3)
    assert torch.equal(draws[0], draws[2])  # the same seed: the same draws, wherever the row is
    assert torch.equal(race_noise((1, 2**16), "cpu", seeds=seeds[1:2], step=3)[0], draws[1])
    assert (draws[4] == draws[5]).float().mean() < 0.001
    for other in (draws[1], draws[3], race_noise((1, 2**16), "cpu", seeds=seeds[:1], step=4)[0]):
        assert (other == draws[0]).float().mean() < 0.001  # another seed (its high bits too) or step
        assert abs(torch.corrcoef(torch.stack([other, draws[0]]))[0, 1]) < 0.02
    # Exp(1): mean 1, variance 1, P(E > 1) = 1/e
    for row in draws[1:4]:
        assert abs(row.mean() - 1) < 0.02 and abs(row.var() - 1) < 0.04
        assert abs((row > 1).float().mean() - math.exp(-1)) < 0.01
    with pytest.raises(ValueError, match="one per row"):
        race_noise((3, 8), "cpu", seeds=seeds)


def test_an_image_sampled_with_a_seed_does_not_depend_on_its_batch():
    model, (states, mask) = tiny_model(), text()
    settings = SamplingSettings(cfg_scale=3.0, temperature=1.0, top_k=10, cfg_until=0.5)
    seeds = torch.tensor([10, 11, 12])
    together = generate(model, states, mask, settings, seeds=seeds)
    for row in range(3):
        alone = generate(
            model, states[row : row + 1], mask[row : row + 1], settings, seeds=seeds[row : row + 1]
        )
        assert torch.equal(alone[0], together[row])
    assert torch.equal(generate_recompute(model, states, mask, settings, seeds=seeds), together)
    other = generate(model, states, mask, settings, seeds=seeds + 3)
    assert not torch.equal(other, together)  # the draws do follow the seeds
    with pytest.raises(ValueError, match="not both"):
        generate(model, states, mask, settings, torch.Generator(), seeds=seeds)


def test_candidate_seeds_keep_the_images_seed_first_and_are_distinct():
    seeds = torch.tensor([0, 1, 7])
    candidates = candidate_seeds(seeds, 4)  # prompt-major
    assert candidates.shape == (12,) and candidates.view(3, 4)[:, 0].tolist() == [0, 1, 7]
    assert len(set(candidates.tolist())) == 12 and bool((candidates >= 0).all())


def test_a_kept_cache_serves_later_calls_with_shorter_texts_as_a_fresh_one_would():
    # the stage keeps one cache per number of rows for its compiled (CUDA-graph) sampler: buffers at fixed addresses
    model, settings, caches = tiny_model(), SamplingSettings(cfg_scale=2.0, temperature=0.8, top_k=10), {}
    long_states, long_mask = torch.randn(3, 9, 16), torch.ones(3, 9, dtype=torch.bool)
    states, mask = text()  # 5 text positions, one caption padded
    kept = reusable_cache(caches, model, long_states, settings)
    generate(model, long_states, long_mask, settings, cache=kept)
    assert reusable_cache(caches, model, states, settings) is kept and len(caches) == 1
    sampled = [
        generate(model, states, mask, settings, torch.Generator().manual_seed(3), cache=cache)
        for cache in (kept, None)
    ]
    assert torch.equal(*sampled)
    # a longer text than the cache holds gets a new one
    assert reusable_cache(caches, model, torch.randn(3, 12, 16), settings) is not kept
    # the cache is kept in the model's dtype, whatever the text states'
    assert reusable_cache({}, model.to(torch.bfloat16), states, settings).self_k[0].dtype == torch.bfloat16


def test_guidance_stops_after_cfg_until_and_the_unconditional_rows_leave_the_batch():
    model, (states, mask) = tiny_model(), text()
    with torch.no_grad():  # weights 3x their initial scale: the caption then changes which tokens are drawn
        for p in model.parameters():
            p.mul_(3)
    settings = SamplingSettings(cfg_scale=3.0, top_k=10, cfg_until=0.4)  # 12 tokens: the first 5 guided
    rows_fed = []

    def step(model, fed, *args):
        rows_fed.append(fed.shape[0])
        return decode_and_sample(model, fed, *args)

    cut = generate(model, states, mask, settings, torch.Generator().manual_seed(7), decode_step=step)
    assert rows_fed == [6] * 4 + [3] * 7  # steps feed tokens 0..10: guided rows while they choose tokens 1..4
    recomputed = generate_recompute(model, states, mask, settings, torch.Generator().manual_seed(7))
    assert torch.equal(cut, recomputed)
    full = generate(model, states, mask, replace(settings, cfg_until=1.0), torch.Generator().manual_seed(7))
    assert torch.equal(cut[:, :5], full[:, :5]) and not torch.equal(cut, full)
    with pytest.raises(ValueError, match=r"cfg_until must be in \(0, 1\]; got 0"):
        SamplingSettings(cfg_until=0)
    # not 56 from 55.000000000000007
    assert SamplingSettings(cfg_scale=2.0, cfg_until=0.55).guided_tokens(100) == 55


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_decode_step_is_one_graph_and_samples_the_eager_tokens(backend):
    # the GPU sampler's step (decode, guidance, token choice) must trace as one graph (fullgraph: no graph break)
    # with dynamic shapes, and draw the same tokens as the eager loop from the same seed at each batch size and
    # attended length (how many compilations that takes: the bench checks, tests/test_bench.py)
    if backend == "inductor" and not has_cpp_compiler():
        pytest.skip("inductor on CPU needs a C++ compiler")
    torch._dynamo.reset()
    model = tiny_model("prefix")
    # guidance stops after half the tokens: the step runs on the doubled batch, then on the conditional rows alone
    settings = SamplingSettings(cfg_scale=2.0, cfg_schedule="linear", temperature=0.9, top_k=8, cfg_until=0.5)
    step = torch.compile(decode_and_sample, backend=backend, fullgraph=True, dynamic=True)
    for batch in (3, 2):
        states, mask = text(batch)
        sampled = [
            generate(model, states, mask, settings, torch.Generator().manual_seed(7), decode_step=s, attend_block=5)
            for s in (None, step)
        ]  # fmt: skip
        assert torch.equal(*sampled)


@pytest.mark.parametrize("masked", [False, True])
def test_cpu_attention_matches_scaled_dot_product_attention(masked):
    import torch.nn.functional as F

    from imagen.models.ar_transformer import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5, generator=g) > 0.3 if masked else None
    if masked:
        mask[..., 0] = True
        mask[1, :, 2] = False  # a query that may see no key: zeros, and no NaN in any gradient
    ours = attention(q, k, v, mask)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    torch.testing.assert_close(ours, reference)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    reference_grads = torch.autograd.grad(reference.square().sum(), (q, k, v))
    for ours_grad, reference_grad in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(ours_grad, reference_grad)
    if not masked:  # no mask means causal: over keys that are not the queries' own sequence it is refused
        with pytest.raises(ValueError, match="3 queries over 5 keys need a mask"):
            attention(q[:, :, :3], k, v, None)


def test_cpu_dropout_drops_its_share_scales_the_rest_and_passes_gradients_through_the_mask():
    from imagen.models.ar_transformer import Dropout, dropout_cpu_fast

    torch.manual_seed(0)
    x = torch.ones(200, 1000, requires_grad=True)
    y = dropout_cpu_fast(x, 0.1)
    kept = y != 0
    # p is rounded to 26 / 256: that share dropped (to within 0.3% on 200k draws), survivors scaled by 256 / 230
    assert abs((~kept).float().mean().item() - 26 / 256) < 0.003
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 256 / 230))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept * (256 / 230))
    assert torch.equal(dropout_cpu_fast(x, 0.1, training=False), x)
    assert torch.equal(dropout_cpu_fast(x, 0.0), x)
    with pytest.raises(ValueError, match="dropout probability"):
        dropout_cpu_fast(x, 1.0)
    module = Dropout(0.1).eval()  # the module follows train/eval
    assert torch.equal(module(x), x) and not torch.equal(module.train()(x), x)


def test_hashed_dropout_mask_drops_its_share_and_differs_from_call_to_call():
    from imagen.models.ar_transformer import hashed_keep_mask

    torch.manual_seed(0)
    masks = torch.stack([hashed_keep_mask((1000, 1000), 0.1) for _ in range(4)]).float()
    # exactly p to 2^-24: 0.1 dropped to within 0.2% on a million elements
    assert (1 - masks.mean(dim=(1, 2)) - 0.1).abs().max() < 0.002
    flat = masks.flatten(1)
    # neighbours and other calls' masks uncorrelated (|r| < 0.01; independent masks give ~0.001)
    assert torch.corrcoef(torch.stack([flat[0, :-1], flat[0, 1:]]))[0, 1].abs() < 0.01
    assert torch.corrcoef(flat).triu(1).abs().max() < 0.01
    torch.manual_seed(1)
    first = hashed_keep_mask((64, 64), 0.5)
    torch.manual_seed(1)  # a function of the seed drawn from torch's RNG
    assert torch.equal(hashed_keep_mask((64, 64), 0.5), first)


@pytest.mark.skipif(not has_cpp_compiler(), reason="inductor builds CPU kernels with a C++ compiler")
def test_compiled_cpu_dropout_uses_the_hashed_mask_and_passes_gradients_through_it():
    from imagen.models.ar_transformer import dropout_cpu_fast, hashed_keep_mask

    drop = torch.compile(lambda x: dropout_cpu_fast(x, 0.1), options={"fallback_random": True})
    torch.manual_seed(0)
    x = torch.ones(200, 1000, requires_grad=True)
    y = drop(x)
    torch.manual_seed(0)
    keep = hashed_keep_mask(x.shape, 0.1)  # the same seed: the eager hash gives the compiled kernel's mask
    torch.testing.assert_close(y, keep / 0.9)
    y.sum().backward()
    torch.testing.assert_close(x.grad, keep / 0.9)
    assert not torch.equal(drop(x), y)


def test_compile_blocks_takes_random_numbers_from_eager_pytorch_for_inductor_on_cpu():
    net = ARTransformer.from_size("tiny", vocab_size=32, grid_size=(4, 4), text_dim=16)
    calls = []
    with mock.patch.object(torch.nn.Module, "compile", lambda self, **kwargs: calls.append(kwargs)):
        net.compile_blocks()
        net.compile_blocks("cuda")
        net.compile_blocks(backend="aot_eager")
        net.compile_blocks(options={"max_autotune": True})
    layers = len(net.blocks)
    assert calls[:layers] == [{"options": {"fallback_random": True}}] * layers
    assert calls[layers : 3 * layers] == [{}] * layers + [{"backend": "aot_eager"}] * layers
    assert calls[3 * layers :] == [{"options": {"fallback_random": True, "max_autotune": True}}] * layers


def test_token_noise_replaces_its_share_of_the_inputs_with_uniform_codes(make_cfg):
    from types import SimpleNamespace

    import hydra
    from hydra.errors import InstantiationException

    from imagen.stages.ar_generator import ARGeneratorStage

    stage = SimpleNamespace(hparams=SimpleNamespace(token_noise=0.1), net=SimpleNamespace(config=ARTransformer.from_size(
        "tiny", vocab_size=1000, grid_size=(4, 4), text_dim=16).config))  # fmt: skip
    torch.manual_seed(0)
    tokens = torch.full((400, 500), 7)
    noised = ARGeneratorStage.noised_inputs(stage, tokens)
    replaced = noised != tokens  # a draw of code 7 itself (1 in 1000) looks unchanged
    assert abs(replaced.float().mean().item() - 0.1 * 0.999) < 0.002
    counts = torch.bincount(noised[replaced], minlength=1000).view(10, 100).sum(1)  # ten bands of 100 codes
    assert (counts.float() / replaced.sum() - 0.1).abs().max() < 0.005
    stage.hparams.token_noise = 0.0
    assert ARGeneratorStage.noised_inputs(stage, tokens) is tokens
    cfg = make_cfg(
        ["experiment=shapes_generator", *TINY_SHAPES, "model.autoencoder_ckpt=x.ckpt", "model.token_noise=1"]
    )
    with pytest.raises(InstantiationException, match=r"model.token_noise must be in \[0, 1\); got 1") as e:
        hydra.utils.instantiate(cfg.model)
    assert isinstance(e.value.__cause__, ValueError)


def test_text_encoder_block_computes_multihead_attention():
    from imagen.models.text_encoder import EncoderBlock

    torch.manual_seed(0)
    block = EncoderBlock(dim=32, heads=4).eval()
    x = torch.randn(3, 7, 32)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:], mask[2, 2:] = False, False  # padded captions
    h = block.norm1(x)
    reference = x + block.attn(h, h, h, key_padding_mask=~mask, need_weights=False)[0]
    reference = reference + block.mlp(block.norm2(reference))
    torch.testing.assert_close(block(x, mask), reference)


def test_gru_text_encoder_reads_both_directions_and_ignores_batch_padding():
    from imagen.models.text_encoder import ScratchTextEncoder

    torch.manual_seed(0)
    encoder = ScratchTextEncoder(dim=16, layers=2, vocab_size=32, mixer="gru").eval()
    long = "a small red circle left of a large blue square"
    encoder.fit_tokenizer([long, "a green triangle on the left"])
    with torch.no_grad():
        alone = encoder(["a red circle"])
        batched = encoder(["a red circle", long])
        # the short caption's states are the same whether or not it is padded to the long one
        assert batched.mask[0].sum() == alone.mask[0].sum() == 5  # [BOS] a red circle [EOS]
        torch.testing.assert_close(batched.states[0, :5], alone.states[0])
        # a word's state depends on the words after it (backward direction) and before it (forward direction)
        edited = encoder(["a red circle", "a red square", "a green circle"]).states
        assert not torch.allclose(edited[0, 2], edited[1, 2])  # "red", followed by another noun
        assert not torch.allclose(edited[0, 3], edited[2, 3])  # "circle", after another color
    with pytest.raises(ValueError, match="model.text_encoder.mixer must be transformer or gru; got 'lstm'"):
        ScratchTextEncoder(mixer="lstm")
    with pytest.raises(ValueError, match="model.text_encoder.mixer=gru needs an even model.text_encoder.dim"):
        ScratchTextEncoder(mixer="gru", dim=15, heads=1)


def test_gru_text_encoder_runs_in_float32_under_cpu_autocast():
    from imagen.models.text_encoder import ScratchTextEncoder

    torch.manual_seed(0)
    encoder = ScratchTextEncoder(dim=16, layers=2, vocab_size=32, mixer="gru").eval()
    captions = ["a red circle", "a small red circle left of a large blue square"]
    encoder.fit_tokenizer(captions)
    with torch.no_grad():
        plain = encoder(captions).states
        # PyTorch's bf16 GRU on CPU is slower than its float32 one: the encoder keeps float32, so the same states
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = encoder(captions).states
    torch.testing.assert_close(autocast.float(), plain)


def test_rope_scores_depend_only_on_the_2d_offset():
    from imagen.models.ar_transformer import apply_rope, rope_angles

    angles = rope_angles((5, 6), head_dim=16, base=100.0)  # (30, 8): cell i = (i // 6, i % 6)
    cos, sin = angles.cos(), angles.sin()
    q, k = torch.randn(1, 1, 1, 16).expand(1, 1, 30, 16), torch.randn(1, 1, 1, 16).expand(1, 1, 30, 16)
    scores = apply_rope(q, cos, sin)[0, 0] @ apply_rope(k, cos, sin)[0, 0].t()  # (30, 30)

    def cell(r, c):
        return r * 6 + c

    # the same query/key content one row down and one column right: (1,2)->(0,1) equals (4,5)->(3,4)
    torch.testing.assert_close(scores[cell(1, 2), cell(0, 1)], scores[cell(4, 5), cell(3, 4)])
    torch.testing.assert_close(scores[cell(2, 0), cell(2, 3)], scores[cell(0, 1), cell(0, 4)])
    # but a different offset gives a different score, and rows differ from columns
    assert not torch.allclose(scores[cell(1, 2), cell(0, 1)], scores[cell(1, 2), cell(1, 1)])
    assert not torch.allclose(scores[cell(0, 0), cell(1, 0)], scores[cell(0, 0), cell(0, 1)])


def test_guidance_scale_zero_is_unconditional_and_one_is_conditional():
    model, (states, mask) = tiny_model(), text()
    tokens = torch.randint(0, 40, (3, 12))
    cond_logits = model(tokens, states, mask)[0]
    uncond_logits = model(tokens, *model.null_condition(3, 5, "cpu"))[0]
    doubled = model(torch.cat([tokens, tokens]), *with_unconditional(model, states, mask))[0]
    for position in (0, 5, 11):
        torch.testing.assert_close(guide(doubled[:, position], 0.0), uncond_logits[:, position])
        torch.testing.assert_close(guide(doubled[:, position], 1.0), cond_logits[:, position])
    assert not torch.allclose(cond_logits, uncond_logits)


def test_top_k_one_is_deterministic_argmax_decoding():
    model, (states, mask) = tiny_model(), text()
    a = generate(model, states, mask, SamplingSettings(top_k=1), torch.Generator().manual_seed(1))
    b = generate(model, states, mask, SamplingSettings(top_k=1), torch.Generator().manual_seed(2))
    greedy = generate_recompute(model, states, mask, SamplingSettings(temperature=0.0))
    assert torch.equal(a, b) and torch.equal(a, greedy)
    # and sampling at temperature 1 does depend on the seed
    c = generate(model, states, mask, SamplingSettings(), torch.Generator().manual_seed(1))
    d = generate(model, states, mask, SamplingSettings(), torch.Generator().manual_seed(2))
    assert not torch.equal(c, d)


@pytest.mark.parametrize("top_p", [None, 0.9])
def test_a_tiny_temperature_samples_the_argmax_not_token_zero(top_p):
    # logits / 1e-39 overflow to inf; the softmax of a row of infs is NaN, and NaN's argmax is token 0
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0], [1.0, -2.0, 0.0, 4.0]])
    for temperature in (1e-39, 1e-30):
        tokens = sample_token(
            logits, SamplingSettings(temperature=temperature, top_p=top_p), torch.Generator().manual_seed(0)
        )
        assert tokens.tolist() == [1, 3]


def test_model_overfits_one_batch():
    torch.manual_seed(0)
    model = ARTransformer.from_size("tiny", vocab_size=40, grid_size=(3, 4), text_dim=16, dim=64)
    states, mask = text(4)
    tokens = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        _, loss = model(tokens, states, mask, targets=tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    sampled = generate(model.eval(), states, mask, SamplingSettings(cfg_scale=1.0, top_k=1))
    assert torch.equal(sampled, tokens)


def _generator_run(make_cfg, ckpt, tmp_path, name: str, extra: list[str]):
    generator = (
        [o for o in TINY_GENERATOR if "text_encoder" not in o]
        if "model/text_encoder=pretrained" in extra
        else TINY_GENERATOR
    )
    cfg = make_cfg(
        [
            "experiment=shapes_generator",
            *TINY_SHAPES,
            *generator,
            f"model.autoencoder_ckpt={ckpt}",
            "trainer.max_steps=6",
            "test=false",
            "callbacks=none",
            "logger=csv",
            "seed=3",
            *extra,
        ],  # fmt: skip
        run_dir=tmp_path / name,
    )
    _, objects = train(cfg)
    return objects["model"]


def test_sampling_during_validation_leaves_training_unaffected(make_cfg, tiny_autoencoder_ckpt, tmp_path):  # noqa: F811
    # validation after step 3 samples images (tiny prompt set, judge off); the run without it must end identical
    with_sampling = _generator_run(make_cfg, tiny_autoencoder_ckpt, tmp_path, "a", ["trainer.val_check_interval=3",
                                   "data.use_judge=true", "model.eval_prompts=4"])  # fmt: skip
    # the same validation (its data loaders draw from the global RNG too), only without the sampling
    without = _generator_run(make_cfg, tiny_autoencoder_ckpt, tmp_path, "b", ["trainer.val_check_interval=3",
                             "data.use_judge=true", "model.eval_prompts=0"])  # fmt: skip
    for key in ("val/judge_acc", "val/binding_acc"):
        assert without.trainer.callback_metrics.get(key) is None
        assert with_sampling.trainer.callback_metrics.get(key) is not None
    a, b = with_sampling.state_dict(), without.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key


def test_validation_samples_with_the_weights_it_scores_under_ema(
    make_cfg,
    tiny_autoencoder_ckpt,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    # EMA swaps its averaged weights in for validation: the judged samples must come from them, like the val loss
    from imagen.stages.ar_generator import ARGeneratorStage

    seen: dict[str, list[torch.Tensor]] = {"loss": [], "samples": []}
    eval_step, generate_images = ARGeneratorStage._eval_step, ARGeneratorStage.generate_images

    def recording_eval_step(self, batch, split):
        seen["loss"].append(self.net.head.weight.detach().clone())
        return eval_step(self, batch, split)

    def recording_generate_images(self, *args, **kwargs):
        seen["samples"].append(self.net.head.weight.detach().clone())
        return generate_images(self, *args, **kwargs)

    monkeypatch.setattr(ARGeneratorStage, "_eval_step", recording_eval_step)
    monkeypatch.setattr(ARGeneratorStage, "generate_images", recording_generate_images)
    model = _generator_run(make_cfg, tiny_autoencoder_ckpt, tmp_path, "ema", [
        "trainer.val_check_interval=3", "data.use_judge=true", "model.eval_prompts=4", "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0", "callbacks.ema.decay=0.5"])  # fmt: skip
    assert model.trainer.callback_metrics.get("val/judge_acc") is not None
    assert seen["loss"] and seen["samples"]
    assert torch.equal(seen["samples"][0], seen["loss"][0])
    # and those are the averaged weights, not the ones training continued from
    assert not torch.equal(seen["samples"][0], model.net.head.weight.detach())
    # EMA's checkpoint holds its averaged copy of the module: the tokenizer must have been trained before the copy
    path = tmp_path / "ema.ckpt"
    model.trainer.save_checkpoint(path)
    loaded = ARGeneratorStage.from_checkpoint(str(path))
    assert loaded.text_encoder.tokenizer.trained
    size = loaded.hparams.image_size
    assert loaded.generate_images(["a small red circle on the left"]).shape == (1, 3, size, size)


@pytest.mark.parametrize("kind", ["bert", "t5", "clip"])
def test_pretrained_text_encoder_loads_offline_and_trains(make_cfg, tiny_autoencoder_ckpt, tmp_path, kind):  # noqa: F811
    path = tmp_path / kind
    save_tiny_hf_encoder(kind, path)
    model = _generator_run(make_cfg, tiny_autoencoder_ckpt, tmp_path, f"run_{kind}",
                           ["model/text_encoder=pretrained", f"model.text_encoder.pretrained={path}",
                            "model.text_encoder.cache_dir=null", "trainer.limit_val_batches=0"])  # fmt: skip
    assert model.text_encoder.dim == 32
    expected = {"bert": "BertModel", "t5": "T5EncoderModel", "clip": "CLIPTextModel"}[
        kind
    ]  # the encoder half alone
    assert type(model.text_encoder.model).__name__ == expected
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert model.trainer.global_step == 6


def test_frozen_pretrained_encoder_keeps_its_states_in_an_on_disk_cache(tmp_path):
    from imagen.models.text_encoder import PretrainedTextEncoder

    path = tmp_path / "bert"
    save_tiny_hf_encoder("bert", path)
    captions = [
        "a small red circle",
        "a large blue square above a small green triangle",
        "a small red circle",
    ]
    encoder = PretrainedTextEncoder(str(path), cache_dir=str(tmp_path / "cache"))
    states, mask = encoder._encode(captions)  # straight from the model, padded by the tokenizer
    first = encoder(captions)
    assert encoder.cache_path.is_file() and len(encoder._cache) == 2
    assert torch.equal(first.mask, mask)
    torch.testing.assert_close(first.states[first.mask], states[mask])
    assert first.states[~first.mask].abs().sum() == 0  # padding positions are zero
    # a new encoder over the same folder reads the states back instead of running the model
    again = PretrainedTextEncoder(str(path), cache_dir=str(tmp_path / "cache"))
    with mock.patch.object(again, "_encode", side_effect=AssertionError("encoded again")):
        reread = again(captions[::-1])
    assert torch.equal(reread.states, first.states.flip(0)) and torch.equal(reread.mask, first.mask.flip(0))
    # other weights saved into the same folder later: the old states are not used for them
    shutil.rmtree(path)
    torch.manual_seed(1)
    save_tiny_hf_encoder("bert", path)
    for file in path.iterdir():  # "later" by a second, whatever the file system's timestamp resolution
        os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 10**9))
    retrained = PretrainedTextEncoder(str(path), cache_dir=str(tmp_path / "cache"))
    assert retrained.cache_path != encoder.cache_path and not retrained._cache


def save_tiny_hf_encoder(kind: str, path) -> None:
    """A tiny randomly initialised encoder and a fast tokenizer, saved with save_pretrained (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "a small large red green blue yellow purple cyan circle square triangle left right top bottom center of above below in the on at there is one and it middle".split()
    path.mkdir(parents=True)
    if kind == "bert":
        from transformers import BertConfig, BertModel, BertTokenizerFast

        (path / "vocab.txt").write_text(
            "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n"
        )
        BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
        config = BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64)  # fmt: skip
        BertModel(config).save_pretrained(path)
    else:  # t5 or clip: a word-level fast tokenizer
        from transformers import PreTrainedTokenizerFast

        eos = "</s>" if kind == "t5" else "<|endoftext|>"
        vocab = {w: i for i, w in enumerate(["<pad>", eos, "<unk>", *words])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", eos_token=eos, unk_token="<unk>"
        ).save_pretrained(path)
        if kind == "t5":
            from transformers import T5Config, T5Model

            config = T5Config(vocab_size=len(vocab), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2)
            T5Model(config).save_pretrained(path)
        else:  # a whole CLIP model (text and vision), as the hub's CLIP checkpoints are: the encoder takes its text half
            from transformers import CLIPConfig, CLIPModel

            tiny = {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            }
            text = {**tiny, "vocab_size": len(vocab), "max_position_embeddings": 64, "pad_token_id": 0,
                    "eos_token_id": 1}  # fmt: skip
            vision = {**tiny, "image_size": 32, "patch_size": 16}
            CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
                path
            )


def test_compiled_blocks_train_like_eager(make_cfg, tiny_autoencoder_ckpt, tmp_path):  # noqa: F811
    # `model.compile=true` compiles each block; the aot_eager backend traces the same graphs as on a GPU without
    # a C++ toolchain, so the run must match the eager one step for step
    # a run of 6 steps with validation after steps 3 and 6
    eager = _generator_run(make_cfg, tiny_autoencoder_ckpt, tmp_path, "eager", ["trainer.precision=32-true",
                           "trainer.val_check_interval=3"])  # fmt: skip
    stances = []
    set_stance = torch.compiler.set_stance
    with mock.patch.object(torch.compiler, "set_stance", lambda s: stances.append(s) or set_stance(s)):
        compiled = _generator_run(make_cfg, tiny_autoencoder_ckpt, tmp_path, "compiled", [
            "trainer.precision=32-true", "trainer.val_check_interval=3", "model.compile=true",
            "+model.compile_options={backend: aot_eager}"])  # fmt: skip
    # on CPU each validation runs the blocks eagerly (its shapes would recompile them), and training resumes compiled
    assert stances == ["force_eager", "default"] * 2
    assert all(
        hasattr(block, "_compiled_call_impl") and block._compiled_call_impl for block in compiled.net.blocks
    )
    a, b = eager.net.state_dict(), compiled.net.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.skipif(not has_cpp_compiler(), reason="inductor builds CPU kernels with a C++ compiler")
def test_inductor_compiled_blocks_give_eager_gradients_under_bf16_autocast():
    # the real CPU path of `model.compile=true` on a CPU with bf16 (AMX): inductor once turned the backward of the
    # RoPE rotation into NaN there, and every step was skipped as non-finite
    torch.manual_seed(0)
    # 64-wide heads over an 8x8 grid: the bug needed both
    eager = ARTransformer.from_size(
        "tiny", vocab_size=32, grid_size=(8, 8), text_dim=16, dim=64, heads=1, layers=1
    )
    compiled = copy.deepcopy(eager).compile_blocks()
    tokens, states = torch.randint(0, 32, (4, 64)), torch.randn(4, 6, 16)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, 4:] = False  # padded captions
    for net in (eager, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(tokens, states, mask, targets=tokens)[1].backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        if p.grad is None:  # the null caption, without caption dropout
            assert q.grad is None, name
            continue
        assert torch.isfinite(q.grad).all(), name
        torch.testing.assert_close(q.grad, p.grad, rtol=0.05, atol=2e-3, msg=name)


def test_compile_without_a_cpp_compiler_trains_eagerly_and_says_so(make_cfg, tiny_autoencoder_ckpt, tmp_path,  # noqa: F811
                                                                    caplog):  # fmt: skip
    with mock.patch("shutil.which", return_value=None), caplog.at_level("WARNING"):
        model = _generator_run(make_cfg, tiny_autoencoder_ckpt, tmp_path, "nocxx", ["model.compile=true"])
    assert not any(getattr(block, "_compiled_call_impl", None) for block in model.net.blocks)
    assert "no C++ compiler" in caplog.text and "model.compile=false" in caplog.text


def test_code_vectors_feed_the_autoencoders_codes_and_travel_in_the_checkpoint(
    make_cfg,
    tiny_autoencoder_ckpt,  # noqa: F811
    tmp_path,
):
    from imagen.stages.ar_generator import ARGeneratorStage

    model = _generator_run(make_cfg, tiny_autoencoder_ckpt, tmp_path, "codes", ["model.code_vectors=true"])
    codes = model.autoencoder.code_vectors()
    assert model.net.config.code_dim == codes.shape[1]
    assert torch.equal(model.net.code_vectors[: codes.shape[0]], codes)  # the frozen autoencoder's, unchanged
    assert not model.net.code_vectors[model.net.bos_id].any()
    path = tmp_path / "codes.ckpt"
    model.trainer.save_checkpoint(path)
    restored = ARGeneratorStage.from_checkpoint(str(path))
    assert torch.equal(restored.net.code_vectors, model.net.code_vectors)
    tokens = torch.randint(0, codes.shape[0], (2, model.net.config.num_image_tokens))
    text = model.encode_text(["a small red circle on the left"] * 2)
    torch.testing.assert_close(
        restored.net(tokens, text.states, text.mask)[0], model.eval().net(tokens, text.states, text.mask)[0]
    )


@pytest.mark.parametrize("compiled", [False, True])
def test_activation_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations(compiled):
    if compiled and not has_cpp_compiler():
        pytest.skip("inductor on CPU needs a C++ compiler")
    torch._dynamo.reset()
    torch.manual_seed(0)
    kept = ARTransformer.from_size("tiny", vocab_size=32, grid_size=(4, 4), text_dim=16, dropout=0.1)
    recomputed = copy.deepcopy(kept)
    recomputed.config.activation_checkpointing = True
    if compiled:
        kept.compile_blocks()
        recomputed.compile_blocks()
    tokens, states = torch.randint(0, 32, (3, 16)), torch.randn(3, 5, 16)
    mask = torch.ones(3, 5, dtype=torch.bool)
    saved_bytes = []
    for net in (kept, recomputed):
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        torch.manual_seed(1)  # the same dropout masks and caption dropout in both
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = net(tokens, states, mask, targets=tokens, cond_drop_prob=0.5)[1]
        saved_bytes.append(total)
        loss.backward()
    assert saved_bytes[1] < saved_bytes[0] / 2
    for (name, p), q in zip(kept.named_parameters(), recomputed.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_epoch_end_scoring_runs_under_the_trainers_precision(make_cfg, tiny_autoencoder_ckpt, tmp_path):  # noqa: F811
    # Lightning autocasts only the step methods; the stage runs its epoch-end scoring (retrieval) under the Trainer's
    # precision too, and keeps the sampling at epoch start in float32
    seen = {}

    def recording(name, method):
        def wrapped(self, split):
            seen[name] = torch.is_autocast_enabled("cpu")
            return method(self, split)

        return wrapped

    start, end = ARGeneratorStage._eval_epoch_start, ARGeneratorStage._eval_epoch_end
    with (
        mock.patch.object(ARGeneratorStage, "_eval_epoch_start", recording("start", start)),
        mock.patch.object(ARGeneratorStage, "_eval_epoch_end", recording("end", end)),
    ):
        _generator_run(make_cfg, tiny_autoencoder_ckpt, tmp_path, "bf16", ["trainer.val_check_interval=3",
                       "trainer.precision=bf16-mixed", "model.eval_prompts=4"])  # fmt: skip
    assert seen == {"start": False, "end": True}


def test_every_parameter_gets_a_gradient_without_caption_dropout():
    # DDP without find_unused_parameters needs each parameter in every step: the null caption too, at cond_drop_prob=0
    from imagen.models.ar_transformer import ARTransformer

    torch.manual_seed(0)
    net = ARTransformer.from_size("tiny", vocab_size=16, grid_size=(2, 2), text_dim=8).train()
    tokens, states, mask = torch.randint(16, (3, 4)), torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)
    _, loss = net(tokens, states, mask, targets=tokens, cond_drop_prob=0.0)
    loss.backward()
    assert [name for name, p in net.named_parameters() if p.grad is None] == []
    assert net.null_text.grad.abs().sum() == 0  # taking part changes nothing: no caption was dropped


class Unpicklable:
    """An object `torch.load(weights_only=True)` refuses: a checkpoint holding one needs trust_checkpoint=true."""


def test_trust_checkpoint_reaches_the_autoencoder_checkpoint(make_cfg, tiny_autoencoder_ckpt, tmp_path):  # noqa: F811
    import hydra
    from hydra.errors import InstantiationException

    checkpoint = torch.load(tiny_autoencoder_ckpt, weights_only=False)
    torch.save({**checkpoint, "note": Unpicklable()}, tmp_path / "autoencoder.ckpt")
    overrides = ["experiment=shapes_generator", *TINY_SHAPES, *TINY_GENERATOR,
                 f"model.autoencoder_ckpt={tmp_path / 'autoencoder.ckpt'}"]  # fmt: skip
    with pytest.raises(InstantiationException, match="refusing it.*trust_checkpoint=true"):
        hydra.utils.instantiate(make_cfg(overrides).model, _convert_="all")
    stage = hydra.utils.instantiate(make_cfg([*overrides, "trust_checkpoint=true"]).model, _convert_="all")
    assert stage.autoencoder.vocab_size == stage.net.config.vocab_size


def test_the_new_concept_fine_tune_builds_a_generator_stage_too(make_cfg, tiny_autoencoder_ckpt):  # noqa: F811
    """`experiment=shapes_finetune_new_concept model=ar_generator`, as its config and the README say; the joint
    stage's `image_text_lr`, which the experiment sets to null, is refused when given a rate."""
    import hydra
    from hydra.errors import InstantiationException

    # no init_from: the stage is only built here
    overrides = ["experiment=shapes_finetune_new_concept", "model=ar_generator", *TINY_SHAPES, *TINY_GENERATOR,
                 "model.init_from=null", f"model.autoencoder_ckpt={tiny_autoencoder_ckpt}"]  # fmt: skip
    stage = hydra.utils.instantiate(make_cfg(overrides).model, _convert_="all")
    assert type(stage) is ARGeneratorStage and stage.hparams.new_words_like
    with pytest.raises(InstantiationException, match="model.image_text_lr=0.001: the generator stage has no"):
        hydra.utils.instantiate(make_cfg([*overrides, "model.image_text_lr=1e-3"]).model, _convert_="all")
