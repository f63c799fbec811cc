"""NER data: the CoNLL reader, tag schemes, label sets, HF datasets, subword alignment and windows."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from imagen.data.conll import (
    IGNORE,
    ConllDataModule,
    ConllFormatError,
    EncodingSettings,
    NerWindows,
    Sentence,
    collate_windows,
    label_list,
    load_tokenizer,
    plan_windows,
    read_conll,
    require_fast,
    resolve_files,
    sentences_from_hf,
)
from imagen.models.ner import tiny_random_encoder

FIXTURES = Path(__file__).parent / "fixtures" / "ner"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    # whole-word entries for these words only: every other word splits into characters (G ##e ##r ...)
    words = ["EU", "rejects", "call", "to", "boycott", "lamb", ".", "Peter", "fans", "in", "New", "York"]
    return load_tokenizer(tiny_random_encoder(tmp_path_factory.mktemp("enc") / "bert", words))


# -- reader -------------------------------------------------------------------------------------------------------


def test_four_column_iob1_file_reads_as_iob2_sentences_and_documents():
    sentences = read_conll(FIXTURES / "iob1_four_columns.txt")
    assert [s.tokens for s in sentences] == [
        ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."],
        ["Peter", "Blackburn"],
        ["Spanish", "Basque", "fans", "in", "New", "York"],
    ]
    assert sentences[0].tags == ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"]
    assert sentences[1].tags == ["B-PER", "I-PER"]
    # IOB1's B- marks a second entity right after one of the same type; it stays B- in IOB2
    assert sentences[2].tags == ["B-MISC", "B-MISC", "O", "O", "B-LOC", "I-LOC"]
    assert [s.document for s in sentences] == [0, 0, 1]  # -DOCSTART- lines end documents, are no sentence
    assert sentences[1].origin.endswith("iob1_four_columns.txt:13")


def test_scheme_can_be_forced():
    kept = read_conll(FIXTURES / "iob1_four_columns.txt", scheme="iob2")
    assert kept[1].tags == ["I-PER", "I-PER"]


def test_iobes_converts_to_iob2(tmp_path):
    path = tmp_path / "iobes.txt"
    path.write_text("Ann S-PER\nvisited O\nNew B-LOC\nYork E-LOC\n")
    assert read_conll(path)[0].tags == ["B-PER", "O", "B-LOC", "I-LOC"]


def test_a_scheme_that_does_not_fit_the_file_names_line_tag_and_setting(tmp_path):
    path = tmp_path / "iobes.txt"
    path.write_text("EU S-ORG\nrejects O\n\nthe O\nPeter B-PER\nBlackburn E-PER\n")
    with pytest.raises(ConllFormatError, match=r"iobes\.txt:1: tag 'S-ORG' does not fit data.scheme=iob2"):
        read_conll(path, scheme="iob2")
    with pytest.raises(
        ConllFormatError,
        match=r"iobes\.txt:1: tag 'S-ORG' does not fit data.scheme=iob1; .*data.scheme=iobes",
    ):
        read_conll(path, scheme="iob1")
    path.write_text("EU O\n\nthe O\nPeter B-PER\nBlackburn E-PER\n")
    with pytest.raises(ConllFormatError, match=r"iobes\.txt:5: tag 'E-PER'"):  # the word's own line
        read_conll(path, scheme="iob2")


def test_two_column_tab_file():
    sentences = read_conll(FIXTURES / "two_columns.tsv")
    assert [s.tokens for s in sentences] == [
        ["@paul", "loves", "New", "York", "City"],
        ["Harry", "Styles", "tour"],
    ]
    assert sentences[0].tags == ["O", "O", "B-location", "I-location", "I-location"]
    assert {s.document for s in sentences} == {0}


def test_malformed_line_names_file_and_line(tmp_path):
    with pytest.raises(ConllFormatError, match=r"malformed\.txt:5: expected 'TOKEN \[...\] TAG'"):
        read_conll(FIXTURES / "malformed.txt")
    bad_tag = tmp_path / "bad_tag.txt"
    bad_tag.write_text("EU NNP I-NP B-ORG\nrejects VBZ I-VP VBZ\n")
    with pytest.raises(ConllFormatError, match=r"bad_tag\.txt:2: expected a tag .* got 'VBZ'"):
        read_conll(bad_tag)
    ragged = tmp_path / "ragged.txt"
    ragged.write_text("EU NNP I-NP B-ORG\n\nrejects O\n")
    with pytest.raises(ConllFormatError, match=r"ragged\.txt:3: expected 4 columns like line 1, got 2"):
        read_conll(ragged)


def test_columns_are_split_at_ascii_spaces_and_tabs_only(tmp_path):
    path = tmp_path / "nbsp.txt"
    path.write_text("EU B-ORG\n10\u00a0000 O\nfans\u2009club O\n")  # no-break and thin spaces inside tokens
    assert read_conll(path)[0].tokens == ["EU", "10\u00a0000", "fans\u2009club"]
    path.write_text("EU B-ORG\n10\u00a0000 O\nfans O O\n")  # the bad line is the third, not the second
    with pytest.raises(ConllFormatError, match=r"nbsp\.txt:3: expected 2 columns like line 1, got 3"):
        read_conll(path)
    tabs = tmp_path / "tabs.tsv"
    tabs.write_text("New York\tB-LOC\nfans \tO\t\n")  # a tab-separated token may hold a space
    assert read_conll(tabs)[0].tokens == ["New York", "fans"]


@pytest.mark.parametrize("line", ["\tO", "\t\tO", " \tB-LOC"])
def test_a_line_without_a_token_names_its_line(tmp_path, line):
    path = tmp_path / "empty_token.tsv"
    path.write_text(f"EU\tB-ORG\n{line}\n")
    with pytest.raises(ConllFormatError, match=r"empty_token\.tsv:2: the token \(first column\) is empty"):
        read_conll(path)


def test_bom_is_skipped_and_latin1_names_file_and_line(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\n".encode("utf-8-sig"))
    assert [s.tokens for s in read_conll(bom)] == [["EU"]]  # the BOM does not hide -DOCSTART-
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("EU B-ORG\n\nFran\u00e7ois B-PER\n".encode("latin-1"))
    with pytest.raises(ConllFormatError, match=r"latin1\.txt:3: not UTF-8 .*iconv -f latin1 -t utf-8"):
        read_conll(latin1)


def test_label_set_covers_all_splits_and_given_labels_are_checked():
    train = [Sentence(["a", "b"], ["B-PER", "O"], 0, "train:1")]
    test = [Sentence(["c", "d"], ["O", "B-EVENT"], 0, "test:7")]  # a type seen only in test
    assert label_list({"train": train, "test": test}) == ["O", "B-EVENT", "I-EVENT", "B-PER", "I-PER"]
    assert label_list({"train": train}, given=["O", "B-PER", "I-PER"]) == ["O", "B-PER", "I-PER"]
    with pytest.raises(
        ValueError, match=r"test:8: tag 'B-EVENT' is not in data.labels"
    ):  # the tag's own line
        label_list({"train": train, "test": test}, given=["O", "B-PER", "I-PER"])


def test_files_resolve_from_either_layout_or_by_name(tmp_path):
    for name in ("eng.train", "eng.testa", "eng.testb", "other.conll"):
        (tmp_path / name).write_text("x O\n")
    files = resolve_files(tmp_path)
    assert [files[s].name for s in ("train", "val", "test")] == ["eng.train", "eng.testa", "eng.testb"]
    assert resolve_files(tmp_path, {"test": "other.conll"})["test"].name == "other.conll"
    with pytest.raises(FileNotFoundError, match="train.txt, valid.txt, test.txt"):
        resolve_files(tmp_path / "empty")


@pytest.mark.parametrize(
    ("split", "name", "text"),
    [
        ("train", "train.txt", ""),
        ("val", "valid.txt", "-DOCSTART- -X- -X- O\n\n"),
        ("test", "test.txt", "\n\n"),
    ],
    ids=["empty", "only_docstart", "only_blank_lines"],
)
def test_a_split_without_sentences_names_its_key_and_file(tmp_path, tokenizer, split, name, text):
    for file in ("train.txt", "valid.txt", "test.txt"):
        (tmp_path / file).write_text(text if file == name else "EU B-ORG\nrejects O\n")
    data = ConllDataModule(tokenizer=tokenizer.name_or_path, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=rf"data.data_dir={tmp_path}: .*{name}: no sentences"):
        data.setup("fit")
    files = {
        s: str(tmp_path / f) for s, f in (("train", "train.txt"), ("val", "valid.txt"), ("test", "test.txt"))
    }
    data = ConllDataModule(tokenizer=tokenizer.name_or_path, files=files)
    with pytest.raises(ValueError, match=rf"data.files.{split}=.*{name}: no sentences"):
        data.setup("fit")


def test_hf_dataset_loads_offline(tmp_path, tokenizer):
    import datasets

    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(
                datasets.ClassLabel(names=["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
            ),
        }
    )
    rows = {
        "tokens": [["-DOCSTART-"], ["Peter", "in", "York"], ["-DOCSTART-"], ["New", "York"]],
        "ner_tags": [[0], [1, 0, 3], [0], [3, 4]],
    }
    split = datasets.Dataset.from_dict(rows, features=features)
    sentences = sentences_from_hf(split)
    assert [(s.tokens, s.tags, s.document) for s in sentences] == [
        (["Peter", "in", "York"], ["B-PER", "O", "B-LOC"], 0),
        (["New", "York"], ["B-LOC", "I-LOC"], 1),
    ]
    folder = tmp_path / "hf"
    datasets.DatasetDict({"train": split, "validation": split, "test": split}).save_to_disk(str(folder))
    data = ConllDataModule(
        tokenizer=tokenizer.name_or_path, data_dir=None, hf_dataset=str(folder), batch_size=2
    )
    data.setup("fit")
    assert data.labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert len(data.sentences["val"]) == 2
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2


def test_hf_rows_are_checked_like_file_lines():
    import datasets

    def split(ner_tags, tags_feature=None, tokens=(("Peter", "in", "York"),)):
        features = None
        if tags_feature is not None:
            features = datasets.Features(
                {"tokens": datasets.Sequence(datasets.Value("string")), "ner_tags": tags_feature}
            )
        rows = {"tokens": [list(t) for t in tokens], "ner_tags": ner_tags}
        return datasets.Dataset.from_dict(rows, features=features)

    ids = datasets.Sequence(datasets.Value("int64"))  # tag ids without a ClassLabel's names
    with pytest.raises(ConllFormatError, match=r"ds\[train\]\[0\]: 'ner_tags' holds tag ids .* no label"):
        sentences_from_hf(split([[1, 0, 3]], ids), "ds[train]")
    with pytest.raises(ConllFormatError, match=r"ds\[train\]\[0\]: expected a tag .* in 'ner_tags', got 'X'"):
        sentences_from_hf(split([["B-PER", "O", "X"]]), "ds[train]")
    with pytest.raises(ConllFormatError, match=r"ds\[train\]\[1\]: 2 'tokens' but 3 'ner_tags'"):
        sentences_from_hf(split([["O"], ["O", "O", "O"]], tokens=[["a"], ["b", "c"]]), "ds[train]")
    assert sentences_from_hf(split([["B-PER", "O", "B-LOC"]]))[0].tags == ["B-PER", "O", "B-LOC"]


def test_slow_tokenizer_is_refused():
    from transformers import ByT5Tokenizer

    with pytest.raises(ValueError, match="slow .* needs a fast one"):
        require_fast(ByT5Tokenizer(), "byt5")


# -- alignment and windows ----------------------------------------------------------------------------------------


def test_labels_land_on_first_subtokens(tokenizer):
    sentence = Sentence(["EU", "rejects", "German", "call"], ["B-ORG", "O", "B-MISC", "O"], 0, "s")
    labels = ["O", "B-MISC", "I-MISC", "B-ORG", "I-ORG"]
    item = NerWindows([sentence], tokenizer, labels, EncodingSettings())[0]
    pieces = tokenizer.convert_ids_to_tokens(item["input_ids"])
    assert pieces == ["[CLS]", "EU", "rejects", "G", "##e", "##r", "##m", "##a", "##n", "call", "[SEP]"]
    assert item["labels"] == [IGNORE, 3, 0, 1, *[IGNORE] * 5, 0, IGNORE]
    assert item["word_index"] == [-1, 0, 1, 2, *[-1] * 5, 3, -1]

    every = NerWindows([sentence], tokenizer, labels, EncodingSettings(label_all_subtokens=True))[0]
    assert every["labels"] == [IGNORE, 3, 0, 1, *[2] * 5, 0, IGNORE]  # B-MISC continues as I-MISC
    assert every["word_index"] == item["word_index"]


def test_a_word_the_tokenizer_drops_still_gets_a_position(tokenizer):
    sentence = Sentence(["EU", "\u200b", "call"], ["B-ORG", "O", "O"], 0, "s")
    item = NerWindows([sentence], tokenizer, ["O", "B-ORG", "I-ORG"], EncodingSettings())[0]
    assert item["word_index"] == [-1, 0, 1, 2, -1]
    assert item["input_ids"][2] == tokenizer.unk_token_id


def test_plan_windows_cores_partition_the_words():
    rng = random.Random(0)
    for _ in range(300):
        max_tokens, context = rng.randint(6, 40), rng.randint(0, 5)
        cap = max_tokens - 2 * context
        if cap < 1:
            continue
        lengths = [rng.randint(1, min(cap, 6)) for _ in range(rng.randint(1, 60))]
        a = rng.randint(0, len(lengths) - 1)
        b = rng.randint(a + 1, len(lengths))
        lo, hi = rng.choice([(a, b), (0, len(lengths))])
        windows = plan_windows(lengths, (a, b), (lo, hi), max_tokens, context)
        cores = [i for w in windows for i in range(w.core_start, w.core_end)]
        assert cores == list(range(a, b))
        for w in windows:
            assert lo <= w.start <= w.core_start < w.core_end <= w.end <= hi
            assert sum(lengths[w.start : w.end]) <= max_tokens


def test_long_sentences_are_windowed_and_stitch_back_every_word_once(tokenizer):
    words = ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."] * 5
    tags = ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"] * 5
    sentences = [
        Sentence(words, tags, 0, "long"),
        Sentence(["Peter", "in", "York"], ["B-PER", "O", "B-LOC"], 0, "short"),
    ]
    labels = label_list({"all": sentences})
    settings = EncodingSettings(max_length=16, window_context=3)
    data = NerWindows(sentences, tokenizer, labels, settings)
    assert len(data) > 5  # the long sentence (57 subtokens) needs several windows; the short one fits in one
    assert all(len(item["input_ids"]) <= 16 for item in data)

    batch = collate_windows(list(data), pad_id=tokenizer.pad_token_id)
    predicted = batch["word_index"][batch["word_index"] >= 0].tolist()
    assert sorted(predicted) == list(range(data.num_words))  # every word predicted exactly once

    # reading the labels at the predicted positions back per sentence gives the gold tags
    flat = [-1] * data.num_words
    for index, label in zip(
        batch["word_index"].flatten().tolist(), batch["labels"].flatten().tolist(), strict=True
    ):
        if index >= 0:
            flat[index] = label
    assert [[labels[t] for t in tags] for tags in data.per_sentence(flat)] == [tags, ["B-PER", "O", "B-LOC"]]


def test_document_context_feeds_neighbours_without_labels(tokenizer):
    sentences = [
        Sentence(["EU", "rejects"], ["B-ORG", "O"], 0, "a"),
        Sentence(["Peter"], ["B-PER"], 0, "b"),
        Sentence(["York"], ["B-LOC"], 1, "c"),  # another document: never context for the others
    ]
    labels = label_list({"all": sentences})
    data = NerWindows(sentences, tokenizer, labels, EncodingSettings(document_context=True))
    middle = data[1]
    assert tokenizer.convert_ids_to_tokens(middle["input_ids"]) == [
        "[CLS]",
        "EU",
        "rejects",
        "Peter",
        "[SEP]",
    ]
    assert middle["labels"] == [IGNORE, IGNORE, IGNORE, labels.index("B-PER"), IGNORE]
    assert middle["word_index"] == [-1, -1, -1, 2, -1]
    assert tokenizer.convert_ids_to_tokens(data[2]["input_ids"]) == ["[CLS]", "York", "[SEP]"]


def test_window_context_must_leave_room():
    with pytest.raises(ValueError, match="window_context=40 leaves no room"):
        EncodingSettings(max_length=64, window_context=40).word_cap(2)


def test_sample_input_files_with_a_bom_or_in_latin1(tmp_path):
    from imagen.cli.sample_ner import read_input

    plain = tmp_path / "plain.txt"
    plain.write_bytes("\ufeffAngela Merkel visited Paris .\n".encode())
    sentences, gold, texts, _ = read_input(plain)
    assert not gold and sentences[0].tokens[0] == "Angela" and texts == ["Angela Merkel visited Paris ."]
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Fran\xe7ois visited Paris .\n".encode("latin-1"))
    with pytest.raises(ConllFormatError, match=r"latin1.txt:1: not UTF-8"):
        read_input(latin1)


def test_a_column_file_with_a_bad_line_is_an_error_not_plain_text(tmp_path):
    from imagen.cli.sample_ner import read_input
    from imagen.data.conll import fixture_dir

    lines = (Path(fixture_dir()) / "test.txt").read_text().splitlines()
    lines[9] = ". . O OX"  # one typo in a CoNLL file: the line is named, the file is not read as plain text
    path = tmp_path / "typo.conll"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConllFormatError, match=r"typo.conll:10: expected"):
        read_input(path)
    with pytest.raises(ConllFormatError, match=r"typo.conll:10: expected"):
        read_input(path, LABELS)


LABELS = ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]  # a checkpoint's


@pytest.mark.parametrize(
    "text, as_columns",  # what input_format=conll says of it
    [
        ("Traffic was slow on I-95\n", r":1: tag 'I-95' is not of the checkpoint's labels"),
        ("For details, contact our office by E-mail.\n", r":1: tag 'E-mail\.' is not of the checkpoint's"),
        ("The B-52 flew over Paris in S-shape\n", r":1: tag 'S-shape' is not of the checkpoint's"),
        # several lines: was refused with a column count error
        ("Flying the B-52\nwas fun today\n", r":2: expected a tag .* got 'today'"),
    ],
)
def test_plain_text_whose_last_word_looks_like_a_tag_is_read_as_text(tmp_path, text, as_columns):
    from imagen.cli.sample_ner import read_input

    path = tmp_path / "plain.txt"
    path.write_text(text)
    sentences, gold, texts, spans = read_input(path, LABELS)
    assert not gold and texts == text.splitlines()  # every line whole, no gold tags
    words = [[t[a:b] for a, b in sp] for t, sp in zip(texts, spans, strict=True)]
    assert [s.tokens for s in sentences] == words and len(words[0]) > 1
    assert read_input(path, LABELS, "text")[1:] == (gold, texts, spans)
    with pytest.raises(ConllFormatError, match=r"plain\.txt" + as_columns):
        read_input(path, LABELS, "conll")


def test_input_format_chooses_how_a_file_is_read(tmp_path):
    from imagen.cli.sample_ner import read_input

    conll = tmp_path / "gold.conll"
    conll.write_text("EU NNP B-ORG\nrejects VBZ O\n\nPeter NNP S-PER\n")
    for input_format in ("auto", "conll"):
        sentences, gold, texts, _ = read_input(conll, LABELS, input_format)
        assert gold and texts == ["EU rejects", "Peter"] and sentences[1].tags == ["B-PER"]
    sentences, gold, texts, _ = read_input(conll, LABELS, "text")  # the columns are words of the text
    assert not gold and texts == ["EU NNP B-ORG", "rejects VBZ O", "Peter NNP S-PER"]
    wnut = tmp_path / "wnut.conll"
    wnut.write_text("@paul O\nloves O\nNew B-location\n")  # types this checkpoint does not know
    with pytest.raises(ConllFormatError, match=r"wnut.conll:3: tag 'B-location' is not of the checkpoint's"):
        read_input(wnut, LABELS, "conll")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("Anna\nWarsaw\n")  # one token per line without tags
    assert [s.tokens for s in read_input(tokens, LABELS, "conll")[0]] == [["Anna", "Warsaw"]]
    assert [s.tokens for s in read_input(tokens, LABELS)[0]] == [["Anna"], ["Warsaw"]]  # auto: a list
    with pytest.raises(ValueError, match=r"input_format='tsv' is unknown"):
        read_input(tokens, LABELS, "tsv")


@pytest.mark.parametrize("kind", ["generic", "roberta"])
def test_a_byte_level_bpe_tokenizer_of_any_model_type_reads_words_as_running_text(tmp_path, kind):
    """A space before each pre-split word, as in running text, in training and in the tokenizer a checkpoint keeps:
    a model type outside the list in conll.py whose tokenizer class takes add_prefix_space (RobertaTokenizer under
    data2vec-text) or ignores it (a plain PreTrainedTokenizerFast under ModernBERT)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Data2VecTextConfig, ModernBertConfig, PreTrainedTokenizerFast, RobertaTokenizer

    from imagen.data.conll import tokenizer_files, tokenizer_from_files

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator(["Anna told Warsaw", "Anna visited Warsaw and told Bob"] * 10, trainer)
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    small = {"vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64}  # fmt: skip
    if kind == "generic":
        PreTrainedTokenizerFast(tokenizer_object=bpe, **specials).save_pretrained(tmp_path)
        ModernBertConfig(**small).save_pretrained(tmp_path)
    else:
        bpe.model.save(str(tmp_path))  # vocab.json, merges.txt
        RobertaTokenizer.from_pretrained(tmp_path, **specials).save_pretrained(tmp_path)
        Data2VecTextConfig(**small).save_pretrained(tmp_path)
    trained_with = load_tokenizer(str(tmp_path))
    kept = tokenizer_from_files(tokenizer_files(trained_with))  # what sample.py task=ner predicts with
    for tokenizer in (trained_with, kept):
        words = tokenizer(["Anna", "told", "Warsaw"], is_split_into_words=True, add_special_tokens=False)
        running = tokenizer(" Anna told Warsaw", add_special_tokens=False)["input_ids"]
        assert words["input_ids"] == running and tokenizer.convert_ids_to_tokens(running)[0].startswith("Ġ")


def test_an_unknown_tag_scheme_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"data.scheme='bio' is unknown; choose from \("):
        ConllDataModule(tokenizer="unused", data_dir=str(tmp_path), scheme="bio")


# -- settings and labels are checked where the datamodule is built ------------------------------------------------


def test_a_window_context_that_leaves_no_room_suggests_values_that_fit():
    with pytest.raises(
        ValueError,
        match=re.escape("data.max_length=3")
        + ".*"
        + re.escape("set data.max_length >= 15 or data.window_context <= 0"),
    ):
        EncodingSettings(max_length=3, window_context=6).word_cap(2)
    assert EncodingSettings(max_length=15, window_context=6).word_cap(2) == 1  # both suggestions work
    assert EncodingSettings(max_length=3, window_context=0).word_cap(2) == 1
    with pytest.raises(
        ValueError, match=re.escape("set data.max_length >= 3") + "$"
    ):  # no context fits max_length=2
        EncodingSettings(max_length=2, window_context=0).word_cap(2)


def test_a_negative_window_context_is_refused(tmp_path):
    with pytest.raises(ValueError, match=re.escape("data.window_context=-4 must be >= 0")):
        ConllDataModule(tokenizer="unused", data_dir=str(tmp_path), window_context=-4)


@pytest.mark.parametrize("key", ["document_context", "label_all_subtokens"])
@pytest.mark.parametrize("value", ["maybe", "false", 1])
def test_flags_must_be_booleans(tmp_path, key, value):
    with pytest.raises(TypeError, match=re.escape(f"data.{key}={value!r} must be a boolean")):
        ConllDataModule(tokenizer="unused", data_dir=str(tmp_path), **{key: value})


def test_window_sizes_must_be_integers(tmp_path):
    with pytest.raises(TypeError, match=re.escape("data.window_context='4' must be an integer")):
        ConllDataModule(tokenizer="unused", data_dir=str(tmp_path), window_context="4")


CONLL_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


@pytest.mark.parametrize(
    ("labels", "named"),
    [
        (
            [*CONLL_LABELS[:-1], "I-MSIC"],
            "data.labels[7]='B-MISC' has no 'I-MISC'; data.labels[8]='I-MSIC' has no 'B-MSIC'",
        ),  # a misspelt I- tag
        ([*CONLL_LABELS, "B-MSIC"], "data.labels[9]='B-MSIC' has no 'I-MSIC'"),  # an extra, misspelt B- tag
        (["O", "B-PER", "I-PER", "B_LOC", "I-LOC"], "data.labels[3]='B_LOC' is not a tag"),
        (["O", "S-PER", "B-PER", "I-PER"], "data.labels[1]='S-PER' is not a tag"),
        (["O", "B-PER", "I-PER", "B-PER"], "data.labels[3]='B-PER' is listed twice"),
    ],
)
def test_explicit_labels_are_refused_naming_the_entry(tmp_path, labels, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        ConllDataModule(tokenizer="unused", data_dir=str(tmp_path), labels=labels)
    with pytest.raises(ValueError, match=re.escape(named)):  # label_list, used directly, checks them too
        label_list({"train": [Sentence(["a"], ["O"], 0, "train:1")]}, given=labels)


def test_labels_that_no_training_tag_uses_are_kept_with_a_warning(caplog):
    train = [Sentence(["a", "b"], ["B-PER", "O"], 0, "train:1")]
    test = [Sentence(["c"], ["B-LOC"], 0, "test:1")]
    given = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER", "B-EVENT", "I-EVENT"]
    with caplog.at_level("WARNING", logger="imagen.data.conll"):
        assert label_list({"train": train, "test": test}, given=given) == given  # order kept
    assert re.search(
        re.escape("data.labels: no tag of the training data has the type(s) ['LOC', 'EVENT']"), caplog.text
    )
