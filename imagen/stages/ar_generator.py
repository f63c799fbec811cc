"""Stage 2: text encoder + autoregressive transformer over the frozen autoencoder's image tokens."""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict

import lightning.pytorch as pl
import torch
import torch.nn as nn
from torchmetrics import MeanMetric
from torchmetrics.image.fid import FrechetInceptionDistance

from imagen.checkpoints import (
    CheckpointError,
    StageLoading,
    check_config,
    load_autoencoder,
    load_init_from,
    load_state_strict,
    read_checkpoint,
    stage_info,
    warn_image_size,
)
from imagen.data.shapes import Scene
from imagen.distributed import sum_over_ranks
from imagen.inference import inference
from imagen.metrics import loss_mean
from imagen.metrics.judge import Judge
from imagen.models.ar_transformer import ARConfig, ARTransformer
from imagen.models.autoencoder import Autoencoder, AutoencoderConfig
from imagen.models.judge import JudgeFeatures
from imagen.models.text_encoder import CaptionTokenizer, TextStates
from imagen.sampling.ar import (
    IMAGE_SEED_STRIDE,
    SamplingSettings,
    compiled_decode_step,
    generate,
    reusable_cache,
)
from imagen.stages.evaluation import rows_to_evaluate, updates_over_ranks
from imagen.stages.finetune import FineTuningMixin
from imagen.stages.optim import FusedOptimizerClipping, build_optimizer

log = logging.getLogger(__name__)


def cpp_compiler() -> str:
    """The C++ compiler command inductor builds CPU kernels with: `$CXX` (may be a command line, "ccache g++") or g++."""
    return os.environ.get("CXX") or "g++"


def has_cpp_compiler() -> bool:
    """Whether `cpp_compiler()`'s program (its first word) is on the PATH."""
    return shutil.which(cpp_compiler().split()[0]) is not None


# Groups of evaluation prompts a datamodule may offer (its `prompt_groups`), and the suffix of their metrics:
# seen compositions, held-out compositions, a concept new to a fine-tuned model (`judge_acc_new`).
GROUP_SUFFIX = {"seen": "", "heldout": "_heldout", "new": "_new"}
# On CPU, scoring many sequences runs 2-3x faster 64 rows at a time than 1024 (activations that stay in cache;
# BENCHMARKS.md); a GPU takes them all at once.
CPU_FORWARD_ROWS = 64


def module_spec(module: nn.Module) -> dict:
    """`{_target_, **init_args}` of a module that records its constructor arguments in `init_args`."""
    cls = type(module)
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **module.init_args}


class FrozenAutoencoderMixin:
    """A frozen first stage: kept in eval mode whatever the trainer asks (taming-transformers' rule), and in float32
    whatever dtype the rest is cast to (`trainer.precision=bf16-true` casts every weight): its tokens are computed
    in float32, the tokens the token cache and sampling see."""

    def train(self, mode: bool = True):
        super().train(mode)
        self.autoencoder.eval()
        return self

    def _apply(self, fn, recurse: bool = True):
        """`fn` (a move, a cast) on everything but the autoencoder, which only follows a move to another device."""
        modules = self._modules
        object.__setattr__(self, "_modules", {k: v for k, v in modules.items() if k != "autoencoder"})
        try:
            super()._apply(fn, recurse)
        finally:
            object.__setattr__(self, "_modules", modules)  # the same dict: the modules' order is kept
        if recurse and "autoencoder" in modules:
            device = next(self.autoencoder.parameters()).device
            self.autoencoder.to(fn(torch.zeros((), device=device)).device)
        return self


class ARGeneratorStage(
    StageLoading, FusedOptimizerClipping, FrozenAutoencoderMixin, FineTuningMixin, pl.LightningModule
):
    """Trains `net` to write the autoencoder's tokens of an image given its caption.

    `net` is an `ARTransformer` or a partial that receives the derived `vocab_size`, `grid_size` and `text_dim` (and,
    with `code_vectors`, `code_dim`: the net adds the autoencoder's code vector of each input token to its embedding).
    Validation and test log the NLL in bits per token and, when the datamodule has a judge (shapes data), the judge
    accuracy of images generated with guidance for fixed prompts of each group (`GROUP_SUFFIX`: seen and held-out
    compositions, a new concept), the judge accuracy of the autoencoder's reconstructions of the same prompts'
    real images (`judge_acc_recon`: what generation can reach at best), plus an FID on the judge's features.
    Training: caption dropout `cond_drop_prob` (for guidance) and `token_noise` (`noised_inputs`).

    Fine-tuning: `init_from` (another run of this stage; without `autoencoder_ckpt` its autoencoder too),
    `freeze` and `lora` (`FineTuningMixin`; LoRA defaults to the attention and MLP layers of `net`).
    """

    MODULE_ARGS: tuple[str, ...] = ()  # a subclass's further constructor arguments that are modules
    LORA_MODULES = ("net",)
    LOADER = "ARGeneratorStage.from_checkpoint(path) (JointStage.from_checkpoint for a joint checkpoint)"
    LORA_TARGETS = ("q", "kv", "proj", "mlp.0", "mlp.2")

    def __init__(
        self,
        net: ARTransformer | Callable[..., ARTransformer],
        text_encoder: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        autoencoder_ckpt: str | None = None,
        autoencoder_config: dict | None = None,
        image_size: int = 32,
        cond_drop_prob: float = 0.1,
        token_noise: float = 0.0,
        weight_decay: float = 0.05,
        sampling: dict | None = None,
        eval_prompts: int = 64,
        test_prompts: int = 512,
        eval_batch_size: int = 256,
        eval_seed: int = 1234,
        compute_fid: bool = True,
        compile: bool = False,
        compile_options: dict | None = None,
        init_from: str | None = None,
        trust_checkpoint: bool = False,
        freeze: list[str] | None = None,
        lora: dict | None = None,
        code_vectors: bool = False,
        new_words_like: list[str] | None = None,
        image_text_lr: float | None = None,
    ):
        super().__init__()
        # the joint stage's setting: null is accepted, as an experiment for both stages gives it
        if image_text_lr is not None:
            raise ValueError(
                f"model.image_text_lr={image_text_lr}: the generator stage has no captioner or matcher"
            )
        if not 0 <= token_noise < 1:
            raise ValueError(f"model.token_noise must be in [0, 1); got {token_noise}")
        # modules travel in the state dict, factories in the config: neither belongs in the hyperparameters
        ignore = ["net", "text_encoder", "optimizer", "scheduler", *self.MODULE_ARGS]
        self.save_hyperparameters(logger=False, ignore=ignore)
        if autoencoder_ckpt:
            checkpoint = read_checkpoint(autoencoder_ckpt, trust_checkpoint)
            self.autoencoder = load_autoencoder(autoencoder_ckpt, trust_checkpoint, checkpoint)
            warn_image_size(checkpoint, autoencoder_ckpt, image_size, "model.autoencoder_ckpt")
        elif (
            autoencoder_config is not None
        ):  # rebuilt from this stage's own checkpoint, which holds its weights
            self.autoencoder = (
                Autoencoder(AutoencoderConfig(**autoencoder_config)).eval().requires_grad_(False)
            )
        elif init_from:
            # fine-tuning: the autoencoder of the run it starts from (its weights load with init_from)
            # read once: configure_model loads the weights from these contents, then drops them
            self._init_checkpoint = read_checkpoint(init_from, trust_checkpoint)
            info = stage_info(self._init_checkpoint, init_from, self.STAGE)
            self.autoencoder = (
                Autoencoder(AutoencoderConfig(**info["autoencoder_config"])).eval().requires_grad_(False)
            )
        else:
            raise ValueError(
                "model.autoencoder_ckpt is required: the path of a trained autoencoder checkpoint, e.g. "
                "model.autoencoder_ckpt=logs/shapes_autoencoder/runs/<run>/checkpoints/last.ckpt"
            )
        f = self.autoencoder.downsample_factor
        if image_size % f:
            raise ValueError(f"data.image_size={image_size} is not divisible by the autoencoder's factor {f}")
        self.text_encoder = text_encoder
        if isinstance(net, ARTransformer):
            self.net = net
        else:
            codes = self.autoencoder.code_vectors() if code_vectors else None
            self.net = net(
                vocab_size=self.autoencoder.vocab_size,
                grid_size=(image_size // f,) * 2,
                text_dim=text_encoder.dim,
                code_dim=0 if codes is None else codes.shape[1],
            )
            if codes is not None:  # a checkpoint's own vectors replace these when its state dict loads
                self.net.set_code_vectors(codes)
        c = self.net.config
        if c.vocab_size != self.autoencoder.vocab_size or c.text_dim != text_encoder.dim:
            raise ValueError(
                f"generator vocab_size={c.vocab_size}/text_dim={c.text_dim} do not match the autoencoder's "
                f"{self.autoencoder.vocab_size} codes / the text encoder's width {text_encoder.dim}"
            )
        if c.conditioning == "prefix" and text_encoder.max_length > c.max_text_length:
            raise ValueError(
                f"model.text_encoder.max_length={text_encoder.max_length} is over model.net.max_text_length="
                f"{c.max_text_length}, the text positions of prefix conditioning: longer captions would be cut; "
                "raise model.net.max_text_length or lower model.text_encoder.max_length"
            )
        if tuple(c.grid_size) != (image_size // f,) * 2:
            raise ValueError(
                f"generator grid_size={tuple(c.grid_size)} does not match data.image_size={image_size} over the "
                f"autoencoder's factor {f}: {(image_size // f,) * 2}"
            )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.sampling = SamplingSettings(**(sampling or {}))
        # on a GPU, the decode step compiled and replayed as CUDA graphs (`sample.py compile_decode=` sets it too)
        self.compile_decode = compile
        judged = {
            f"{name}{s}{kind}": MeanMetric()
            for s in GROUP_SUFFIX.values()
            for name, kind in (("judge_acc", ""), ("judge_acc", "_recon"), ("binding_acc", ""))
        }
        self.metrics = nn.ModuleDict(  # a diverged batch's nan stays in nll
            {split: nn.ModuleDict({"nll": loss_mean(), **judged}) for split in ("val", "test")}
        )

    # -- conditioning and tokens --------------------------------------------------------------------------------------

    def encode_text(self, captions: list[str]) -> TextStates:
        return self.text_encoder(captions)

    @torch.no_grad()  # the frozen autoencoder is in eval mode whatever the stage's mode
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, h * w) token ids in raster order, in float32 under the Trainer's bf16 too: the tokens
        the token cache, sampling and the epoch-end evaluations see (bf16 moves latents near a boundary to another
        code)."""
        with torch.autocast(images.device.type, enabled=False):
            return self.autoencoder.encode(images.float()).flatten(1)

    def configure_model(self) -> None:
        """`init_from`: the trained modules (`trained_modules()`, a subclass's too; the autoencoder when no
        `autoencoder_ckpt` is given) start from another run of this stage, loaded strictly (a resume's checkpoint,
        loaded after this, then wins); words of the training captions its tokenizer lacks are added. Then the
        LoRA adapters and freezing (`apply_finetuning`). With `compile`, each Transformer block is compiled
        (regional `torch.compile`); on a GPU the sampler's decode step is compiled at its first use
        (`generate_tokens`)."""
        if self.hparams.init_from and not getattr(self, "_initialised", False):
            names = [*self.init_from_modules(), *([] if self.hparams.autoencoder_ckpt else ["autoencoder"])]
            prefixes = tuple(f"{name}." for name in names)
            path = str(self.hparams.init_from)
            checkpoint = self.__dict__.pop("_init_checkpoint", None)
            if checkpoint is None:
                checkpoint = read_checkpoint(path, self.hparams.trust_checkpoint)
            # settings first: a differing one is named, where the strict load would only list keys
            self.check_net_config(stage_info(checkpoint, path, self.STAGE), path, "model.init_from")
            if self.hparams.autoencoder_ckpt:
                self.check_same_tokens(checkpoint, path)
            load_init_from(
                self, path, self.STAGE, prefixes, self.hparams.trust_checkpoint, checkpoint=checkpoint
            )
            self.add_new_words()
            self._initialised = True
        # here rather than in setup(): a weight-averaging callback copies the module right after this hook
        self.fit_tokenizers()
        self.apply_finetuning()
        if self.hparams.compile and not getattr(self, "_compiled", False):
            device = self.trainer.strategy.root_device if self._trainer is not None else self.device
            if self._can_compile(device):
                self.net.compile_blocks(device.type, **(self.hparams.compile_options or {}))
            self._compiled = True

    def _can_compile(self, device: torch.device) -> bool:
        """inductor builds CPU kernels with a C++ compiler; without one the blocks train eagerly (the same
        numbers, ~10% slower on the shapes generator), and a warning says so."""
        backend = (self.hparams.compile_options or {}).get("backend", "inductor")
        if device.type == "cpu" and backend == "inductor" and not has_cpp_compiler():
            log.warning(f"model.compile=true: no C++ compiler ({cpp_compiler()!r}; set CXX to choose one) for torch.compile "
                        "on CPU, so the blocks run eagerly; model.compile=false silences this")  # fmt: skip
            return False
        return True

    def caption_tokenizers(self) -> list[tuple[CaptionTokenizer, list[torch.Tensor]]]:
        """The trained word-level tokenizers of this stage, each with its weight tables that hold one row per token
        id (embeddings, output layers), whose first dimension bounds the vocabulary (a subclass adds its own)."""
        tokenizer = getattr(self.text_encoder, "tokenizer", None)
        if isinstance(tokenizer, CaptionTokenizer) and tokenizer.trained:
            return [(tokenizer, [self.text_encoder.token_emb.weight])]
        return []

    def add_new_words(self) -> None:
        """Add the words of the training captions that a restored tokenizer lacks (a new concept to fine-tune on);
        their rows, unused so far, are learned from here on. With `new_words_like`, they start at the mean row of
        those known words (textual inversion's start from a coarse descriptor: a new color word from the colors)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if not hasattr(datamodule, "train_captions"):
            return
        captions = datamodule.train_captions()
        for tokenizer, tables in self.caption_tokenizers():
            words = tokenizer.add_words(captions, tables[0].shape[0])
            if not words:
                continue
            log.info(f"added {len(words)} new word(s) to the caption tokenizer: {', '.join(words[:20])}")
            like = self.hparams.new_words_like
            if like:
                like_ids = [tokenizer.token_id(word, "model.new_words_like") for word in like]
                new_ids = [tokenizer.token_id(word) for word in words]
                with torch.no_grad():
                    for table in tables:
                        table[new_ids] = table[like_ids].mean(0)

    def batch_tokens(self, batch: dict) -> torch.Tensor:
        """(B, h * w) tokens: pre-tokenized (`tokens`, from the token cache) or encoded from `image`."""
        return batch["tokens"] if "tokens" in batch else self.image_tokens(batch["image"])

    def init_from_modules(self) -> list[str]:
        """The submodules `model.init_from` restores: the trained ones (a subclass adds its own state)."""
        return list(self.trained_modules())

    def check_net_config(self, info: dict, source: str, key: str) -> None:
        """The transformer described by a checkpoint's `imagen` entry must be this one: settings without weights of
        their own (RoPE) would otherwise load strictly and silently compute something else."""
        if "net_config" not in info:
            return
        check_config(
            ARConfig(**info["net_config"]), self.net.config, "model.net", f"{key}: {source} holds a transformer",
            "e.g. model.net.rope=false for checkpoints written before RoPE, model.code_vectors=false for those "
            "written before code vectors",
        )  # fmt: skip

    def check_same_tokens(self, checkpoint: dict, source: str) -> None:
        """`model.init_from` with a `model.autoencoder_ckpt` of its own: that autoencoder must turn images into the
        tokens the checkpoint was trained on. Its encoder and codebook must equal the ones the checkpoint holds (a
        decoder trained further is fine); another autoencoder of the same vocabulary size would load and train on
        codes that mean other images."""
        state = checkpoint["state_dict"]

        def same(name: str, ours: torch.Tensor) -> bool:
            """Compared as the checkpoint stored them (under bf16-true: rounded)."""
            theirs = state.get(f"autoencoder.{name}")
            return (
                theirs is not None
                and theirs.shape == ours.shape
                and torch.equal(theirs, ours.to(theirs.dtype))
            )

        own = self.autoencoder.state_dict().items()
        differing = [name for name, ours in own if not name.startswith("decoder.") and not same(name, ours)]
        if differing:
            raise CheckpointError(
                f"model.autoencoder_ckpt={self.hparams.autoencoder_ckpt} is not the autoencoder that "
                f"model.init_from={source} was trained with: its encoder or codebook differs "
                f"({', '.join(differing[:3])}{', ...' if len(differing) > 3 else ''}), so its tokens mean other "
                "images. Leave model.autoencoder_ckpt unset (null) to use the checkpoint's own autoencoder"
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resume (`ckpt_path`) must build the same networks the checkpoint holds; Lightning calls this after
        `configure_model` and before its strict load, whose key lists would not say which setting differs."""
        info = checkpoint.get("imagen") or {}
        self.check_net_config(info, "the checkpoint being resumed", "ckpt_path")
        theirs, ours = info.get("lora"), self.finetuning_info()["lora"]
        if theirs != ours:
            raise ValueError(
                f"ckpt_path: the checkpoint being resumed was trained with model.lora={theirs}, this run has "
                f"model.lora={ours}; resume with the same model.lora"
            )

    def fit_tokenizers(self) -> None:
        """Train the caption tokenizers on the training captions (once; a restored tokenizer is kept)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if hasattr(self.text_encoder, "fit_tokenizer") and hasattr(datamodule, "train_captions"):
            self.text_encoder.fit_tokenizer(datamodule.train_captions())

    # -- training -----------------------------------------------------------------------------------------------------

    def noised_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """The teacher-forced inputs of a training step: `tokens` (B, N) with each replaced by a uniformly drawn code
        with probability `token_noise` (the targets stay the true tokens). The model learns to continue from
        prefixes with mistakes in them, as its own samples have."""
        p = self.hparams.token_noise
        if not p:
            return tokens
        replaced = torch.rand(tokens.shape, device=tokens.device) < p
        return torch.where(replaced, torch.randint_like(tokens, self.net.config.vocab_size), tokens)

    def generation_loss(self, tokens: torch.Tensor, text: TextStates) -> torch.Tensor:
        """The training loss of the generator: cross-entropy of `tokens` (B, N) given their captions' `text`, teacher
        forced on `noised_inputs`, with caption dropout `cond_drop_prob`."""
        _, loss = self.net(
            self.noised_inputs(tokens),
            text.states,
            text.mask,
            targets=tokens,
            cond_drop_prob=self.hparams.cond_drop_prob,
        )
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        tokens = self.batch_tokens(batch)
        loss = self.generation_loss(tokens, self.encode_text(batch["caption"]))
        self.log("train/loss", loss, prog_bar=True, batch_size=tokens.shape[0])
        return loss

    def trained_modules(self) -> nn.ModuleDict:
        """The modules the optimizer updates (subclasses add theirs)."""
        return nn.ModuleDict({"net": self.net, "text_encoder": self.text_encoder})

    def group_lrs(self) -> dict[str, float]:
        """Learning rates of trained modules that do not use the optimizer's own (subclasses set them)."""
        return {}

    def configure_optimizers(self):
        optimizer = build_optimizer(
            self.optimizer_factory, self.trained_modules(), self.hparams.weight_decay, self.group_lrs()
        )
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"},
        }

    # -- sampling -----------------------------------------------------------------------------------------------------

    @inference
    def generate_tokens(
        self,
        text: TextStates,
        settings: SamplingSettings | None = None,
        generator: torch.Generator | None = None,
        seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image tokens (B, h * w) for encoded captions, sampled with the KV cache; the draws from `generator` or
        from per-image `seeds` (`generate`). With `compile_decode` (from `model.compile`) on a GPU, each token's step
        is one CUDA graph, and the module keeps a KV cache per batch size for the graphs to reuse."""
        settings, step, cache = settings or self.sampling, None, None
        if self.compile_decode and text.states.is_cuda:
            if getattr(self, "_decode_step", None) is None:
                self._decode_step, self._sampling_caches = compiled_decode_step(), {}
            step = self._decode_step
            cache = reusable_cache(self._sampling_caches, self.net, text.states, settings)
        return generate(
            self.net, text.states, text.mask, settings, generator, decode_step=step, cache=cache, seeds=seeds
        )

    @inference
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h * w) tokens -> images (B, 3, H, W) in [-1, 1] through the autoencoder's decoder."""
        h, w = self.net.config.grid_size
        if tokens.ndim != 2 or tokens.shape[1] != h * w:
            raise ValueError(
                f"tokens of shape {tuple(tokens.shape)}: decode_tokens reads (B, {h * w}), a {h}x{w} grid"
            )
        return self.autoencoder.decode(tokens.view(-1, h, w))

    @inference
    def generate_images(
        self,
        captions: list[str],
        settings: SamplingSettings | None = None,
        generator: torch.Generator | None = None,
        seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Captions -> images (B, 3, H, W) in [-1, 1]; the draws from `generator` or per-image `seeds`."""
        return self.decode_tokens(
            self.generate_tokens(self.encode_text(captions), settings, generator, seeds)
        )

    @inference
    def token_logprob(self, tokens: torch.Tensor, text: TextStates) -> torch.Tensor:
        """(B,) mean log-probability of the tokens under the caption-conditional model (no guidance)."""
        rows = CPU_FORWARD_ROWS if tokens.device.type == "cpu" else len(tokens)
        out = []
        for s in range(0, len(tokens), rows):
            part = tokens[s : s + rows]
            logits, _ = self.net(part, text.states[s : s + rows], text.mask[s : s + rows])
            out.append(logits.float().log_softmax(-1).gather(-1, part[..., None]).squeeze(-1).mean(-1))
        return torch.cat(out)

    @inference
    def unconditional_token_logprob(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) mean log-probability of the tokens given the empty caption (the unconditional half of guidance)."""
        states, mask = self.net.null_condition(len(tokens), 1, tokens.device)
        return self.token_logprob(tokens, TextStates(states, mask))

    def _eval_generator(self) -> torch.Generator:
        # a private generator: sampling during validation never touches the global RNG used by training
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.hparams.eval_seed + self.global_rank)
        return generator

    def _prompt_seeds(self, numbers: list[int]) -> torch.Tensor:
        """(B,) the seeds of evaluation prompts by their number in the group's list: an image's draws depend on its
        prompt and `eval_seed` alone, not on the number of processes or the batch it is sampled in."""
        seeds = [self.hparams.eval_seed + k * IMAGE_SEED_STRIDE for k in numbers]
        return torch.tensor(seeds, dtype=torch.long, device=self.device)

    # -- evaluation ---------------------------------------------------------------------------------------------------

    def _eval_step(self, batch: dict, split: str) -> None:
        tokens = self.batch_tokens(batch)
        text = self.encode_text(batch["caption"])
        _, loss = self.net(tokens, text.states, text.mask, targets=tokens)
        self.metrics[split]["nll"].update(loss / math.log(2), weight=tokens.shape[0])

    def _prompt_groups(self) -> tuple[str, ...]:
        datamodule = getattr(self.trainer, "datamodule", None)
        groups = tuple(getattr(datamodule, "prompt_groups", ("seen", "heldout")))
        unknown = [g for g in groups if g not in GROUP_SUFFIX]
        if unknown:
            raise ValueError(
                f"{type(datamodule).__name__}.prompt_groups: unknown {unknown}; known {list(GROUP_SUFFIX)}"
            )
        return groups

    def _judge_generated(self, split: str) -> dict[str, torch.Tensor]:
        """Generate for this rank's share of the fixed prompts of each group; score them and the autoencoder's
        reconstructions of their real images with the judge, and FID of the images of seen prompts against the
        real images of the same prompts, on the judge's features."""
        datamodule = getattr(self.trainer, "datamodule", None)
        judge = getattr(datamodule, "judge", None)
        if judge is None or not hasattr(datamodule, "eval_prompts"):
            return {}
        limit = self.hparams.eval_prompts if split == "val" else self.hparams.test_prompts
        judge.to(self.device)
        # not a submodule: the judge's weights must not enter this stage's checkpoints
        fid = FrechetInceptionDistance(feature=JudgeFeatures(judge.net), sync_on_compute=True).to(self.device)
        rank, world, step = self.global_rank, self.trainer.world_size, self.hparams.eval_batch_size
        for group in self._prompt_groups():
            key = f"judge_acc{GROUP_SUFFIX[group]}"
            captions, scenes, real = datamodule.eval_prompts(split, group=group, limit=limit)
            numbers = list(range(len(captions)))[rank::world]  # this rank's share, by prompt number
            captions, scenes, real = captions[rank::world], scenes[rank::world], real[rank::world]
            for i in range(0, len(captions), step):
                seeds = self._prompt_seeds(numbers[i : i + step])
                images = self._judged_images(
                    split, group, captions[i : i + step], scenes[i : i + step], judge, seeds
                )
                self.metrics[split][key].update(judge.matches(images, scenes[i : i + step]).float())
                self._score_generated(split, group, images, scenes[i : i + step])
                reference = real[i : i + step].to(self.device)
                recon = self.autoencoder(reference)[0].clamp(-1, 1)
                self.metrics[split][f"{key}_recon"].update(judge.matches(recon, scenes[i : i + step]).float())
                if self.hparams.compute_fid and group == "seen":
                    fid.update(images, real=False)
                    fid.update(reference, real=True)
        # compute() gathers the features of every rank, so every rank must call it: decide on the count of all ranks
        if (
            self.hparams.compute_fid
            and sum_over_ranks(self.trainer, [int(fid.fake_features_num_samples)])[0] > 1
        ):
            return {f"{split}/fid": fid.compute()}
        return {}

    def _judged_images(
        self,
        split: str,
        group: str,
        captions: list[str],
        scenes: list[Scene],
        judge: Judge,
        seeds: torch.Tensor,
    ) -> torch.Tensor:
        """One image per prompt for `judge_acc`, drawn from the prompts' `seeds` (a subclass also judges further
        samples of the same prompts)."""
        return self.generate_images(captions, seeds=seeds)

    def _score_generated(self, split: str, group: str, images: torch.Tensor, scenes: list[Scene]) -> None:
        """Further scores of images generated for prompts of `group` (a subclass's: the round trip)."""

    def _eval_epoch_start(self, split: str) -> None:
        # Generation is scored when the epoch starts, after a weight-averaging callback (EMA) swapped its weights in;
        # Lightning's own averaging callback swaps them back out before the module's on_*_epoch_end (EMAWeights keeps
        # them in until on_validation_end).
        self._generated_values = {split: self._judge_generated(split)}
        self._score_binding(split)

    @torch.no_grad()
    def _score_binding(self, split: str) -> None:
        """`binding_acc`: on this rank's share of the datamodule's `binding_pairs` (two-object prompts, and their
        image with the objects' attributes swapped), the fraction where the caption makes the true image's tokens
        more likely (teacher-forced, no guidance). 50% is a model that reads the caption as a bag of attributes."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "binding_pairs"):
            return
        limit = self.hparams.eval_prompts if split == "val" else self.hparams.test_prompts
        rank, world, step = self.global_rank, self.trainer.world_size, self.hparams.eval_batch_size
        for group in self._prompt_groups():
            captions, images, swapped = datamodule.binding_pairs(split, group=group, limit=limit)
            captions, images, swapped = captions[rank::world], images[rank::world], swapped[rank::world]
            for i in range(0, len(captions), step):
                text = self.encode_text(captions[i : i + step])
                true = self.token_logprob(self.image_tokens(images[i : i + step].to(self.device)), text)
                other = self.token_logprob(self.image_tokens(swapped[i : i + step].to(self.device)), text)
                self.metrics[split][f"binding_acc{GROUP_SUFFIX[group]}"].update((true > other).float())

    def _eval_epoch_end(self, split: str) -> None:
        values = getattr(self, "_generated_values", {}).pop(split, {})
        metrics = self.metrics[split]
        # A metric is computed if any rank updated it, on every rank: a rank with no prompts of a group (fewer prompts
        # than ranks) or no batch of a group must still take part, else the others wait for it; every rank then logs
        # the same keys.
        updates = updates_over_ranks(self.trainer, metrics.values())
        for (name, metric), count in zip(metrics.items(), updates, strict=True):
            if count > 0:
                values[f"{split}/{name if name != 'nll' else 'nll_bits'}"] = metric.compute()
            metric.reset()
        self.log_dict(values, prog_bar=split == "val", sync_dist=False)

    def _eager_evaluation(self, on: bool) -> None:
        """With `compile` on CPU, evaluation runs the compiled blocks eagerly: its shapes (prompt batches, the
        sampler's one-token steps) differ from training's, and compiling for them takes longer than it saves (6 s
        against 0.8 s for sampling 32 prompts). On a GPU the sampler's compiled decode step is worth it."""
        if self.hparams.compile and self.device.type == "cpu":
            torch.compiler.set_stance("force_eager" if on else "default")

    def on_validation_start(self) -> None:
        self._eager_evaluation(True)

    def on_validation_end(self) -> None:
        self._eager_evaluation(False)

    def on_test_start(self) -> None:
        self._eager_evaluation(True)

    def on_test_end(self) -> None:
        self._eager_evaluation(False)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if (batch := rows_to_evaluate(self.trainer, batch, batch_idx)) is not None:
            self._eval_step(batch, "val")

    def _trainer_precision(self):
        """The Trainer's precision (bf16 autocast under `bf16-mixed`) for the scoring at the end of an evaluation
        (retrieval re-scores thousands of pairs with the captioner and the generator): Lightning applies it to the
        step methods only. Sampling at the start stays in float32: under bf16 the quickstart's held-out judge
        accuracy fell by 2.0 and 4.6 points (two checkpoints, one draw each; BENCHMARKS.md, session 25)."""
        return self.trainer.precision_plugin.forward_context()

    def on_validation_epoch_start(self) -> None:
        self._eval_epoch_start("val")

    def on_validation_epoch_end(self) -> None:
        with self._trainer_precision():
            self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if (batch := rows_to_evaluate(self.trainer, batch, batch_idx)) is not None:
            self._eval_step(batch, "test")

    def on_test_epoch_start(self) -> None:
        self._eval_epoch_start("test")

    def on_test_epoch_end(self) -> None:
        with self._trainer_precision():
            self._eval_epoch_end("test")

    @inference
    def log_images(self, batch: dict) -> dict:
        captions = list(batch["caption"])
        images = self.generate_images(captions, generator=self._eval_generator())
        references = batch["image"] if "image" in batch else self.decode_tokens(batch["tokens"])
        return {"samples": (images, captions), "references": (references, captions)}

    # -- checkpoints --------------------------------------------------------------------------------------------------

    STAGE = "ar_generator"  # the name in checkpoint["imagen"]["stage"]

    @classmethod
    def from_checkpoint(
        cls, path: str, trust: bool = False, checkpoint: dict | None = None
    ) -> ARGeneratorStage:
        """Rebuild a trained stage (text encoder, transformer, autoencoder, ...) from its checkpoint alone
        (`checkpoint`: the file's contents when the caller has read them already)."""
        checkpoint = checkpoint if checkpoint is not None else read_checkpoint(path, trust)
        stage = cls(**cls.init_args_from_info(stage_info(checkpoint, path, cls.STAGE)))
        stage.add_lora_adapters()  # a LoRA-fine-tuned checkpoint: the adapters' weights are in its state dict
        load_state_strict(stage, checkpoint["state_dict"], source=str(path))
        return stage.eval()

    @classmethod
    def init_args_from_info(cls, info: dict) -> dict:
        """Constructor arguments from the plain-type description written by `on_save_checkpoint`."""
        import hydra

        return {
            "net": ARTransformer(ARConfig(**info["net_config"])),
            "text_encoder": hydra.utils.instantiate(info["text_encoder"]),
            "autoencoder_config": info["autoencoder_config"],
            "image_size": info["image_size"],
            "sampling": info["sampling"],
            "lora": info.get("lora"),
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["imagen"] = {
            "stage": self.STAGE,
            "net_config": asdict(self.net.config),
            "autoencoder_config": asdict(self.autoencoder.config),
            "text_encoder": module_spec(self.text_encoder),
            "image_size": self.hparams.image_size,
            "sampling": asdict(self.sampling),
            **self.finetuning_info(),
        }
