"""Text encoders: captions -> (states (B, L, D), mask (B, L)).

Two kinds, one interface (`forward(captions) -> TextStates`, `dim`, `max_length`):
- `ScratchTextEncoder`: a small bidirectional GRU or Transformer trained from scratch with a word-level tokenizer
  that the Hugging Face `tokenizers` library trains on the corpus captions (no download; the default for the shapes
  data);
- `PretrainedTextEncoder`: a Hugging Face encoder (T5 encoder, BERT family, CLIP text) loaded with
  `AutoTokenizer` / `AutoModel.from_pretrained(name_or_local_path)`, frozen by default as in Imagen, with an
  optional on-disk cache of its outputs for a fixed caption set.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from imagen.files import atomic_file
from imagen.models.ar_transformer import Dropout, attention

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
PAD_ID = 0


@dataclass
class TextStates:
    states: torch.Tensor  # (B, L, D)
    mask: torch.Tensor  # (B, L) bool, True on real tokens


def check_captions(captions: Iterable[str]) -> list[str]:
    """`captions` as a list: a non-empty iterable of strings (a lone string would be read a character at a time)."""
    if isinstance(captions, str | bytes):
        raise TypeError(f"captions are a list of strings, not one string: pass [{captions!r}]"[:300])
    if not isinstance(captions, Iterable):
        raise TypeError(f"captions are a list of strings, not {type(captions).__name__}")
    captions = list(captions)  # a tuple, a numpy array of strings, a generator
    if not captions:
        raise ValueError("no captions: the list is empty")
    if bad := [c for c in captions if not isinstance(c, str)]:
        raise TypeError(f"captions are strings; got {type(bad[0]).__name__} {bad[0]!r}"[:300])
    return captions


class CaptionTokenizer:
    """Word-level tokenizer trained on corpus captions (`tokenizers` library); serializes to a JSON string."""

    def __init__(self, tokenizer: Tokenizer | None = None):
        self.tokenizer = tokenizer
        self.truncated = 0  # captions cut to max_length so far

    @property
    def trained(self) -> bool:
        return self.tokenizer is not None

    def train(self, captions: list[str], vocab_size: int) -> None:
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(
            captions, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
        )
        self.tokenizer = tok

    def words(self, caption: str) -> list[str]:
        """The caption's words as the tokenizer sees them (normalized, split)."""
        normalized = self.tokenizer.normalizer.normalize_str(caption)
        return [word for word, _ in self.tokenizer.pre_tokenizer.pre_tokenize_str(normalized)]

    def unknown_words(self, caption: str) -> list[str]:
        """The caption's words the vocabulary lacks (each is read as [UNK])."""
        return [word for word in self.words(caption) if self.tokenizer.token_to_id(word) is None]

    def add_words(self, captions: list[str], max_vocab: int) -> list[str]:
        """Add the words of `captions` the vocabulary lacks (new concepts for fine-tuning); returns them."""
        words = sorted({word for caption in captions for word in self.unknown_words(caption)})
        if self.vocab_size + len(words) > max_vocab:
            raise ValueError(f"adding {len(words)} words exceeds the text encoder's vocab_size={max_vocab}")
        # into the word-level model itself, after the last id: an added token would match inside known words ("star"
        # would split "stars" into "star" + [UNK])
        first = self.vocab_size
        known = self.tokenizer.get_vocab(with_added_tokens=False)
        self.tokenizer.model = models.WordLevel(
            {**known, **{w: first + i for i, w in enumerate(words)}}, unk_token="[UNK]"
        )
        return words

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def token_id(self, word: str, key: str = "") -> int:
        """The id of a word of the vocabulary; an unknown word is an error naming the config `key`."""
        token = self.tokenizer.token_to_id(self.tokenizer.normalizer.normalize_str(word))
        if token is None:
            raise ValueError(f"{key or 'word'}: {word!r} is not in the caption vocabulary")
        return token

    def to_str(self) -> str:
        return self.tokenizer.to_str()

    @classmethod
    def from_str(cls, text: str) -> CaptionTokenizer:
        return cls(Tokenizer.from_str(text))

    def __call__(self, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) with [BOS] ... [EOS], padded with [PAD]; over-long captions are cut and counted."""
        if not self.trained:
            raise RuntimeError(
                "the caption tokenizer is not trained yet (the stage trains it in configure_model())"
            )
        bos, eos = self.tokenizer.token_to_id("[BOS]"), self.tokenizer.token_to_id("[EOS]")
        rows = []
        for enc in self.tokenizer.encode_batch(check_captions(captions)):
            ids = enc.ids
            if len(ids) > max_length - 2:
                self.truncated += 1
                if self.truncated in (1, 10, 100, 1000):
                    log.warning(
                        f"{self.truncated} caption(s) longer than {max_length - 2} tokens were truncated"
                    )
                ids = ids[: max_length - 2]
            rows.append([bos, *ids, eos])
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, ids != PAD_ID


class EncoderBlock(nn.Module):
    """Pre-norm bidirectional Transformer block."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), mask (B, L) True on real tokens. The weights are `nn.MultiheadAttention`'s; the attention
        itself runs through `attention` (on CPU, plain matmuls beat the fused kernel's backward several times)."""
        h = self.norm1(x)
        b, length, dim = h.shape
        qkv = F.linear(h, self.attn.in_proj_weight, self.attn.in_proj_bias)
        q, k, v = qkv.view(b, length, 3, self.attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, hd)
        dropout = self.attn.dropout if self.training else 0.0
        y = attention(q, k, v, mask[:, None, None, :], dropout).transpose(1, 2).reshape(b, length, dim)
        x = x + self.attn.out_proj(y)
        return x + self.mlp(self.norm2(x))


def rnn_precision() -> contextlib.AbstractContextManager:
    """Where the GRU mixer runs: in float32 even under CPU bf16 autocast, where PyTorch's bf16 GRU takes 1.6x as long
    forward and backward (`python -m imagen.bench.cpu_step`); CUDA autocast applies as usual."""
    return torch.autocast("cpu", enabled=False)


class TokenizerInStateDict:
    """For a module with a `tokenizer` (`CaptionTokenizer`): the tokenizer travels inside the state dict, as a JSON
    string (loadable with `weights_only=True`)."""

    tokenizer: CaptionTokenizer

    def get_extra_state(self) -> dict:
        return {"tokenizer": self.tokenizer.to_str() if self.tokenizer.trained else None}

    def set_extra_state(self, state: dict) -> None:
        if state.get("tokenizer"):
            self.tokenizer = CaptionTokenizer.from_str(state["tokenizer"])


class ScratchTextEncoder(TokenizerInStateDict, nn.Module):
    """Word-level caption tokens: embeddings plus learned positions, mixed by `layers` layers of a `mixer`, trained
    with the generator. `mixer`:
    - `transformer`: pre-norm Transformer blocks;
    - `gru`: a bidirectional GRU (as in AttnGAN's text encoder; `heads` unused): each word's state is built from
      the words before and after it in order, so "red" in "a red circle left of a blue square" reaches the state of
      "circle" and the relation reaches both phrases. On the shapes data it binds attributes to objects within a few
      hundred steps, where the Transformer's states stay nearly those of the word alone (BENCHMARKS.md)."""

    def __init__(self, dim: int = 128, layers: int = 2, heads: int = 4, vocab_size: int = 512, max_length: int = 32,
                 dropout: float = 0.0, mixer: str = "transformer"):  # fmt: skip
        super().__init__()
        self.init_args = {"dim": dim, "layers": layers, "heads": heads, "vocab_size": vocab_size,
                          "max_length": max_length, "dropout": dropout, "mixer": mixer}  # fmt: skip
        self.dim, self.max_length, self.vocab_size = dim, max_length, vocab_size
        self.tokenizer = CaptionTokenizer()
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, max_length, dim))
        if mixer not in ("transformer", "gru"):
            raise ValueError(f"model.text_encoder.mixer must be transformer or gru; got {mixer!r}")
        self.mixer = mixer
        if mixer == "gru":
            if dim % 2:
                raise ValueError(
                    f"model.text_encoder.mixer=gru needs an even model.text_encoder.dim (two directions); got {dim}"
                )
            self.rnn = nn.GRU(
                dim, dim // 2, num_layers=layers, batch_first=True, bidirectional=True, dropout=dropout
            )
        blocks = layers if mixer == "transformer" else 0
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.pos_emb, std=0.02)

    def fit_tokenizer(self, captions: list[str]) -> None:
        """Train the tokenizer on the corpus captions (once; a restored tokenizer is kept)."""
        if not self.tokenizer.trained:
            self.tokenizer.train(captions, self.vocab_size)
            log.info(f"trained a word-level caption tokenizer: {self.tokenizer.vocab_size} tokens")

    def forward(self, captions: list[str]) -> TextStates:
        ids, mask = self.tokenizer(captions, self.max_length)
        lengths = mask.sum(1)  # on the host, where packing needs them: no device sync
        ids, mask = ids.to(self.token_emb.weight.device), mask.to(self.token_emb.weight.device)
        length = ids.shape[1]
        x = self.token_emb(ids) + self.pos_emb[:, :length]
        for block in self.blocks:
            x = block(x, mask)
        if self.mixer == "gru":
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            with rnn_precision():
                x, _ = nn.utils.rnn.pad_packed_sequence(
                    self.rnn(packed)[0], batch_first=True, total_length=length
                )
        return TextStates(self.norm(x), mask)


def weights_identity(pretrained: str, model: nn.Module) -> str:
    """What names the weights `pretrained` loaded: a local folder's path and its files' sizes and modification
    times (weights saved there again get a new identity), or the hub name and the commit it resolved to."""
    folder = Path(pretrained)
    if folder.is_dir():
        files = sorted(f for f in folder.iterdir() if f.is_file())
        return "|".join(
            [str(folder.resolve()), *(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)]
        )
    return f"{pretrained}@{getattr(model.config, '_commit_hash', None)}"


class PretrainedTextEncoder(nn.Module):
    """A Hugging Face text encoder; `pretrained` is a hub name or a local folder saved with `save_pretrained`."""

    def __init__(
        self, pretrained: str, freeze: bool = True, max_length: int = 64, cache_dir: str | None = None
    ):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.init_args = {
            "pretrained": pretrained,
            "freeze": freeze,
            "max_length": max_length,
            "cache_dir": cache_dir,
        }
        self.pretrained, self.freeze, self.max_length = pretrained, freeze, max_length
        self.hf_tokenizer = AutoTokenizer.from_pretrained(pretrained)
        config = AutoConfig.from_pretrained(pretrained)
        if config.model_type in ("t5", "mt5", "umt5"):
            from transformers import T5EncoderModel

            self.model = T5EncoderModel.from_pretrained(pretrained)
        elif config.model_type == "clip":
            from transformers import CLIPTextModel

            self.model = CLIPTextModel.from_pretrained(pretrained)
        else:
            self.model = AutoModel.from_pretrained(pretrained)
        hidden = getattr(self.model.config, "hidden_size", None) or getattr(
            self.model.config, "d_model", None
        )
        self.dim = int(hidden)
        if freeze:
            self.model.requires_grad_(False).eval()
        self.cache_path = None
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if cache_dir and freeze:
            key = hashlib.sha256(
                f"{weights_identity(pretrained, self.model)}|{max_length}".encode()
            ).hexdigest()
            self.cache_path = Path(cache_dir) / "text_encoder" / f"{key[:16]}.pt"
            if self.cache_path.exists():
                self._cache = torch.load(self.cache_path, map_location="cpu", weights_only=True)

    def train(self, mode: bool = True) -> PretrainedTextEncoder:
        super().train(mode)
        if self.freeze:
            self.model.eval()  # frozen: dropout stays off even while the generator trains
        return self

    def fit_tokenizer(self, captions: list[str]) -> None:
        """Pretrained tokenizers need no training."""

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        batch = self.hf_tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                                  return_tensors="pt").to(device)  # fmt: skip
        with torch.set_grad_enabled(not self.freeze and torch.is_grad_enabled()):
            states = self.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
        return states, batch["attention_mask"].bool()

    def forward(self, captions: list[str]) -> TextStates:
        captions = check_captions(captions)
        if self.cache_path is None:
            return TextStates(*self._encode(captions))
        missing = sorted({c for c in captions if c not in self._cache})
        if missing:
            states, mask = self._encode(missing)
            for c, s, m in zip(missing, states.cpu(), mask.cpu(), strict=True):
                self._cache[c] = (s[m].clone(), m[m].clone())
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(self.cache_path) as temporary:
                torch.save(self._cache, temporary)
        device = next(self.model.parameters()).device
        rows = [self._cache[c][0] for c in captions]
        length = max(r.shape[0] for r in rows)
        states = torch.zeros(len(rows), length, self.dim)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            states[i, : r.shape[0]], mask[i, : r.shape[0]] = r, True
        return TextStates(states.to(device), mask.to(device))
