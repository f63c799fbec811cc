"""Stage 1: the image autoencoder (tokenizer) as a LightningModule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchmetrics.image import StructuralSimilarityIndexMeasure

from imagen.callbacks.fault import grads_are_finite
from imagen.checkpoints import StageLoading, check_config, load_init_from, read_checkpoint, stage_info
from imagen.inference import inference
from imagen.metrics import loss_mean
from imagen.metrics.codebook import CodebookUsage
from imagen.models.autoencoder import Autoencoder, AutoencoderConfig
from imagen.models.losses import hinge_discriminator_loss, hinge_generator_loss
from imagen.stages.evaluation import rows_to_evaluate, updates_over_ranks
from imagen.stages.finetune import FineTuningMixin
from imagen.stages.optim import FusedOptimizerClipping, build_optimizer


def image_gradient_loss(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """L1 distance between horizontal and vertical pixel differences: keeps edges and corners sharp, which
    per-pixel losses trade away for blur on small objects."""
    dx = F.l1_loss(recon.diff(dim=-1), images.diff(dim=-1))
    dy = F.l1_loss(recon.diff(dim=-2), images.diff(dim=-2))
    return dx + dy


def fp16_unsupported(adversarial: bool, grad_clip: float | None) -> str | None:
    """Why the stage cannot train under fp16 loss scaling (its manual optimization never unscales), or None."""
    if adversarial:
        why = "cannot train the adversarial loss (the discriminator step bypasses the grad scaler)"
    elif grad_clip:
        why = "cannot clip gradients here (model.grad_clip: they are clipped still scaled); set model.grad_clip=null"
    else:
        return None
    return f"{why}, or use trainer.precision=bf16-mixed or 32-true"


class ImagePSNR(MeanMetric):
    """The mean over images of each image's PSNR (over its channels and pixels), as torchmetrics'
    `PeakSignalNoiseRatio(dim=(1, 2, 3))` computes it, but kept as a sum and a count: that one keeps a list of
    per-image errors, whose synchronisation fails under DDP when a rank has no image to evaluate (its sampler share
    all repeats or stand-ins). A nan is kept, not dropped."""

    def __init__(self, data_range: float = 1.0, **kwargs):
        super().__init__(nan_strategy=float("nan"), **kwargs)
        self.data_range = data_range

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        per_image = peak_signal_noise_ratio(
            preds, target, data_range=self.data_range, dim=(1, 2, 3), reduction="none"
        )
        super().update(per_image)


class AutoencoderStage(StageLoading, FusedOptimizerClipping, FineTuningMixin, pl.LightningModule):
    """Trains `net` (encoder -> quantizer -> decoder) to reconstruct images through discrete tokens.

    Losses: `l1_weight * |x - x'| + l2_weight * (x - x')^2 + gradient_weight * |grad x - grad x'| + quantizer aux
    loss`, plus optionally a perceptual loss
    and, from `adversarial_start_step` on, a PatchGAN hinge loss. Optimization is manual (generator and
    discriminator optimizers). Validation and test log PSNR, SSIM, codebook usage and perplexity, and, when the
    datamodule has a judge (shapes data), the judge's accuracy on reconstructions. Fine-tuning: `init_from`
    (another autoencoder run) and `freeze` (`FineTuningMixin`; e.g. `[net.encoder]`).
    """

    LOADER = "imagen.checkpoints.load_autoencoder(path) (the trained Autoencoder network)"

    def __init__(
        self,
        net: Autoencoder,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        l1_weight: float = 1.0,
        l2_weight: float = 1.0,
        gradient_weight: float = 0.0,
        perceptual: nn.Module | None = None,
        perceptual_weight: float = 0.0,
        discriminator: nn.Module | None = None,
        disc_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        adversarial_weight: float = 0.1,
        adversarial_start_step: int = 0,
        grad_clip: float | None = 1.0,
        weight_decay: float = 0.0,
        init_from: str | None = None,
        trust_checkpoint: bool = False,
        freeze: list[str] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(
            logger=False,
            ignore=["net", "optimizer", "scheduler", "perceptual", "discriminator", "disc_optimizer"],
        )
        self.automatic_optimization = False  # generator and discriminator step separately
        if discriminator is not None and disc_optimizer is None:
            raise ValueError("model.discriminator is set but model.disc_optimizer is null")
        self.net = net
        self.perceptual = perceptual
        self.discriminator = discriminator
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.disc_optimizer_factory = disc_optimizer
        self.metrics = nn.ModuleDict({split: self._split_metrics() for split in ("val", "test")})
        if init_from:  # fine-tuning: the network of another autoencoder run (a resume then overrides it)
            checkpoint = read_checkpoint(init_from, trust_checkpoint)
            self.check_net_config(
                stage_info(checkpoint, init_from, "autoencoder"), init_from, "model.init_from"
            )
            load_init_from(self, init_from, "autoencoder", ("net.",), checkpoint=checkpoint)

    def check_net_config(self, info: dict, source: str, key: str) -> None:
        """The network described by a checkpoint's `imagen` entry must be this one: quantizer settings without
        weights of their own (FSQ levels, cosine codes) would otherwise load strictly and map images to other tokens."""
        if "net_config" in info:
            check_config(
                AutoencoderConfig(**info["net_config"]), self.net.config, "model.net",
                f"{key}: {source} holds an autoencoder", "the settings it was trained with",
            )  # fmt: skip

    def _split_metrics(self) -> nn.ModuleDict:
        return nn.ModuleDict(
            {
                "psnr": ImagePSNR(data_range=1.0),
                "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
                "codebook": CodebookUsage(self.net.vocab_size),
                "rec_loss": loss_mean(),  # over every sample of all ranks
                "judge_acc": MeanMetric(),
                "judge_acc_heldout": MeanMetric(),  # the subset of scenes with a held-out composition
            }
        )

    # -- training -------------------------------------------------------------------------------------------------

    def reconstruction_loss(self, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        loss = self.hparams.l1_weight * F.l1_loss(recon, images) + self.hparams.l2_weight * F.mse_loss(
            recon, images
        )
        if self.hparams.gradient_weight > 0:
            loss = loss + self.hparams.gradient_weight * image_gradient_loss(recon, images)
        if self.perceptual is not None and self.hparams.perceptual_weight > 0:
            loss = loss + self.hparams.perceptual_weight * self.perceptual(recon, images)
        return loss

    def _adversarial_active(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.hparams.adversarial_start_step

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        optimizers = self.optimizers()
        opt_g, opt_d = optimizers if isinstance(optimizers, list) else (optimizers, None)
        recon, q = self.net(images)
        rec_loss = self.reconstruction_loss(images, recon)
        loss = rec_loss + q.aux_loss
        adversarial = self._adversarial_active()
        if adversarial:
            # this backward also leaves gradients in the discriminator; they are cleared before its own step
            g_loss = hinge_generator_loss(self.discriminator(recon))
            loss = loss + self.hparams.adversarial_weight * g_loss
            self.log("train/g_loss", g_loss)

        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.hparams.grad_clip:
            self.clip_gradients(
                opt_g, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm"
            )
        opt_g.step()
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            (schedulers[0] if isinstance(schedulers, list) else schedulers).step()

        if adversarial:
            d_loss = hinge_discriminator_loss(self.discriminator(images), self.discriminator(recon.detach()))
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            if self.hparams.grad_clip:
                self.clip_gradients(
                    opt_d, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm"
                )
            # Step the wrapped torch optimizer: Lightning counts every LightningOptimizer.step() as a global step,
            # and trainer.max_steps should count batches whether or not the discriminator is on. That bypasses the
            # callbacks' non-finite check, so it is done here.
            if grads_are_finite(opt_d.optimizer):
                opt_d.optimizer.step()
            self.log("train/d_loss", d_loss)

        self.log_dict(
            {"train/loss": loss, "train/rec_loss": rec_loss, "train/aux_loss": q.aux_loss}, prog_bar=True
        )
        return loss

    def configure_optimizers(self):
        opt_g = build_optimizer(self.optimizer_factory, self.net, self.hparams.weight_decay)
        optimizers, schedulers = [opt_g], []
        if self.scheduler_factory is not None:
            schedulers.append({"scheduler": self.scheduler_factory(opt_g), "interval": "step"})
        if self.discriminator is not None:
            optimizers.append(build_optimizer(self.disc_optimizer_factory, self.discriminator))
        return optimizers, schedulers

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:
            self.net.quantizer.synchronise_codebook()
        if str(self.trainer.precision).startswith("16"):
            why = fp16_unsupported(self.discriminator is not None, self.hparams.grad_clip)
            if why:
                raise ValueError(f"trainer.precision={self.trainer.precision} {why}")

    # -- evaluation -----------------------------------------------------------------------------------------------

    def _judge(self):
        datamodule = getattr(self.trainer, "datamodule", None)
        return getattr(datamodule, "judge", None)

    def _eval_step(self, batch: dict, split: str) -> None:
        images = batch["image"]
        recon, q = self.net(images)
        if not torch.isfinite(recon).all():  # straight-through quantizers pass a non-finite encoding on
            raise FloatingPointError(
                f"the autoencoder's reconstructions are not finite at {split} (global step {self.global_step}): "
                "training has diverged (the log names any skipped non-finite steps); lower model.optimizer.lr or "
                "resume from an earlier checkpoint"
            )
        recon = recon.clamp(-1, 1)
        m = self.metrics[split]
        with torch.autocast(self.device.type, enabled=False):  # in float32 under the Trainer's bf16 too
            scaled, target = (recon.float() + 1) / 2, (images.float() + 1) / 2
            m["psnr"].update(scaled, target)
            m["ssim"].update(scaled, target)
        m["codebook"].update(q.indices)
        judge = self._judge()
        if judge is not None and "target" in batch:
            exact = judge.to(self.device).exact(recon, batch["target"]).float()
            m["judge_acc"].update(exact)
            heldout = torch.as_tensor(batch.get("heldout", False), dtype=torch.bool, device=exact.device)
            heldout = heldout.expand_as(exact)
            # updated on every batch, even with none held out: under DDP every rank must take part in compute()
            m["judge_acc_heldout"].update(exact[heldout])
        m["rec_loss"].update(self.reconstruction_loss(images, recon), weight=len(images))

    def _eval_epoch_end(self, split: str) -> None:
        m = self.metrics[split]
        # Each metric's compute() synchronises its states across the ranks: whether to compute it is decided on the
        # update counts of all ranks, as a rank whose rows were all dropped (`rows_to_evaluate`: fewer samples than
        # ranks, or only stand-ins) updated nothing yet must take part; every rank then logs the same keys.
        updated = dict(zip(m.keys(), updates_over_ranks(self.trainer, m.values()), strict=True))
        values = {}
        if updated["psnr"] > 0:  # psnr, ssim, codebook and rec_loss are updated together
            codebook = m["codebook"].compute()
            values = {
                f"{split}/psnr": m["psnr"].compute(),
                f"{split}/ssim": m["ssim"].compute(),
                f"{split}/rec_loss": m["rec_loss"].compute(),
                f"{split}/codebook_usage": codebook["usage"],
                f"{split}/perplexity": codebook["perplexity"],
            }
        if updated["judge_acc"] > 0:
            values[f"{split}/judge_acc"] = m["judge_acc"].compute()
            heldout = m["judge_acc_heldout"].compute()  # nan when the split holds no held-out composition
            if not torch.isnan(heldout):
                values[f"{split}/judge_acc_heldout"] = heldout
        self.log_dict(values, prog_bar=split == "val")
        for metric in m.values():
            metric.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if (batch := rows_to_evaluate(self.trainer, batch, batch_idx)) is not None:
            self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if (batch := rows_to_evaluate(self.trainer, batch, batch_idx)) is not None:
            self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    @inference
    def log_images(self, batch: dict) -> dict[str, torch.Tensor]:
        """Images in [-1, 1] for the image logger: each input followed by its reconstruction."""
        images = batch["image"]
        recon, _ = self.net(images)
        pairs = torch.stack([images, recon.clamp(-1, 1)], dim=1)  # (B, 2, 3, H, W)
        return {"inputs_reconstructions": pairs.flatten(0, 1)}

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resume (`ckpt_path`) must build the network the checkpoint holds (called before Lightning's strict load)."""
        self.check_net_config(checkpoint.get("imagen") or {}, "the checkpoint being resumed", "ckpt_path")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain types only: later stages rebuild the network from this without unpickling any object.
        checkpoint["imagen"] = {"stage": "autoencoder", "net_config": asdict(self.net.config)}
        # the size it trains at, which later stages compare theirs with (an export keeps this entry)
        image_size = getattr(getattr(self.trainer, "datamodule", None), "hparams", {}).get("image_size")
        if image_size is not None:
            checkpoint["imagen"]["image_size"] = int(image_size)
