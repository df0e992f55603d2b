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
    # regexes over parameter paths; the default: self- and cross-attention q/k/v/o (cross: encoder-decoders)
    targets: tuple[str, ...] = (r"(attn|cross)/(q|k|v|o)/kernel$",)
    init: Literal["kaiming", "gaussian"] = "kaiming"  # A's init; B starts at zero (PEFT's default)
    name: str = "default"  # adapter name; several can be stacked
    load: tuple[str, ...] = ()  # adapter dirs loaded (frozen) and stacked under the trained one
    rslora: bool = False  # rsLoRA: scale alpha / sqrt(rank) instead of alpha / rank (PEFT use_rslora)
    # regex over kernel paths -> rank / alpha for the Linears it matches (first match wins; PEFT rank_pattern)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # regexes over parameter paths of tensors trained fully with the adapter and saved with it (PEFT
    # modules_to_save), e.g. the embedding after adding language tags, or a norm
    modules_to_save: tuple[str, ...] = ()

    def __hash__(self) -> int:  # the patterns are dicts: configs are hashed (caches, static jit arguments)
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v for v in vars(self).values()))


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
