"""`sample.py task=ner` on files: how `input_format` reads them, empty files, and entities listed as scored."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from imagen.cli.sample import sample
from imagen.data.conll import ConllFormatError, EncodingSettings, load_tokenizer, tokenizer_files
from imagen.models.ner import (
    NerTagger,
    NerTaggerConfig,
    encoder_config_dict,
    load_encoder,
    tiny_random_encoder,
)

LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


@pytest.fixture(scope="module")
def ner_checkpoint(tmp_path_factory):
    """`ner_checkpoint(scoring, tag)`: a NER stage checkpoint (`model.scoring=scoring`) that tags every word `tag`."""
    folder = tmp_path_factory.mktemp("ner")
    encoder_dir = tiny_random_encoder(folder / "bert", ["Anna", "left", "Traffic", "was"])
    made = {}

    def make(scoring: str, tag: str) -> str:
        if (scoring, tag) not in made:
            made[scoring, tag] = save_checkpoint(folder / f"{scoring}_{tag}.ckpt", encoder_dir, scoring, tag)
        return made[scoring, tag]

    return make


def save_checkpoint(path, encoder_dir: str, scoring: str, tag: str) -> str:
    """A NER stage checkpoint whose head tags every word `tag` (zero weights, one large bias)."""
    tagger = NerTagger(load_encoder(encoder_dir), NerTaggerConfig(num_labels=len(LABELS), dropout=0.0))
    with torch.no_grad():
        tagger.head.weight.zero_()
        tagger.head.bias.zero_()
        tagger.head.bias[LABELS.index(tag)] = 10.0
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in tagger.state_dict().items()},
            "imagen": {
                "stage": "ner",
                "labels": LABELS,
                "tagger": {"head": "linear", "dropout": 0.0},
                "encoder_config": encoder_config_dict(tagger.encoder),
                "tokenizer_files": tokenizer_files(load_tokenizer(encoder_dir)),
                "encoding": dataclasses.asdict(EncodingSettings()),
                "scoring": scoring,
            },
        },
        path,
    )
    return str(path)


def run(make_cfg, ckpt: str, path, out, *overrides: str) -> dict:
    return sample(
        make_cfg(["task=ner", f"ckpt={ckpt}", f"input={path}", f"out_dir={out}", *overrides], "sample")
    )


@pytest.mark.parametrize("scoring, f1, listed", [("conlleval", 1.0, ["Anna left"]), ("strict", 0.0, [])])
def test_listed_entities_follow_the_checkpoint_scoring(
    make_cfg, tmp_path, ner_checkpoint, scoring, f1, listed
):
    ckpt = ner_checkpoint(scoring, "I-LOC")  # predicts I-LOC I-LOC
    gold = tmp_path / "gold.conll"
    gold.write_text("Anna B-LOC\nleft I-LOC\n")
    summary = run(make_cfg, ckpt, gold, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "entities.jsonl").read_text())
    assert [e["text"] for e in record["entities"]] == listed  # strict: no entity, so F1 0
    assert summary["f1"] == f1 and summary["entities"] == len(listed)


def test_input_format_says_how_a_line_ending_in_a_tag_like_word_is_read(make_cfg, tmp_path, ner_checkpoint):
    ckpt = ner_checkpoint("conlleval", "O")
    plain = tmp_path / "plain.txt"
    plain.write_text("Traffic was slow on I-95\n")
    for input_format in ("auto", "text"):  # the whole line, no gold tags (was: the token Traffic, tag I-95)
        summary = run(
            make_cfg, ckpt, plain, tmp_path / input_format, f"input_format={input_format}", "format=conll"
        )
        predictions = (tmp_path / input_format / "predictions.conll").read_text()
        assert predictions == "Traffic O\nwas O\nslow O\non O\nI-95 O\n\n" and "f1" not in summary
    with pytest.raises(ConllFormatError, match=r"plain\.txt:1: tag 'I-95' is not of the checkpoint's labels"):
        run(make_cfg, ckpt, plain, tmp_path / "conll", "input_format=conll")
    with pytest.raises(ValueError, match=r"input_format='csv' is unknown"):
        run(make_cfg, ckpt, plain, tmp_path / "csv", "input_format=csv")


@pytest.mark.parametrize("text", ["", "\n\n", "-DOCSTART- -X- -X- O\n\n", "-DOCSTART-\n"])
@pytest.mark.parametrize("input_format", ["auto", "conll", "text"])
def test_an_input_without_sentences_is_an_error_naming_the_file(
    make_cfg, tmp_path, ner_checkpoint, text, input_format
):
    ckpt = ner_checkpoint("conlleval", "O")
    path = tmp_path / "empty.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"input=.*empty\.txt: no sentences"):
        run(make_cfg, ckpt, path, tmp_path / "out", f"input_format={input_format}")
