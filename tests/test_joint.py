"""The joint stage: switchable losses, reranking, retrieval recall, caption decoding and parsing, sample.py."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from imagen.cli.sample import sample
from imagen.cli.train import train
from imagen.data.shapes import Scene, SceneSampler, ShapeObject, ShapesConfig
from imagen.images import save_png, to_uint8
from imagen.metrics.captions import caption_correct, parse_shapes_caption
from imagen.metrics.retrieval import (
    caption_keys,
    recall_at_k,
    rerank_top_k,
    retrieval_metrics,
    same_caption_relevance,
)
from imagen.models.image_text import ImageTextNet
from imagen.models.text_encoder import PAD_ID, CaptionTokenizer, TextStates
from imagen.sampling.caption import CaptionDecoding, beam_search, decode_captions, ids_to_text, special_ids
from imagen.sampling.rerank import best_of
from imagen.stages.joint import JointStage, RerankSettings, scene_relevance
from tests.conftest import TINY_SHAPES, train_tiny_stage
from tests.test_train import TINY_JOINT, tiny_autoencoder_ckpt  # noqa: F401  (session fixture)


def joint_overrides(ckpt, *extra: str) -> list[str]:
    return ["experiment=shapes_joint", *TINY_SHAPES, *TINY_JOINT, f"model.autoencoder_ckpt={ckpt}", *extra]


pytestmark = pytest.mark.usefixtures("one_thread")


# -- reranking and retrieval (pure functions) ------------------------------------------------------------------------


def test_best_of_keeps_the_highest_scoring_candidate_of_each_group():
    candidates = torch.arange(12).view(6, 2)  # 3 groups of 2 candidates, each a row
    scores = torch.tensor([0.1, 0.9, 5.0, -1.0, -3.0, -2.0])
    best, index = best_of(candidates, scores, per_group=2)
    assert index.tolist() == [1, 2, 5]
    assert torch.equal(best, candidates[[1, 2, 5]])
    one, _ = best_of(candidates, scores, per_group=1)  # no reranking: everything kept, in order
    assert torch.equal(one, candidates)
    with pytest.raises(ValueError, match="groups of 4"):
        best_of(candidates, scores, per_group=4)


def _gather_rows_in_process(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from imagen.metrics.retrieval import gather_rows

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)

    def all_gather(t):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        return torch.stack(parts)

    def broadcast(obj, src):
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    n = 3 - rank  # rank 0 holds 3 rows, rank 1 holds 2: padded for the exchange
    rows = torch.arange(n * 2, dtype=torch.float).view(n, 2) + 10 * rank
    index = torch.arange(n) * world + rank
    both = gather_rows([rows, index], all_gather, world)
    # rank 0 holds nothing (an evaluation stream with fewer samples than ranks x workers): it still takes part
    one = gather_rows(None if rank == 0 else [rows.half(), index], all_gather, world, broadcast)
    none = gather_rows(None, all_gather, world, broadcast)
    torch.save((both, one, none), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_gather_rows_concatenates_every_process_share_on_every_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gather_rows_in_process, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    expected_rows = torch.cat([torch.arange(6.0).view(3, 2), torch.arange(4.0).view(2, 2) + 10])
    for rank in range(2):
        (rows, index), (rows_of_one, index_of_one), none = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(rows, expected_rows)
        assert index.tolist() == [0, 2, 4, 1, 3]
        # rank 1's rows only, in their own dtype on both ranks
        torch.testing.assert_close(rows_of_one, expected_rows[3:].half())
        assert index_of_one.tolist() == [1, 3]
        assert none is None


def test_hard_negative_captions_enter_only_the_image_to_text_half_of_the_contrastive_loss():
    from imagen.models.image_text import contrastive_loss

    torch.manual_seed(0)
    image, text, negative = (F.normalize(torch.randn(n, 8), dim=-1) for n in (4, 4, 3))
    scale, labels = torch.tensor(10.0), torch.arange(4)
    plain = 0.5 * (
        F.cross_entropy(scale * image @ text.t(), labels) + F.cross_entropy(scale * text @ image.t(), labels)
    )
    torch.testing.assert_close(contrastive_loss(image, text, scale), plain)
    # (4, 7): the batch's captions, then the negatives
    image_to_text = scale * image @ torch.cat([text, negative]).t()
    expected = 0.5 * (
        F.cross_entropy(image_to_text, labels) + F.cross_entropy(scale * text @ image.t(), labels)
    )
    torch.testing.assert_close(contrastive_loss(image, text, scale, negative), expected)
    # a negative that copies the true caption is as likely as it: the image-to-text half cannot go below log 2
    assert contrastive_loss(image, text, torch.tensor(100.0), text) > 0.5 * np.log(2)


def test_pairs_of_a_batch_that_match_are_left_out_of_the_contrastive_negatives():
    from imagen.models.image_text import contrastive_loss

    torch.manual_seed(0)
    image = F.normalize(torch.randn(4, 8), dim=-1)
    image[2] = image[0]  # item 2 repeats item 0's scene and caption
    text, scale, labels = image.clone(), torch.tensor(100.0), torch.arange(4)
    also_true = torch.eye(4, dtype=torch.bool)
    also_true[0, 2] = also_true[2, 0] = True
    # pushed apart, the two copies hold the loss at log 2 for their rows; left out, it goes to 0
    assert contrastive_loss(image, text, scale) > 0.5 * np.log(2) - 1e-3
    assert contrastive_loss(image, text, scale, also_true=also_true) < 1e-3
    logits = (scale * image @ text.t()).masked_fill(
        also_true & ~torch.eye(4, dtype=torch.bool), float("-inf")
    )
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    torch.testing.assert_close(contrastive_loss(image, text, scale, also_true=also_true), expected)


def test_the_pairs_that_match_come_from_the_scenes_shown_or_from_equal_captions(joint_ckpt):
    stage = JointStage.from_checkpoint(joint_ckpt)
    left = Scene((ShapeObject("red", "circle", "small", "left"),))
    right = Scene((ShapeObject("red", "circle", "small", "right"),))
    shown = {"index": torch.tensor([0, 1, 2]), "mirrored": torch.tensor([False, True, False])}
    with mock.patch.object(JointStage, "_scenes", lambda self, split, index: [left, left, right]):
        # item 1 shows the mirror image of `left`, which is `right`, as item 2 does
        pairs = stage._pairs_that_match(shown, ["", "", ""])
    assert pairs.tolist() == [[True, False, False], [False, True, True], [False, True, True]]
    # without scenes (real data): captions equal but for case and spacing, as retrieval scores them
    captions = ["a dog", "a cat", "A  dog"]
    with mock.patch.object(JointStage, "_scenes", return_value=None):  # a datamodule without scenes
        pairs = stage._pairs_that_match({"index": torch.tensor([5, 6, 7])}, captions)
    assert pairs.tolist() == [[True, False, True], [False, True, False], [True, False, True]]


def test_recall_at_k_is_exact_on_a_constructed_case():
    # query q's relevant item is ranked 1st, 3rd, 7th, or absent (similarity falls with the item index)
    similarity = torch.linspace(1, 0, 10).repeat(4, 1)  # (4 queries, 10 items)
    relevant = torch.zeros(4, 10, dtype=torch.bool)
    relevant[0, 0] = relevant[1, 2] = relevant[2, 6] = True
    assert recall_at_k(similarity, relevant, (1, 3, 5, 7, 10)) == {1: 0.25, 3: 0.5, 5: 0.5, 7: 0.75, 10: 0.75}
    # several relevant items (ranked 5th and 10th): the best-ranked one counts
    relevant[3, [4, 9]] = True
    assert recall_at_k(similarity, relevant, (4, 5)) == {4: 0.5, 5: 0.75}


def test_recall_at_k_counts_ties_and_nan_against_the_query():
    # every score tied: the relevant item ranks behind all the others wherever it sits in the list
    similarity, relevant = torch.zeros(3, 3), torch.eye(3, dtype=torch.bool)
    assert recall_at_k(similarity, relevant, (1, 2, 3)) == {1: 0.0, 2: 0.0, 3: 1.0}
    # one irrelevant item tied with the relevant one; one NaN among the irrelevant; the relevant one NaN
    similarity = torch.tensor([[0.9, 0.9, 0.1], [float("nan"), 0.8, 0.1], [0.2, 0.3, float("nan")]])
    assert recall_at_k(similarity, relevant, (1, 2)) == {1: 0.0, 2: pytest.approx(2 / 3)}


def test_retrieval_metrics_rank_both_directions():
    text = torch.eye(3)
    image = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]])  # images 1 and 2 swapped against their captions
    relevant = torch.eye(3, dtype=torch.bool)
    similarity = text @ image.t()
    values = retrieval_metrics(similarity, similarity.t(), relevant, ks=(1, 3))
    assert values["recall_at_1_t2i"] == pytest.approx(1 / 3) and values["recall_at_1_i2t"] == pytest.approx(
        1 / 3
    )
    assert values["recall_at_3_t2i"] == 1.0 and values["recall_at_3_i2t"] == 1.0
    # each direction its own matrix
    values = retrieval_metrics(text @ text.t(), similarity.t(), relevant, ks=(1,))
    assert values == {"recall_at_1_t2i": 1.0, "recall_at_1_i2t": pytest.approx(1 / 3)}


def test_an_image_whose_own_caption_is_the_query_counts_as_relevant():
    # images 0 and 1 share a caption (case and spacing aside); each text ranks image 1 first, without a tie
    keys = caption_keys(["An actor attends the premiere", "an actor  attends the premiere ", "a red car"])
    assert keys.dtype == torch.int64 and keys[0] == keys[1] != keys[2]
    similarity = torch.tensor([[0.5, 0.9, 0.1], [0.5, 0.9, 0.1], [0.1, 0.2, 0.9]])  # (texts, images)
    relevant = same_caption_relevance(keys)
    assert relevant.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    assert recall_at_k(similarity, relevant, (1,)) == {1: 1.0}
    # by the pairing alone, text 0 misses: image 1 is another image's
    assert recall_at_k(similarity, torch.eye(3, dtype=torch.bool), (1,)) == {1: pytest.approx(2 / 3)}


def test_reranking_the_top_k_reorders_only_them_by_the_second_score():
    similarity = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])  # (2 queries, 4 items)
    second = torch.tensor([[0.0, 5.0, 1.0, 9.0], [0.0, 0.0, 7.0, 3.0]])  # would put item 3 first in both rows

    def score(queries, items):
        return second[queries, items]

    out = rerank_top_k(similarity, score, k=3)
    order = out.argsort(1, descending=True).tolist()
    # row 0: its top 3 (items 0-2) by the second score, then item 3 (not in the top 3: its 9.0 is never asked for)
    assert order == [[1, 2, 0, 3], [2, 3, 1, 0]]
    relevant = torch.tensor([[False, True, False, False], [False, False, True, False]])
    assert recall_at_k(similarity, relevant, (1,)) == {1: 0.0}
    assert recall_at_k(out, relevant, (1,)) == {1: 1.0}
    # k=1: unchanged
    assert torch.equal(rerank_top_k(similarity, score, k=1).argsort(1), similarity.argsort(1))
    # a tie in the second score stays a tie, which recall counts against the query
    out = rerank_top_k(similarity, lambda queries, items: torch.ones(len(queries)), k=3)
    assert out[0, 0] == out[0, 1] == out[0, 2] > out[0, 3]
    assert recall_at_k(out, relevant, (1,)) == {1: 0.0}


def test_scene_relevance_follows_what_the_caption_says():
    a, b = ShapeObject("red", "circle", "small", "left"), ShapeObject("blue", "square", "large", "right")
    a2, b2 = (
        ShapeObject("red", "circle", "small", "top left"),
        ShapeObject("blue", "square", "large", "top right"),
    )
    scenes = [Scene((a, b), "left of"), Scene((a2, b2), "left of"), Scene((b, a), "right of"), Scene((a,))]
    relevant = scene_relevance(scenes)
    # the same relation in another row is what the caption says; the inverse phrasing too; one object is not
    assert relevant.tolist() == [
        [True, True, True, False],
        [True, True, True, False],
        [True, True, True, False],
        [False, False, False, True],
    ]


# -- captions --------------------------------------------------------------------------------------------------------


def test_every_paraphrase_parses_back_to_its_scene_and_a_wrong_caption_does_not():
    sampler, rng = SceneSampler(ShapesConfig()), np.random.default_rng(0)
    for _ in range(200):
        scene = sampler.sample(rng)
        for caption in scene.captions():
            assert caption_correct(caption, scene), caption
            assert caption_correct(caption.replace(",", " ,"), scene)  # as the word tokenizer decodes it
    scene = Scene((ShapeObject("red", "circle", "small", "top left"),))
    assert not caption_correct("a small red circle at the top", scene)  # wrong cell
    assert not caption_correct("a large red circle in the top left", scene)  # wrong size
    assert parse_shapes_caption("a red circle") is None
    two = Scene(
        (ShapeObject("red", "circle", "small", "left"), ShapeObject("blue", "square", "large", "right")),
        "left of",
    )
    assert caption_correct("a large blue square and a small red circle left of it", two)
    assert not caption_correct("a small red circle and a large blue square left of it", two)


@pytest.mark.parametrize("conv_layers", [0, 1])
def test_image_encoder_conv_blocks_mix_each_cell_with_its_grid_neighbours(conv_layers):
    """One ResBlock (two 3x3 convs) lets a token reach cells up to 2 rows/columns away, on the raster grid."""
    torch.manual_seed(0)
    net = ImageTextNet.from_size("tiny", vocab_size=10, grid_size=(6, 6), caption_vocab_size=16, text_dim=8,
                                 conv_layers=conv_layers, encoder_layers=0).eval()  # fmt: skip
    tokens = torch.zeros(1, 36, dtype=torch.long)
    changed_token = tokens.clone()
    changed_token[0, 2 * 6 + 1] = 7  # row 2, column 1
    moved = (net.encode_image(changed_token) - net.encode_image(tokens)).abs().amax(-1)[0].view(6, 6) > 1e-6
    rows, cols = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    reach = 2 * conv_layers
    expected = ((rows - 2).abs() <= reach) & ((cols - 1).abs() <= reach)
    assert torch.equal(moved, expected)


def test_image_embeddings_start_at_the_scale_of_the_positions_added_to_them():
    """Token embeddings at N(0, 1) beside positions at 0.02 hid where a token is: a captioner trained under bf16
    autocast then said where an object is right only with bf16's rounding (fp32 captions were worse)."""
    net = ImageTextNet.from_size(
        "shapes", vocab_size=1000, grid_size=(8, 8), caption_vocab_size=64, text_dim=8
    )
    positions = net.row_emb[:, None] + net.col_emb[None]
    assert 0.5 < positions.std() / net.image_emb.weight.std() < 4
    assert 0.5 < net.caption_pos.std() / net.caption_emb.weight.std() < 2


def test_caption_decoding_variants_produce_the_memorised_captions():
    torch.manual_seed(0)
    captions = [
        "a small red circle on the left",
        "there is a large blue square at the top",
        "in the middle , a",
    ]
    tokenizer = CaptionTokenizer()
    tokenizer.train(captions, vocab_size=64)
    net = ImageTextNet.from_size("tiny", vocab_size=10, grid_size=(2, 2), caption_vocab_size=64, text_dim=8)
    tokens = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 8, 9]])
    ids, _ = tokenizer(captions, 32)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(150):
        loss = net.caption_loss(net.encode_image(tokens), ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    net.eval()
    features = net.encode_image(tokens)
    for decoding in (CaptionDecoding("greedy"), CaptionDecoding("beam", beam_size=3),
                     CaptionDecoding("nucleus", top_p=0.5)):  # fmt: skip
        out = decode_captions(net, features, tokenizer, decoding, torch.Generator().manual_seed(0))
        assert out == captions, decoding.method
    # other scores added to the final beams': one that favours each image's last beam gets that beam
    given = []

    def rescore(strings):
        given.extend(strings)
        return torch.tensor([100.0 * (j % 3 == 2) for j in range(len(strings))])

    rescored = CaptionDecoding("beam", beam_size=3, generator_weight=1.0)
    out = decode_captions(net, features, tokenizer, rescored, rescore=rescore)
    assert len(given) == 9 and out == given[2::3] and out != captions
    with pytest.raises(ValueError, match="needs a joint stage's matcher and generator"):
        decode_captions(net, features, tokenizer, rescored)
    # hot nucleus sampling still writes only vocabulary words, within the length limit ([BOS] + at most 5 tokens;
    # a caption cut there has no [EOS])
    hot = CaptionDecoding("nucleus", top_p=1.0, temperature=5.0, max_length=6)
    words = set(tokenizer.tokenizer.get_vocab()) - {"[PAD]", "[UNK]", "[BOS]", "[EOS]"}
    for caption in decode_captions(net, features, tokenizer, hot, torch.Generator().manual_seed(1)):
        assert 1 <= len(caption.split()) <= 5 and set(caption.split()) <= words


def test_every_caption_token_sees_every_image_cell():
    """The caption decoder's cross-attention once ran causal over the image cells (token t saw cells 0..t)."""
    torch.manual_seed(0)
    net = ImageTextNet.from_size("tiny", vocab_size=10, grid_size=(3, 3), caption_vocab_size=16, text_dim=8)
    net.eval()
    features = net.encode_image(torch.randint(10, (1, 9)))
    changed = features.clone()
    changed[:, -1] += 1.0  # the last cell only
    ids = torch.tensor([[1, 2]])
    first = net.caption_logits(features, ids)[:, 0]
    assert not torch.allclose(net.caption_logits(changed, ids)[:, 0], first)
    cross = net.caption_cross_kv(changed)
    self_kv = [tuple(torch.zeros(1, 2, 4, 16) for _ in range(2)) for _ in cross]
    torch.testing.assert_close(
        net.caption_step(ids[:, :1], 0, cross, self_kv)[:, 0], net.caption_logits(changed, ids)[:, 0]
    )


def test_cached_caption_decoding_scores_what_the_decoder_computes_over_the_whole_prefix():
    """Beam search runs one token a step against cached keys/values, reordered with the beams: each returned
    beam's score is its caption's log-probability recomputed teacher-forced from scratch."""
    torch.manual_seed(0)
    tokenizer = CaptionTokenizer()
    tokenizer.train(["a small red circle on the left", "a large blue square at the top"], vocab_size=64)
    net = ImageTextNet.from_size("tiny", vocab_size=10, grid_size=(2, 2), caption_vocab_size=64, text_dim=8)
    net.eval()
    features = net.encode_image(torch.randint(10, (3, 4)))
    decoding = CaptionDecoding("beam", beam_size=4, length_penalty=0.0, max_length=8)
    ids, scores = beam_search(net, features, tokenizer, decoding)  # (3, 4, T), (3, 4)
    flat = ids.flatten(0, 1)
    _, _, banned = special_ids(tokenizer)
    logits = net.caption_logits(features.repeat_interleave(4, 0), flat[:, :-1]).float()
    logits[..., banned] = float("-inf")
    logp = logits.log_softmax(-1).gather(-1, flat[:, 1:, None]).squeeze(-1)  # (B * K, T - 1)
    written = torch.cat([torch.ones_like(flat[:, :1]), flat[:, 1:-1]], 1) != PAD_ID  # no cost after [EOS]
    expected = (logp * written).sum(1).view(3, 4)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    # distinct beams per image
    assert all(len({tuple(beam) for beam in image}) == 4 for image in ids.tolist())


# -- the stage -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("off", ["generation", "caption", "matching"])
def test_each_loss_can_be_switched_off_and_the_others_train(make_cfg, tiny_autoencoder_ckpt, tmp_path, off):  # noqa: F811
    # without the captioner, retrieval ranks by embedding alone; without the matcher, beams by the captioner alone
    rerank = {
        "caption": ["model.retrieval_rerank=0"],
        "generation": ["model.caption_decoding.generator_weight=0", "model.retrieval_generator_weight=null"],
    }.get(off, [])
    cfg = make_cfg(joint_overrides(tiny_autoencoder_ckpt, f"model.loss_weights.{off}=0", "trainer.max_steps=3",
                                   "test=false", "callbacks=none", "trainer.limit_val_batches=0", "seed=1", *rerank))  # fmt: skip
    import hydra
    import lightning.pytorch as pl

    pl.seed_everything(cfg.seed)  # as train() does before building the model: the same initial weights
    before = hydra.utils.instantiate(cfg.model, _convert_="all").state_dict()
    _, objects = train(cfg)
    stage = objects["model"]
    assert stage.trainer.global_step == 3
    after = stage.state_dict()
    owner = {"generation": ["net."], "caption": ["image_text.decoder."],
             "matching": ["image_text.image_proj.", "image_text.text_blocks."]}  # fmt: skip
    for name, prefixes in owner.items():
        for prefix in prefixes:
            weights = [k for k in after if k.startswith(prefix)]
            assert weights, prefix
            changed = any(not torch.equal(before[k], after[k]) for k in weights)
            assert changed == (name != off), f"{prefix} changed={changed} with loss_weights.{off}=0"
    logged = set(stage.trainer.callback_metrics)
    assert f"train/loss_{off}" not in logged and "train/loss" in logged


@pytest.mark.parametrize("setting,trains", [("null", True), ("false", False), ("true", True)])
def test_a_pure_matcher_trains_the_text_encoder_unless_told_not_to(
    make_cfg,
    tiny_autoencoder_ckpt,  # noqa: F811
    setting,
    trains,
):
    # generation off: the matching loss is the text encoder's only gradient (null trains it: nothing else would)
    cfg = make_cfg(joint_overrides(tiny_autoencoder_ckpt, "model.loss_weights.generation=0", "model.loss_weights.caption=0",
                                   "model.retrieval_rerank=0", "model.caption_decoding.generator_weight=0",
                                   f"model.matching_trains_text_encoder={setting}", "trainer.max_steps=3", "test=false",
                                   "callbacks=none", "trainer.limit_val_batches=0", "seed=1"))  # fmt: skip
    import hydra
    import lightning.pytorch as pl

    pl.seed_everything(cfg.seed)
    before = hydra.utils.instantiate(cfg.model, _convert_="all").state_dict()
    after = train(cfg)[1]["model"].state_dict()

    def changed(prefix: str) -> bool:
        weights = [k for k in after if k.startswith(prefix) and isinstance(after[k], torch.Tensor)]
        assert weights, prefix
        return any(not torch.equal(before[k], after[k]) for k in weights)

    assert changed("image_text.text_proj.") and changed("image_text.image_proj.")
    assert changed("text_encoder.") == trains


@pytest.mark.parametrize("overrides,error", [
    (["model.loss_weights.generation=0", "model.loss_weights.caption=0", "model.loss_weights.matching=0"],
     "every weight is 0"),
    (["model.loss_weights.caption=0"], "leaves untrained; set model.retrieval_rerank=0"),  # no captioner to rerank
    (["model.loss_weights.generation=0"], "leaves untrained; set model.retrieval_generator_weight=null"),
    (["model.loss_weights.generation=0", "model.retrieval_generator_weight=null"],
     "leaves untrained; set model.caption_decoding.generator_weight=0"),
    (["+model.retrieval_generator_weight.txt=1"], "unknown direction"),
    (["model.loss_weights.matching=0", "model.caption_decoding.match_weight=0.3"],
     "leaves untrained; set model.caption_decoding.match_weight=0"),
    (["model.rerank.candidates=0"], "candidates must be an integer >= 1"),
    (["model.rerank.score=likelihood"], "score must be one of"),
])  # fmt: skip
def test_configs_that_cannot_train_or_evaluate_are_refused(make_cfg, tiny_autoencoder_ckpt, overrides, error):  # noqa: F811
    import hydra

    cfg = make_cfg(joint_overrides(tiny_autoencoder_ckpt, *overrides))
    with pytest.raises((ValueError, hydra.errors.InstantiationException), match=error):
        hydra.utils.instantiate(cfg.model, _convert_="all")


def test_greedy_captions_without_a_generator_ignore_the_beam_weights(make_cfg, tiny_autoencoder_ckpt):  # noqa: F811
    import hydra

    overrides = ["model.loss_weights.generation=0", "model.retrieval_generator_weight=null",
                 "model.caption_decoding.method=greedy"]  # fmt: skip
    cfg = make_cfg(joint_overrides(tiny_autoencoder_ckpt, *overrides))
    assert cfg.model.caption_decoding.generator_weight > 0  # the default, never read by greedy decoding
    stage = hydra.utils.instantiate(cfg.model, _convert_="all")
    with pytest.raises(ValueError, match="set caption_decoding_generator_weight=0"):
        stage.check_caption_decoding(replace(stage.caption_decoding, method="beam"), "caption_decoding_{}")
    # captions longer than the captioner's positions: refused up front, not when a caption first runs past them
    limit = stage.image_text.config.max_caption_length
    for length in (limit + 1, 1):
        with pytest.raises(
            ValueError, match=rf"model.caption_decoding.max_length={length}: .* 2 to {limit} tokens"
        ):
            stage.check_caption_decoding(
                replace(stage.caption_decoding, max_length=length), "model.caption_decoding.{}"
            )
    stage.check_caption_decoding(replace(stage.caption_decoding, max_length=limit))


def test_the_captioner_and_matcher_train_at_their_own_learning_rate(make_cfg, tiny_autoencoder_ckpt):  # noqa: F811
    import functools

    import hydra
    import torch.nn as nn

    from imagen.stages.optim import build_optimizer, warmup_cosine

    cfg = make_cfg(joint_overrides(tiny_autoencoder_ckpt, "model.image_text_lr=2e-4"))
    stage = hydra.utils.instantiate(cfg.model, _convert_="all")
    assert stage.group_lrs() == {"image_text": 2e-4}
    # build_optimizer: the named submodule's parameters get that rate, with weight decay still on >= 2-D ones only
    model = nn.ModuleDict({"net": nn.Linear(3, 3), "image_text": nn.Linear(3, 3)})
    optimizer = build_optimizer(
        functools.partial(torch.optim.AdamW, lr=3e-3), model, 0.05, {"image_text": 1e-3}
    )
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    lr_decay = {
        name: (group_of[id(p)]["lr"], group_of[id(p)]["weight_decay"]) for name, p in model.named_parameters()
    }
    assert lr_decay == {"net.weight": (3e-3, 0.05), "net.bias": (3e-3, 0.0),
                        "image_text.weight": (1e-3, 0.05), "image_text.bias": (1e-3, 0.0)}  # fmt: skip
    schedule = warmup_cosine(optimizer, warmup_steps=2, total_steps=10)
    for _ in range(5):
        optimizer.step()
        schedule.step()
    lrs = {g["lr"] for g in optimizer.param_groups}
    assert len(lrs) == 2 and max(lrs) / min(lrs) == pytest.approx(3.0)  # the schedule scales both alike
    with pytest.raises(ValueError, match="'text_encoder'"):
        build_optimizer(torch.optim.AdamW, model, 0.05, {"text_encoder": 1e-3})
    # the optimizer's own decay would be silently replaced by the stage's per-group one
    with pytest.raises(
        ValueError, match="model.optimizer.weight_decay=0.1 would be overridden by model.weight_decay"
    ):
        build_optimizer(functools.partial(torch.optim.AdamW, weight_decay=0.1), model, 0.05)
    model["image_text"].requires_grad_(False)  # frozen (or LoRA elsewhere): its rate has nothing to apply to
    optimizer = build_optimizer(
        functools.partial(torch.optim.AdamW, lr=3e-3), model, 0.05, {"image_text": 1e-3}
    )
    assert {g["lr"] for g in optimizer.param_groups} == {3e-3}
    # a resume must keep the parameter groups of its checkpoint's optimizer: another rate is fine, none is not
    stage.on_load_checkpoint({"hyper_parameters": {"image_text_lr": 1e-3}, "optimizer_states": [{}]})
    with pytest.raises(
        ValueError, match=r"trained with model.image_text_lr=None, this run has model.image_text_lr=0.0002"
    ):
        stage.on_load_checkpoint({"hyper_parameters": {}, "optimizer_states": [{}]})


def test_the_captioner_and_matcher_gradients_are_clipped_apart(make_cfg, tiny_autoencoder_ckpt):  # noqa: F811
    import hydra

    cfg = make_cfg(joint_overrides(tiny_autoencoder_ckpt))
    stage = hydra.utils.instantiate(cfg.model, _convert_="all")
    generator, image_text = stage.gradient_clip_groups()
    names = {id(p): name for name, p in stage.named_parameters()}
    assert {names[id(p)].split(".")[0] for p in generator} == {"net", "text_encoder"}
    assert {id(p) for p in image_text} == {id(p) for p in stage.image_text.parameters()}
    cfg = make_cfg(joint_overrides(tiny_autoencoder_ckpt, "model.clip_image_text_apart=false"))
    assert hydra.utils.instantiate(cfg.model, _convert_="all").gradient_clip_groups() is None


@pytest.fixture(scope="module")
def joint_ckpt(tmp_path_factory, tiny_autoencoder_ckpt):  # noqa: F811
    return train_tiny_stage(joint_overrides(tiny_autoencoder_ckpt, "trainer.max_steps=4", "trainer.limit_val_batches=0"),
                            tmp_path_factory.mktemp("tiny_joint"))  # fmt: skip


def test_test_split_reports_retrieval_and_caption_metrics(
    make_cfg,
    joint_ckpt,
    tiny_autoencoder_ckpt,  # noqa: F811
    tmp_path,
):
    run = tmp_path / "eval"
    cfg = make_cfg(joint_overrides(tiny_autoencoder_ckpt, "train=false", f"ckpt_path={joint_ckpt}",
                                   "callbacks=none"), run_dir=run)  # fmt: skip
    metrics, _ = train(cfg)
    written = json.loads((run / "metrics.json").read_text())
    for key in ("test/nll_bits", "test/caption_nll", "test/bleu4", "test/caption_acc", "test/caption_acc_heldout",
                "test/recall_at_1_t2i", "test/recall_at_1_i2t", "test/recall_at_10_t2i"):  # fmt: skip
        assert key in written, key
        assert 0 <= written[key] and (key.endswith("nll") or key.endswith("bits") or written[key] <= 1)
    assert written["test/recall_at_1_t2i"] <= written["test/recall_at_10_t2i"]
    # the captioner re-orders each query's 8 nearest matches (model.retrieval_rerank): the 10 nearest stay the same
    for direction in ("t2i", "i2t"):
        assert (
            written[f"test/recall_at_10_{direction}"] == written[f"test/recall_at_10_{direction}_embedding"]
        )


def test_logged_images_leave_the_training_random_numbers_alone(joint_ckpt):
    stage = JointStage.from_checkpoint(joint_ckpt)
    stage.caption_decoding = replace(stage.caption_decoding, method="nucleus")  # draws random numbers
    tokens = torch.randint(stage.image_text.config.vocab_size, (2, stage.net.config.num_image_tokens))
    state = torch.get_rng_state()
    images = stage.log_images({"tokens": tokens, "caption": ["a small red circle", "a large blue square"]})
    assert len(images["captioned"][1]) == 2 and torch.equal(torch.get_rng_state(), state)


def test_retrieval_pairs_are_scored_by_the_captioner_and_the_generator_at_each_direction_s_weight(joint_ckpt):
    stage = JointStage.from_checkpoint(joint_ckpt)
    captions = ["a small red circle on the left", "a large blue square at the top", "a small green triangle"]
    ids = stage.caption_ids(captions)
    tokens = torch.randint(stage.image_text.config.vocab_size, (3, stage.net.config.num_image_tokens))
    features = stage.image_text.encode_image(tokens)
    similarity = torch.rand(3, 3)
    texts, images = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 2, 2])
    stage.retrieval_generator_weight = {"t2i": 0.0, "i2t": 0.0}
    base_t2i, base_i2t = stage._pair_scores(similarity, features, ids, tokens, nearest=3)
    # without the generator: the matcher's logit plus the caption's whole log-likelihood (t2i) or per token (i2t)
    cosine, pairs = similarity[texts, images], (features[images], ids[texts])
    torch.testing.assert_close(
        base_t2i(texts, images), stage.match_and_caption_scores(cosine, *pairs), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        base_i2t(texts, images),
        stage.match_and_caption_scores(cosine, *pairs, per_token=True),
        atol=1e-4,
        rtol=1e-4,
    )
    stage.retrieval_generator_weight = {"t2i": 2.0, "i2t": 5.0}
    t2i, i2t = stage._pair_scores(similarity, features, ids, tokens, nearest=3)
    generator = stage.token_logprob(tokens[images], stage.encode_text([captions[t] for t in texts.tolist()]))
    # text->image: less each image's own log-likelihood given the empty caption (the null condition of guidance)
    null = TextStates(*stage.net.null_condition(len(images), 1, tokens.device))
    prior = stage.token_logprob(tokens[images], null)
    assert not torch.allclose(prior, generator)
    torch.testing.assert_close(
        t2i(texts, images) - base_t2i(texts, images), 2.0 * (generator - prior), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        i2t(texts, images) - base_i2t(texts, images), 5.0 * generator, atol=1e-4, rtol=1e-4
    )
    # with nearest=1 only each text's and each image's most similar are scored
    t2i, _ = stage._pair_scores(torch.eye(3), features, ids, tokens, nearest=1)
    assert t2i(torch.tensor([1]), torch.tensor([1])).shape == (1,)
    with pytest.raises(RuntimeError, match="outside each query's nearest"):
        t2i(torch.tensor([0]), torch.tensor([1]))


def test_retrieval_reranks_captions_of_different_lengths_from_different_batches(joint_ckpt):
    """Each batch's caption ids are as wide as its longest caption: the batches are joined for the reranking."""
    import types

    stage = JointStage.from_checkpoint(joint_ckpt).eval()
    stage.hparams.retrieval_rerank = 4  # as model/joint.yaml (the tiny test model does without)
    stage._trainer = types.SimpleNamespace(world_size=1, datamodule=None, global_rank=0)
    captions = ["a small red circle on the left of a large blue square"] * 3 + ["a red circle"] * 2
    assert stage.caption_ids(captions[:3]).shape[1] > stage.caption_ids(captions[3:]).shape[1]
    tokens = torch.randint(stage.image_text.config.vocab_size, (5, stage.net.config.num_image_tokens))
    recalls = []
    for batches in ([slice(0, 3), slice(3, 5)], [slice(0, 5)]):
        with torch.no_grad():
            for rows in batches:
                batch = {"caption": captions[rows], "tokens": tokens[rows], "index": torch.arange(5)[rows]}
                stage._eval_step(batch, "val")
            recalls.append(stage._retrieval("val"))
    assert recalls[0] == pytest.approx(recalls[1]) and "val/recall_at_1_t2i_embedding" in recalls[0]


@pytest.mark.parametrize("rerank", [0, 4])
def test_real_corpus_retrieval_counts_an_image_with_the_query_s_caption_as_relevant(joint_ckpt, rerank):
    import types

    stage = JointStage.from_checkpoint(joint_ckpt).eval()
    stage.hparams.retrieval_rerank = rerank
    # no datamodule with scenes: a real corpus
    stage._trainer = types.SimpleNamespace(world_size=1, datamodule=None, global_rank=0)
    # images 0 and 1 share a caption (case and spacing aside); texts 0 and 1 embed alike, image 1 nearer to them
    captions = ["an actor attends the premiere", "An actor  attends the premiere", "a red car", "a blue car"]
    tokens = torch.randint(stage.image_text.config.vocab_size, (4, stage.net.config.num_image_tokens))
    texts = torch.eye(4)[[0, 0, 1, 2]]  # (4 texts, 4)
    images = torch.eye(4)[[0, 0, 1, 2]] * torch.tensor([[0.5], [1.0], [1.0], [1.0]])  # (4 images, 4)
    batch = {"caption": captions, "tokens": tokens, "index": torch.arange(4)}
    with (
        mock.patch.object(stage.image_text, "text_embedding", return_value=texts),
        mock.patch.object(stage.image_text, "image_embedding", return_value=images),
        torch.no_grad(),
    ):
        stage._eval_step(batch, "val")
        recalls = stage._retrieval("val")
    # text 0 finds image 1 first, and image 0 or 1 finds texts 0 and 1 tied first: by the pairing alone, misses
    suffix = "_embedding" if rerank else ""
    assert recalls[f"val/recall_at_1_t2i{suffix}"] == 1.0 and recalls[f"val/recall_at_1_i2t{suffix}"] == 1.0


def test_images_become_the_same_tokens_under_the_trainers_bf16_as_in_float32(joint_ckpt):
    stage = JointStage.from_checkpoint(joint_ckpt).eval()
    torch.manual_seed(0)
    images = torch.rand(32, 3, stage.hparams.image_size, stage.hparams.image_size) * 2 - 1
    with torch.no_grad():
        float32 = stage.autoencoder.encode(images).flatten(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what training and validation steps run under
            bf16 = stage.autoencoder.encode(images).flatten(1)
            assert not torch.equal(bf16, float32)  # some tokens move
            assert torch.equal(stage.image_tokens(images), float32)


def test_the_image_encoder_reads_the_autoencoder_code_vectors(joint_ckpt):
    stage = JointStage.from_checkpoint(joint_ckpt)
    net = stage.image_text
    assert net.config.code_dim > 0  # model.image_code_vectors=true, the default
    torch.testing.assert_close(net.code_vectors, stage.autoencoder.code_vectors())
    tokens = torch.randint(net.config.vocab_size, (2, stage.net.config.num_image_tokens))
    before = net.encode_image(tokens)
    net.set_code_vectors(torch.randn_like(net.code_vectors))
    assert not torch.allclose(net.encode_image(tokens), before)
    with pytest.raises(ValueError, match="code vectors of shape"):
        net.set_code_vectors(torch.zeros(3, net.config.code_dim))


@pytest.mark.parametrize("weight", ["match_weight", "generator_weight"])
def test_caption_beams_are_kept_by_what_the_matcher_or_generator_scores(joint_ckpt, weight):
    stage = JointStage.from_checkpoint(joint_ckpt)
    tokens = torch.randint(stage.image_text.config.vocab_size, (4, stage.net.config.num_image_tokens))
    features = stage.image_text.encode_image(tokens)
    # by hand: every beam's caption, and the head's score of it (so large a weight that it alone decides)
    ids, _ = beam_search(
        stage.image_text, features, stage.caption_tokenizer, CaptionDecoding("beam", beam_size=3)
    )
    beams = ids_to_text(ids.flatten(0, 1), stage.caption_tokenizer)
    text = stage.encode_text(beams)
    if weight == "match_weight":
        image = stage.image_text.image_embedding(features).repeat_interleave(3, 0)
        scores = (stage.image_text.text_embedding(text.states, text.mask) * image).sum(-1)
    else:
        scores = stage.token_logprob(tokens.repeat_interleave(3, 0), text)
    expected = [beams[3 * i + j] for i, j in enumerate(scores.view(4, 3).argmax(1).tolist())]
    decoding = CaptionDecoding("beam", beam_size=3, **{weight: 1e6})
    assert stage.decode_captions(tokens, features, decoding) == expected


@pytest.mark.parametrize("score", ["match", "caption", "both"])
def test_reranking_returns_the_best_candidate_and_one_image_per_prompt(joint_ckpt, score):
    stage = JointStage.from_checkpoint(joint_ckpt)
    stage.rerank = RerankSettings(candidates=3, score=score)
    prompts = ["a small red circle on the left", "a large blue square above a small green triangle"]
    tokens, scores = stage.generate_reranked_tokens(
        prompts, candidates=3, generator=torch.Generator().manual_seed(4)
    )
    assert tokens.shape == (2, stage.net.config.num_image_tokens) and scores.shape == (2,)
    # the same draw, scored by hand: the kept candidate is the argmax of its prompt's three
    repeated = [p for p in prompts for _ in range(3)]
    text = stage.encode_text(repeated)
    candidates = stage.generate_tokens(text, generator=torch.Generator().manual_seed(4))
    all_scores = stage.candidate_scores(candidates, text, repeated).view(2, 3)
    best = all_scores.argmax(1)
    assert torch.equal(tokens, candidates.view(2, 3, -1)[torch.arange(2), best])
    torch.testing.assert_close(scores, all_scores.max(1).values)


def test_reranking_with_seeds_draws_each_images_plain_sample_as_its_first_candidate(joint_ckpt):
    stage = JointStage.from_checkpoint(joint_ckpt)
    settings = replace(stage.sampling, temperature=1.0)
    prompts = ["a small red circle on the left", "a large blue square above a small green triangle"]
    seeds = torch.tensor([3, 9])
    candidates, _, _ = stage._sample_candidates(prompts, 3, settings, seeds=seeds)  # (2 * 3, N), prompt-major
    plain = stage.generate_tokens(stage.encode_text(prompts), settings, seeds=seeds)
    assert torch.equal(candidates.view(2, 3, -1)[:, 0], plain)
    assert not torch.equal(candidates.view(2, 3, -1)[:, 1], plain)
    # and an image's candidates do not depend on the other prompts
    alone, _, _ = stage._sample_candidates(prompts[1:], 3, settings, seeds=seeds[1:])
    assert torch.equal(alone, candidates[3:])


def test_the_matching_scale_is_capped_in_the_weight_after_each_step_not_in_the_forward_pass(joint_ckpt):
    from lightning.pytorch import LightningModule

    stage = JointStage.from_checkpoint(joint_ckpt)
    net = stage.image_text
    with torch.no_grad():
        # above log(100): a forward cap would pass no gradient, and it would stay there
        net.logit_scale.fill_(4.7)
    image, text = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    assert net.matching_scale().item() == pytest.approx(100)  # read as the cap (an older checkpoint's weight)
    net.matching_loss(image, text).backward()
    assert net.logit_scale.grad.abs() > 0
    with mock.patch.object(LightningModule, "optimizer_step") as step:
        stage.optimizer_step(0, 0, None, None)
    step.assert_called_once()
    assert net.logit_scale.item() == pytest.approx(
        math.log(100)
    ) and net.matching_scale().item() == pytest.approx(100)


def test_judge_acc_takes_each_prompt_s_first_candidate_and_the_reranked_figure_its_best(
    joint_ckpt, monkeypatch
):
    from types import SimpleNamespace

    stage = JointStage.from_checkpoint(joint_ckpt)
    stage.rerank = RerankSettings(candidates=3)
    stage.hparams.eval_batch_size = 6  # two prompts per sampling batch: the five prompts take three
    drawn, judged = [], []
    sample_candidates = stage._sample_candidates
    monkeypatch.setattr(
        stage, "_sample_candidates", lambda *a, **k: drawn.append(sample_candidates(*a, **k)) or drawn[-1]
    )
    # the judge passes every other image it sees: 3 of the 5 best candidates
    judge = SimpleNamespace(
        matches=lambda images, scenes: judged.append(images) or (torch.arange(len(images)) % 2 == 0).float()
    )
    prompts = ["a small red circle on the left", "a large blue square", "a small green triangle", "a large red square",
               "a small blue circle"]  # fmt: skip
    images = stage._judged_images(
        "val", "seen", prompts, [None] * 5, judge, stage._prompt_seeds(list(range(5)))
    )
    assert [len(tokens) for tokens, _, _ in drawn] == [6, 6, 3] and images.shape[0] == 5
    first = torch.cat([tokens[::3] for tokens, _, _ in drawn])  # (5, N): candidate 0 of each prompt
    best = torch.cat([best for _, best, _ in drawn])
    torch.testing.assert_close(images, stage.decode_tokens(first), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(judged), stage.decode_tokens(best), atol=1e-5, rtol=1e-5)
    assert stage.metrics["val"]["judge_acc_reranked"].compute() == pytest.approx(3 / 5)


def test_evaluation_images_depend_on_the_prompt_not_on_the_number_of_processes(joint_ckpt, monkeypatch):
    """Each evaluation prompt draws from its own seed: on 2 processes (each sampling every other prompt) the images are
    those of 1 process, so generation metrics do not change with the number of GPUs."""
    from types import SimpleNamespace

    stage = JointStage.from_checkpoint(joint_ckpt)
    stage.rerank = RerankSettings(candidates=2)
    prompts = ["a small red circle on the left", "a large blue square", "a small green triangle", "a large red square",
               "a small blue circle"]  # fmt: skip
    judge = SimpleNamespace(matches=lambda images, scenes: torch.ones(len(images)))
    one = stage._judged_images("val", "seen", prompts, [None] * 5, judge, stage._prompt_seeds(list(range(5))))
    for rank in (0, 1):  # what each of 2 processes samples: its share of the prompts, by prompt number
        share = stage._judged_images("val", "seen", prompts[rank::2], [None] * len(prompts[rank::2]), judge,
                                     stage._prompt_seeds(list(range(5))[rank::2]))  # fmt: skip
        torch.testing.assert_close(share, one[rank::2], atol=1e-5, rtol=1e-5)
    assert not torch.equal(one[0], one[1])


def test_bleu_references_are_every_caption_of_a_real_corpus_image(joint_ckpt):
    from types import SimpleNamespace

    stage = JointStage.from_checkpoint(joint_ckpt)
    # a real corpus: no shapes split to read paraphrases from
    stage.trainer = SimpleNamespace(datamodule=None)
    batch = {
        "caption": ["a red circle", "a blue square"],
        "all_captions": ["a red circle\na circle in red", "a blue square"],
    }
    references = stage._references("val", batch, torch.tensor([0, 1]))
    assert [len(row) for row in references] == [2, 1]
    assert references[0][1].split() == ["a", "circle", "in", "red"]
    del batch["all_captions"]  # a corpus item without them: its one caption
    assert [len(row) for row in stage._references("val", batch, torch.tensor([0, 1]))] == [1, 1]


def test_images_to_caption_are_cropped_not_squashed(tmp_path):
    from imagen.cli.sample_caption import read_image

    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, 16:48, 2] = 255  # blue in the middle, black at the sides: the center crop is all blue
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image = read_image(tmp_path / "wide.png", 32)  # the shorter side already: a crop alone
    assert image.shape == (3, 32, 32) and torch.all(image[2] == 1) and torch.all(image[:2] == -1)


def test_sample_reranks_and_captions(make_cfg, joint_ckpt, tmp_path):
    out = tmp_path / "gen"
    summary = sample(make_cfg([f"out_dir={out}", f"ckpt={joint_ckpt}", 'prompts=["a small red circle on the left"]',
                               "n=3", "rerank_candidates=2", "batch_size=4"], config_name="sample"))  # fmt: skip
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert summary["images"] == 3 and len(rows) == 3 and len(list((out / "images").glob("*.png"))) == 3
    assert all(r["rerank_candidates"] == 2 and "rerank_both" in r["scores"] for r in rows)

    folder = tmp_path / "images"
    pixels = to_uint8(torch.rand(3, 3, 32, 32) * 2 - 1)
    for i, image in enumerate(pixels):
        save_png(image, folder / f"img_{i}.png")
    # skipped, counted and named: the others are captioned
    (folder / "img_broken.png").write_bytes(b"not a png")
    for decoding in ("greedy", "beam", "nucleus"):
        cap_out = tmp_path / decoding
        summary = sample(make_cfg([f"out_dir={cap_out}", f"ckpt={joint_ckpt}", "task=caption", f"images={folder}",
                                   f"decoding={decoding}"], config_name="sample"))  # fmt: skip
        rows = [json.loads(line) for line in (cap_out / "captions.jsonl").read_text().splitlines()]
        assert summary["captions"] == 3 and summary["skipped"] == [str(folder / "img_broken.png")]
        assert [r["file"] for r in rows] == [str(folder / f"img_{i}.png") for i in range(3)]
        assert all(isinstance(r["caption"], str) and r["decoding"] == decoding for r in rows)
    with pytest.raises(FileNotFoundError, match="images="):
        sample(make_cfg([f"out_dir={tmp_path}", f"ckpt={joint_ckpt}", "task=caption", f"images={tmp_path / 'nope'}"],
                        config_name="sample"))  # fmt: skip
