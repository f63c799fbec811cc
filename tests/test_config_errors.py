"""Config mistakes stop before any work, with a message that names the key."""

from __future__ import annotations

import importlib.util
import logging
import re

import pytest
import torch
from hydra.errors import ConfigCompositionException
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf.errors import MissingMandatoryValue

from imagen.cli.checks import ConfigError, check_train_config
from imagen.cli.train import train
from tests.conftest import TINY_SHAPES

CASES = [
    (["data.image_size=30"], ConfigError, "data.image_size=30 is not divisible"),
    (["+model.net.channel_mult=[1,2,2]", "data.image_size=36"], ConfigError, "downsampling factor 8"),
    (["model.net.size=huge"], ConfigError, "model.net.size='huge'"),
    (["+model.net.codebook_sise=3"], ConfigError, "model.net.codebook_sise"),
    (["model.net.quantizer=pq"], ConfigError, "model.net.quantizer"),
    (["trainer.gradient_clip_val=1.0"], ConfigError, "model.grad_clip"),
    (["ckpt_path=/no/such.ckpt"], ConfigError, "ckpt_path=/no/such.ckpt: no such file"),
    (["trainer.max_steps=-1"], ConfigError, "trainer.max_steps"),
    (
        ["trainer.max_steps=lots"],
        ConfigError,
        "trainer.max_steps='lots' must be an integer; e.g. trainer.max_steps=",
    ),
    (["data.batch_size=0"], ConfigError, "data.batch_size=0 must be >= 1; e.g. data.batch_size=64"),
    (["data.batch_size=1.5"], ConfigError, "data.batch_size=1.5 must be an integer"),
    (
        ["data.num_train=8"],
        ConfigError,
        "data.num_train=8 is smaller than data.batch_size=16: no full training batch",
    ),
    (
        ["model.optimizer.lr=fast"],
        ConfigError,
        "model.optimizer.lr='fast' must be a number; e.g. model.optimizer.lr=",
    ),
    (["seed=-3"], ConfigError, "seed=-3 must be >= 0"),
    (
        ["callbacks.model_checkpoint.every_n_train_steps=0"],
        ConfigError,
        "callbacks.model_checkpoint.every_n_train_steps=0 must be >= 1; or null to save by time",
    ),
    (
        [
            "callbacks.model_checkpoint.every_n_train_steps=100",
            "callbacks.model_checkpoint.train_time_interval={_target_: datetime.timedelta, minutes: 30}",
        ],
        ConfigError,
        "every_n_train_steps and .train_time_interval are both set",
    ),
    (
        ["callbacks.nonfinite_guard.max_consecutive=0"],
        ConfigError,
        "callbacks.nonfinite_guard.max_consecutive=0",
    ),
    (
        ["model=autoencoder_gan", "trainer.precision=16-mixed"],
        ConfigError,
        "trainer.precision=16-mixed cannot train the adversarial loss",
    ),
    (
        ["experiment=shapes_autoencoder", "trainer.precision=16-mixed"],
        ConfigError,
        r"trainer.precision=16-mixed cannot clip gradients here .*set model.grad_clip=null",
    ),
    (["train=false", "ckpt_path=null"], ConfigError, "train=false test=true needs ckpt_path=PATH"),
    (["train=false", "test=false"], ConfigError, "train=false test=false: nothing to run"),
    (
        ["trainer.accumulate_grad_batches=4", "trainer.val_check_interval=6"],
        ConfigError,
        "trainer.val_check_interval=6 .training batches. is not a multiple of trainer.accumulate_grad_batches=4.*"
        r"e.g. trainer.val_check_interval=8",
    ),
    (["model.init_from=/no/such.ckpt"], ConfigError, "model.init_from=/no/such.ckpt: no such file"),
    (
        ["model.init_from={ner_ckpt}"],
        ConfigError,
        "model.init_from: checkpoint .* is from the 'ner' stage; expected",
    ),
    (
        ["model.init_from={empty_ckpt}"],
        ConfigError,
        "model.init_from: checkpoint .*empty.ckpt is truncated or corrupt",
    ),
    (["test_before_fit=true"], ConfigError, "test_before_fit=true tests the starting weights of a fine-tune"),
    (["+model.lora=8"], ConfigError, "model.lora must be null or a mapping such as {r: 8, alpha: 16}; got 8"),
    (["+model.lora={r: 4}"], ConfigError, "model.lora: the autoencoder stage has no LoRA adapters"),
    (["ckpt_path={ner_ckpt}"], ConfigError, "ckpt_path: checkpoint .* is from the 'ner' stage; expected"),
    (
        ["model=autoencoder_gan", "trainer=ddp"],
        ConfigError,
        "trainer.strategy: DDP without find_unused_parameters stops at the first step that leaves parameters "
        "without a gradient, as model.discriminator",
    ),
    (
        ["model=autoencoder_gan", "trainer=ddp_sim"],
        ConfigError,
        "set trainer.strategy.find_unused_parameters=true",
    ),
    (
        ["callbacks=[default,early_stopping]", "callbacks.model_checkpoint.monitor=null"],
        ConfigError,
        "callbacks.early_stopping.monitor is null",
    ),
    # values a user types that would fail deep inside a library, or train without complaint
    (["data.image_size=32px"], ConfigError, "data.image_size='32px' must be an integer"),
    (["trust_checkpoint=no"], ConfigError, "trust_checkpoint='no' must be true or false"),
    (["model.optimizer.lr=nan"], ConfigError, "model.optimizer.lr=nan must be a finite number"),
    (["model.weight_decay=inf"], ConfigError, "model.weight_decay=inf must be a finite number"),
    (["test=yes"], ConfigError, "test='yes' must be true or false"),
    (["data.seed=-1"], ConfigError, "data.seed=-1 must be >= 0"),
    (["data.eval_batch_size=0"], ConfigError, "data.eval_batch_size=0 must be >= 1"),
    (
        ["trainer.val_check_interval=0"],
        ConfigError,
        "trainer.val_check_interval=0 must be a number of training",
    ),
    (["trainer.val_check_interval=1.5"], ConfigError, "or a fraction of an epoch in (0, 1]"),
    (["trainer.accumulate_grad_batches=0"], ConfigError, "trainer.accumulate_grad_batches=0 must be >= 1"),
    (["trainer.limit_train_batches=0"], ConfigError, "trainer.limit_train_batches=0 trains nothing"),
    (["model.optimizer.betas=0.9"], ConfigError, "model.optimizer.betas=0.9 must be two numbers in "),
    (
        ["model.optimizer.betas=[0.9,1.5]"],
        ConfigError,
        "model.optimizer.betas=[0.9, 1.5] must be two numbers",
    ),
    (["model.grad_clip=one"], ConfigError, "model.grad_clip='one' must be a number"),
    (["model.grad_clip=-1"], ConfigError, "model.grad_clip=-1 must be >= 0; the largest gradient norm"),
    (["model.l1_weight=-1"], ConfigError, "model.l1_weight=-1 must be >= 0; 0 turns the term off"),
    (["model.weight_decay=-0.05"], ConfigError, "model.weight_decay=-0.05 must be >= 0"),
    (["model.scheduler.min_lr_ratio=2"], ConfigError, "model.scheduler.min_lr_ratio=2 must be in [0, 1]"),
    (["+model.net.vq_decay=1.5"], ConfigError, "model.net.vq_decay=1.5 must be in [0, 1]"),
    (["+model.net.codebook_size=0"], ConfigError, "model.net.codebook_size must be >= 2; got 0"),
    (["+model.net.channel_mult=2"], ConfigError, "model.net.channel_mult must be a list of integers >= 1"),
    (
        ["experiment=shapes_generator", "model.cond_drop_prob=1.5"],
        ConfigError,
        "model.cond_drop_prob=1.5 must be in",
    ),
    (
        ["experiment=shapes_generator", "model.eval_batch_size=0"],
        ConfigError,
        "model.eval_batch_size=0 must be",
    ),
]


CORPUS_CASES = [
    ("data.resampled=no", "data.resampled='no' must be true or false"),
    ("data.random_crop=maybe", "data.random_crop='maybe' must be true or false"),
    ("data.holdout_fraction=ten", "data.holdout_fraction='ten' must be a number"),
    ("data.max_pixels=64M", "data.max_pixels='64M' must be an integer, or null"),
    ("data.max_bad_fraction=2", "data.max_bad_fraction=2 must be in [0, 1]"),
    ("data.samples_per_epoch=-8", "data.samples_per_epoch=-8 must be >= 1"),
    ("data.eval_samples=0", "data.eval_samples=0 must be >= 1"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer=-1 must be >= 0"),
    ("data.tokenizer_captions=0", "data.tokenizer_captions=0 must be >= 1"),
    ("data.image_size=[32]", "data.image_size=[32] must be an integer"),
    (
        "callbacks.model_checkpoint.save_top_k=all",
        "callbacks.model_checkpoint.save_top_k='all' must be an integer",
    ),
    ("callbacks.image_logger.max_images=0", "callbacks.image_logger.max_images=0 must be >= 1"),
    ("trainer.benchmark=yes", "trainer.benchmark='yes' must be true or false, or null"),
    ("trainer.num_nodes=two", "trainer.num_nodes='two' must be an integer"),
]


@pytest.mark.parametrize("override, message", CORPUS_CASES, ids=[c[0] for c in CORPUS_CASES])
def test_invalid_real_corpus_configs(make_cfg, tmp_path, override, message):
    """Values of another type than the argument they reach (checked against its annotation), or out of range."""
    cfg = make_cfg(["experiment=wds_generator", f"data.shards='{tmp_path}/{{0..1}}.tar'", override])
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_train_config(cfg)


def test_callback_settings_are_checked_and_an_average_that_never_starts_is_named(make_cfg, caplog):
    early = ["callbacks=[default,early_stopping]", "callbacks.early_stopping.patience=-1"]
    with pytest.raises(ConfigError, match="callbacks.early_stopping.patience=-1 must be >= 0"):
        check_train_config(make_cfg(["experiment=shapes_autoencoder", *TINY_SHAPES, *early]))
    for start, warned in ((5, False), (10, True)):
        caplog.clear()
        cfg = make_cfg(["experiment=shapes_autoencoder", *TINY_SHAPES, "callbacks=[default,ema]",
                        "trainer.max_steps=10", f"callbacks.ema.update_starting_at_step={start}"])  # fmt: skip
        with caplog.at_level(logging.WARNING, logger="imagen"):
            check_train_config(cfg)
        assert (
            "callbacks.ema.update_starting_at_step=10 is not before trainer.max_steps=10" in caplog.text
        ) == warned
    for signals, message in (
        ("[SIGUSR]", "'SIGUSR' is not a signal"),
        ("SIGTERM", "'SIGTERM' is one name, not a list"),
    ):
        cfg = make_cfg(
            ["experiment=shapes_autoencoder", *TINY_SHAPES, f"callbacks.preemption.signals={signals}"]
        )
        with pytest.raises(ConfigError, match=f"callbacks.preemption.signals: {message}"):
            check_train_config(cfg)


NER_CASES = [
    (["model.warmup=1.5"], "model.warmup=1.5 must be a fraction of the training steps"),
    (["model.warmup=-0.1"], "model.warmup=-0.1 must be a fraction"),
    (["model.dropout=1.5"], "model.dropout=1.5 must be in [0, 1]"),
]


@pytest.mark.parametrize("overrides, message", NER_CASES, ids=[" ".join(c[0]) for c in NER_CASES])
def test_invalid_ner_configs(make_cfg, overrides, message):
    cfg = make_cfg(["experiment=ner_tiny", *overrides])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        check_train_config(cfg)


@pytest.mark.parametrize("overrides, error, message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_invalid_autoencoder_configs(make_cfg, tmp_path, overrides, error, message):
    torch.save({"imagen": {"stage": "ner"}, "state_dict": {}}, tmp_path / "ner.ckpt")
    (tmp_path / "empty.ckpt").touch()
    paths = {"ner_ckpt": tmp_path / "ner.ckpt", "empty_ckpt": tmp_path / "empty.ckpt"}
    cfg = make_cfg(
        [
            "experiment=shapes_autoencoder",
            *TINY_SHAPES,
            *(
                o.replace("{ner_ckpt}", str(paths["ner_ckpt"])).replace(
                    "{empty_ckpt}", str(paths["empty_ckpt"])
                )
                for o in overrides
            ),
        ]
    )
    pattern = message.replace("[", r"\[").replace("(", r"\(").replace("+", r"\+")
    with pytest.raises(error, match=pattern) as raised:
        check_train_config(cfg)
    assert "\n" not in str(raised.value), "one line"


def test_valid_time_interval_builds_a_checkpoint_callback(make_cfg):
    from datetime import timedelta

    from imagen.cli.utils import instantiate_callbacks

    cfg = make_cfg(["experiment=shapes_autoencoder", *TINY_SHAPES,
                    "callbacks.model_checkpoint.train_time_interval={_target_: datetime.timedelta, minutes: 30}"])  # fmt: skip
    check_train_config(cfg)
    callbacks = instantiate_callbacks(cfg.callbacks)
    checkpoint = next(c for c in callbacks if isinstance(c, ModelCheckpoint))
    assert checkpoint._train_time_interval == timedelta(minutes=30)


def test_captioned_stages_refuse_heldout_compositions_in_training(make_cfg, tmp_path):
    ckpt = tmp_path / "ae.ckpt"
    ckpt.touch()
    cfg = make_cfg(
        ["experiment=shapes_generator", f"model.autoencoder_ckpt={ckpt}", "data.heldout_in_train=true"]
    )
    with pytest.raises(ConfigError, match="data.heldout_in_train=true would show the held-out compositions"):
        check_train_config(cfg)


def test_unknown_key_is_rejected_at_composition(make_cfg):
    with pytest.raises(ConfigCompositionException, match="trainer.max_stepz"):
        make_cfg(["trainer.max_stepz=3"])


def test_the_new_concept_data_counts_its_replayed_scenes_as_training_batches(make_cfg, tmp_path):
    overrides = ["experiment=shapes_finetune_new_concept", f"model.init_from={tmp_path / 'missing.ckpt'}"]
    # 16 new-concept scenes x 8 repeats + 1600 replayed: batches of 32 fill; the missing init_from is the next error
    with pytest.raises(ConfigError, match="model.init_from=.*missing.ckpt: no such file"):
        check_train_config(make_cfg([*overrides, "data.num_train=16"]))
    with pytest.raises(
        ConfigError, match=r"data.num_train=2 x data.new_repeats \+ data.num_replay is smaller"
    ):
        check_train_config(
            make_cfg([*overrides, "data.num_train=2", "data.new_repeats=1", "data.num_replay=4"])
        )


def test_generator_needs_an_autoencoder_checkpoint(make_cfg, tmp_path):
    cfg = make_cfg(["experiment=shapes_generator", *TINY_SHAPES])
    with pytest.raises(MissingMandatoryValue, match="autoencoder_ckpt"):
        train(cfg)
    cfg = make_cfg(
        ["experiment=shapes_generator", *TINY_SHAPES, f"model.autoencoder_ckpt={tmp_path / 'x.ckpt'}"]
    )
    with pytest.raises(ConfigError, match="model.autoencoder_ckpt=.*no such file"):
        train(cfg)


def test_ddp_with_heads_that_learn_nothing_needs_find_unused_parameters(make_cfg, tmp_path):
    # a captioner-only joint run leaves the generator without a gradient in every step
    overrides = ["experiment=shapes_joint", f"model.autoencoder_ckpt={tmp_path / 'ae.ckpt'}",
                 "model.loss_weights.generation=0", "trainer=ddp_sim"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"as model.loss_weights.generation=0 does; set trainer.strategy"):
        check_train_config(make_cfg(overrides))
    # the default strategy (auto) on several devices is DDP too
    gpus = [*overrides[:-1], "trainer=gpu", "trainer.devices=4"]
    with pytest.raises(ConfigError, match=r"as model.loss_weights.generation=0 does; set trainer.strategy"):
        check_train_config(make_cfg(gpus))
    cfg = make_cfg([*overrides, "trainer.strategy=ddp_find_unused_parameters_true"])
    # the next check fails: this one passed
    with pytest.raises(ConfigError, match="model.autoencoder_ckpt=.*no such file"):
        check_train_config(cfg)


def test_ddp_in_a_local_multirun_is_refused(make_cfg):
    """Lightning re-runs the command line for the other ranks, `-m` and the sweep included: each rank would run
    every job. Under the SLURM launcher, SLURM starts the ranks, and a single run is fine."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    def multirun(cfg):
        with read_write(cfg.hydra), open_dict(cfg):
            cfg.hydra.mode = RunMode.MULTIRUN
        HydraConfig().set_config(cfg)
        return cfg

    ddp = ["experiment=shapes_autoencoder", "trainer=ddp_sim"]
    check_train_config(make_cfg(ddp))  # a single run
    with pytest.raises(ConfigError, match=r"trainer.devices=2 with DDP in a local multirun \(-m\)"):
        check_train_config(multirun(make_cfg(ddp)))
    check_train_config(multirun(make_cfg(["experiment=shapes_autoencoder", "trainer.devices=1"])))
    for devices in ("-1", "'0,1'", "[0,1]"):  # every device, a string list, a list
        with pytest.raises(ConfigError, match="in a local multirun"):
            check_train_config(multirun(make_cfg([*ddp, f"trainer.devices={devices}"])))
    spawned = [
        "+trainer.strategy._target_=lightning.pytorch.strategies.DDPStrategy",
        "+trainer.strategy.start_method=spawn",
    ]
    check_train_config(
        multirun(
            make_cfg(["experiment=shapes_autoencoder", "trainer=ddp_sim", "~trainer.strategy", *spawned])
        )
    )
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
        check_train_config(multirun(make_cfg([*ddp, "hydra/launcher=slurm"])))


def test_a_monitor_in_a_run_that_never_validates_is_named(make_cfg, caplog):
    from imagen.cli.checks import check_train_config

    base = ["experiment=shapes_autoencoder", "callbacks=[default,early_stopping]"]
    for overrides, why in (
        (
            ["trainer.max_steps=10", "trainer.val_check_interval=20"],
            "trainer.val_check_interval=20 batches, past ",
        ),
        (["trainer.limit_val_batches=0"], "trainer.limit_val_batches=0"),
    ):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="imagen"):
            check_train_config(make_cfg([*base, *overrides]))
        for name in ("model_checkpoint", "early_stopping"):
            assert (
                f"callbacks.{name}.monitor=val/psnr never sees a value" in caplog.text and why in caplog.text
            )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imagen"):
        check_train_config(make_cfg([*base, "trainer.max_steps=40", "trainer.val_check_interval=20"]))
        # 10 optimizer steps of 2 batches each reach the 20th batch
        check_train_config(make_cfg([*base, "trainer.max_steps=10", "trainer.val_check_interval=20",
                                     "trainer.accumulate_grad_batches=2"]))  # fmt: skip
        check_train_config(
            make_cfg([*base, "trainer.max_steps=10", "trainer.val_check_interval=20", "debug=fdr"])
        )
    assert "never sees a value" not in caplog.text


def test_a_warmup_past_the_last_step_is_named(make_cfg, caplog):
    for warmup, warned in ((5, False), (50, True)):
        caplog.clear()
        cfg = make_cfg(["experiment=shapes_autoencoder", *TINY_SHAPES, "trainer.max_steps=10",
                        f"model.scheduler.warmup_steps={warmup}"])  # fmt: skip
        with caplog.at_level(logging.WARNING, logger="imagen"):
            check_train_config(cfg)
        message = f"model.scheduler.warmup_steps={warmup} is past trainer.max_steps=10"
        assert (message in caplog.text) == warned


def test_time_based_validation_and_interpolations_pass_the_type_checks(make_cfg, tmp_path):
    """A duration for val_check_interval is Lightning's; interpolated values are not resolved by the checks (a run
    id's resolver writes a file)."""
    for interval in ("00:01:00:00", "{hours: 1}"):
        check_train_config(make_cfg(["experiment=shapes_autoencoder", *TINY_SHAPES,
                                     f"trainer.val_check_interval={interval}"]))  # fmt: skip
    cfg = make_cfg(
        ["experiment=shapes_autoencoder", *TINY_SHAPES, "logger=wandb", f"paths.output_dir={tmp_path}"]
    )
    check_train_config(cfg)
    assert not list(tmp_path.glob(".run_id*")), "the checks resolved the W&B run id"


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.caption_decoding.top_p=0", r"model.caption_decoding: top_p must be in \(0, 1\]; got 0"),
        ("model.sampling.temperature=-1", "model.sampling: temperature must be >= 0; got -1"),
        ("model.rerank.candidates=2.5", "model.rerank.candidates must be an integer >= 1; got 2.5"),
        ("model.loss_weights.caption=-1", "model.loss_weights.caption must be >= 0; got -1"),
        ("+model.caption_decoding.topp=0.5", r"model.caption_decoding.topp is not a setting; valid keys: \["),
    ],
)
def test_a_stage_settings_value_is_refused_before_the_stage_is_built(make_cfg, tmp_path, override, message):
    cfg = make_cfg(["experiment=shapes_joint", f"model.autoencoder_ckpt={tmp_path / 'ae.ckpt'}", override])
    with pytest.raises(ConfigError, match=message):
        check_train_config(cfg)


def test_a_key_its_target_does_not_take_is_refused_before_any_data_is_read(make_cfg, tmp_path):
    from imagen.cli.checks import check_argument_types

    cfg = make_cfg(["experiment=shapes_autoencoder", "+callbacks.model_checkpoint.every_n_step=5"])
    with pytest.raises(
        ConfigError,
        match=r"callbacks.model_checkpoint.every_n_step: .*LastAndBestCheckpoint takes no argument 'every_n_step'; "
        r"it takes \[.*'every_n_train_steps'",
    ):
        check_train_config(cfg)
    # a size registry's builder takes its config's fields, judged by their types
    generator = ["experiment=shapes_generator", f"model.autoencoder_ckpt={tmp_path / 'ae.ckpt'}"]
    for override, message in (
        (
            "+model.net.dimm=8",
            r"model.net.dimm: .*ARTransformer.from_size takes no argument 'dimm'; it takes \[",
        ),
        (
            "+model.image_text.layer=2",
            r"model.image_text.layer: .*ImageTextNet.from_size takes no argument 'layer'",
        ),
        ("model.net.dropout=lots", r"model.net.dropout='lots' must be a number"),
    ):
        cfg = make_cfg([*generator, override] if "image_text" not in override else
                       ["experiment=shapes_joint", *generator[1:], override])  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            check_argument_types(cfg.model, "model")
    # a target that takes **kwargs takes any key: DDPStrategy hands them to torch's DistributedDataParallel
    for extra in (
        [],
        ["trainer.strategy.find_unused_parameters=true"],
        ["+trainer.strategy.static_graph=true"],
    ):
        check_train_config(make_cfg(["experiment=shapes_autoencoder", *TINY_SHAPES, "trainer=ddp", *extra]))
    # the real-corpus experiments keep their text encoder's sizes in an option, which `pretrained` replaces whole
    for experiment in ("coco_generator", "wds_generator", "coco_joint"):
        cfg = make_cfg([f"experiment={experiment}", "model/text_encoder=pretrained"])
        check_argument_types(cfg.model, "model")
        assert "vocab_size" not in cfg.model.text_encoder
        scratch = make_cfg([f"experiment={experiment}"]).model.text_encoder
        assert (scratch.dim, scratch.vocab_size) == (512, 32768 if experiment == "wds_generator" else 16384)


class _Base:
    def __init__(self, a: int = 1, b: int = 2):
        self.a, self.b = a, b


class _HandsKeywordsOn(_Base):
    def __init__(self, x: int = 0, **kwargs):
        super().__init__(**kwargs)


class _PopsAKeyword(_Base):
    def __init__(self, **kwargs):
        self.x = kwargs.pop("x", 0)
        super().__init__(**kwargs)


class _KeepsKeywords(_Base):
    def __init__(self, x: int = 0, **options):
        self.options = options
        super().__init__(a=x)


def test_the_arguments_a_target_takes_follow_its_keywords_to_its_base_only_when_it_hands_them_on_whole():
    from imagen.cli.checks import _target_arguments

    def accepted(name: str):
        return _target_arguments(f"tests.test_config_errors.{name}")[1]

    assert accepted("_HandsKeywordsOn") == {"self", "x", "a", "b"}
    assert accepted("_PopsAKeyword") is None  # takes x, which its base does not: not judged
    assert accepted("_KeepsKeywords") is None
    assert accepted("_Base") == {"self", "a", "b"}
