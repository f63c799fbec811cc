"""`python -m imagen.cli.encode`: write the pre-tokenized cache of an image-text dataset (see
`imagen.data.token_cache`); the config is `conf/encode.yaml`."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import imagen.cli.utils  # noqa: F401  (registers the config resolvers)
from imagen.cli.checks import ConfigError, config_errors_in_one_line, expect_bool, expect_number
from imagen.data.formats import SPLITS
from imagen.data.token_cache import rank_and_world, write_token_cache
from imagen.files import file_in_the_way

log = logging.getLogger("imagen")


def check_encode_config(cfg: DictConfig) -> None:
    """The encode settings, checked before the data is indexed or the checkpoint read; each failure names its key."""
    for key, fix in (
        ("shard_size", "samples per shard, e.g. shard_size=10000"),
        ("batch_size", "e.g. batch_size=64"),
    ):
        if cfg.get(key) is None:
            raise ConfigError(f"{key}=None must be an integer; {fix}")
        expect_number(cfg, key, int, 1, fix)
    expect_number(
        cfg, "max_shards", int, 1, "the shards to write per split in this run, or null for all of them"
    )
    expect_bool(cfg, "trust_checkpoint")
    splits = OmegaConf.to_container(cfg.splits) if OmegaConf.is_list(cfg.splits) else cfg.splits
    valid = f"list some of {', '.join(SPLITS)}, e.g. splits=[{','.join(SPLITS)}]"
    if not isinstance(splits, list):
        raise ConfigError(f"splits={splits!r} must be a list; {valid}")
    if not splits:
        raise ConfigError(f"splits=[]: nothing to encode; {valid}")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ConfigError(f"splits={splits}: {unknown[0]!r} is not a split; {valid}")
    if len(set(splits)) < len(splits):
        raise ConfigError(f"splits={splits} names a split twice; list each once")
    if cfg.device != "auto":
        from imagen.cli.sample import resolve_device

        try:
            resolve_device(cfg.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    out = Path(cfg.out_dir)
    for folder in (out, *(out / s for s in splits)):  # out_dir and the splits' folders in it
        blocking = file_in_the_way(folder)
        if blocking is not None:
            raise ConfigError(f"out_dir={out}: {blocking} is a file, not a folder; point out_dir at a folder "
                              "(a new one is created)")  # fmt: skip


def encode(cfg: DictConfig) -> dict:
    """Build the datamodule from `cfg.data` and encode `cfg.splits` into `cfg.out_dir`."""
    check_encode_config(cfg)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    result = write_token_cache(cfg.autoencoder_ckpt, datamodule, cfg.out_dir, tuple(cfg.splits), cfg.shard_size,
                               cfg.batch_size, cfg.device, cfg.max_shards, cfg.trust_checkpoint)  # fmt: skip
    for split, names in result.items():
        log.info(f"{split}: wrote {len(names['written'])} shards, {len(names['skipped'])} already finished")
    unfinished = {split: len(names["unfinished"]) for split, names in result.items() if names["unfinished"]}
    if unfinished:  # other processes' shards, or those past max_shards: no index.json for these splits yet
        world = rank_and_world()[1]
        waits = [f"max_shards={cfg.max_shards} stopped this run"] if cfg.max_shards is not None else []
        waits += [f"the other {world - 1} processes must finish theirs"] if world > 1 else []
        log.warning(f"token cache {cfg.out_dir} is not complete: shards still unfinished by split {unfinished} "
                    f"({'; '.join(waits) or 'not encoded'}); rerun this command to encode them")  # fmt: skip
    else:
        log.info(f"token cache: {cfg.out_dir}")
    return result


@hydra.main(version_base="1.3", config_path="pkg://imagen.conf", config_name="encode")
@config_errors_in_one_line
def main(cfg: DictConfig) -> None:
    encode(cfg)


if __name__ == "__main__":
    main()
