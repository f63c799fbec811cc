"""Evaluation counts every sample once: under DDP (the samples Lightning's distributed sampler repeats to even out the
ranks) and with bad samples skipped (their stand-ins)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from imagen.data.image_text import ImageTextDataModule
from imagen.stages.evaluation import rows_to_evaluate, without_sampler_repeats
from tests.test_image_text_data import FOLDER_KINDS, every_split, write_bad_folder


@pytest.mark.parametrize(
    "size, world, batch_size", [(10, 4, 2), (10, 3, 4), (7, 8, 1), (12, 4, 2), (5, 2, 8)]
)
def test_every_sample_is_evaluated_once_over_all_ranks(size, world, batch_size):
    dataset = [{"image": torch.full((2,), float(i)), "caption": f"c{i}", "index": i} for i in range(size)]
    seen = []
    for rank in range(world):
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
        for testing in (False, True):
            trainer = SimpleNamespace(testing=testing, val_dataloaders=loader, test_dataloaders=[loader])
            for batch_idx, batch in enumerate(loader):
                batch["heldout"] = False  # a value for the whole batch stays as it is
                kept = without_sampler_repeats(trainer, batch, batch_idx)
                if kept is None:
                    continue
                assert (
                    kept["image"][:, 0].tolist()
                    == kept["index"].tolist()
                    == [int(c[1:]) for c in kept["caption"]]
                )
                assert kept["heldout"] is False
                if testing:
                    seen += kept["index"].tolist()
    assert sorted(seen) == list(range(size))  # the sampler alone gives world * ceil(size / world)


def test_batches_of_a_loader_without_a_distributed_sampler_are_kept_whole():
    loader = DataLoader(list(range(5)), batch_size=2)
    trainer = SimpleNamespace(testing=False, val_dataloaders=loader)
    batch = {"index": torch.tensor([4])}
    assert without_sampler_repeats(trainer, batch, 2) is batch


def test_the_stand_ins_for_bad_samples_are_left_out_of_an_evaluation(tmp_path):
    # each bad sample's place holds the next good one, which is read at its own index too
    root = write_bad_folder(tmp_path / "bad", good=4)
    dm = ImageTextDataModule("image_txt", root=every_split(str(root)), image_size=32, max_pixels=50_000,
                             bad_samples="skip", max_bad_fraction=1.0, batch_size=3, num_workers=0)  # fmt: skip
    loader = dm._loader("val")
    trainer = SimpleNamespace(testing=False, val_dataloaders=loader)
    read, evaluated = [], []
    for batch_idx, batch in enumerate(loader):
        batch = dm.on_before_batch_transfer(batch, 0)
        read += batch["name"]
        if (kept := rows_to_evaluate(trainer, batch, batch_idx)) is not None:
            assert len(kept["image"]) == len(kept["caption"]) == len(kept["index"]) == len(kept["name"])
            evaluated += kept["name"]
    assert len(read) == 4 + len(FOLDER_KINDS)  # a row per record, bad ones too (their stand-ins)
    assert sorted(evaluated) == sorted(set(read)) and len(evaluated) == 4
    assert dm.bad.good == 4 and dm.bad.bad == len(FOLDER_KINDS)


def test_autoencoder_psnr_and_ssim_are_computed_in_float32_under_bf16(tmp_path):
    import functools

    import lightning.pytorch as pl
    from torchmetrics.functional import structural_similarity_index_measure as ssim

    from imagen.models.autoencoder import Autoencoder
    from imagen.stages.autoencoder import AutoencoderStage

    torch.manual_seed(0)
    stage = AutoencoderStage(
        Autoencoder.from_size("tiny", quantizer="fsq"), functools.partial(torch.optim.AdamW)
    )
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.validate(stage, DataLoader([{"image": image} for image in images], batch_size=4), verbose=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        recon = stage.net(images)[0].clamp(-1, 1)  # the model runs in bf16, as the Trainer runs it
    expected = ssim((recon.float() + 1) / 2, (images + 1) / 2, data_range=1.0)
    assert trainer.callback_metrics["val/ssim"].item() == pytest.approx(expected.item(), abs=1e-6)


def test_an_evaluation_loss_is_weighted_and_keeps_a_diverged_batch_s_nan():
    from imagen.metrics import loss_mean

    mean = loss_mean()
    mean.update(torch.tensor(2.0), weight=8)  # a batch of 8
    mean.update(torch.tensor(1.0), weight=1)  # the last batch, of 1
    assert mean.compute().item() == pytest.approx(17 / 9)
    mean.update(torch.tensor(float("nan")), weight=8)
    assert mean.compute().isnan()  # not dropped: a diverged model does not report the other batches' figure


def test_the_autoencoder_psnr_is_torchmetrics_per_image_psnr_averaged():
    from torchmetrics.image import PeakSignalNoiseRatio

    from imagen.stages.autoencoder import ImagePSNR

    torch.manual_seed(0)
    ours, reference = ImagePSNR(data_range=1.0), PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))
    for size, noise in [(4, 0.05), (1, 0.3), (3, 0.01)]:  # batches of unequal sizes and errors
        target = torch.rand(size, 3, 16, 16)
        preds = (target + noise * torch.randn_like(target)).clamp(0, 1)
        ours.update(preds, target)
        reference.update(preds, target)
    assert ours.compute().item() == pytest.approx(reference.compute().item(), rel=1e-6)  # float rounding only


class _BrightnessJudge:
    """The shapes judge's interface: an image is right when its mean is above its target."""

    def to(self, device):
        return self

    def exact(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3)) > target


def _autoencoder_evaluation(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One evaluation epoch of the autoencoder stage, whose rows all lie on rank 0: on rank 1 they were the
    sampler's repeats (one sample, two ranks), left out. Writes the logged values."""
    import datetime
    import functools
    import types

    import torch.distributed as dist

    from imagen.models.autoencoder import Autoencoder
    from imagen.stages.autoencoder import AutoencoderStage

    torch.manual_seed(0)
    stage = AutoencoderStage(
        Autoencoder.from_size("tiny", quantizer="fsq"), functools.partial(torch.optim.AdamW)
    )
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    batch = {"image": images, "target": torch.zeros(3), "heldout": torch.tensor([True, False, False])}
    if world > 1:  # a short timeout: a collective that one rank misses fails the test instead of hanging it
        timeout = datetime.timedelta(seconds=30)
        dist.init_process_group("gloo", f"file://{init_file}", timeout=timeout, rank=rank, world_size=world)

    def reduce(tensor, reduce_op):  # DDPStrategy.reduce's "sum"
        if world > 1:
            dist.all_reduce(tensor)
        return tensor

    strategy = types.SimpleNamespace(reduce=reduce, root_device=torch.device("cpu"))
    stage.trainer = types.SimpleNamespace(
        strategy=strategy, datamodule=types.SimpleNamespace(judge=_BrightnessJudge())
    )
    logged = {}
    stage.log_dict = lambda values, **kwargs: logged.update({k: float(v) for k, v in values.items()})
    with torch.no_grad():
        if rank == 0:
            stage._eval_step(batch, "val")
        stage._eval_epoch_end("val")
    torch.save(logged, f"{out_dir}/rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


def test_a_rank_without_autoencoder_evaluation_rows_takes_part_in_every_metric(tmp_path):
    """2 processes: the one with no rows to evaluate still synchronises every metric the other computes (PSNR's
    list states and a judge accuracy computed on the other's count alone failed), and both log the values of one
    process."""
    import torch.multiprocessing as mp

    _autoencoder_evaluation(0, 1, "", str(tmp_path))
    single = torch.load(tmp_path / "rank0.pt")
    assert {"val/psnr", "val/ssim", "val/judge_acc", "val/judge_acc_heldout"} <= set(single)
    mp.spawn(_autoencoder_evaluation, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert torch.load(tmp_path / f"rank{rank}.pt") == pytest.approx(single, rel=1e-6)
