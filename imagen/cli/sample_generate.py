"""`python sample.py ckpt=PATH prompts=[...]`: text -> image with a trained generator checkpoint.

Writes one PNG per image (`images/PPP_SS.png`), a captioned grid (`grid.png`, one row per prompt) and
`samples.jsonl` (prompt, seed, checkpoint, settings, file, scores; written as the images are) into `out_dir`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace

import torch
from omegaconf import DictConfig, OmegaConf

from imagen.checkpoints import CheckpointError
from imagen.cli.checks import ConfigError
from imagen.cli.sample import IMAGE_SEED_STRIDE, check_trained, prepare_out_dir, resolve_device, text_lines
from imagen.images import captioned_grid, save_png, to_uint8
from imagen.models.text_encoder import CaptionTokenizer
from imagen.progress import progress_bar
from imagen.sampling.ar import SamplingSettings

log = logging.getLogger("imagen")


DECODE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def decode_dtype(name: str) -> torch.dtype:
    if name not in DECODE_DTYPES:
        raise ValueError(f"decode_dtype={name!r}: must be one of {sorted(DECODE_DTYPES)}")
    return DECODE_DTYPES[name]


def compile_decode(value, device: torch.device) -> bool:
    """`compile_decode`: auto (on a GPU), true or false (the stage compiles the decode step on a GPU only)."""
    if value == "auto":
        return device.type == "cuda"
    if not isinstance(value, bool):
        raise ValueError(f"compile_decode={value!r}: must be auto, true or false")
    return value


def read_prompts(cfg: DictConfig) -> list[str]:
    """Prompts from `prompts` (a list, or one prompt) and/or `prompts_file` (one per line); an empty result is an
    error."""
    given = cfg.prompts or []
    prompts = [str(p) for p in given] if OmegaConf.is_list(given) or isinstance(given, list) else [str(given)]
    if cfg.prompts_file:
        prompts += text_lines(cfg.prompts_file, "prompts_file")
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts and cfg.prompts_file:
        raise ConfigError(f"prompts_file={cfg.prompts_file} holds no prompts (it is empty or blank); write one "
                          "prompt per line, or pass prompts='[\"a small red circle on the left\"]'")  # fmt: skip
    if not prompts:
        raise ConfigError(
            "no prompts: pass prompts='[\"a small red circle on the left\"]' or prompts_file=FILE"
        )
    return prompts


def load_generator(path: str, trust: bool):
    """The generator or joint stage of a checkpoint; a checkpoint of another stage, or a joint one whose generator
    was not trained, is a clear error."""
    from imagen.checkpoints import read_checkpoint
    from imagen.stages.ar_generator import ARGeneratorStage
    from imagen.stages.joint import JointStage

    checkpoint = read_checkpoint(path, trust)  # read once: it picks the class and fills the stage
    info = checkpoint.get("imagen")
    cls = JointStage if isinstance(info, dict) and info.get("stage") == JointStage.STAGE else ARGeneratorStage
    try:
        stage = cls.from_checkpoint(path, trust=trust, checkpoint=checkpoint)
    except CheckpointError:
        raise
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} is not a compatible {cls.STAGE} checkpoint: {e}") from None
    if cls is JointStage:
        check_trained(stage, checkpoint, "generation", "generator", path)
    stage.merge_lora()  # a LoRA fine-tune samples at the plain model's speed
    return stage


def unknown_words(stage, prompts: list[str]) -> list[list[str]]:
    """Each prompt's words a word-level caption tokenizer lacks (read as [UNK]), with a warning naming them; none
    for a pretrained text encoder's subword tokenizer."""
    tokenizer = getattr(stage.text_encoder, "tokenizer", None)
    if not isinstance(tokenizer, CaptionTokenizer):
        return [[] for _ in prompts]
    unknown = [tokenizer.unknown_words(prompt) for prompt in prompts]
    for prompt, words in zip(prompts, unknown, strict=True):
        if words:
            log.warning(f"prompt {prompt!r}: {words} are not in the checkpoint's caption vocabulary; the text "
                        "encoder reads each as [UNK]")  # fmt: skip
    return unknown


def sampling_settings(cfg: DictConfig, recorded: SamplingSettings) -> SamplingSettings:
    """The settings given on the command line; a null one is the checkpoint's `recorded` (its validation's);
    `top_k=0` turns top-k off."""
    keys = ("cfg_scale", "cfg_until", "temperature", "top_k", "top_p")
    given = {key: cfg[key] for key in keys if cfg[key] is not None}
    if given.get("top_k") == 0:
        given["top_k"] = None
    return replace(recorded, **given)


@torch.no_grad()
def sample_generate(cfg: DictConfig) -> dict:
    prompts = read_prompts(cfg)
    device = resolve_device(cfg.device)
    dtype, compiled = decode_dtype(cfg.decode_dtype), compile_decode(cfg.compile_decode, device)
    stage = load_generator(cfg.ckpt, cfg.trust_checkpoint)
    stage.to(device)
    stage.net.to(dtype)  # the generator's weights; its KV cache follows them
    stage.compile_decode = compiled
    settings = sampling_settings(cfg, stage.sampling)
    candidates = cfg.rerank_candidates or 1
    if candidates > 1 and not hasattr(stage, "generate_reranked_tokens"):
        raise ValueError(f"rerank_candidates={candidates} needs a joint-stage checkpoint (a matching head); {cfg.ckpt} "
                         "is a generator checkpoint")  # fmt: skip
    unknown = unknown_words(stage, prompts)
    # everything checked: an earlier run's outputs may go now
    out_dir = prepare_out_dir(cfg, ("images", "grid.png", "samples.jsonl"))
    (out_dir / "images").mkdir()
    # sample s of every prompt has seed `seed + s * 2^32`, and its draws depend on that seed alone (`race_noise`)
    jobs = [(p, prompt, s) for p, prompt in enumerate(prompts) for s in range(cfg.n)]
    per_call = max(1, cfg.batch_size // candidates)  # each kept image costs `candidates` samples
    images, records = [], []
    # a record is written as its image is: an interrupted run leaves every image it saved described
    with progress_bar() as progress, open(out_dir / "samples.jsonl", "w") as manifest:
        task = progress.add_task(f"sampling {len(jobs)} images", total=len(jobs))
        for start in range(0, len(jobs), per_call):
            batch = jobs[start : start + per_call]
            captions = [caption for _, caption, _ in batch]
            seeds = [cfg.seed + s * IMAGE_SEED_STRIDE for _, _, s in batch]
            seed_tensor = torch.tensor(seeds, device=device)
            text = stage.encode_text(captions)
            if candidates > 1:
                tokens, rerank_scores = stage.generate_reranked_tokens(
                    captions, candidates, settings, seeds=seed_tensor
                )
            else:
                tokens = stage.generate_tokens(text, settings, seeds=seed_tensor)
                rerank_scores = [None] * len(batch)
            pixels = stage.decode_tokens(tokens)
            scores = stage.token_logprob(tokens, text)
            for (p, caption, s), seed, image, score, best in zip(
                batch, seeds, pixels, scores, rerank_scores, strict=True
            ):
                file = out_dir / "images" / f"{p:03d}_{s:02d}.png"
                save_png(to_uint8(image[None])[0], file)
                images.append(image.cpu())
                # `prompts=[<prompt>] seed=<seed> n=1` with the same checkpoint and settings gives this image again
                record = {"prompt": caption, "prompt_index": p, "sample": s, "seed": seed, "ckpt": str(cfg.ckpt),
                          "settings": asdict(settings), "decode_dtype": cfg.decode_dtype,
                          "file": str(file.relative_to(out_dir)),
                          "scores": {"mean_token_logprob": round(float(score), 5)}}  # fmt: skip
                if best is not None:
                    record["scores"][f"rerank_{stage.rerank.score}"] = round(float(best), 5)
                    record["rerank_candidates"] = candidates
                if unknown[p]:
                    record["unknown_words"] = unknown[p]
                manifest.write(json.dumps(record) + "\n")
                records.append(record)
            manifest.flush()
            progress.update(task, advance=len(batch))
    grid = captioned_grid(torch.stack(images), [r["prompt"] for r in records], nrow=cfg.n)
    grid_path = save_png(grid, out_dir / "grid.png")
    log.info(f"wrote {len(records)} images, {grid_path} and {out_dir / 'samples.jsonl'}")
    return {"images": len(records), "grid": str(grid_path), "manifest": str(out_dir / "samples.jsonl")}
