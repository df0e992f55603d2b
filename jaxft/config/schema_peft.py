"""The `peft:` section of the config schema (re-exported by `jaxft.config.schema`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the Linear kernels whose paths match `targets`."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input, training only (HF PEFT lora_dropout); in [0, 1)
    targets: tuple[str, ...] = (r"attn/(q|k|v|o)/kernel$",)  # regexes over parameter paths
    init: Literal["kaiming", "gaussian"] = "kaiming"  # A's init; B starts at zero (PEFT's default)
    name: str = "default"  # adapter name; several can be stacked
    load: tuple[str, ...] = ()  # adapter dirs loaded (frozen) and stacked under the trained one


@dataclass(frozen=True)
class SparseConfig:
    """Lottery-Ticket Sparse Fine-Tuning (Ansell et al. 2022)."""

    phase1_steps: int = 100  # full finetuning steps used to select the mask
    k: float = 0.01  # entries kept: a count (>= 1) or a proportion of maskable entries (< 1)
    maskable: tuple[str, ...] = (r".*",)  # regexes over parameter paths
    dense: tuple[str, ...] = ()  # regexes of tensors trained fully in phase 2 (e.g. a new head)
    mask_type: Literal["lt", "random", "magnitude"] = "lt"
    l1: float = 0.0  # phase 1: L1 pull towards the starting point


@dataclass(frozen=True)
class PeftConfig:
    """Parameter-efficient finetuning: LoRA or sparse fine-tuning (LT-SFT)."""

    method: Literal["none", "lora", "sparse"] = "none"
    lora: LoraConfig = field(default_factory=LoraConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    # Sparse diffs / LoRA adapters applied to the base before training, each
    # "path" or "path*scale" (e.g. a language diff under a task diff).
    compose: tuple[str, ...] = ()
    save_base: bool = False  # checkpoints hold only what trains (adapters / diffs), not the frozen base
