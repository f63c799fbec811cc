"""CPU smoke run of the NER benchmark (imagen stage vs. the HF run_ner recipe) on the packaged fixture."""

from __future__ import annotations

import json
import math

from imagen.bench.ner import main
from imagen.data.conll import fixture_dir, read_conll
from imagen.models.ner import tiny_random_encoder


def test_bench_runs_both_sides_and_reports_ratios(tmp_path, cache_dir):
    encoder = tiny_random_encoder(cache_dir / "ner_tiny_encoder")
    out = tmp_path / "bench"
    argv = [
        "--data-dir",
        fixture_dir(),
        "--encoder",
        encoder,
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
    ]
    results = main([*argv, "--output-dir", str(out), "--json", str(tmp_path / "bench.json")])

    assert json.loads((tmp_path / "bench.json").read_text()) == results
    ours, hf = results["imagen"], results["hf_recipe"]
    for side in (ours, hf):
        assert 0.0 <= side["f1"] <= 1.0
        assert 0 < side["train_seconds"] < side["total_seconds"]
    assert math.isfinite(results["train_time_ratio"]) and math.isfinite(results["f1_difference_points"])
    assert hf["test_words_truncated"] == 0
    # the imagen side is the real train.py run, with the settings given to both
    config = (out / "imagen" / ".hydra" / "config.yaml").read_text()
    assert "lr: 0.003" in config and "max_epochs: 2" in config and "batch_size: 8" in config
    metrics = json.loads((out / "imagen" / "metrics.json").read_text())
    assert metrics["test/f1"] == ours["f1"]


def test_make_tiny_encoder_uses_the_data_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    main(["--make-tiny-encoder", str(tmp_path / "enc"), "--data-dir", fixture_dir()])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "enc")
    words = {w for s in read_conll(f"{fixture_dir()}/train.txt") for w in s.tokens if w.isalnum()}
    # BERT splits off punctuation
    assert len(words) > 100 and all(tokenizer.tokenize(w) == [w] for w in words)
    assert tokenizer.tokenize("Zq") == ["Z", "##q"]  # unseen words split into characters
