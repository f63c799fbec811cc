"""The NER stage end to end through the real entry points: train.py's task and sample.py task=ner."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hydra.errors import InstantiationException

from imagen.checkpoints import CheckpointError
from imagen.cli.sample import sample
from imagen.cli.train import train
from imagen.data.conll import fixture_dir, read_conll
from imagen.models.ner import tiny_random_encoder


def test_tiny_model_overfits_and_its_checkpoint_round_trips_through_sample(make_cfg, tmp_path):
    run = tmp_path / "run"
    cfg = make_cfg(
        [
            "experiment=ner_tiny",
            "data.files={val: train.txt, test: train.txt}",  # memorised: every training sentence tagged right
            "trainer.max_epochs=40",
            "trainer.check_val_every_n_epoch=40",
            "callbacks.rich_progress_bar=null",
        ],
        run_dir=run,
    )
    metrics, _ = train(cfg)
    assert metrics["test/f1"] == 1.0
    written = json.loads((run / "metrics.json").read_text())
    assert written["test/f1"] == 1.0 and written["val/f1"] == 1.0
    assert {"test/precision", "test/recall", "test/f1_PER", "test/f1_MISC"} <= set(written)
    reports = json.loads((run / "ner_test_report.json").read_text())
    assert reports["entities"]["micro avg"]["f1"] == 1.0
    assert reports["tokens"]["micro avg"]["f1"] == 1.0 and "B-LOC" in reports["tokens"]
    assert "token-level scores per tag" in (run / "ner_test_report.txt").read_text()

    ckpt = run / "checkpoints" / "last.ckpt"
    info = torch.load(ckpt, map_location="cpu", weights_only=True)["imagen"]  # plain types only
    assert info["stage"] == "ner" and info["labels"][0] == "O" and "tokenizer.json" in info["tokenizer_files"]

    # evaluating the checkpoint (train=false ckpt_path=...) gives the same score
    evaluated, _ = train(
        make_cfg(
            ["experiment=ner_tiny", "data.files={test: train.txt}", "train=false", f"ckpt_path={ckpt}"],
            run_dir=tmp_path / "eval",
        )
    )
    assert evaluated["test/f1"] == 1.0
    # on the held-out test sentences it learned something too (tagging every word O scores 0; 0.48 measured)
    held_out, _ = train(
        make_cfg(["experiment=ner_tiny", "train=false", f"ckpt_path={ckpt}"], run_dir=tmp_path / "held_out")
    )
    assert held_out["test/f1"] > 0.2
    # a sentence whose every window lies past the batches run is not scored, with a warning, and no crash
    partial, _ = train(
        make_cfg(["experiment=ner_tiny", "train=false", f"ckpt_path={ckpt}", "data.eval_batch_size=1",
                  "trainer.limit_test_batches=1"], run_dir=tmp_path / "partial")
    )  # fmt: skip
    assert "test/f1" not in partial

    # fine-tuning from the run: before any step, the test split already scores what the run scored
    before, _ = train(
        make_cfg(
            ["experiment=ner_tiny", "data.files={val: train.txt, test: train.txt}", f"model.init_from={ckpt}",
             "test_before_fit=true", "trainer.max_epochs=1", "callbacks.rich_progress_bar=null"],
            run_dir=tmp_path / "finetune",
        )
    )  # fmt: skip
    assert before["before/test/f1"] == 1.0
    more_labels = f"data.labels=[{','.join([*info['labels'], 'B-NEW', 'I-NEW'])}]"  # the head would differ
    with pytest.raises(ValueError, match=r"model.init_from=.* was trained with labels \['O'"):
        train(
            make_cfg(
                ["experiment=ner_tiny", f"model.init_from={ckpt}", more_labels], run_dir=tmp_path / "other"
            )
        )

    # CoNLL in, `token gold pred` out: the prediction of every training word is its gold tag
    out = tmp_path / "conll_out"
    train_file = f"{fixture_dir()}/train.txt"
    summary = sample(
        make_cfg(
            ["task=ner", f"ckpt={ckpt}", f"input={train_file}", "format=conll", f"out_dir={out}"], "sample"
        )
    )
    lines = [line.split() for line in (out / "predictions.conll").read_text().splitlines() if line]
    assert len(lines) == sum(len(s.tokens) for s in read_conll(train_file))
    assert all(gold == pred for _, gold, pred in lines)
    assert summary["f1"] == 1.0

    # raw text in, entities with character offsets out
    text = "Anna Kowalski, the chief executive, told reporters in Warsaw."
    out = tmp_path / "text_out"
    summary = sample(make_cfg(["task=ner", f"ckpt={ckpt}", f"text='{text}'", f"out_dir={out}"], "sample"))
    record = json.loads((out / "entities.jsonl").read_text())
    assert record["text"] == text
    found = [(e["text"], e["type"], e["start"], e["end"]) for e in record["entities"]]
    assert found == [("Anna Kowalski", "PER", 0, 13), ("Warsaw", "LOC", 54, 60)]
    assert all(0 < e["score"] <= 1 for e in record["entities"]) and summary["entities"] == 2

    # a plain text file in (not CoNLL: one sentence per line, a blank line between documents), one record per line
    plain = tmp_path / "news.txt"
    plain.write_text(f"{text}\n\nThe talks in Warsaw went on.\n")
    out = tmp_path / "file_out"
    summary = sample(make_cfg(["task=ner", f"ckpt={ckpt}", f"input={plain}", f"out_dir={out}"], "sample"))
    records = [json.loads(line) for line in (out / "entities.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == [text, "The talks in Warsaw went on."]
    assert [(e["text"], e["type"]) for e in records[1]["entities"]] == [("Warsaw", "LOC")]
    assert all(r["text"][e["start"] : e["end"]] == e["text"] for r in records for e in r["entities"])
    # a CoNLL file to JSON lines: each sentence's text is its tokens joined by spaces, and the offsets point into it
    out = tmp_path / "conll_jsonl"
    sample(make_cfg(["task=ner", f"ckpt={ckpt}", f"input={train_file}", f"out_dir={out}"], "sample"))
    records = [json.loads(line) for line in (out / "entities.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == [" ".join(s.tokens) for s in read_conll(train_file)]
    assert sum(len(r["entities"]) for r in records) > 0
    assert all(r["text"][e["start"] : e["end"]] == e["text"] for r in records for e in r["entities"])


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=ner_conll2003"],  # + the fixture and the tiny encoder, below
        ["experiment=ner_tiny", "model.head=crf", "data.document_context=true"],
        [
            "experiment=ner_tiny",
            "data.label_all_subtokens=true",
            "data.max_length=16",
            "data.window_context=2",
        ],
    ],
    ids=["conll2003", "tiny-crf-document-context", "tiny-all-subtokens"],
)
def test_fast_dev_run(make_cfg, cache_dir, overrides):
    if overrides[0] == "experiment=ner_conll2003":
        encoder = tiny_random_encoder(cache_dir / "ner_tiny_encoder")
        overrides = [*overrides, f"data.data_dir={fixture_dir()}", f"model.pretrained={encoder}"]
    cfg = make_cfg([*overrides, "trainer.fast_dev_run=true", "logger=csv"])
    metrics, objects = train(cfg)
    assert objects["trainer"].state.finished
    assert 0.0 <= metrics["test/f1"] <= 1.0 and metrics["test/loss"] > 0


def test_a_misspelt_scoring_mode_is_refused_before_training(make_cfg):
    with pytest.raises(InstantiationException, match="model.scoring='strcit' is unknown"):
        train(make_cfg(["experiment=ner_tiny", "model.scoring=strcit"]))


def test_crf_with_all_subtokens_is_refused(make_cfg):
    cfg = make_cfg(
        [
            "experiment=ner_tiny",
            "model.head=crf",
            "data.label_all_subtokens=true",
            "trainer.fast_dev_run=true",
        ]
    )
    with pytest.raises(ValueError, match="model.head=crf .* data.label_all_subtokens"):
        train(cfg)


def test_sample_refuses_missing_and_untrusted_checkpoints(make_cfg, tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointError, match=f"checkpoint {missing}: no such file"):
        sample(make_cfg(["task=ner", f"ckpt={missing}", "text=Hello"], "sample"))

    pickled = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {}, "config": pytest.approx(1.0)}, pickled)  # holds a Python object
    with pytest.raises(CheckpointError, match="trust_checkpoint=true"):
        sample(make_cfg(["task=ner", f"ckpt={pickled}", "text=Hello"], "sample"))
    with pytest.raises(ValueError, match="not a NER stage checkpoint"):
        sample(make_cfg(["task=ner", f"ckpt={pickled}", "text=Hello", "trust_checkpoint=true"], "sample"))


def test_raw_text_is_cut_into_conll_words_with_their_offsets():
    import unicodedata

    from imagen.cli.sample_ner import words_of

    text = "Germany's Merkel met U.S. officials at AT&T in New-York."
    words, spans = words_of(text)
    assert words == [
        "Germany",
        "'s",
        "Merkel",
        "met",
        "U.S.",
        "officials",
        "at",
        "AT&T",
        "in",
        "New-York",
        ".",
    ]
    assert [text[a:b] for a, b in spans] == words
    assert words_of("GERMANY'S coach can't say")[0] == ["GERMANY", "'S", "coach", "ca", "n't", "say"]
    # decomposed accents and Indic vowel signs are combining marks: part of their word
    assert words_of(unicodedata.normalize("NFD", "Jürgen Müller"))[0] == [
        unicodedata.normalize("NFD", w) for w in ("Jürgen", "Müller")
    ]
    assert words_of("नरेंद्र मोदी")[0] == ["नरेंद्र", "मोदी"]


def test_a_file_of_one_token_per_line_without_tags_is_read_as_sentences(tmp_path):
    from imagen.cli.sample_ner import read_input

    path = tmp_path / "tokens.txt"
    path.write_text("Anna\nKowalski\nvisited\nWarsaw\n.\n\nHe\nleft\n")
    sentences, has_gold, texts, spans = read_input(path)
    assert [s.tokens for s in sentences] == [["Anna", "Kowalski", "visited", "Warsaw", "."], ["He", "left"]]
    assert not has_gold and texts[0] == "Anna Kowalski visited Warsaw ." and spans[0][1] == (5, 13)
    path.write_text("-DOCSTART-\n\nAnna\nleft\n\n-DOCSTART-\n\nHe\nstayed\n")  # two documents
    assert [s.document for s in read_input(path)[0]] == [0, 1]
    path.write_text("Anna\nWarsaw\n")  # one block: a list of one-word lines, each its own sentence
    assert [s.tokens for s in read_input(path)[0]] == [["Anna"], ["Warsaw"]]


def test_roberta_style_encoders_read_two_positions_fewer_than_they_have():
    from transformers import BertConfig, RobertaConfig

    from imagen.models.ner import usable_positions

    assert usable_positions(BertConfig(max_position_embeddings=512)) == 512
    # positions start after the padding index: 514 embeddings, 512 tokens
    assert usable_positions(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512


@pytest.mark.parametrize("head", ["linear", "crf"])
def test_the_evaluation_loss_is_the_loss_of_the_split_each_window_once(cache_dir, tmp_path, head):
    """`test/loss` is the loss of the whole split (the mean over its scored tokens, or with the CRF over its
    windows' sequences), whatever the batches: not a mean of the batches' means. Under DDP a rank's share ends with
    repeats of another's windows, left out: here the two ranks' shares (Lightning's DistributedSampler) are run one
    after the other and their values, weighted by what each scored, make the split's."""
    import functools

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, DistributedSampler

    from imagen.data.conll import ConllDataModule, collate_windows
    from imagen.models.ner import tiny_random_encoder
    from imagen.stages.ner import NerStage

    encoder = tiny_random_encoder(cache_dir / "ner_tiny_encoder")
    dm = ConllDataModule(encoder, data_dir=fixture_dir(), max_length=32, window_context=6, eval_batch_size=2)
    dm.setup()
    torch.manual_seed(0)
    stage = NerStage(encoder, optimizer=None, head=head, dropout=0.0)
    stage.labels = list(dm.labels)
    stage.net.set_num_labels(len(stage.labels))
    torch.nn.init.normal_(stage.net.head.weight, std=1.0)  # tokens of unequal losses
    windows = dm.dataset("test")
    collate = functools.partial(collate_windows, pad_id=dm.tokenizer.pad_token_id)

    def loss_and_weight(indices: list[int]) -> tuple[float, int]:
        """The loss of these windows as one batch, and how many tokens (or sequences) it is a mean over."""
        batch = collate([windows[i] for i in indices])
        with torch.no_grad():
            _, loss = stage.net.eval()(batch["input_ids"], batch["attention_mask"], batch["labels"])
        scored = batch["labels"] != -100
        return loss.item(), int((scored if head == "linear" else scored.any(dim=1)).sum())

    def logged_loss(**loader) -> float:
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
        if loader:  # this rank's share, as Lightning's sampler gives it under DDP
            dm.test_dataloader = lambda: DataLoader(windows, batch_size=2, collate_fn=collate, **loader)
        trainer.test(stage, datamodule=dm, verbose=False)
        return trainer.callback_metrics["test/loss"].item()

    split, _ = loss_and_weight(list(range(len(windows))))
    assert len(windows) == 7
    assert logged_loss() == pytest.approx(split, rel=1e-5)  # 4 batches of 2, 2, 2, 1 windows
    shares = [DistributedSampler(windows, num_replicas=2, rank=rank, shuffle=False) for rank in (0, 1)]
    assert [list(s) for s in shares] == [[0, 2, 4, 6], [1, 3, 5, 0]]  # window 0 twice: once is a repeat
    ranks = [logged_loss(sampler=share) for share in shares]
    weights = [loss_and_weight(owned)[1] for owned in ([0, 2, 4, 6], [1, 3, 5])]
    assert (ranks[0] * weights[0] + ranks[1] * weights[1]) / sum(weights) == pytest.approx(split, rel=1e-5)


@pytest.mark.parametrize("form", ["absolute", "nested"])
def test_a_pretrained_path_that_does_not_exist_names_the_key_and_path(make_cfg, tmp_path, monkeypatch, form):
    missing = tmp_path / "no_such_model"
    if form == "nested":  # relative, but with two separators: no hub name (namespace/name) looks like it
        monkeypatch.chdir(tmp_path)
        missing = "models/bert/no_such_model"
    cfg = make_cfg(["experiment=ner_tiny", f"model.pretrained={missing}", "trainer.fast_dev_run=true"])
    with pytest.raises(
        InstantiationException, match=re.escape(f"model.pretrained={missing}: no such folder")
    ):
        train(cfg)


def test_pretrained_hub_names_pass_and_local_folders_resolve(tmp_path, monkeypatch):
    from imagen.models.ner import check_pretrained

    for name in ("bert-base-cased", "dslim/bert-base-NER"):  # left to from_pretrained (the hub)
        assert check_pretrained(name) == name
    folder = tmp_path / "enc"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert check_pretrained("~/enc") == str(folder)
    monkeypatch.chdir(tmp_path)
    assert check_pretrained("./enc") == "enc"
    for path in ("./nope", "../nope", "~/nope", "a/b/nope"):
        with pytest.raises(FileNotFoundError, match=re.escape(f"data.tokenizer={path}: no such folder")):
            check_pretrained(path, "data.tokenizer")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=re.escape("model.pretrained=./weights.bin is a file")):
        check_pretrained("./weights.bin")
