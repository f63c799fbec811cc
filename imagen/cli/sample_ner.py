"""`python sample.py task=ner ckpt=PATH text="..."` (or `input=FILE`): tag entities with a NER stage checkpoint.

Writes `<out_dir>/entities.jsonl` (one line per sentence: its text and entities with type, character offsets
and score) or, with `format=conll`, `<out_dir>/predictions.conll` (`token gold pred` columns that `conlleval`
scores; `token pred` when the input has no gold tags). `input_format` says how `input` is read: `conll` (tag
in the last column, or one token per line), `text` (one sentence per line) or `auto` (columns only when every tag
is of the checkpoint's labels). The checkpoint alone is enough: the tokenizer, encoder config and labels travel
in it, so no hub access or `pretrained` folder is needed.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import regex
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from imagen.checkpoints import load_state_strict, plain_state_dict, read_checkpoint
from imagen.cli.sample import prepare_out_dir, resolve_device, text_lines
from imagen.data.conll import (
    DOCSTART,
    ConllEncodingError,
    ConllFormatError,
    EncodingSettings,
    NerWindows,
    Sentence,
    check_tag,
    collate_windows,
    read_conll,
    split_columns,
    tokenizer_from_files,
    word_origin,
)
from imagen.inference import eval_mode
from imagen.metrics.ner import SCORING_MODES, entity_report
from imagen.models.ner import NerTagger, NerTaggerConfig, encoder_from_config
from imagen.progress import progress_bar

log = logging.getLogger("imagen")

FORMATS = ("jsonl", "conll")
INPUT_FORMATS = ("auto", "conll", "text")
# CoNLL-like words: an abbreviation of capitals (U.S.); letters, digits and combining marks (decomposed accents,
# Indic vowel signs) joined by inner - & . or an apostrophe (AT&T, 3.5, O'Neil); a clitic split off as CoNLL does
# (Germany 's, I 'm, do n't, GERMANY 'S); any other non-space character alone
CLITIC = r"(?i:['’](?:s|re|ve|ll|d|m)|n['’]t)\b"
_WORD = regex.compile(
    rf"(?:\p{{Lu}}\.){{2,}}|[\w\p{{M}}]+(?={CLITIC})|[\w\p{{M}}]+(?:(?:[-&.]|(?!{CLITIC})['’])[\w\p{{M}}]+)*"
    rf"|{CLITIC}|[^\w\p{{M}}\s]"
)


@dataclass
class NerModel:
    """What prediction needs, rebuilt from a checkpoint."""

    tagger: NerTagger
    tokenizer: object
    labels: list[str]
    settings: EncodingSettings
    scoring: str = "conlleval"  # the entity scoring its run reported (`model.scoring`)


def load_ner_model(checkpoint: dict, source: str = "checkpoint") -> NerModel:
    """Rebuild tokenizer, encoder and head of a NER stage checkpoint (offline) and load its weights; weights that do
    not fit the head and encoder it describes are a `CheckpointError` listing the keys."""
    info = checkpoint.get("imagen") or {}
    if info.get("stage") != "ner":
        raise ValueError(
            f"{source}: not a NER stage checkpoint (stage={info.get('stage')!r}); train one with experiment=ner_*"
        )
    labels = list(info["labels"])
    tagger = NerTagger(
        encoder_from_config(info["encoder_config"]), NerTaggerConfig(num_labels=len(labels), **info["tagger"])
    )
    prefix = "net."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    load_state_strict(tagger, plain_state_dict(state, info), source=source)  # LoRA adapters folded in
    return NerModel(
        tagger.eval(),
        tokenizer_from_files(info["tokenizer_files"]),
        labels,
        EncodingSettings(**info["encoding"]),
        info.get("scoring", "conlleval"),
    )


Span = tuple[int, int]  # a word's character offsets in its text: [start, end)


def words_of(text: str) -> tuple[list[str], list[Span]]:
    """CoNLL-like tokens of raw text (punctuation split off) and their character spans."""
    matches = list(_WORD.finditer(text))
    return [m.group() for m in matches], [m.span() for m in matches]


def known_tag(tag: str, labels: Sequence[str] | None) -> bool:
    """Whether `tag` (any scheme: B-, I-, E-, S-) is O or of an entity type in `labels`; None: any tag."""
    if labels is None:
        return True
    return tag == "O" or tag[2:] in {label[2:] for label in labels if label != "O"}


def first_line_is_conll(path: str | Path, labels: Sequence[str] | None = None) -> bool:
    """Whether the first non-blank line of a file is `TOKEN ... TAG` with a tag of `labels` (None: any tag): a
    column file, not plain text."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        fields = next((fields for line in f if (fields := split_columns(line))), [])
    try:
        check_tag(fields[-1] if len(fields) >= 2 else None, str(path), "")
    except ConllFormatError:
        return False
    return known_tag(fields[-1], labels)


def unknown_tag(
    path: str | Path, sentences: list[Sentence], labels: Sequence[str] | None
) -> tuple[str, str] | None:
    """(`file:line`, the tag as written there) of the first tag of `read_conll(path)`'s `sentences` not of the
    entity types of `labels`, or None."""
    for s in sentences:
        for word, tag in enumerate(s.tags):
            if not known_tag(tag, labels):
                where = word_origin(s, word)
                line = text_lines(path, "input")[int(where.rpartition(":")[2]) - 1]
                return where, split_columns(line)[-1]  # before the conversion to IOB2
    return None


def joined_texts(sentences: list[Sentence]) -> tuple[list[str], list[list[Span]]]:
    """Each sentence's text, its tokens joined by spaces, and the tokens' character spans in it."""
    texts, spans = [], []
    for s in sentences:
        texts.append(" ".join(s.tokens))
        starts = [0, *itertools.accumulate(len(t) + 1 for t in s.tokens)][:-1]
        spans.append([(start, start + len(t)) for start, t in zip(starts, s.tokens, strict=True)])
    return texts, spans


def token_blocks(lines: list[str], source: str, guess: bool = True) -> list[Sentence] | None:
    """Sentences of a CoNLL-style file without tags (one token per line, blank lines between sentences), or None
    where the lines are not that: a line of several words or, with `guess`, one block only (a list, one item per
    line) or no sentence of several lines."""
    sentences, tokens, start, document = [], [], 1, 0
    for number, line in enumerate([*lines, ""], 1):
        fields = split_columns(line)
        if len(fields) > 1:
            return None
        if fields and fields[0] != DOCSTART:
            tokens.append(fields[0])
            continue
        if tokens:
            sentences.append(Sentence(tokens, ["O"] * len(tokens), document, f"{source}:{start}"))
            tokens = []
        if fields and sentences:  # -DOCSTART- starts another document
            document += 1
        start = number + 1
    if not guess or (len(sentences) > 1 and any(len(s.tokens) > 1 for s in sentences)):
        return sentences
    return None


# sentences, whether they carry gold tags, each one's text, its words' character spans in it
InputSentences = tuple[list[Sentence], bool, list[str], list[list[Span]]]


def read_input(
    path: str | Path, labels: Sequence[str] | None = None, input_format: str = "auto"
) -> InputSentences:
    """Sentences of `path`, whether they carry gold tags, and each sentence's text with its words' character spans.

    `conll`: see `read_columns`; `text`: see `read_text`; `auto`: a column file if it parses as one and all its
    tags are of the types of `labels` (None: any tag); a column file with a bad line (an error naming it) if its
    first line ends in such a tag; one token per line if it looks like that (several sentences, one of several
    tokens); else plain text. A file without a sentence is an error.
    """
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format={input_format!r} is unknown; choose from {INPUT_FORMATS}")
    if input_format == "conll":
        found = read_columns(path, labels)
    elif input_format == "text":
        found = read_text(path)
    else:
        found = read_guessed(path, labels)
    if not found[0]:
        raise ValueError(
            f"input={path}: no sentences (the file is empty or holds only blank and {DOCSTART} lines)"
        )
    return found


def read_guessed(path: str | Path, labels: Sequence[str] | None) -> InputSentences:
    """`read_input` with `input_format=auto`."""
    try:
        sentences = read_conll(path)
    except ConllEncodingError:  # no text at all: the error names the line to convert
        raise
    except ConllFormatError:
        if first_line_is_conll(path, labels):  # a column file with a bad line: the error names it
            raise
    else:
        found = unknown_tag(path, sentences, labels)
        if found is None:
            return sentences, True, *joined_texts(sentences)
        log.warning(
            f"input={path}: read as plain text, as {found[0]} ends in {found[1]!r}, not a tag of the checkpoint's "
            f"labels {list(labels or [])}; input_format=text reads plain text without this warning"
        )
    blocks = token_blocks(text_lines(path, "input"), str(path))
    if blocks is not None:
        return blocks, False, *joined_texts(blocks)
    return read_text(path)


def read_columns(path: str | Path, labels: Sequence[str] | None) -> InputSentences:
    """`read_input` with `input_format=conll`: a CoNLL column file, tag last (the text: its tokens joined by spaces),
    or one token per line without tags (blank lines between sentences). A bad line, or a tag not of the types of
    `labels`, is a `ConllFormatError` naming its line."""
    blocks = token_blocks(text_lines(path, "input"), str(path), guess=False)
    if blocks is not None:  # one column: no tags
        return blocks, False, *joined_texts(blocks)
    sentences = read_conll(path)
    found = unknown_tag(path, sentences, labels)
    if found is not None:
        raise ConllFormatError(
            f"{found[0]}: tag {found[1]!r} is not of the checkpoint's labels {list(labels or [])} "
            "(input_format=conll)"
        )
    return sentences, True, *joined_texts(sentences)


def read_text(path: str | Path) -> InputSentences:
    """`read_input` with `input_format=text`: plain text, one sentence per line (the text: the line as written); a
    blank line or a `-DOCSTART-` one ends a document."""
    sentences, texts, spans, document = [], [], [], 0
    for number, line in enumerate(text_lines(path, "input"), 1):
        tokens, token_spans = words_of(line) if line.split()[:1] != [DOCSTART] else ([], [])
        if tokens:
            sentences.append(Sentence(tokens, ["O"] * len(tokens), document, f"{path}:{number}"))
            texts.append(line)
            spans.append(token_spans)
        elif sentences and sentences[-1].document == document:
            document += 1
    return sentences, False, texts, spans


@torch.no_grad()
def predict(
    model: NerModel,
    sentences: list[Sentence],
    batch_size: int,
    device: torch.device,
    show_progress: bool = False,
):
    """Per sentence, the predicted tag and its probability of every word: [(tags, probs)]; the tagger in eval mode
    whatever its own."""
    unlabelled = [Sentence(s.tokens, ["O"] * len(s.tokens), s.document, s.origin) for s in sentences]
    if "O" not in model.labels:
        raise ValueError(f"the checkpoint's labels {model.labels} have no 'O'")
    dataset = NerWindows(unlabelled, model.tokenizer, model.labels, model.settings)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=functools.partial(collate_windows, pad_id=model.tokenizer.pad_token_id),
    )
    tags = torch.full((dataset.num_words,), -1, dtype=torch.long)
    probs = torch.zeros(dataset.num_words)
    with eval_mode(model.tagger.to(device)) as tagger, progress_bar(transient=True) as bar:
        task = bar.add_task("tagging", total=len(loader), visible=show_progress)
        for batch in loader:
            logits, _ = tagger(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            mask = batch["word_index"] >= 0
            batch_tags, batch_probs = tagger.decode(logits, mask.to(device))
            tags[batch["word_index"][mask]] = batch_tags.cpu()[mask]
            probs[batch["word_index"][mask]] = batch_probs.cpu()[mask]
            bar.update(task, advance=1)
    return [
        ([model.labels[t] for t in sentence_tags], sentence_probs)
        for sentence_tags, sentence_probs in zip(
            dataset.per_sentence(tags.tolist()), dataset.per_sentence(probs.tolist()), strict=True
        )
    ]


def entities_of(
    text: str, spans: list[tuple[int, int]], tags: list[str], probs: list[float], scoring: str = "conlleval"
) -> list[dict]:
    """Entities with their text, type, character offsets [start, end) and score (the mean probability of their
    words' tags), chunked as `scoring` (`model.scoring`, see `entity_report`) counts them: `conlleval` reads an
    `I-X` after `O` as an entity, `strict` does not."""
    from seqeval.metrics.sequence_labeling import get_entities
    from seqeval.scheme import IOB2, Entities

    if scoring not in SCORING_MODES:
        raise ValueError(f"NER scoring mode {scoring!r} is unknown; choose from {SCORING_MODES}")
    if scoring == "strict":
        chunks = [(e.tag, e.start, e.end - 1) for e in Entities([list(tags)], IOB2).entities[0]]
    else:
        chunks = get_entities(list(tags))
    out = []
    for kind, first, last in chunks:
        start, end = spans[first][0], spans[last][1]
        score = sum(probs[first : last + 1]) / (last + 1 - first)
        out.append(
            {"text": text[start:end], "type": kind, "start": start, "end": end, "score": round(score, 4)}
        )
    return out


def sample_ner(cfg: DictConfig) -> dict:
    """Tag `cfg.text` or the sentences of `cfg.input`; returns {"path", "sentences", "entities"} (+ "f1" when
    the input has gold tags)."""
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r} is unknown; choose from {FORMATS}")
    input_format = cfg.get("input_format", "auto")
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format={input_format!r} is unknown; choose from {INPUT_FORMATS}")
    if (cfg.get("text") is None) == (cfg.get("input") is None):
        raise ValueError('task=ner needs exactly one of text="..." and input=FILE')
    model = load_ner_model(read_checkpoint(cfg.ckpt, cfg.trust_checkpoint), f"ckpt={cfg.ckpt}")

    if cfg.text is not None:
        tokens, spans = words_of(str(cfg.text))
        if not tokens:
            raise ValueError("text is empty")
        sentences, has_gold, texts = (
            [Sentence(tokens, ["O"] * len(tokens), 0, "text")],
            False,
            [str(cfg.text)],
        )
        all_spans = [spans]
    else:
        if not Path(cfg.input).is_file():
            raise FileNotFoundError(f"input={cfg.input}: no such file")
        sentences, has_gold, texts, all_spans = read_input(cfg.input, model.labels, input_format)
    out_dir = prepare_out_dir(cfg, ("entities.jsonl", "predictions.conll"))
    predictions = predict(
        model, sentences, cfg.batch_size, resolve_device(cfg.device), show_progress=cfg.text is None
    )

    summary: dict = {"sentences": len(sentences)}
    if cfg.format == "jsonl":
        path = out_dir / "entities.jsonl"
        count = 0
        with open(path, "w") as f:
            for text, spans, (tags, probs) in zip(texts, all_spans, predictions, strict=True):
                found = entities_of(text, spans, tags, probs, model.scoring)
                count += len(found)
                f.write(json.dumps({"text": text, "entities": found}) + "\n")
                if cfg.text is not None:
                    for e in found:
                        log.info(f"{e['type']:>6} {e['text']!r} [{e['start']}:{e['end']}] {e['score']:.3f}")
        summary["entities"] = count
    else:
        path = out_dir / "predictions.conll"
        with open(path, "w") as f:
            for s, (tags, _) in zip(sentences, predictions, strict=True):
                for token, gold, pred in zip(s.tokens, s.tags, tags, strict=True):
                    f.write(f"{token} {gold} {pred}\n" if has_gold else f"{token} {pred}\n")
                f.write("\n")
    if has_gold:
        gold, pred = [s.tags for s in sentences], [t for t, _ in predictions]
        summary["f1"] = entity_report(gold, pred, model.scoring)["micro avg"]["f1"]
    summary["path"] = str(path)
    log.info(f"NER: {summary}")
    return summary
