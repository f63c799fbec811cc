"""Token classifier for NER: a pretrained transformer encoder + dropout + a linear head, optionally with a CRF."""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

HEADS = ("linear", "crf")
IGNORE_INDEX = -100  # the label of positions without a loss (torch's cross-entropy default)


@dataclass
class NerTaggerConfig:
    num_labels: int = 0  # 0: no head yet; `NerTagger.set_num_labels` adds it once the label set is known
    head: str = "linear"  # linear | crf
    dropout: float = 0.1

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"model.head={self.head!r} is unknown; choose from {HEADS}")


def _drop_pooler(encoder: nn.Module) -> nn.Module:
    # BERT-style encoders carry a sentence pooler that token classification never uses; its parameters would
    # get no gradient (and break DDP without find_unused_parameters)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return encoder


def looks_like_path(name_or_path: str) -> bool:
    """Whether `name_or_path` can only be a local folder, not a hub name (`name` or `namespace/name`): absolute,
    starting with `./`, `../` or `~`, or with more than one path separator."""
    value = str(name_or_path)
    separators = ("/", os.sep, *((os.altsep,) if os.altsep else ()))
    return (
        os.path.isabs(value)
        or value.startswith(("~", *(f"{dots}{sep}" for dots in (".", "..") for sep in separators)))
        or value in (".", "..")
        or sum(value.count(sep) for sep in set(separators)) >= 2
    )


def check_pretrained(name_or_path, key: str = "model.pretrained") -> str:
    """`name_or_path` (with `~` expanded) if it is a hub name or an existing folder; a value that looks like a path
    (`looks_like_path`) but is no folder raises `FileNotFoundError` naming `key` and the path."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"{key}={name_or_path!r} must be a Hugging Face hub name or a folder")
    value = os.fspath(name_or_path)
    if not (looks_like_path(value) or os.path.exists(value)):
        return value  # a hub name: from_pretrained resolves it (a folder of that name in the cwd wins)
    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{key}={value}: no such folder ({path}); give a folder written by save_pretrained (config, weights, "
            "tokenizer) or a Hugging Face hub name such as bert-base-cased"
        )
    if not path.is_dir():
        raise NotADirectoryError(
            f"{key}={value} is a file, not a folder in save_pretrained layout (config, weights, tokenizer)"
        )
    return str(path)


def load_encoder(name_or_path: str) -> nn.Module:
    """`AutoModel.from_pretrained(name_or_path)` in float32 and training mode, without the pooler."""
    from transformers import AutoModel

    return _drop_pooler(AutoModel.from_pretrained(name_or_path, dtype=torch.float32)).train()


def encoder_from_config(config: dict) -> nn.Module:
    """A randomly initialised encoder from a saved `config.to_dict()` (weights come from a checkpoint)."""
    from transformers import AutoConfig, AutoModel

    config = dict(config)
    return _drop_pooler(
        AutoModel.from_config(AutoConfig.for_model(config.pop("model_type"), **config)).float()
    )


def encoder_config_dict(encoder: nn.Module) -> dict:
    """The encoder's config as plain JSON types (for `checkpoint["imagen"]`)."""
    return json.loads(encoder.config.to_json_string(use_diff=False))


class ConditionalRandomField(nn.Module):
    """Linear-chain CRF over left-aligned sequences: emissions (B, W, L), mask (B, W) true on a prefix."""

    def __init__(self, num_tags: int):
        super().__init__()
        self.transitions = nn.Parameter(torch.zeros(num_tags, num_tags))  # [from, to]
        self.start = nn.Parameter(torch.zeros(num_tags))
        self.end = nn.Parameter(torch.zeros(num_tags))

    def log_partition(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B,)
        alpha = self.start + emissions[:, 0]  # (B, L)
        for t in range(1, emissions.shape[1]):
            step = torch.logsumexp(alpha[:, :, None] + self.transitions + emissions[:, t, None, :], dim=1)
            alpha = torch.where(mask[:, t, None], step, alpha)
        return torch.logsumexp(alpha + self.end, dim=1)

    def score(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B,)
        m = mask.float()
        emitted = (emissions.gather(2, tags[:, :, None]).squeeze(2) * m).sum(1)
        moved = (self.transitions[tags[:, :-1], tags[:, 1:]] * m[:, 1:]).sum(1)
        last = tags.gather(1, (mask.sum(1) - 1).clamp(min=0)[:, None]).squeeze(1)
        return self.start[tags[:, 0]] + emitted + moved + self.end[last]

    def nll(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of `tags` (B, W) over the sequences that have at least one position."""
        emissions = emissions.float()
        keep = mask[:, 0]
        return (self.log_partition(emissions, mask) - self.score(emissions, tags, mask))[
            keep
        ].sum() / keep.sum().clamp(min=1)

    def viterbi(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The most likely tags (B, W); positions outside `mask` hold 0."""
        emissions = emissions.float()
        best = self.start + emissions[:, 0]  # (B, L)
        history = []
        for t in range(1, emissions.shape[1]):
            candidates = best[:, :, None] + self.transitions  # (B, from, to)
            value, previous = candidates.max(dim=1)
            history.append(previous)
            best = torch.where(mask[:, t, None], value + emissions[:, t], best)
        tag = (best + self.end).argmax(dim=1)  # (B,) the last tag of each sequence
        lengths = mask.sum(1)
        tags = torch.zeros_like(mask, dtype=torch.long)
        for t in range(emissions.shape[1] - 1, -1, -1):
            inside = t < lengths  # past a sequence's end its last tag is carried back unchanged
            tags[:, t] = torch.where(inside, tag, 0)
            if t > 0:
                tag = torch.where(inside, history[t - 1].gather(1, tag[:, None]).squeeze(1), tag)
        return tags


def _left_align(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather the masked positions of each row to its front: (B, T, ...) -> (B, W, ...), their mask (B, W) and
    their source positions (B, W), W = the most masked positions in a row."""
    order = torch.argsort((~mask).int(), dim=1, stable=True)
    width = max(int(mask.sum(1).max()), 1)
    order = order[:, :width]
    index = order.view(*order.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index), mask.gather(1, order), order


class NerTagger(nn.Module):
    """encoder -> dropout -> linear head over labels (-> CRF over the labelled positions).

    `forward(input_ids, attention_mask, labels=None) -> (logits (B, T, L), loss or None)`; labels (B, T) hold
    `IGNORE_INDEX` (-100) where there is no loss. With the CRF, the labelled positions of a row form its tag sequence.
    """

    def __init__(self, encoder: nn.Module, config: NerTaggerConfig):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.dropout = nn.Dropout(config.dropout)
        self.head: nn.Linear | None = None
        self.crf: ConditionalRandomField | None = None
        if config.num_labels:
            self.set_num_labels(config.num_labels)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **config) -> NerTagger:
        return cls(load_encoder(name_or_path), NerTaggerConfig(**config))

    def set_num_labels(self, num_labels: int) -> None:
        """(Re)build the head for `num_labels` labels, initialised like the encoder's own layers."""
        self.config.num_labels = num_labels
        self.head = nn.Linear(self.encoder.config.hidden_size, num_labels)
        nn.init.normal_(self.head.weight, std=getattr(self.encoder.config, "initializer_range", 0.02))
        nn.init.zeros_(self.head.bias)
        self.crf = ConditionalRandomField(num_labels) if self.config.head == "crf" else None
        self.head.to(self.encoder.device)
        if self.crf is not None:
            self.crf.to(self.encoder.device)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.head is None:
            raise RuntimeError("NerTagger has no head yet: call set_num_labels(len(labels)) first")
        # (B, T, H)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.head(self.dropout(hidden))  # (B, T, L)
        if labels is None:
            return logits, None
        scored = labels != IGNORE_INDEX
        if self.crf is None:
            # a mean over the scored tokens; a batch without one has loss 0, not the NaN of an empty mean
            total = F.cross_entropy(
                logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            return logits, total / scored.sum().clamp(min=1)
        emissions, mask, _ = _left_align(logits, scored)
        tags, _, _ = _left_align(labels.clamp(min=0), scored)
        return logits, self.crf.nll(emissions, tags, mask)

    @torch.no_grad()
    def decode(self, logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tags (B, T) and their probabilities (B, T) at the positions in `mask` (B, T) (the words' first
        subtokens): the argmax, or with the CRF the Viterbi path over those positions. The probability is the
        head's softmax for the chosen tag."""
        probs = logits.float().softmax(-1)
        if self.crf is None:
            tags = probs.argmax(-1)
        else:
            emissions, aligned_mask, positions = _left_align(logits, mask)
            tags = torch.zeros_like(mask, dtype=torch.long)
            tags.scatter_(
                1, positions, torch.where(aligned_mask, self.crf.viterbi(emissions, aligned_mask), 0)
            )
        return tags, probs.gather(2, tags[:, :, None]).squeeze(2)


# encoders that number positions from pad_token_id + 1 (RoBERTa's scheme), so that many fewer tokens fit
PADDING_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
                            "data2vec-text", "longformer", "mpnet", "ibert", "xmod", "luke", "lilt", "markuplm",
                            "layoutlmv3"}  # fmt: skip


def usable_positions(config) -> int | None:
    """How many tokens an encoder of this (Hugging Face) config reads at most; None where it does not say."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and getattr(config, "model_type", None) in PADDING_OFFSET_POSITIONS:
        positions -= (config.pad_token_id or 0) + 1
    return positions


def tiny_random_encoder(path: str | Path, words: Iterable[str] | None = None, seed: int = 0) -> str:
    """Write a tiny randomly initialised BERT (hidden 32, 2 layers, 2 heads) and a fast WordPiece tokenizer to
    `path` with `save_pretrained`, unless it is already there; returns `path`.

    The vocabulary: the special tokens, `words` (default: the words of the packaged CoNLL fixture's train
    split) and every ASCII letter, digit and punctuation mark and character of `words`, alone and as a `##`
    continuation, so that other words split into characters.
    For tests and offline demos; its predictions mean nothing until trained.
    """
    from transformers import BertConfig, BertModel, BertTokenizer

    path = Path(path)
    if (path / "config.json").is_file():
        return str(path)
    if words is None:
        from imagen.data.conll import fixture_dir, read_conll

        words = [w for s in read_conll(Path(fixture_dir()) / "train.txt") for w in s.tokens]
    words = sorted(set(words))
    chars = sorted(
        {c for w in words for c in w} | set(string.ascii_letters + string.digits + string.punctuation)
    )
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [f"##{c}" for c in chars]
    specials_and_chars = set(vocab)
    vocab += [w for w in words if w not in specials_and_chars]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=False)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertModel(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, path)  # atomic: a concurrent writer either wins or finds the finished folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)
