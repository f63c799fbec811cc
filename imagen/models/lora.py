"""LoRA adapters (peft) on the `nn.Linear` layers of plain modules, merged back into the weights for sampling and
export.

Adapters are injected in place (`peft.inject_adapter_in_model`): a targeted `nn.Linear` named `q` becomes a
peft `lora.Linear` whose state-dict keys are `q.base_layer.weight` (the frozen weight), `q.lora_A.default.weight`
(r, in) and `q.lora_B.default.weight` (out, r); its output is `base(x) + alpha / r * B(A(dropout(x)))`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from imagen.values import is_int

ADAPTER = "default"  # peft's adapter name: the middle part of the adapters' state-dict keys


@dataclass
class LoraSettings:
    """`model.lora`: adapters of rank `r` on the layers named by `target_modules` inside `modules`."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # layer names matched like peft does (the name itself or its last dotted parts, e.g. q, kv, mlp.0);
    # None: the stage's default
    target_modules: list[str] | None = None
    modules: list[str] | None = None  # the submodules that get adapters (e.g. net); None: the stage's default
    # submodules trained in full beside the adapters; None: the stage's default
    trainable: list[str] | None = None

    def __post_init__(self) -> None:
        if not is_int(self.r) or self.r < 1:
            raise ValueError(f"model.lora.r must be an integer >= 1; got {self.r!r}")
        if self.alpha <= 0:
            raise ValueError(f"model.lora.alpha must be > 0; got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout must be in [0, 1); got {self.dropout}")
        for key in ("target_modules", "modules", "trainable"):
            value = getattr(self, key)
            if isinstance(value, str):
                raise ValueError(f"model.lora.{key} must be a list of names, e.g. [{value}]; got {value!r}")
            if value is not None:
                setattr(self, key, [str(v) for v in value])

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def add_lora(module: nn.Module, settings: LoraSettings, key: str = "model.lora") -> list[str]:
    """Inject adapters into the `nn.Linear` layers of `module` named by `settings.target_modules`; returns the
    adapted layers' names. A target that matches no layer, or a layer that is not `nn.Linear`, is an error."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = list(settings.target_modules or [])
    if not targets:
        raise ValueError(f"{key}.target_modules is empty: name the nn.Linear layers to adapt, e.g. [q, kv]")
    wrong = [
        f"{name} ({type(m).__name__})"
        for name, m in module.named_modules()
        if any(name == t or name.endswith(f".{t}") for t in targets) and not isinstance(m, nn.Linear)
    ]
    if wrong:
        raise ValueError(
            f"{key}.target_modules must name nn.Linear layers; these are not: {', '.join(wrong)}"
        )
    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets
    )
    try:
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"{key}.target_modules={targets}: {str(e).splitlines()[0]}") from None
    return [name for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]


def has_lora(module: nn.Module) -> bool:
    """Whether `module` holds a LoRA adapter anywhere (a merged one leaves none)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


@torch.no_grad()
def merge_lora(module: nn.Module) -> int:
    """Fold every adapter of `module` into its base weight and put the plain layer back (in place); returns the
    number of layers merged. Outputs are unchanged up to rounding; sampling then runs at the plain speed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, m) for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, layer.get_base_layer())
    for m in module.modules():
        if hasattr(m, "peft_config"):  # peft's record on the module it injected into
            del m.peft_config
    return len(layers)


def merge_lora_state(state: dict, settings: LoraSettings) -> dict:
    """A state dict with LoRA keys -> the plain one: `W = W_base + alpha / r * B @ A` for every adapted layer
    (the same as `merge_lora` on the module, for checkpoints that are not loaded into a model)."""
    out = {}
    suffix = ".base_layer.weight"
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if key.endswith(suffix):
            prefix = key[: -len(suffix)]
            a, b = state[f"{prefix}.lora_A.{ADAPTER}.weight"], state[f"{prefix}.lora_B.{ADAPTER}.weight"]
            out[f"{prefix}.weight"] = (value.float() + settings.scale * b.float() @ a.float()).to(value.dtype)
        else:
            out[key.replace(".base_layer.", ".")] = value
    return out
