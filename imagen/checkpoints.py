"""Reading checkpoints safely and loading weights strictly, with a report of what did not match."""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, unsafe, or from an incompatible stage or config."""


def read_checkpoint(path: str | Path, trust: bool = False) -> dict[str, Any]:
    """Load a checkpoint file onto the CPU without executing code from it.

    The file is read with `torch.load(weights_only=True)`. A file that needs full unpickling (it holds
    arbitrary Python objects) is refused unless `trust=True`, since unpickling can run code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust:
            raise CheckpointError(
                f"checkpoint {path} holds Python objects that only full unpickling can load, and unpickling can "
                f"run code; refusing it. If you trust its source, pass the trust flag (trust_checkpoint=true). "
                f"({str(e).splitlines()[0]})"
            ) from None
        log.warning(f"loading {path} with full unpickling (trusted by the caller)")
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
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


def load_autoencoder(path: str | Path, trust: bool = False):
    """Rebuild the trained `Autoencoder` of an autoencoder-stage checkpoint (frozen, in eval mode)."""
    from imagen.models.autoencoder import Autoencoder, AutoencoderConfig

    checkpoint = read_checkpoint(path, trust)
    info = stage_info(checkpoint, path, "autoencoder")
    model = Autoencoder(AutoencoderConfig(**info["net_config"]))
    load_state_strict(model, checkpoint["state_dict"], prefix="net.", source=str(path))
    return model.eval().requires_grad_(False)
