"""NER stage: fine-tune a pretrained encoder + token-classification head on CoNLL-format data."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn as nn

from imagen.checkpoints import StageLoading, load_init_from, read_checkpoint, stage_info
from imagen.data.conll import IGNORE, ConllDataModule, NerWindows, tokenizer_files
from imagen.metrics import loss_mean
from imagen.metrics.ner import SCORING_MODES, entity_report, report_rows, report_table, token_report
from imagen.models.ner import NerTagger, check_pretrained, encoder_config_dict, usable_positions
from imagen.stages.evaluation import rows_to_evaluate, updates_over_ranks
from imagen.stages.finetune import FineTuningMixin
from imagen.stages.optim import FusedOptimizerClipping, build_optimizer, warmup_linear

log = logging.getLogger(__name__)


def stitch(
    dataset: NerWindows, flat_tags: list[int], labels: list[str]
) -> tuple[list[list[str]], list[list[str]]]:
    """Gold and predicted tags of the sentences whose every word was predicted (`flat_tags` -1: not predicted,
    e.g. with `trainer.limit_val_batches`)."""
    gold, pred = [], []
    for sentence, tags in zip(dataset.sentences, dataset.per_sentence(flat_tags), strict=True):
        if min(tags) >= 0:
            gold.append(sentence.tags)
            pred.append([labels[t] for t in tags])
    return gold, pred


class NerStage(StageLoading, FusedOptimizerClipping, FineTuningMixin, pl.LightningModule):
    """Token classification: `NerTagger` (encoder from `pretrained` + dropout + linear or CRF head).

    The head is sized in `setup()` from the datamodule's label list (`ConllDataModule.labels`). Validation and
    test predict every word once (windows are stitched back by word index) and log entity-level
    `split/precision`, `split/recall`, `split/f1` (seqeval, `scoring` = conlleval | strict); the test also logs
    `test/f1_<TYPE>` and writes per-type entity and per-tag token reports (printed, `ner_test_report.{txt,json}`
    in the run directory, and a table in loggers with `log_table`, i.e. W&B).

    The schedule is linear warmup over `warmup` (a fraction of the training steps, or a step count if >= 1)
    then linear decay to 0 at the last step; the total comes from the trainer (epochs x batches or max_steps).

    Fine-tuning (`FineTuningMixin`, applied once the head exists): `init_from` (the tagger, encoder and head, of
    another NER run trained with the same labels, loaded strictly; `pretrained` still gives the architecture and
    tokenizer), `freeze` (e.g. `[net.encoder.embeddings]`) and `lora` (adapters on the encoder's attention
    projections `query`, `key`, `value` of BERT-family encoders by default; the head and CRF train in full).
    """

    LORA_MODULES = ("net.encoder",)
    LORA_TARGETS = ("query", "key", "value")
    LOADER = "imagen.cli.sample_ner.load_ner_model(imagen.checkpoints.read_checkpoint(path))"

    def __init__(
        self,
        pretrained: str,
        optimizer: Callable[..., torch.optim.Optimizer],
        head: str = "linear",
        dropout: float = 0.1,
        weight_decay: float = 0.01,
        warmup: float = 0.1,
        scoring: str = "conlleval",
        freeze: list[str] | None = None,
        lora: dict | None = None,
        init_from: str | None = None,
        trust_checkpoint: bool = False,
    ):
        super().__init__()
        if scoring not in SCORING_MODES:
            raise ValueError(f"model.scoring={scoring!r} is unknown; choose from {SCORING_MODES}")
        self.save_hyperparameters(logger=False, ignore=["optimizer"])
        self.net = NerTagger.from_pretrained(check_pretrained(pretrained), head=head, dropout=dropout)
        self.optimizer_factory = optimizer
        self.labels: list[str] = []
        self.encoding: dict = {}
        self.tokenizer_files: dict[str, str | bytes] = {}
        self._predictions: torch.Tensor | None = (
            None  # (words in the split,) predicted label ids, -1: none yet
        )
        # `split/loss`: the loss of the whole split, each batch's weighted by what it is a mean over (see _eval_step)
        self.eval_loss = nn.ModuleDict({split: loss_mean() for split in ("val", "test")})

    # -- setup ----------------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, ConllDataModule):
            raise TypeError(
                f"the NER stage needs data=conll (a ConllDataModule), got {type(datamodule).__name__}"
            )
        datamodule.setup(stage)
        settings = datamodule.settings
        if settings.label_all_subtokens and self.hparams.head == "crf":
            raise ValueError(
                "model.head=crf tags words (first subtokens); it cannot be used with data.label_all_subtokens=true"
            )
        max_positions = usable_positions(self.net.encoder.config)
        if max_positions is not None and settings.max_length > max_positions:
            raise ValueError(
                f"data.max_length={settings.max_length} exceeds the encoder's {max_positions} positions"
            )
        if not self.labels:
            self.labels = list(datamodule.labels)
            self.net.set_num_labels(len(self.labels))
        elif datamodule.labels != self.labels:
            raise ValueError(
                f"the data's labels {datamodule.labels} differ from the model's {self.labels}; set data.labels"
            )
        self.encoding = asdict(settings)
        self.tokenizer_files = tokenizer_files(datamodule.tokenizer)

    def configure_model(self) -> None:
        """`init_from`, once the head is sized from the data's labels (`setup`); a resume's checkpoint, loaded
        after this, then wins. Then LoRA and freezing."""
        if self.hparams.init_from and not getattr(self, "_initialised", False):
            path = self.hparams.init_from
            checkpoint = read_checkpoint(path, self.hparams.trust_checkpoint)
            saved = stage_info(checkpoint, path, "ner").get("labels")  # refuses another stage's checkpoint
            if saved != self.labels:
                raise ValueError(
                    f"model.init_from={path} was trained with labels {saved}, the data has {self.labels}; "
                    "set data.labels to the run's"
                )
            load_init_from(self, path, "ner", ("net.",), checkpoint=checkpoint)
            self._initialised = True
        super().configure_model()

    def lora_trainable_default(self) -> list[str]:
        return ["net.head", *(["net.crf"] if self.net.crf is not None else [])]

    def configure_optimizers(self):
        optimizer = build_optimizer(self.optimizer_factory, self.net, self.hparams.weight_decay)
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError(
                "the NER schedule needs a finite length: set trainer.max_epochs or trainer.max_steps"
            )
        scheduler = warmup_linear(optimizer, self.hparams.warmup, int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- training -------------------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        _, loss = self.net(batch["input_ids"], batch["attention_mask"], batch["labels"])
        self.log("train/loss", loss, batch_size=batch["input_ids"].shape[0])
        return loss

    # -- evaluation -----------------------------------------------------------------------------------------------

    def _dataset(self, split: str) -> NerWindows:
        return self.trainer.datamodule.dataset(split)

    def _start(self, split: str) -> None:
        words = self._dataset(split).num_words
        self._predictions = torch.full((words,), -1, dtype=torch.long, device=self.device)

    def _eval_step(self, batch: dict, batch_idx: int, split: str) -> None:
        # Under DDP the sampler repeats windows at the end of some ranks' shares: left out, each window counts once
        if (batch := rows_to_evaluate(self.trainer, batch, batch_idx)) is None:
            return
        logits, loss = self.net(batch["input_ids"], batch["attention_mask"], batch["labels"])
        # The batch's loss is a mean over its scored tokens (linear head), or over its windows with a scored token
        # (CRF: a sequence's negative log-likelihood): weighted by that count, the epoch's is the whole split's.
        scored = batch["labels"] != IGNORE
        count = int((scored if self.net.crf is None else scored.any(dim=1)).sum())
        if count > 0:  # else its loss is nan (a mean over nothing), and its weight 0
            self.eval_loss[split].update(loss, weight=count)
        mask = batch["word_index"] >= 0  # (B, T) first subtokens of the windows' core words
        tags, _ = self.net.decode(logits, mask)
        self._predictions[batch["word_index"][mask]] = tags[mask]

    def _log_loss(self, split: str) -> None:
        """`split/loss` over all ranks, synchronised once: computed on every rank if any rank scored a token (a rank
        whose windows were all repeats of another's has none, yet takes part)."""
        loss = self.eval_loss[split]
        if updates_over_ranks(self.trainer, [loss])[0] > 0:
            self.log(f"{split}/loss", loss.compute(), sync_dist=False)  # the same on every rank
        loss.reset()

    def _end(self, split: str) -> None:
        self._log_loss(split)
        predictions = self._predictions
        if self.trainer.world_size > 1:  # each word was predicted on one rank (or the same on several)
            torch.distributed.all_reduce(predictions, op=torch.distributed.ReduceOp.MAX)
        dataset = self._dataset(split)
        gold, pred = stitch(dataset, predictions.tolist(), self.labels)
        if len(gold) < len(dataset.sentences):
            log.warning(
                f"{split}: scored {len(gold)} of {len(dataset.sentences)} sentences (the rest were not run)"
            )
        if not gold:  # no sentence was run to its end (limited batches): nothing to score
            self._predictions = None
            return
        entities = entity_report(gold, pred, self.hparams.scoring)
        micro = entities["micro avg"]
        values = {f"{split}/{k}": micro[k] for k in ("precision", "recall", "f1")}
        if split == "test":
            values |= {f"test/f1_{name}": v["f1"] for name, v in entities.items() if " avg" not in name}
        self.log_dict(values, prog_bar=split == "val", sync_dist=True)  # the same on every rank
        if split == "test" and self.trainer.is_global_zero:
            self._write_reports(entities, token_report(gold, pred, self.labels))
        self._predictions = None

    def _write_reports(self, entities: dict, tokens: dict) -> None:
        from rich.console import Console

        tables = [
            report_table(entities, f"test: entity-level scores ({self.hparams.scoring})"),
            report_table(tokens, "test: token-level scores per tag"),
        ]
        out = Path(self.trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ner_test_report.json").write_text(
            json.dumps({"entities": entities, "tokens": tokens}, indent=2) + "\n"
        )
        with open(out / "ner_test_report.txt", "w") as f:
            for console in (Console(), Console(file=f, width=100)):
                for table in tables:
                    console.print(table)
        for logger in self.trainer.loggers:
            if hasattr(logger, "log_table"):  # W&B; the other loggers have no tables
                for name, report in (("entity_report", entities), ("token_report", tokens)):
                    columns, rows = report_rows(report)
                    logger.log_table(key=f"test/{name}", columns=columns, data=rows)

    def on_validation_epoch_start(self) -> None:
        self._start("val")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._end("val")

    def on_test_epoch_start(self) -> None:
        self._start("test")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._end("test")

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain types only: `sample.py task=ner` rebuilds tokenizer, encoder and head from this offline, with
        # torch.load(weights_only=True), without the hub or the `pretrained` folder.
        checkpoint["imagen"] = {
            "stage": "ner",
            "labels": list(self.labels),
            "tagger": {"head": self.hparams.head, "dropout": self.hparams.dropout},
            "encoder_config": encoder_config_dict(self.net.encoder),
            "tokenizer_files": dict(self.tokenizer_files),
            "encoding": dict(self.encoding),
            "scoring": self.hparams.scoring,
            **self.finetuning_info(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("imagen", {}).get("labels")
        if (
            saved is not None and not self.labels
        ):  # NerStage.load_from_checkpoint: size the head before loading
            self.labels = list(saved)
            self.net.set_num_labels(len(saved))
        elif saved is not None and saved != self.labels:
            raise ValueError(
                f"the checkpoint was trained with labels {saved}, the data has {self.labels}; set data.labels"
            )
