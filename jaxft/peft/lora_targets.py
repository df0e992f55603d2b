"""What a LoRA config touches, as pure functions of the config and parameter paths (so
`jaxft params` can show it from abstract shapes, and export can recompute it):

- the adapted Linears: kernels whose path (``layers/0/attn/q/kernel``) a
  `peft.lora.targets` regex finds (``re.search``);
- each one's rank and alpha: the first `rank_pattern` / `alpha_pattern` regex
  (in the order written) that finds its kernel path, else `rank` / `alpha`
  (PEFT's rank_pattern / alpha_pattern, over our paths instead of HF module names);
- its scale: ``alpha / rank``, or ``alpha / sqrt(rank)`` with `rslora`;
- the tensors trained fully and saved with the adapter: parameters (not adapter
  factors) whose path a `modules_to_save` regex finds.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

from jaxft.config.schema import LoraConfig


def compile_regexes(key: str, regexes: Iterable[str]) -> list[re.Pattern]:
    out = []
    for r in regexes:
        try:
            out.append(re.compile(r))
        except re.error as e:
            raise ValueError(f"{key}: bad regex {r!r}: {e}") from None
    return out


def check_config(cfg: LoraConfig) -> None:
    """One-line ValueErrors naming the key for what the schema's types cannot catch."""
    if cfg.rank < 1:
        raise ValueError(f"peft.lora.rank: must be >= 1, got {cfg.rank}")
    if cfg.init not in ("kaiming", "gaussian"):
        raise ValueError(f"peft.lora.init: unknown {cfg.init!r}; known: kaiming, gaussian")
    for key in ("targets", "modules_to_save"):
        compile_regexes(f"peft.lora.{key}", getattr(cfg, key))
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = getattr(cfg, key)
        compile_regexes(f"peft.lora.{key}", pattern)
        for regex, value in pattern.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (
                    key == "rank_pattern" and int(value) != value):
                what = "a positive integer rank" if key == "rank_pattern" else "a positive alpha"
                raise ValueError(f"peft.lora.{key}: {regex!r} -> {value!r}: expected {what}")


def target_kernels(cfg: LoraConfig, kernel_paths: Sequence[str]) -> list[str]:
    """The kernel paths (in the given order) a `targets` regex finds."""
    regexes = compile_regexes("peft.lora.targets", cfg.targets)
    return [p for p in kernel_paths if any(r.search(p) for r in regexes)]


def _first(pattern: dict, path: str, key: str):
    for regex, value in pattern.items():
        if compile_regexes(key, [regex])[0].search(path):
            return value
    return None


def rank_alpha(cfg: LoraConfig, kernel_path: str) -> tuple[int, float]:
    """``(rank, alpha)`` of the adapter on ``kernel_path``."""
    rank = _first(cfg.rank_pattern, kernel_path, "peft.lora.rank_pattern")
    alpha = _first(cfg.alpha_pattern, kernel_path, "peft.lora.alpha_pattern")
    return int(cfg.rank if rank is None else rank), float(cfg.alpha if alpha is None else alpha)


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """The adapter's multiplier: ``alpha / rank`` (LoRA) or ``alpha / sqrt(rank)`` (rsLoRA)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def alpha_for(scale: float, rank: int, rslora: bool) -> float:
    """The alpha that gives ``scale`` at ``rank`` (the inverse of `lora_scale`)."""
    return scale * math.sqrt(rank) if rslora else scale * rank


def saved_paths(cfg: LoraConfig, param_paths: Sequence[str]) -> list[str]:
    """The parameter paths (adapter factors excluded by the caller) a `modules_to_save` regex finds."""
    regexes = compile_regexes("peft.lora.modules_to_save", cfg.modules_to_save)
    return [p for p in param_paths if any(r.search(p) for r in regexes)]


def check_saved(cfg: LoraConfig, saved: Sequence[str], targets: Sequence[str], param_paths: Sequence[str]) -> None:
    """`modules_to_save` must find something, and not a kernel LoRA adapts."""
    if cfg.modules_to_save and not saved:
        raise ValueError(f"peft.lora.modules_to_save: {list(cfg.modules_to_save)} match no parameter; parameters "
                         f"are e.g. {sorted(param_paths)[:4]}")
    clash = sorted(set(saved) & set(targets))
    if clash:
        raise ValueError(f"peft.lora.modules_to_save: {clash[0]} is also a LoRA target (peft.lora.targets); "
                         "a tensor either trains fully or gets an adapter")
