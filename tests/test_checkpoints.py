"""Safe checkpoint reading and strict loading."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

from imagen.checkpoints import CheckpointError, load_state_strict, read_checkpoint


class RunsCode:
    """Unpickling this calls `touch(path)`: what a malicious checkpoint does."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_a_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing"):
        read_checkpoint(path)
    assert not marker.exists(), "the payload must not have run"


def test_truncated_and_missing_checkpoints_name_the_file(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        read_checkpoint(path)
    assert str(path) in str(e.value)
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "nope.ckpt")


# torch's weights-only unpickler fails on these with UnpicklingError, IndexError, KeyError
@pytest.mark.parametrize("seed", [0, 2, 20])
def test_random_bytes_are_corrupt_not_a_file_to_trust(tmp_path, seed):
    path = tmp_path / "last.ckpt"
    path.write_bytes(random.Random(seed).randbytes(4096))  # not a zip: torch reads it as a legacy pickle
    for trust in (False, True):
        with pytest.raises(CheckpointError, match="is truncated or corrupt") as e:
            read_checkpoint(path, trust=trust)
        message = str(e.value)
        assert str(path) in message and "trust_checkpoint" not in message and "weights_only" not in message


def test_a_trusted_file_that_fails_to_unpickle_is_corrupt(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"cpathlib\nPath\n\xff" + bytes(100))  # a global, then garbage
    with pytest.raises(CheckpointError, match=r"\(pathlib.Path\), and unpickling can run code; refusing it"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="is truncated or corrupt: invalid load key") as e:
        read_checkpoint(path, trust=True)
    assert str(path) in str(e.value)


def file_mapped_at(address: int) -> str | None:
    """The file mapped at `address` in this process (Linux `/proc/self/maps`), or None (anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
    return None


def test_a_mapped_read_gives_the_same_contents_and_the_same_refusals(tmp_path):
    """`mmap=True` (the start-of-run checks read only a checkpoint's description) on torch.save's zip format, and on
    the legacy format, which cannot be mapped and is read whole."""
    contents = {"state_dict": {"w": torch.arange(1000.0)}, "imagen": {"stage": "autoencoder"}}
    for name, zip_format in (("zip.ckpt", True), ("legacy.ckpt", False)):
        torch.save(contents, tmp_path / name, _use_new_zipfile_serialization=zip_format)
        read = read_checkpoint(tmp_path / name, mmap=True)
        assert read["imagen"] == contents["imagen"]
        torch.testing.assert_close(read["state_dict"]["w"], contents["state_dict"]["w"])
        if sys.platform == "linux":  # the zip format's tensors live in a mapping of the file itself
            assert file_mapped_at(read["state_dict"]["w"].data_ptr()) == (
                str(tmp_path / name) if zip_format else None
            )
    torch.save({"payload": RunsCode(tmp_path / "pwned")}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="refusing"):
        read_checkpoint(tmp_path / "evil.ckpt", mmap=True)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "zip.ckpt").read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(tmp_path / "cut.ckpt", mmap=True)


def test_strict_load_lists_every_bad_key():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    state = {"0.weight": torch.zeros(3, 2), "0.bias": torch.zeros(4), "2.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError) as e:
        load_state_strict(model, state, source="x.ckpt")
    message = str(e.value)
    assert "missing keys: 1.bias, 1.weight" in message
    assert "unexpected keys: 2.weight" in message
    assert "0.bias: checkpoint (4,) vs model (3,)" in message
    good = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    load_state_strict(model, {f"net.{k}": v for k, v in good.items()}, prefix="net.")
    assert torch.equal(model[0].weight, torch.ones(3, 2))


def test_last_checkpoint_holds_the_final_weights_when_the_monitored_metric_stops_improving(tmp_path):
    """`step` monitored with mode=min: only the first validation is ever the best one."""
    from tests.conftest import TINY_SHAPES, train_tiny_stage

    last = train_tiny_stage(
        ["experiment=shapes_autoencoder", *TINY_SHAPES, "model.net.size=tiny", "data.image_size=16",
         "trainer.max_steps=6", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
         "callbacks.model_checkpoint.monitor=step", "callbacks.model_checkpoint.mode=min"],
        tmp_path,
    )  # fmt: skip
    best = sorted(p.name for p in last.parent.glob("step_*.ckpt"))
    assert best == ["step_000002.ckpt"], best
    assert read_checkpoint(last)["global_step"] == 6


def test_a_monitored_metric_the_run_never_logs_names_the_key_and_keeps_the_steps(tmp_path):
    from tests.conftest import TINY_SHAPES, train_tiny_stage

    with pytest.raises(ValueError, match=r"callbacks.model_checkpoint.monitor=val/judge_acc: .*'val/psnr'"):
        train_tiny_stage(
            ["experiment=shapes_autoencoder", *TINY_SHAPES, "model.net.size=tiny", "data.image_size=16",
             "trainer.max_steps=6", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
             "callbacks.model_checkpoint.monitor=val/judge_acc"],
            tmp_path,
        )  # fmt: skip
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2


def fit_with_schedule(tmp_path, manual: bool, **checkpoint_args) -> tuple[dict, list[str]]:
    """7 steps, validating at step 4, with a checkpoint schedule: the step `last.ckpt` holds at the start of each
    step (the checkpoint callback runs after the module's hooks: by then it has saved the step before), and the
    top-k checkpoints."""
    import lightning.pytorch as pl

    from imagen.callbacks.checkpoint import LastAndBestCheckpoint

    last = tmp_path / "last.ckpt"
    seen: dict[int, int | None] = {}

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
            self.automatic_optimization = not manual

        def on_train_batch_start(self, batch, batch_idx):
            seen[self.global_step] = read_checkpoint(last)["global_step"] if last.exists() else None

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch[0]).square().mean()
            if manual:
                optimizer = self.optimizers()
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", 1.0 / (1 + self.global_step))  # better at every validation

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 2)), batch_size=4)
    checkpoints = LastAndBestCheckpoint(dirpath=tmp_path, filename="step_{step:06d}", monitor="val/loss",
                                        **{"save_last": True, "save_top_k": 1, "auto_insert_metric_name": False,
                                           **checkpoint_args})  # fmt: skip
    trainer = pl.Trainer(callbacks=[checkpoints], logger=False, enable_progress_bar=False, accelerator="cpu",
                         enable_model_summary=False, max_steps=7, check_val_every_n_epoch=None,
                         val_check_interval=4, limit_val_batches=1, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(Module(), data, data)
    return seen, sorted(p.name for p in tmp_path.glob("step_*.ckpt"))


@pytest.mark.parametrize("manual", [False, True])
def test_scheduled_saves_write_last_before_the_first_validation_and_every_validation_chooses(
    tmp_path, manual
):
    seen, best = fit_with_schedule(tmp_path, manual, every_n_train_steps=2)
    # last.ckpt at steps 2 and 4 (the validation at 4 chooses too) and 6, before the first validation's metric
    assert seen == {0: None, 1: None, 2: 2, 3: 2, 4: 4, 5: 4, 6: 6}
    assert best == [
        "step_000004.ckpt"
    ]  # chosen at the validation of step 4, though a scheduled save came first
    assert read_checkpoint(tmp_path / "last.ckpt")["global_step"] == 7


def test_a_time_schedule_saves_under_manual_optimization(tmp_path):
    import datetime

    seen, _ = fit_with_schedule(tmp_path, manual=True, train_time_interval=datetime.timedelta(0))
    assert seen == {step: step or None for step in range(7)}  # every step's weights, at the next one's start


def test_without_last_a_schedule_leaves_the_choice_to_validation_and_a_link_is_refused(tmp_path):
    from imagen.callbacks.checkpoint import LastAndBestCheckpoint

    seen, best = fit_with_schedule(tmp_path, manual=False, every_n_train_steps=2, save_last=False)
    assert set(seen.values()) == {None} and best == ["step_000004.ckpt"]
    with pytest.raises(ValueError, match="save_last='link' is not supported"):
        LastAndBestCheckpoint(dirpath=tmp_path, monitor="val/loss", save_last="link")
