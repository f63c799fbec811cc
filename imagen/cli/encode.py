"""`python -m imagen.cli.encode`: write the pre-tokenized cache of an image-text dataset (see
`imagen.data.token_cache`); the config is `conf/encode.yaml`."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

import imagen.cli.utils  # noqa: F401  (registers the config resolvers)
from imagen.data.token_cache import write_token_cache

log = logging.getLogger("imagen")


def encode(cfg: DictConfig) -> dict:
    """Build the datamodule from `cfg.data` and encode `cfg.splits` into `cfg.out_dir`."""
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    result = write_token_cache(cfg.autoencoder_ckpt, datamodule, cfg.out_dir, tuple(cfg.splits), cfg.shard_size,
                               cfg.batch_size, cfg.device, cfg.max_shards)  # fmt: skip
    for split, names in result.items():
        log.info(f"{split}: wrote {len(names['written'])} shards, {len(names['skipped'])} already finished")
    unfinished = {split: len(names["unfinished"]) for split, names in result.items() if names["unfinished"]}
    if unfinished:  # other processes' shards (or those past max_shards): no index.json for these splits yet
        log.warning(f"token cache {cfg.out_dir} is not complete: shards still unfinished by split {unfinished}; "
                    "it loads once the other processes finish theirs, or rerun this command to encode them")  # fmt: skip
    else:
        log.info(f"token cache: {cfg.out_dir}")
    return result


@hydra.main(version_base="1.3", config_path="pkg://imagen.conf", config_name="encode")
def main(cfg: DictConfig) -> None:
    encode(cfg)


if __name__ == "__main__":
    main()
