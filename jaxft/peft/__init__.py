"""Parameter-efficient finetuning: methods transform the parameter tree and
filter what trains; they never fork a model class.

The trainer calls two functions of this package:
- `transform_model(model, cfg, rngs)`: add method variables (LoRA adapters)
  to a freshly built model; identity for full finetuning and sparse FT.
- `trainable_filter(peft_cfg, train_cfg)`: the nnx filter of what trains.
"""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx

from jaxft.config.schema import PeftConfig, TrainConfig


def transform_model(model: nnx.Module, cfg: PeftConfig, rngs: nnx.Rngs) -> nnx.Module:
    if cfg.method == "lora":
        from jaxft.peft.lora import apply_lora
        return apply_lora(model, cfg.lora, rngs=rngs)
    return model


def trainable_filter(peft_cfg: PeftConfig, train_cfg: TrainConfig) -> Callable[[tuple[Any, ...], Any], bool]:
    from jaxft.train.state import param_filter

    if peft_cfg.method == "lora":
        from jaxft.peft.lora import lora_trainable_filter
        return lora_trainable_filter(peft_cfg.lora)
    return param_filter(train_cfg)


def l1_strength(cfg: PeftConfig) -> float:
    """Sparse FT's L1 pull towards the starting point (0 for other methods)."""
    return cfg.sparse.l1 if cfg.method == "sparse" else 0.0
