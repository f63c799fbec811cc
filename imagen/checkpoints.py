"""Checkpoints: written atomically, read safely (no code runs), found for resuming, exported to safetensors, and
loaded strictly with a report of what did not match."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import pickle
import re
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml
from lightning.pytorch import LightningDataModule
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod

from imagen.files import atomic_file, file_in_the_way

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, unsafe, or from an incompatible stage or config."""


class StageLoading:
    """LightningModule mixin. A stage is built from modules (`net`, `text_encoder`, the optimizer's partial), which are
    not hyperparameters, so Lightning's `load_from_checkpoint(path)` alone cannot rebuild it: its error names the
    loader that can (`LOADER`)."""

    LOADER = ""

    @_restricted_classmethod  # Lightning's: refused on an instance (it returns a new module, and leaves this one)
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        except TypeError as e:
            if not any(f"required {kind} argument" in str(e) for kind in ("positional", "keyword-only")):
                raise
            raise TypeError(
                f"{cls.__name__}.load_from_checkpoint({checkpoint_path}) needs the modules the stage was built with "
                f"({e}); to rebuild the trained model from the checkpoint alone: {cls.LOADER}"
            ) from e


EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.yaml"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_sha256(path: str | Path) -> str:
    """The SHA-256 of a checkpoint file, or of an exported folder's weights: which weights a later run was given."""
    path = Path(path)
    return file_sha256(path / EXPORT_WEIGHTS if path.is_dir() else path)


# torch's weights-only unpickler refusing a global the file names: not allowlisted, or from a blocked module (`os`)
DISALLOWED_GLOBAL = re.compile(
    r"GLOBAL (\S+) (?:was not an allowed global by default|whose module \S+ is blocked)"
)


def weights_only_error(error: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler met, without the advice it wraps it in (to load with full unpickling)."""
    message = str(error).split("Check the documentation of torch.load")[0]
    _, found, reason = message.rpartition("WeightsUnpickler error:")
    return reason.strip() if found else message.strip().splitlines()[0]


def _torch_load(path: Path, mmap: bool, weights_only: bool) -> dict[str, Any]:
    """`torch.load` onto the CPU; a truncated or corrupt file is a `CheckpointError` naming it (an unpickling error
    is left to the caller)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    # LookupError: the weights-only unpickler's stack and memo, read from random bytes
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, LookupError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {e}") from None
    # torch's zip reader meets some truncations as EINVAL, naming no file; others are I/O
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {e}") from None


def read_checkpoint(path: str | Path, trust: bool = False, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint onto the CPU without executing code from it.

    `path` is a Lightning checkpoint file, read with `torch.load(weights_only=True)`, or a folder written by
    `export_checkpoint` (safetensors weights + YAML). A file that needs full unpickling (it holds arbitrary Python
    objects) is refused unless `trust=True`, since unpickling can run code. `mmap`: the tensors of a file are
    mapped, not read, until used (for a look at its description: cheap on a checkpoint of many GB).
    """
    path = Path(path)
    if path.is_dir():
        if (path / EXPORT_WEIGHTS).is_file():
            return read_export(path)
        last = path / "checkpoints" / "last.ckpt"
        raise CheckpointError(
            f"checkpoint {path} is a folder without {EXPORT_WEIGHTS}, so not an exported checkpoint "
            f"(`python -m imagen.cli.export CKPT DIR` writes one); pass a checkpoint file"
            + (f", e.g. the run's {last}" if last.is_file() else "")
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    # only torch.save's zip format maps; an older or corrupt file is read whole
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        return _torch_load(path, mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        # the one refusal a sound file meets: a global (a class or function to call) outside torch's allowlist
        refused = DISALLOWED_GLOBAL.search(str(e))
        if refused is None:
            raise CheckpointError(
                f"checkpoint {path} is truncated or corrupt: {weights_only_error(e)}"
            ) from None
        if not trust:
            raise CheckpointError(
                f"checkpoint {path} holds Python objects that only full unpickling can load ({refused[1]}), and "
                f"unpickling can run code; refusing it. If you trust its source, pass the trust flag "
                f"(trust_checkpoint=true)."
            ) from None
    log.warning(f"loading {path} with full unpickling (trusted by the caller)")
    try:
        return _torch_load(path, mmap, weights_only=False)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {e}") from None


def stage_info(checkpoint: dict, path: str | Path, stage: str) -> dict:
    """The plain-type description a stage stores in `checkpoint["imagen"]`; checks it is from `stage`."""
    info = checkpoint.get("imagen")
    if not isinstance(info, dict) or "stage" not in info:
        raise CheckpointError(f"checkpoint {path} was not written by an imagen stage (no 'imagen' entry)")
    if info["stage"] != stage:
        raise CheckpointError(
            f"checkpoint {path} is from the {info['stage']!r} stage; expected a {stage!r} checkpoint"
        )
    return info


def load_state_strict(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str = "", source: str = ""
) -> None:
    """Load the entries of `state_dict` under `prefix` into `module`; any missing, unexpected or mis-shaped key
    is an error that lists them all."""
    if prefix:
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own
        and isinstance(v, torch.Tensor)
        and isinstance(own[k], torch.Tensor)
        and v.shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {source} does not match {type(module).__name__}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
                lines.append(f"  {title} keys: {shown}")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(state_dict, strict=True)


def load_autoencoder(path: str | Path, trust: bool = False, checkpoint: dict | None = None):
    """Rebuild the trained `Autoencoder` of an autoencoder-stage checkpoint (frozen, in eval mode); `checkpoint`:
    its contents, when the caller has read them already."""
    from imagen.models.autoencoder import Autoencoder, AutoencoderConfig

    checkpoint = read_checkpoint(path, trust) if checkpoint is None else checkpoint
    info = stage_info(checkpoint, path, "autoencoder")
    model = Autoencoder(AutoencoderConfig(**info["net_config"]))
    load_state_strict(model, checkpoint["state_dict"], prefix="net.", source=str(path))
    return model.eval().requires_grad_(False)


def trained_image_size(checkpoint: dict) -> int | None:
    """The `data.image_size` an autoencoder checkpoint was trained at: its `imagen` entry's (kept by an export), else
    its datamodule's hyperparameters (which Lightning saves); None where neither says."""
    size = (checkpoint.get("imagen") or {}).get("image_size")
    if size is None:
        size = (checkpoint.get(LightningDataModule.CHECKPOINT_HYPER_PARAMS_KEY) or {}).get("image_size")
    return size


def warn_image_size(checkpoint: dict, path: str | Path, image_size: int, key: str) -> None:
    """Warn when images of `image_size` px are to be encoded with an autoencoder trained at another size (a warning,
    not an error: the convolutional autoencoder runs at any size its factor divides). `key`: the config key that
    names the checkpoint."""
    trained = trained_image_size(checkpoint)
    if trained is not None and trained != image_size:
        log.warning(
            f"data.image_size={image_size}, but the autoencoder {key}={path} was trained at data.image_size={trained}: "
            f"its codes of {image_size} px images are off the distribution it learned, which costs quality; set "
            f"data.image_size={trained}, or train an autoencoder at {image_size} px"
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic on local disks: the checkpoint is written to a hidden temporary
    file in the same folder, flushed to disk, then renamed over the target, so a kill during a save leaves the
    previous file intact. Remote paths (`s3://...`) go through Lightning's own writer."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, one_writer=True) as temporary, open(temporary, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())


def find_resume_checkpoint(run_dir: str | Path, trust: bool = False) -> tuple[Path, dict] | None:
    """The newest readable checkpoint of a run directory, for resuming, and its contents; None if there is none.

    Candidates are `checkpoints/*.ckpt` and Lightning's SLURM requeue checkpoints (`hpc_ckpt_N.ckpt`), newest
    first; a truncated or corrupt one is reported (naming the file) and skipped. `trust`: as for `read_checkpoint`.
    """
    run_dir = Path(run_dir)
    candidates = [*(run_dir / "checkpoints").glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime_ns, reverse=True):
        try:
            return path, read_checkpoint(path, trust)
        except CheckpointError as e:
            log.warning(f"cannot resume from {e}; trying an older checkpoint")
    return None


def _plain(value: Any) -> Any:
    """`value` with tuples as lists, for YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def check_export_dir(out_dir: str | Path, overwrite: bool = False) -> None:
    """`out_dir` must be a folder (or not exist yet) that holds no export, unless `overwrite`: an earlier export is
    never replaced by mistake."""
    out_dir = Path(out_dir)
    blocking = file_in_the_way(out_dir)
    if blocking is not None:
        raise NotADirectoryError(
            f"OUT_DIR {out_dir}: {blocking} is a file, not a folder; give the folder to export into (a new one is "
            "created)"
        )
    found = [name for name in (EXPORT_WEIGHTS, EXPORT_CONFIG) if (out_dir / name).exists()]
    if found and not overwrite:
        try:
            stage = (
                f" of the {yaml.safe_load((out_dir / EXPORT_CONFIG).read_text())['imagen']['stage']} stage"
            )
        except (OSError, yaml.YAMLError, KeyError, TypeError):  # a partial or foreign config: the files only
            stage = ""
        raise FileExistsError(
            f"OUT_DIR {out_dir} already holds an export{stage} ({', '.join(found)}); choose another folder, or pass "
            "--overwrite (export_checkpoint(..., overwrite=True)) to replace it"
        )


def export_checkpoint(
    path: str | Path, out_dir: str | Path, trust: bool = False, overwrite: bool = False
) -> Path:
    """Write a stage checkpoint as `out_dir/model.safetensors` (the tensors of its state dict) plus
    `out_dir/config.yaml` (what rebuilds the model: the stage's `imagen` entry, its hyperparameters and any
    non-tensor state such as a tokenizer). `read_checkpoint(out_dir)` reads it back; no pickle is involved.
    LoRA adapters are merged into the weights: the export is the plain model that samples the same.

    A folder that already holds an export is refused (`FileExistsError`, before the checkpoint is read) unless
    `overwrite`. Both files are written beside their final names first and renamed into place only once both are
    complete: a failed export leaves an earlier one as it was."""
    from safetensors.torch import save_file

    check_export_dir(out_dir, overwrite)
    checkpoint = read_checkpoint(path, trust)
    info = checkpoint.get("imagen")
    if not isinstance(info, dict):
        raise CheckpointError(f"checkpoint {path} was not written by an imagen stage (no 'imagen' entry)")
    state = plain_state_dict(checkpoint["state_dict"], info)
    hyper_parameters = dict(checkpoint.get("hyper_parameters", {}))
    if info.get("lora"):
        info, hyper_parameters["lora"] = {**info, "lora": None}, None
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    config = {
        "imagen": _plain(info),
        "hyper_parameters": _plain(hyper_parameters),
        "extra_state": _plain({k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}),
        "source": {"checkpoint": str(path), "global_step": checkpoint.get("global_step")},
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights, config_file = out_dir / EXPORT_WEIGHTS, out_dir / EXPORT_CONFIG
    # the weights are renamed into place first, the config last: a reader sees the new weights with it
    with atomic_file(config_file) as config_draft, atomic_file(weights) as weights_draft:
        save_file(tensors, str(weights_draft), metadata={"format": "pt", "stage": config["imagen"]["stage"]})
        # safetensors writes a private temporary file (0600) and renames it: give it a new file's mode, as config.yaml
        umask = os.umask(0)  # reading the umask means setting it; put back at once
        os.umask(umask)
        weights_draft.chmod(0o666 & ~umask)
        config_draft.write_text(yaml.safe_dump(config, sort_keys=False))
    return out_dir


def read_export(out_dir: str | Path) -> dict[str, Any]:
    """A folder written by `export_checkpoint`, as a checkpoint-like dict (`state_dict`, `imagen`, ...)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    try:
        state = load_file(str(out_dir / EXPORT_WEIGHTS), device="cpu")
        config = yaml.safe_load((out_dir / EXPORT_CONFIG).read_text())
    except (SafetensorError, OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"exported checkpoint {out_dir} is incomplete or corrupt: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("imagen"), dict):
        raise CheckpointError(
            f"exported checkpoint {out_dir}: {EXPORT_CONFIG} has no 'imagen' entry (not written by an imagen export)"
        )
    state.update(config.get("extra_state") or {})
    return {
        "state_dict": state,
        "imagen": config["imagen"],
        "hyper_parameters": config.get("hyper_parameters", {}),
        "global_step": (config.get("source") or {}).get("global_step"),
    }


def check_config(theirs, ours, prefix: str, what: str, hint: str) -> None:
    """Two configs of one dataclass (a checkpoint's, this run's) must agree, but for the fields the dataclass lists in
    `training_only` (a run may set its own: dropout while fine-tuning): else an error naming every differing field
    as `prefix.field: checkpoint X, this run Y`."""
    a, b = asdict(theirs), asdict(ours)
    skip = getattr(type(ours), "training_only", ())
    diff = [
        f"{prefix}.{k}: checkpoint {a[k]!r}, this run {b[k]!r}" for k in b if a[k] != b[k] and k not in skip
    ]
    if diff:
        raise ValueError(
            f"{what} configured differently; set the run's config to match ({hint}):\n  " + "\n  ".join(diff)
        )


def plain_state_dict(state: dict, info: dict) -> dict:
    """A stage's state dict without LoRA adapters: those its `imagen` entry records are merged into the weights."""
    if not info.get("lora"):
        return state
    from imagen.models.lora import LoraSettings, merge_lora_state

    return merge_lora_state(state, LoraSettings(**info["lora"]))


def load_init_from(
    module: nn.Module,
    path: str | Path,
    stage: str,
    prefixes: tuple[str, ...],
    trust: bool = False,
    checkpoint: dict | None = None,
) -> dict:
    """Initialise the submodules of a stage named by `prefixes` (e.g. `net.`) from another run's checkpoint of
    the same stage (`model.init_from`), strictly: any mismatched key is an error that lists them. A checkpoint
    fine-tuned with LoRA gives its weights with the adapters folded in (`checkpoint`: the file's contents when the
    caller has read them already). Returns the checkpoint's `imagen` entry."""
    checkpoint = checkpoint if checkpoint is not None else read_checkpoint(path, trust)
    info = stage_info(checkpoint, path, stage)
    state = plain_state_dict(checkpoint["state_dict"], info)
    for prefix in prefixes:
        load_state_strict(module.get_submodule(prefix.rstrip(".")), state, prefix, str(path))
    log.info(f"initialised {', '.join(p.rstrip('.') for p in prefixes)} from {path}")
    return info
