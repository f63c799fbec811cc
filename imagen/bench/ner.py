"""The NER stage side by side with the Hugging Face `run_ner` recipe, on the same data, encoder and settings.

    python -m imagen.bench.ner --data-dir DIR --encoder NAME_OR_PATH [--epochs 5 --batch-size 16 --lr 2e-5]
    python -m imagen.bench.ner --make-tiny-encoder DIR [--data-dir DATA]   # a tiny random BERT for smoke runs

Each side runs in its own process, one after the other (the recipe first):
- recipe: `AutoModelForTokenClassification` + `Trainer` + `DataCollatorForTokenClassification`, labels on
  first subtokens, truncation at the model's maximum length, scored on the test split with seqeval like
  `run_ner` (over the labelled positions);
- imagen: `python -m imagen.cli.train experiment=ner_conll2003 ...`, F1 and fit time from its metrics.json.
Both use the same seed, epochs, batch size, LR, weight decay (not on biases and LayerNorm), linear warmup and
decay, gradient clipping at 1.0, and bf16 where the GPU has it; neither validates during training, saves
checkpoints or draws a progress bar. Training wall-clock is imagen's `time/fit_seconds` (reading and
tokenizing the data + training) vs. the recipe's tokenization of the training split + `Trainer.train()`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imagen.data.conll import SPLITS, label_list, load_tokenizer, read_conll, resolve_files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m imagen.bench.ner", description=__doc__.split("\n")[0])
    p.add_argument(
        "--data-dir", help="CoNLL files: eng.train/eng.testa/eng.testb or train.txt/valid.txt/test.txt"
    )
    for split in SPLITS:
        p.add_argument(f"--{split}", help=f"the {split} file, if named otherwise (relative to --data-dir)")
    p.add_argument("--encoder", help="the pretrained encoder: hub name or save_pretrained folder")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.1, help="warmup as a fraction of the training steps")
    p.add_argument(
        "--max-length",
        type=int,
        default=128,
        help="imagen's window length (the recipe truncates at the model's maximum)",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--output-dir", default=None, help="run directories of both sides (default: a temp folder)"
    )
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument(
        "--imagen-override", action="append", default=[], help="extra train.py override (repeatable)"
    )
    p.add_argument("--make-tiny-encoder", metavar="DIR", help="write a tiny random BERT to DIR and exit")
    p.add_argument("--side", choices=["both", "hf"], default="both", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.make_tiny_encoder and not (args.data_dir and args.encoder):
        p.error("--data-dir and --encoder are required (or --make-tiny-encoder DIR)")
    return args


def _files(args) -> dict[str, str]:
    return {s: getattr(args, s) for s in SPLITS if getattr(args, s)}


def run_recipe(args: argparse.Namespace, output_dir: Path) -> dict:
    """The Hugging Face `run_ner` recipe (in this process)."""
    import datasets
    import numpy as np
    import torch
    from transformers import (
        AutoModelForTokenClassification,
        DataCollatorForTokenClassification,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from imagen.metrics.ner import entity_report

    splits = {split: read_conll(path) for split, path in resolve_files(args.data_dir, _files(args)).items()}
    labels = label_list(splits)
    label_id = {t: i for i, t in enumerate(labels)}
    set_seed(args.seed)
    tokenizer = load_tokenizer(args.encoder)
    model = AutoModelForTokenClassification.from_pretrained(
        args.encoder, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_id
    )
    max_length = min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 512))

    def encode(batch):  # run_ner's tokenize_and_align_labels with label_all_tokens=False
        enc = tokenizer(batch["tokens"], truncation=True, max_length=max_length, is_split_into_words=True)
        enc["labels"] = []
        for i, tags in enumerate(batch["tags"]):
            previous, row = None, []
            for word in enc.word_ids(i):
                row.append(-100 if word is None or word == previous else tags[word])
                previous = word
            enc["labels"].append(row)
        return enc

    def dataset(split: str):
        rows = {
            "tokens": [s.tokens for s in splits[split]],
            "tags": [[label_id[t] for t in s.tags] for s in splits[split]],
        }
        return datasets.Dataset.from_dict(rows).map(encode, batched=True, remove_columns=["tokens", "tags"])

    training_args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        num_train_epochs=args.epochs,
        warmup_steps=args.warmup,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        eval_strategy="no",
        save_strategy="no",
        logging_steps=50,
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
    )
    start = time.perf_counter()
    train_set = dataset("train")
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        data_collator=DataCollatorForTokenClassification(tokenizer),
        processing_class=tokenizer,
    )
    trainer.train()
    train_seconds = time.perf_counter() - start

    output = trainer.predict(dataset("test"))
    predictions = np.argmax(output.predictions, axis=-1)
    gold, pred = [], []
    for p_row, g_row in zip(predictions, output.label_ids, strict=True):
        keep = g_row != -100
        gold.append([labels[g] for g in g_row[keep]])
        pred.append([labels[p] for p in p_row[keep]])
    words = sum(len(s.tokens) for s in splits["test"])
    micro = entity_report(gold, pred)["micro avg"]
    return {
        "f1": micro["f1"],
        "precision": micro["precision"],
        "recall": micro["recall"],
        "train_seconds": train_seconds,
        "test_words_truncated": words - sum(len(g) for g in gold),
    }


def imagen_overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    overrides = [
        "experiment=ner_conll2003",
        f"data.data_dir={Path(args.data_dir).resolve()}",
        f"model.pretrained={args.encoder}",
        f"trainer.max_epochs={args.epochs}",
        f"data.batch_size={args.batch_size}",
        f"data.max_length={args.max_length}",
        f"model.optimizer.lr={args.lr}",
        f"model.weight_decay={args.weight_decay}",
        f"model.warmup={args.warmup}",
        f"seed={args.seed}",
        f"hydra.run.dir={run_dir}",
        # as the recipe: no validation during training, no checkpoints, no progress bar, no logger
        "trainer.limit_val_batches=0",
        "callbacks.model_checkpoint=null",
        "callbacks.rich_progress_bar=null",
        "callbacks.learning_rate_monitor=null",
        "+trainer.enable_checkpointing=false",
        "+trainer.enable_progress_bar=false",
        "~logger",
        "extras.print_config=false",
    ]
    files = _files(args)
    if files:
        overrides.append("data.files={" + ",".join(f"{k}:{v}" for k, v in files.items()) + "}")
    return overrides + list(args.imagen_override)


def _run(command: list[str]) -> float:
    # one GPU for both sides: the HF Trainer would otherwise spread over all visible GPUs (DataParallel)
    env = os.environ | {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    return time.perf_counter() - start


def run_both(args: argparse.Namespace, argv: list[str]) -> dict:
    output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="ner_bench_"))
    output_dir.mkdir(parents=True, exist_ok=True)
    result_file = output_dir / "hf_result.json"
    hf_total = _run(
        [sys.executable, "-m", "imagen.bench.ner", *argv, "--side", "hf", "--result", str(result_file)]
    )
    hf = json.loads(result_file.read_text()) | {"total_seconds": hf_total}

    run_dir = output_dir / "imagen"
    imagen_total = _run([sys.executable, "-m", "imagen.cli.train", *imagen_overrides(args, run_dir)])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ours = {
        "f1": metrics["test/f1"],
        "precision": metrics["test/precision"],
        "recall": metrics["test/recall"],
        "train_seconds": metrics["time/fit_seconds"],
        "total_seconds": imagen_total,
    }
    return {
        "date": datetime.date.today().isoformat(),
        "command": "python -m imagen.bench.ner " + " ".join(argv),
        "device": _device(),
        "settings": {
            k: getattr(args, k)
            for k in ("epochs", "batch_size", "lr", "weight_decay", "warmup", "max_length", "seed")
        },
        "imagen": ours,
        "hf_recipe": hf,
        "f1_difference_points": 100 * (ours["f1"] - hf["f1"]),
        "train_time_ratio": ours["train_seconds"] / hf["train_seconds"],
        "total_time_ratio": ours["total_seconds"] / hf["total_seconds"],
    }


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def print_results(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"NER: imagen vs. HF run_ner recipe ({results['device']})")
    for column in ("", "test F1", "precision", "recall", "train s", "total s"):
        table.add_column(column, justify="right")
    for name, key in (("imagen", "imagen"), ("HF recipe", "hf_recipe")):
        r = results[key]
        table.add_row(
            name,
            *(f"{r[k]:.4f}" for k in ("f1", "precision", "recall")),
            f"{r['train_seconds']:.1f}",
            f"{r['total_seconds']:.1f}",
        )
    Console().print(table)
    Console().print(
        f"F1 difference (imagen - recipe): {results['f1_difference_points']:+.2f} points; "
        f"train time ratio {results['train_time_ratio']:.3f}; total time ratio {results['total_time_ratio']:.3f}"
    )


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.make_tiny_encoder:
        from imagen.models.ner import tiny_random_encoder

        words = None
        if args.data_dir:
            words = [
                w for s in read_conll(resolve_files(args.data_dir, _files(args))["train"]) for w in s.tokens
            ]
        print(tiny_random_encoder(args.make_tiny_encoder, words))
        return None
    if args.side == "hf":
        result = run_recipe(args, Path(args.result).parent / "hf")
        Path(args.result).write_text(json.dumps(result, indent=2) + "\n")
        return result
    results = run_both(args, argv)
    print_results(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
