"""`python sample.py`: generate images from text, caption images, or tag entities with a trained checkpoint."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from imagen.cli.utils import apply_extras, task_wrapper

log = logging.getLogger("imagen")

TASKS = ("generate", "caption", "ner")


@task_wrapper
def sample(cfg: DictConfig) -> dict:
    """Run the task named by `cfg.task`; returns a summary (output paths and counts)."""
    apply_extras(cfg)
    if cfg.task == "ner":
        from imagen.cli.sample_ner import sample_ner

        return sample_ner(cfg)
    if cfg.task == "generate":
        from imagen.cli.sample_generate import sample_generate

        return sample_generate(cfg)
    if cfg.task == "caption":
        from imagen.cli.sample_caption import sample_caption

        return sample_caption(cfg)
    raise ValueError(f"task={cfg.task!r} is not available yet; choose from {TASKS}")


@hydra.main(version_base="1.3", config_path="pkg://imagen.conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
