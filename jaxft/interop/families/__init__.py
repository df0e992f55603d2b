"""HF ``model_type`` -> family mapping.  A family is one small module that registers a ``Family``.

To add one (as ``t5.py``, ``bart.py``): write ``to_model_config``/``to_hf_config``/``tensors``
and ``claims`` (which jaxft configs it exports), call ``register(Family(...))`` at
import, and add the module name to ``_BUILTIN``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from jaxft.config.schema import ModelConfig
from jaxft.interop.families.common import Tensor


@dataclass(frozen=True)
class Family:
    model_type: str  # HF config.json "model_type"
    architecture: str  # HF "architectures"[0] written on export, e.g. "LlamaForCausalLM"
    to_model_config: Callable[[dict], ModelConfig]
    to_hf_config: Callable[[ModelConfig], dict]  # checks exportability; model_type/architectures added by caller
    tensors: Callable[[ModelConfig], list[Tensor]]
    claims: Callable[[ModelConfig], bool]  # export: does this family own this jaxft config?
    priority: int = 0  # export: higher is asked first (more specific families)
    base_prefixes: tuple[str, ...] = ()  # prefixes a headless checkpoint may lack ("transformer.")
    other_architectures: tuple[str, ...] = ()  # also accepted on import ("T5WithLMHeadModel")
    ignorable: tuple[str, ...] = ()  # regexes: checkpoint tensors with nothing we need (tied copies)


FAMILIES: dict[str, Family] = {}
_BUILTIN = ("llama", "gemma", "bloom", "t5", "bart")
_loaded = False


def register(family: Family) -> Family:
    FAMILIES[family.model_type] = family
    return family


def _load() -> None:
    global _loaded
    if not _loaded:
        for name in _BUILTIN:
            importlib.import_module(f"jaxft.interop.families.{name}")
        _loaded = True


def family_for_hf(hf_config: dict) -> Family:
    """The family of an HF ``config.json`` (by ``model_type``; ``architectures`` must agree)."""
    _load()
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"config.json: model_type={model_type!r} is not supported; "
                         f"supported: {', '.join(sorted(FAMILIES))}")
    family = FAMILIES[model_type]
    archs = hf_config.get("architectures") or [family.architecture]
    base = family.architecture.removesuffix("ForCausalLM").removesuffix("ForConditionalGeneration")
    bad = [a for a in archs if a not in (family.architecture, base + "Model", *family.other_architectures)]
    if bad:
        raise ValueError(f"config.json: architectures={archs!r} is not supported for {model_type!r}; "
                         f"supported: {family.architecture!r}")
    return family


def family_for_model(cfg: ModelConfig, model_type: str | None = None) -> Family:
    """The HF family a jaxft config exports to (``model_type`` forces one)."""
    _load()
    if model_type is not None:
        if model_type not in FAMILIES:
            raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
        return FAMILIES[model_type]
    for family in sorted(FAMILIES.values(), key=lambda f: -f.priority):
        if family.claims(cfg):
            return family
    raise ValueError(f"model.family={cfg.family!r}: no HF family can express this config")
