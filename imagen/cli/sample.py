"""`python sample.py`: generate images from text, caption images, or tag entities with a trained checkpoint."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from imagen.checkpoints import CheckpointError
from imagen.cli.checks import ConfigError, config_errors_in_one_line, expect_bool, expect_number
from imagen.cli.utils import apply_extras, task_wrapper
from imagen.files import file_in_the_way
from imagen.sampling.ar import IMAGE_SEED_STRIDE

log = logging.getLogger("imagen")

TASKS = ("generate", "caption", "ner")
SAMPLE_IMAGE = re.compile(r"\d{3,}_\d{2,}\.png")  # images/PPP_SS.png


def resolve_device(name: str | int) -> torch.device:
    """`device`: auto (a GPU if there is one), cpu, cuda or cuda:N; another name, or CUDA where there is none, is an
    error naming the key."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name}: CUDA is not available on this machine; use device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={name}: this machine has {torch.cuda.device_count()} GPUs (cuda:0 ...)")
    return device


def expect_fraction(cfg: DictConfig, key: str, fix: str) -> None:
    """`key`, when set, must be a number in (0, 1]."""
    expect_number(cfg, key, float, float("-inf"), fix)  # a finite number
    value = cfg.get(key)
    if value is not None and not 0 < value <= 1:
        raise ConfigError(f"{key}={value} must be in (0, 1]; {fix}")


def check_generation_settings(cfg: DictConfig) -> None:
    """task=generate's sampling settings (null: the checkpoint's own)."""
    expect_number(cfg, "rerank_candidates", int, 1, "1: no reranking, e.g. rerank_candidates=4")
    if cfg.seed + (cfg.n - 1) * IMAGE_SEED_STRIDE >= 2**63:
        raise ConfigError(f"seed={cfg.seed} is too large for n={cfg.n}: sample s gets seed + s * 2^32, which must "
                          "stay below 2^63")  # fmt: skip
    # guided logits = unconditional + cfg_scale x (conditional - unconditional)
    expect_number(cfg, "cfg_scale", float, 0, "the guidance scale: 0 samples unconditionally (the prompt is "
                   "ignored), 1 conditionally without guidance, above 1 with guidance, e.g. cfg_scale=1.5")  # fmt: skip
    expect_fraction(cfg, "cfg_until", "the fraction of each image's tokens sampled with guidance, "
                   "e.g. cfg_until=0.5")  # fmt: skip
    expect_number(cfg, "temperature", float, 0, "0: greedy, e.g. temperature=0.7")
    expect_number(cfg, "top_k", int, 0, "0: no top-k cut-off, e.g. top_k=20")
    expect_fraction(cfg, "top_p", "1: no nucleus cut-off, e.g. top_p=0.9")


def check_caption_settings(cfg: DictConfig) -> None:
    """task=caption's decoding settings (null: the checkpoint's own, model.caption_decoding)."""
    from imagen.sampling.caption import METHODS

    method = cfg.get("decoding")
    if method is not None and method not in METHODS:
        raise ConfigError(f"decoding={method!r} is not a caption decoding method; use decoding=greedy, beam or "
                          "nucleus, or null for the checkpoint's own")  # fmt: skip
    expect_number(cfg, "beam_size", int, 1, "the beams kept, e.g. beam_size=4")
    expect_fraction(cfg, "caption_top_p", "nucleus decoding's cut-off, e.g. caption_top_p=0.9")  # fmt: skip
    expect_number(cfg, "caption_temperature", float, 0, "0: greedy, e.g. caption_temperature=1.0")
    for key in ("caption_match_weight", "caption_generator_weight"):
        expect_number(cfg, key, float, 0, f"0: not used, e.g. {key}=1.0")


def check_out_dir(out_dir) -> Path:
    """`out_dir` as a path: an existing folder, or one that can be created (no part of it is a file)."""
    if out_dir is None or not str(out_dir).strip():
        raise ConfigError(f"out_dir={out_dir!r} must be a folder; e.g. out_dir=samples/run1")
    path = Path(str(out_dir))
    blocking = file_in_the_way(path)
    if blocking is not None:
        problem = (
            "exists and is not a folder"
            if blocking == path
            else f"lies inside {blocking}, which is not a folder"
        )
        raise ConfigError(
            f"out_dir={path} {problem}; choose another out_dir (by default each run gets a new one)"
        )
    return path


def check_settings(cfg: DictConfig) -> None:
    """The settings of every task, checked before a checkpoint is read or an output written; each failure names its
    key."""
    required = {"batch_size": "e.g. batch_size=16", "seed": "e.g. seed=0"}
    if cfg.task == "generate":
        required["n"] = "the images per prompt, e.g. n=4"
    for key, fix in required.items():
        if cfg.get(key) is None:
            raise ConfigError(f"{key}=None must be an integer; {fix}")
        expect_number(cfg, key, int, 0 if key == "seed" else 1, fix)
    for key in ("overwrite", "trust_checkpoint"):
        expect_bool(cfg, key, required=True)
    if cfg.task == "generate":
        check_generation_settings(cfg)
    if cfg.task == "caption":
        check_caption_settings(cfg)
    resolve_device(cfg.device)
    check_out_dir(cfg.out_dir)


def prepare_out_dir(cfg: DictConfig, outputs: tuple[str, ...]) -> Path:
    """`out_dir`, created. The task's `outputs` there from an earlier run are an error naming them, or are deleted
    first with `overwrite=true`: a run's outputs are never mixed with stale ones."""
    out_dir = check_out_dir(cfg.out_dir)
    found = [name for name in outputs if (out_dir / name).exists()]
    if found and not cfg.overwrite:
        raise FileExistsError(
            f"out_dir={out_dir} holds an earlier run's {', '.join(found)}; choose another out_dir (by default each "
            "run gets a new one) or pass overwrite=true to delete them first"
        )
    folders = [
        out_dir / name for name in found if (out_dir / name).is_dir() and not (out_dir / name).is_symlink()
    ]
    for folder in folders:  # holding more than what sample.py writes there: nothing is deleted
        others = [p.name for p in folder.iterdir() if not SAMPLE_IMAGE.fullmatch(p.name)]
        if others:
            raise FileExistsError(f"out_dir={out_dir}: {folder} holds files sample.py did not write ({others[:3]}); "
                                  "choose another out_dir")  # fmt: skip
    for name in found:
        path = out_dir / name
        if path in folders:
            shutil.rmtree(path)
        else:
            path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def text_lines(path: str | Path, key: str) -> list[str]:
    """The lines of a UTF-8 text file (a byte order mark is dropped; split at \\n, \\r\\n or \\r). A missing file, or
    a line that is not UTF-8, is an error naming `key`, the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}={path}: no such file")
    lines = []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            lines.append(raw.decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{key}={path}:{number}: not UTF-8 ({e.reason} at byte {e.start} of the line); convert the file, "
                "e.g. `iconv -f latin1 -t utf-8`"
            ) from None
    return lines


def check_trained(stage, checkpoint: dict, loss: str, head: str, path: str) -> None:
    """A joint-stage checkpoint trained with `model.loss_weights.<loss>=0` has an untrained `head`: an error, or a
    warning where the run started from another's weights (`model.init_from`), which that head keeps."""
    if getattr(stage.weights, loss):
        return
    init_from = (checkpoint.get("hyper_parameters") or {}).get("init_from")
    trained = f"checkpoint {path} was trained with model.loss_weights.{loss}=0"
    if init_from:
        log.warning(f"{trained}: its {head} is that of the run it started from (model.init_from={init_from})")
        return
    raise CheckpointError(
        f"{trained}: its {head} is untrained; use a checkpoint trained with model.loss_weights.{loss} > 0"
    )


@task_wrapper
def sample(cfg: DictConfig) -> dict:
    """Run the task named by `cfg.task`; returns a summary (output paths and counts)."""
    apply_extras(cfg)
    check_settings(cfg)
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
@config_errors_in_one_line
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
