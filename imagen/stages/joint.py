"""Joint image-text stage: text -> image generation, image -> text captioning and text-image matching.

It extends the generator stage (same frozen autoencoder, text encoder, `ARTransformer`, sampler and judge
evaluation) with an `ImageTextNet`: an image-token encoder shared by a caption decoder and a contrastive matcher.
The loss is `generation * L_gen + caption * L_cap + matching * L_match`; a weight of 0 skips that loss (its
module still exists, untrained) and the evaluations that need it.

Matching is used to rerank generated candidates (`rerank`), and for text->image / image->text retrieval
(Recall@K over the whole evaluation split, relevance from the ground-truth scenes on shapes data, else from equal
captions), where the captioner re-orders each query's nearest matches (`retrieval_rerank`). The round trip
(text -> generated image -> greedy caption) measures the fraction of the prompt's attributes the caption states
again (`round_trip`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.text import BLEUScore

from imagen.checkpoints import check_config
from imagen.data.shapes import Scene, matches_caption
from imagen.inference import inference
from imagen.metrics import loss_mean
from imagen.metrics.captions import caption_correct, preserved_attributes
from imagen.metrics.judge import Judge
from imagen.metrics.retrieval import (
    caption_keys,
    gather_rows,
    rerank_top_k,
    retrieval_metrics,
    same_caption_relevance,
)
from imagen.models.ar_transformer import ARTransformer
from imagen.models.image_text import CaptionVocabulary, ImageTextConfig, ImageTextNet
from imagen.models.text_encoder import PAD_ID, CaptionTokenizer, TextStates
from imagen.sampling.ar import SamplingSettings, candidate_seeds
from imagen.sampling.caption import CaptionDecoding, decode_captions, ids_to_text
from imagen.sampling.rerank import best_of
from imagen.stages.ar_generator import GROUP_SUFFIX, ARGeneratorStage
from imagen.values import is_int

log = logging.getLogger(__name__)


@dataclass
class LossWeights:
    generation: float = 1.0
    caption: float = 1.0
    matching: float = 1.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 0:
                raise ValueError(f"model.loss_weights.{name} must be >= 0; got {value}")
        if not any(asdict(self).values()):
            raise ValueError("model.loss_weights: every weight is 0; nothing would train")


SCORE_HEADS = {"match": ("matching",), "caption": ("caption",), "both": ("matching", "caption")}


@dataclass
class RerankSettings:
    candidates: int = 4  # images drawn per prompt, the best kept; 1 turns reranking off
    # match: text-image embedding cosine | caption: mean log p(prompt | image) per token | both: the matcher's logit
    # plus log p(prompt | image) (`JointStage.match_and_caption_scores`, as retrieval re-orders text->image)
    score: str = "match"

    def __post_init__(self) -> None:
        if self.score not in SCORE_HEADS:
            raise ValueError(f"model.rerank.score must be one of {sorted(SCORE_HEADS)}; got {self.score!r}")
        if not is_int(self.candidates) or self.candidates < 1:
            raise ValueError(f"model.rerank.candidates must be an integer >= 1; got {self.candidates!r}")

    @property
    def heads(self) -> tuple[str, ...]:
        """The losses that train the heads this score reads."""
        return SCORE_HEADS[self.score]


class JointStage(ARGeneratorStage):
    """The generator stage plus captioning and matching heads over the same image tokens.

    `image_text` is an `ImageTextNet` or a partial that receives the derived sizes (image vocabulary and grid,
    caption vocabulary and length, text width). Captions are tokenized with the scratch text encoder's tokenizer
    when it has one, else with a tokenizer this stage trains on the corpus captions (`caption_vocab_size`,
    `max_caption_length`). With `image_code_vectors`, the image encoder also reads the autoencoder's code vector
    of each token (`ImageTextConfig.code_dim`). `image_text_lr` trains the captioner and matcher at their own
    learning rate (null: the optimizer's); `clip_image_text_apart` clips their gradient norm apart from the generator's.
    `retrieval_rerank`: each retrieval query's that many nearest matches by embedding are re-ordered by
    `match_and_caption_scores` (0 or 1: by embedding alone), plus `retrieval_generator_weight[direction]` x the
    generator's mean log p(image tokens | caption) (`t2i`, `i2t`; 0: without it), less the image's log p(image
    tokens | empty caption) for `t2i`. Other arguments are the generator stage's.
    """

    STAGE = "joint"
    MODULE_ARGS = ("image_text",)

    def __init__(
        self,
        net: ARTransformer | Callable[..., ARTransformer],
        text_encoder: nn.Module,
        image_text: ImageTextNet | Callable[..., ImageTextNet],
        loss_weights: dict | None = None,
        rerank: dict | None = None,
        caption_decoding: dict | None = None,
        caption_vocab_size: int = 512,
        max_caption_length: int = 32,
        retrieval_ks: Sequence[int] = (1, 5, 10),
        retrieval_rerank: int = 0,
        retrieval_generator_weight: dict | None = None,
        matching_trains_text_encoder: bool | None = None,
        image_code_vectors: bool = False,
        image_text_lr: float | None = None,
        clip_image_text_apart: bool = False,
        **generator_args,
    ):
        # the generator stage saves this constructor's arguments too (Lightning collects the whole chain)
        super().__init__(net=net, text_encoder=text_encoder, **generator_args)
        self.weights = LossWeights(**(loss_weights or {}))
        if image_text_lr is not None and image_text_lr <= 0:
            raise ValueError(f"model.image_text_lr must be > 0 or null; got {image_text_lr}")
        self.rerank = RerankSettings(**(rerank or {}))
        if retrieval_rerank < 0:
            raise ValueError(f"model.retrieval_rerank must be >= 0; got {retrieval_rerank}")
        if retrieval_rerank > 1 and not self.weights.caption:
            raise ValueError(
                f"model.retrieval_rerank={retrieval_rerank} re-orders retrieval with the captioner, which "
                f"model.loss_weights.caption=0 leaves untrained; set model.retrieval_rerank=0"
            )
        self.retrieval_generator_weight = {"t2i": 0.0, "i2t": 0.0}
        for direction, weight in (retrieval_generator_weight or {}).items():
            key = f"model.retrieval_generator_weight.{direction}"
            if direction not in self.retrieval_generator_weight:
                raise ValueError(f"{key}: unknown direction; known: t2i, i2t")
            if weight < 0:
                raise ValueError(f"{key} must be >= 0; got {weight}")
            if weight and retrieval_rerank > 1 and not self.weights.generation:
                raise ValueError(
                    f"{key}={weight} re-orders retrieval with the generator, which model.loss_weights.generation=0 "
                    f"leaves untrained; set model.retrieval_generator_weight=null"
                )
            self.retrieval_generator_weight[direction] = float(weight)
        self.caption_decoding = CaptionDecoding(**(caption_decoding or {}))
        if isinstance(getattr(text_encoder, "tokenizer", None), CaptionTokenizer):
            caption_vocab_size, max_caption_length = text_encoder.vocab_size, text_encoder.max_length
        else:
            self.caption_vocabulary = CaptionVocabulary()
        if isinstance(image_text, ImageTextNet):
            self.image_text = image_text
        else:
            codes = self.autoencoder.code_vectors() if image_code_vectors else None
            self.image_text = image_text(
                vocab_size=self.autoencoder.vocab_size,
                grid_size=self.net.config.grid_size,
                caption_vocab_size=caption_vocab_size,
                max_caption_length=max_caption_length,
                text_dim=text_encoder.dim,
                code_dim=0 if codes is None else codes.shape[1],
            )
            if codes is not None:  # a checkpoint's own vectors replace these when its state dict loads
                self.image_text.set_code_vectors(codes)
        self.check_caption_decoding(self.caption_decoding, "model.caption_decoding.{}")
        c = self.image_text.config
        if (c.vocab_size, c.grid_size, c.text_dim) != (
            self.autoencoder.vocab_size,
            self.net.config.grid_size,
            text_encoder.dim,
        ):
            raise ValueError(
                f"model.image_text vocab_size={c.vocab_size}, grid_size={c.grid_size}, text_dim={c.text_dim} do "
                f"not match the autoencoder ({self.autoencoder.vocab_size} codes, grid {self.net.config.grid_size})"
                f" / the text encoder's width {text_encoder.dim}"
            )
        # per prompt group (GROUP_SUFFIX): caption accuracy on real images, judge accuracy of reranked images,
        # attributes kept by the round trip
        grouped = [name.format(s) for name in ("caption_acc{}", "judge_acc{}_reranked", "round_trip{}")
                   for s in GROUP_SUFFIX.values()]  # fmt: skip
        for split in ("val", "test"):
            self.metrics[split].update(
                {
                    "caption_nll": loss_mean(),  # bits per caption token
                    "bleu4": BLEUScore(n_gram=4),
                    **{name: MeanMetric() for name in grouped},
                }
            )
        # per split, per batch: text embeddings, image embeddings, sample indices, caption keys (`caption_keys`) (and
        # with `retrieval_rerank`, the image features and caption ids that `match_and_caption_scores` reads, and the
        # image tokens the generator scores)
        self._embeddings: dict[str, list[tuple[torch.Tensor, ...]]] = {}

    def check_net_config(self, info: dict, source: str, key: str) -> None:
        """The generator's check, and the captioner/matcher must be configured as the checkpoint's."""
        super().check_net_config(info, source, key)
        if "image_text_config" not in info:
            return
        check_config(
            ImageTextConfig(**info["image_text_config"]), self.image_text.config, "model.image_text",
            f"{key}: {source} holds an image-text network",
            "code_dim comes from model.image_code_vectors: false for checkpoints written before it; "
            "+model.image_text.conv_layers=0 for checkpoints written before the conv blocks (2026-12-01), "
            "+model.image_text.text_layers=0 before the matcher's text blocks (2026-12-01)",
        )  # fmt: skip

    # -- captions -----------------------------------------------------------------------------------------------------

    @property
    def caption_tokenizer(self) -> CaptionTokenizer:
        own = getattr(self, "caption_vocabulary", None)
        return own.tokenizer if own is not None else self.text_encoder.tokenizer

    def caption_ids(self, captions: list[str]) -> torch.Tensor:
        """Caption strings -> ids (B, T): [BOS] words [EOS] [PAD]..."""
        ids, _ = self.caption_tokenizer(captions, self.image_text.config.max_caption_length)
        return ids.to(self.device)

    def caption_tokenizers(self) -> list[tuple[CaptionTokenizer, list[torch.Tensor]]]:
        captioner = [self.image_text.caption_emb.weight, self.image_text.caption_head.weight]
        own = getattr(self, "caption_vocabulary", None)
        if own is None:  # the captioner shares the text encoder's tokenizer
            return [(tokenizer, [*tables, *captioner]) for tokenizer, tables in super().caption_tokenizers()]
        if not own.tokenizer.trained:
            return super().caption_tokenizers()
        return [*super().caption_tokenizers(), (own.tokenizer, captioner)]

    def fit_tokenizers(self) -> None:
        super().fit_tokenizers()
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        own = getattr(self, "caption_vocabulary", None)
        if own is not None and not own.tokenizer.trained and hasattr(datamodule, "train_captions"):
            own.tokenizer.train(datamodule.train_captions(), self.image_text.config.caption_vocab_size)

    def init_from_modules(self) -> list[str]:
        # the captioner's own vocabulary (pretrained text encoders) must keep the ids its embeddings were trained on
        own = ["caption_vocabulary"] if getattr(self, "caption_vocabulary", None) is not None else []
        return [*super().init_from_modules(), *own]

    @inference
    def caption_images(
        self,
        images: torch.Tensor,
        decoding: CaptionDecoding | None = None,
        generator: torch.Generator | None = None,
    ) -> list[str]:
        """Images (B, 3, H, W) in [-1, 1] -> captions."""
        return self.caption_tokens(self.image_tokens(images.to(self.device)), decoding, generator)

    @inference
    def caption_tokens(
        self,
        tokens: torch.Tensor,
        decoding: CaptionDecoding | None = None,
        generator: torch.Generator | None = None,
    ) -> list[str]:
        """Images as (B, h * w) tokens -> captions."""
        features = self.image_text.encode_image(tokens)
        return self.decode_captions(tokens, features, decoding or self.caption_decoding, generator)

    def check_caption_decoding(self, decoding: CaptionDecoding, key: str = "{}") -> None:
        """A decoding this stage cannot run is an error naming its config key (`key.format(field)`): not a
        `CaptionDecoding`, captions longer than the captioner's positions, or beams re-scored with a head this stage
        did not train (greedy and nucleus decoding never re-score: their weights are not read)."""
        if not isinstance(decoding, CaptionDecoding):
            raise TypeError(
                f"decoding is a CaptionDecoding, not {type(decoding).__name__}: e.g. CaptionDecoding(method='beam')"
            )
        limit = self.image_text.config.max_caption_length
        if decoding.max_length is not None and not 2 <= decoding.max_length <= limit:
            name = key.format("max_length")
            raise ValueError(
                f"{name}={decoding.max_length}: the captioner reads captions of 2 to {limit} tokens ([BOS] and [EOS] "
                f"included); set {name}=null for its {limit}"
            )
        if not decoding.rescored:
            return
        heads = {"match_weight": ("matching", "matcher"), "generator_weight": ("generation", "generator")}
        for weight, (loss, head) in heads.items():
            if getattr(decoding, weight) and not getattr(self.weights, loss):
                name = key.format(weight)
                raise ValueError(
                    f"{name} re-scores caption beams with the {head}, which model.loss_weights.{loss}=0 leaves "
                    f"untrained; set {name}=0"
                )

    @inference
    def decode_captions(
        self,
        tokens: torch.Tensor,
        features: torch.Tensor,
        decoding: CaptionDecoding,
        generator: torch.Generator | None = None,
    ) -> list[str]:
        """Image tokens (B, N) and their features (B, N, dim) -> captions. With `decoding.match_weight` /
        `generator_weight`, each final beam's score gains the matcher's logit / the generator's mean log p(image
        tokens | caption), so the kept caption is one the other two heads also find true of the image."""
        self.check_caption_decoding(decoding)

        def rescore(captions: list[str]) -> torch.Tensor:  # (B * K,): the K beams of one image adjacent
            beams = len(captions) // len(tokens)
            text = self.encode_text(captions)
            extra = torch.zeros(len(captions), device=tokens.device)
            if decoding.match_weight:
                image = self.image_text.image_embedding(features).repeat_interleave(beams, 0)
                cosine = self.image_text.match_cosine(image, text.states, text.mask)
                extra += decoding.match_weight * self.image_text.matching_scale() * cosine.float()
            if decoding.generator_weight:
                extra += decoding.generator_weight * self.token_logprob(
                    tokens.repeat_interleave(beams, 0), text
                )
            return extra

        return decode_captions(
            self.image_text, features, self.caption_tokenizer, decoding, generator, rescore
        )

    # -- training -----------------------------------------------------------------------------------------------------

    def trained_modules(self) -> nn.ModuleDict:
        modules = super().trained_modules()
        modules["image_text"] = self.image_text
        return modules

    def gradient_clip_groups(self) -> list[list[nn.Parameter]] | None:
        """The captioner/matcher's gradients apart from the generator's: theirs are often 10x larger, and one
        clipped total norm would shrink the generator's steps along with them."""
        if not self.hparams.clip_image_text_apart:
            return None
        modules = self.trained_modules()
        image_text = modules.pop("image_text")
        return [list(modules.parameters()), list(image_text.parameters())]

    def group_lrs(self) -> dict[str, float]:
        lr = self.hparams.image_text_lr
        return {} if lr is None else {"image_text": lr}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resume needs the optimizer's parameter groups of the checkpoint: with and without `image_text_lr`
        they differ, and the optimizer state would not load."""
        super().on_load_checkpoint(checkpoint)
        theirs = (checkpoint.get("hyper_parameters") or {}).get("image_text_lr")
        ours = self.hparams.image_text_lr
        if "optimizer_states" in checkpoint and (theirs is None) != (ours is None):
            raise ValueError(
                f"ckpt_path: the checkpoint being resumed was trained with model.image_text_lr={theirs}, this run "
                f"has model.image_text_lr={ours}; resume with {'null' if theirs is None else 'a rate'} (null for "
                f"checkpoints written before it existed)"
            )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        w = self.weights
        captions = list(batch["caption"])
        tokens = self.batch_tokens(batch)
        text = self.encode_text(captions) if w.generation or w.matching else None
        features = self.image_text.encode_image(tokens) if w.caption or w.matching else None
        losses = {}
        if w.generation:
            losses["generation"] = self.generation_loss(tokens, text)
        if w.caption:
            losses["caption"] = self.image_text.caption_loss(features, self.caption_ids(captions))
        if w.matching:
            # beside generation, matching reads the text states without training the shared encoder by default:
            # in-batch negatives are told apart by their words alone, and its pull keeps the states a bag of words
            trains = self.hparams.matching_trains_text_encoder
            trains = not w.generation if trains is None else trains
            states = text.states if trains else text.states.detach()
            negative = None
            if "negative_caption" in batch:  # hard negatives from the data (shapes: data.hard_negatives=true)
                with torch.set_grad_enabled(trains):
                    other = self.encode_text(list(batch["negative_caption"]))
                negative = self.image_text.text_embedding(other.states, other.mask)
            losses["matching"] = self.image_text.matching_loss(
                self.image_text.image_embedding(features),
                self.image_text.text_embedding(states, text.mask),
                negative,
                self._pairs_that_match(batch, captions),
            )
        loss = sum(getattr(w, name) * value for name, value in losses.items())
        b = tokens.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log_dict({f"train/loss_{name}": value for name, value in losses.items()}, batch_size=b)
        return loss

    def _pairs_that_match(self, batch: dict, captions: list[str]) -> torch.Tensor:
        """(B, B) bool, [image i, caption j]: the pairs of a training batch whose caption is true of the image: by
        the scenes' objects where the data has them (shapes), else by captions equal but for case and spacing (the
        rule retrieval scores by, `caption_keys`)."""
        scenes = self._scenes("train", batch["index"]) if "index" in batch else None
        if scenes is not None:
            if "mirrored" in batch:  # data.train_hflip: the items shown
                scenes = [
                    s.mirrored() if m else s for s, m in zip(scenes, batch["mirrored"].tolist(), strict=True)
                ]
            return scene_relevance(scenes).t()  # scene_relevance is [caption, image]
        # symmetric: [image, caption] reads as [caption, image]
        return same_caption_relevance(caption_keys(captions))

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.image_text.clamp_logit_scale_()  # before the weight average (a callback) reads it

    # -- reranking ----------------------------------------------------------------------------------------------------

    def _untrained_scorer(self) -> str | None:
        """The loss (of those `rerank.score` reads) weighted 0, if any."""
        return next((loss for loss in self.rerank.heads if not getattr(self.weights, loss)), None)

    def _check_scorer(self) -> None:
        loss = self._untrained_scorer()
        if loss is not None:
            raise ValueError(
                f"model.rerank.score={self.rerank.score} scores with a head trained with model.loss_weights.{loss}=0"
            )

    @inference
    def candidate_scores(self, tokens: torch.Tensor, text: TextStates, captions: list[str]) -> torch.Tensor:
        """(B,) how well image tokens (B, N) fit their captions, by `rerank.score`."""
        features = self.image_text.encode_image(tokens)
        if self.rerank.score == "caption":
            return self.image_text.caption_logprob(features, self.caption_ids(captions))
        image = self.image_text.image_embedding(features)
        cosine = self.image_text.match_cosine(image, text.states, text.mask)
        if self.rerank.score == "match":
            return cosine
        return self.match_and_caption_scores(cosine, features, self.caption_ids(captions))

    @inference
    def generate_reranked_tokens(
        self,
        captions: list[str],
        candidates: int | None = None,
        settings: SamplingSettings | None = None,
        generator: torch.Generator | None = None,
        seeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For each caption, `candidates` samples and the best by `rerank.score`: (tokens (B, N), scores (B,)).
        Given per-image `seeds` (B,), the candidates' draws come from `candidate_seeds` (candidate 0: the image's
        own seed)."""
        key = "model.rerank.candidates" if candidates is None else "candidates"
        candidates = self.rerank.candidates if candidates is None else candidates
        if not is_int(candidates) or candidates < 1:
            raise ValueError(f"{key}={candidates!r}: the number of samples per caption, an integer >= 1")
        _, best, scores = self._sample_candidates(captions, candidates, settings, generator, seeds)
        return best, scores

    def _sample_candidates(
        self,
        captions: list[str],
        n: int,
        settings: SamplingSettings | None = None,
        generator: torch.Generator | None = None,
        seeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`n` samples per caption, prompt-major (B * n, N), and the best of each prompt's (B, N) with its score (B,)."""
        self._check_scorer()
        text = self.encode_text(captions)
        # prompt-major: the candidates of one prompt are consecutive rows
        text = TextStates(text.states.repeat_interleave(n, 0), text.mask.repeat_interleave(n, 0))
        repeated = [c for c in captions for _ in range(n)]
        seeds = None if seeds is None else candidate_seeds(seeds, n)
        tokens = self.generate_tokens(text, settings, generator, seeds)  # (B * n, N)
        scores = self.candidate_scores(tokens, text, repeated)
        best, index = best_of(tokens, scores, n)
        return tokens, best, scores[index]

    # -- evaluation ---------------------------------------------------------------------------------------------------

    def _scenes(self, split: str, index: torch.Tensor) -> list[Scene] | None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "split"):
            return None
        scenes = datamodule.split(split).scenes
        return [scenes[i] for i in index.tolist()]

    def _stream_index(self, split: str, n: int) -> torch.Tensor:
        """Indices for the samples of a stream (WebDataset), which has none: this rank's count of the split's samples
        so far, above the rank (`rank << 40`), so that gathered retrieval sets keep every sample once."""
        start = sum(len(rows[2]) for rows in self._embeddings.get(split, []))
        return torch.arange(start, start + n) + (self.global_rank << 40)

    def _references(self, split: str, batch: dict, index: torch.Tensor) -> list[list[str]]:
        """Every caption of each image (the shapes data's paraphrases; a real corpus's captions, `all_captions`, one per
        line), spelled as the tokenizer decodes."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "split"):
            paraphrases = datamodule.split(split).captions
            rows = [paraphrases[i] for i in index.tolist()]
        elif "all_captions" in batch:
            rows = [captions.split("\n") for captions in batch["all_captions"]]
        else:
            rows = [[c] for c in batch["caption"]]
        flat = ids_to_text(self.caption_ids([c for row in rows for c in row]), self.caption_tokenizer)
        out, start = [], 0
        for row in rows:
            out.append(flat[start : start + len(row)])
            start += len(row)
        return out

    def _eval_step(self, batch: dict, split: str) -> None:
        w, metrics = self.weights, self.metrics[split]
        captions = list(batch["caption"])
        tokens = self.batch_tokens(batch)
        n = tokens.shape[0]
        text = self.encode_text(captions) if w.generation or w.matching else None
        if w.generation:
            _, loss = self.net(tokens, text.states, text.mask, targets=tokens)
            metrics["nll"].update(loss / math.log(2), weight=n)
        if not (w.caption or w.matching):
            return
        features = self.image_text.encode_image(tokens)
        index = batch["index"] if "index" in batch else self._stream_index(split, n)
        if w.caption:
            ids = self.caption_ids(captions)
            loss = self.image_text.caption_loss(features, ids)
            # a mean over the batch's caption tokens: weighted by their number
            metrics["caption_nll"].update(loss / math.log(2), weight=(ids[:, 1:] != PAD_ID).sum())
            generated = self.decode_captions(tokens, features, self.caption_decoding, self._eval_generator())
            metrics["bleu4"].update(generated, self._references(split, batch, index))
            scenes = self._scenes(split, index)
            if scenes is not None:
                correct = torch.tensor(
                    [caption_correct(g, s) for g, s in zip(generated, scenes, strict=True)]
                )
                groups = [self.trainer.datamodule.scene_group(s) for s in scenes]
                for group in sorted(set(groups)):
                    rows = torch.tensor([g == group for g in groups])
                    metrics[f"caption_acc{GROUP_SUFFIX[group]}"].update(correct[rows].float())
        if w.matching:
            image = self.image_text.image_embedding(features)
            text_embedding = self.image_text.text_embedding(text.states, text.mask)
            rows = [text_embedding, image, index, caption_keys(captions)]
            if self.hparams.retrieval_rerank > 1:  # it needs the captioner (checked in __init__)
                # (B, max_caption_length): the batches' captions, padded each to its own longest, are joined later
                ids = F.pad(ids, (0, self.image_text.config.max_caption_length - ids.shape[1]), value=PAD_ID)
                rows += [features, ids, tokens]
            self._embeddings.setdefault(split, []).append(tuple(t.cpu() for t in rows))

    def _retrieval(self, split: str) -> dict[str, float]:
        """Recall@K both ways over this split's images and their captions: every process's share is gathered (the
        distributed sampler's padding repeats some samples: each index counts once), so all ranks log the same.
        With `retrieval_rerank`, the embedding-only figures are logged too, as `recall_at_{k}_{t2i,i2t}_embedding`."""
        rows = self._embeddings.pop(split, [])
        parts = [torch.cat(part) for part in zip(*rows, strict=True)] if rows else None
        if self.trainer.world_size > 1:  # a rank without rows takes part too; the exchange runs on the device
            parts = gather_rows(
                parts, self.all_gather, self.trainer.world_size, self.trainer.strategy.broadcast, self.device
            )
            parts = None if parts is None else [t.cpu() for t in parts]
        if parts is None:
            return {}
        index = parts[2]
        first = torch.from_numpy(np.sort(np.unique(index.numpy(), return_index=True)[1]))
        text, image, index, keys, *pairs = (t[first] for t in parts)
        if pairs:  # the captions' ids to the longest one's width (they were padded to max_caption_length)
            features, ids, tokens = pairs
            pairs = [features, ids[:, : int((ids != PAD_ID).sum(1).max())], tokens]
        scenes = self._scenes(split, index)
        if scenes is not None:
            relevant = scene_relevance(scenes)
        else:  # no ground truth beyond the captions: an image whose own caption is the text's is right too
            relevant = same_caption_relevance(keys)
        with torch.autocast("cpu", enabled=False):  # float32 even under the Trainer's bf16 (on_*_epoch_end)
            similarity = text.float() @ image.float().t()  # (texts, images)
        ks = self.hparams.retrieval_ks
        values = retrieval_metrics(similarity, similarity.t(), relevant, ks)
        nearest = self.hparams.retrieval_rerank
        if nearest > 1:
            t2i_score, i2t_score = self._pair_scores(similarity, *pairs, nearest)
            t2i = rerank_top_k(similarity, t2i_score, nearest)
            i2t = rerank_top_k(similarity.t(), lambda i, t: i2t_score(t, i), nearest)
            embedding_only = {f"{name}_embedding": v for name, v in values.items()}
            values = {**retrieval_metrics(t2i, i2t, relevant, ks), **embedding_only}
        return {f"{split}/{k}": v for k, v in values.items()}

    @inference
    def match_and_caption_scores(
        self, cosine: torch.Tensor, features: torch.Tensor, ids: torch.Tensor, per_token: bool = False
    ) -> torch.Tensor:
        """(M,) how well caption ids (M, T) fit image features (M, N, dim) with embedding cosine (M,): the matcher's
        logit (its learned inverse temperature x cosine) plus the captioner's log p(caption | image), both
        log-likelihoods. `per_token`: the caption's mean log-probability per token, for captions of different lengths
        competing for one image; else its whole log-likelihood (one caption, many images)."""
        likelihood = self.image_text.caption_logprob(features, ids, per_token=per_token)
        return self.image_text.matching_scale() * cosine.to(likelihood) + likelihood

    def _pair_scores(
        self,
        similarity: torch.Tensor,
        features: torch.Tensor,
        ids: torch.Tensor,
        tokens: torch.Tensor,
        nearest: int,
    ) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...]:
        """Scores of (texts (M,), images (M,)) pairs among each text's and each image's `nearest` by `similarity`
        (texts, images), one function per direction (t2i, i2t): `match_and_caption_scores` (the whole caption's
        log-likelihood for t2i, per token for i2t) plus `retrieval_generator_weight[direction]` x the generator's mean
        log p(image tokens | caption) (the caption as the captioner's ids spell it). t2i ranks images for one caption,
        so it takes that log p less the image's own, given the empty caption (their pointwise mutual information):
        the plain likelihood favours simple images. i2t ranks captions for one image, which the image's own term
        would not reorder. Each pair the two directions share is scored once, and each image's own term once, on the
        device in evaluation batches; features, ids and tokens stay on the CPU."""
        num_texts, num_images = similarity.shape
        k = min(nearest, num_texts, num_images)
        t2i = similarity.topk(k, dim=1).indices  # (texts, k), as `rerank_top_k` picks them
        i2t = similarity.t().topk(k, dim=1).indices  # (images, k)
        # the pairs to score, once each: sorted codes text * num_images + image
        codes = torch.cat([
            torch.arange(num_texts).repeat_interleave(k) * num_images + t2i.flatten(),
            i2t.flatten() * num_images + torch.arange(num_images).repeat_interleave(k),
        ]).unique()  # fmt: skip
        texts, images = codes // num_images, codes % num_images
        weights = self.retrieval_generator_weight
        text = None
        if any(weights.values()):  # each caption encoded once, padded to the longest
            text = self.encode_text(ids_to_text(ids, self.caption_tokenizer))
        chunk = self.hparams.eval_batch_size
        match, caption, generator = [], [], []
        for s in range(0, len(codes), chunk):
            t, i = texts[s : s + chunk], images[s : s + chunk]
            cosine, image_features, caption_ids = (
                x.to(self.device) for x in (similarity[t, i], features[i], ids[t])
            )
            match.append((self.image_text.matching_scale() * cosine.float()).cpu())
            caption.append(
                self.image_text.caption_logprob(image_features, caption_ids, per_token=False).cpu()
            )
            if text is not None:
                rows = t.to(text.states.device)
                states = TextStates(text.states[rows], text.mask[rows])
                generator.append(self.token_logprob(tokens[i].to(self.device), states).cpu())
        match, caption = torch.cat(match), torch.cat(caption)
        generator = torch.cat(generator) if generator else torch.zeros_like(match)
        prior = torch.zeros(num_images)  # (images,) log p(image tokens | empty caption), for t2i
        if text is not None and weights["t2i"]:
            prior = torch.cat([
                self.unconditional_token_logprob(tokens[s : s + chunk].to(self.device)).cpu()
                for s in range(0, num_images, chunk)
            ])  # fmt: skip
        generator_t2i = generator - prior[images]
        lengths = (ids[texts, 1:] != PAD_ID).sum(1).clamp(min=1)  # caption tokens scored, [EOS] included

        def scorer(direction: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
            def score(queried_texts: torch.Tensor, queried_images: torch.Tensor) -> torch.Tensor:
                wanted = queried_texts * num_images + queried_images
                rows = torch.searchsorted(codes, wanted).clamp(max=len(codes) - 1)
                if not torch.equal(codes[rows], wanted):
                    raise RuntimeError("retrieval re-ranking asked for a pair outside each query's nearest")
                if direction == "t2i":
                    return match[rows] + caption[rows] + weights["t2i"] * generator_t2i[rows]
                return match[rows] + caption[rows] / lengths[rows] + weights["i2t"] * generator[rows]

            return score

        return scorer("t2i"), scorer("i2t")

    def _judge_generated(self, split: str) -> dict[str, torch.Tensor]:
        return super()._judge_generated(split) if self.weights.generation else {}

    def _score_binding(self, split: str) -> None:
        if self.weights.generation:
            super()._score_binding(split)

    @torch.no_grad()
    def _judged_images(
        self,
        split: str,
        group: str,
        captions: list[str],
        scenes: list[Scene],
        judge: Judge,
        seeds: torch.Tensor,
    ) -> torch.Tensor:
        """`rerank.candidates` images per prompt: the best by `rerank.score` is judged for `judge_acc*_reranked`, and
        the first, a plain sample, is returned for `judge_acc` (so the two are judged on the same draws)."""
        n = self.rerank.candidates
        if n < 2 or self._untrained_scorer() is not None:
            return super()._judged_images(split, group, captions, scenes, judge, seeds)
        step = max(1, self.hparams.eval_batch_size // n)
        plain = []
        for i in range(0, len(captions), step):
            tokens, best, _ = self._sample_candidates(captions[i : i + step], n, seeds=seeds[i : i + step])
            first_and_best = self.decode_tokens(torch.cat([tokens[::n], best]))  # (2 * B, 3, H, W)
            first, best = first_and_best.chunk(2)
            plain.append(first)
            correct = judge.matches(best, scenes[i : i + step]).float()
            self.metrics[split][f"judge_acc{GROUP_SUFFIX[group]}_reranked"].update(correct)
        return torch.cat(plain)

    def _score_generated(self, split: str, group: str, images: torch.Tensor, scenes: list[Scene]) -> None:
        """The round trip: each generated image captioned greedily; the fraction of its prompt's attributes
        (color, shape, size of each object; position or relation) the caption states again."""
        if not self.weights.caption:
            return
        captions = self.caption_images(images, replace(self.caption_decoding, method="greedy"))
        kept, total = zip(
            *(preserved_attributes(c, s) for c, s in zip(captions, scenes, strict=True)), strict=True
        )
        total = torch.tensor(total, dtype=torch.float)
        self.metrics[split][f"round_trip{GROUP_SUFFIX[group]}"].update(
            torch.tensor(kept) / total, weight=total
        )

    def _eval_epoch_end(self, split: str) -> None:
        retrieval = self._retrieval(split)
        if retrieval:
            self.log_dict(retrieval, prog_bar=False, sync_dist=False)
        super()._eval_epoch_end(split)

    @inference
    def log_images(self, batch: dict) -> dict:
        images = super().log_images(batch) if self.weights.generation else {}
        if self.weights.caption:
            tokens = self.batch_tokens(batch)
            pictures = batch["image"] if "image" in batch else self.decode_tokens(tokens)
            images["captioned"] = (pictures, self.caption_tokens(tokens, generator=self._eval_generator()))
        return images

    # -- checkpoints --------------------------------------------------------------------------------------------------

    @classmethod
    def init_args_from_info(cls, info: dict) -> dict:
        return {
            **super().init_args_from_info(info),
            "image_text": ImageTextNet(ImageTextConfig(**info["image_text_config"])),
            "loss_weights": info["loss_weights"],
            "rerank": info["rerank"],
            "caption_decoding": info["caption_decoding"],
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["imagen"].update(
            {
                "image_text_config": asdict(self.image_text.config),
                "loss_weights": asdict(self.weights),
                "rerank": asdict(self.rerank),
                "caption_decoding": asdict(self.caption_decoding),
            }
        )


def scene_relevance(scenes: list[Scene]) -> torch.Tensor:
    """(N, N) bool: caption of scene i is true of image j (the judge's rule on ground-truth objects)."""
    keys = [repr(s) for s in scenes]
    unique = {k: s for k, s in zip(keys, scenes, strict=True)}
    names = list(unique)
    position = {k: i for i, k in enumerate(names)}
    # (U, U): caption of unique scene a vs image of unique scene b
    table = torch.tensor(
        [[matches_caption(list(unique[b].objects), unique[a]) for b in names] for a in names],
        dtype=torch.bool,
    )
    rows = torch.tensor([position[k] for k in keys])
    return table[rows][:, rows]
