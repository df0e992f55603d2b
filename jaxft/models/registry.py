"""Model family name -> builder.  Presets are data: ``configs/models/<name>.yaml``.

A family registers a builder ``(cfg, *, rngs) -> nnx.Module``::

    @register("t5")
    def _build_t5(cfg, *, rngs): return T5(cfg, rngs=rngs)
"""

from __future__ import annotations

import contextlib
from typing import Callable

import jax
from flax import nnx

from jaxft.config.schema import ModelConfig

Builder = Callable[..., nnx.Module]
FAMILIES: dict[str, Builder] = {}


def register(family: str) -> Callable[[Builder], Builder]:
    def deco(builder: Builder) -> Builder:
        if family in FAMILIES and FAMILIES[family] is not builder:
            raise ValueError(f"model family {family!r} is already registered")
        FAMILIES[family] = builder
        return builder
    return deco


@register("decoder")
def _build_decoder(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    from jaxft.models.decoder import Decoder
    return Decoder(cfg, rngs=rngs)


@register("t5")
def _build_t5(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    from jaxft.models.t5 import T5
    return T5(cfg, rngs=rngs)


@register("bart")
def _build_bart(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    from jaxft.models.bart import Bart
    return Bart(cfg, rngs=rngs)


ENCODER_DECODER = frozenset({"t5", "bart"})
DECODER_INPUTS = ("inputs", "positions", "segment_ids")
SEQ2SEQ_INPUTS = ("enc_inputs", "enc_positions", "enc_segment_ids", "inputs", "positions", "segment_ids")


def is_encoder_decoder(cfg: ModelConfig) -> bool:
    return cfg.family in ENCODER_DECODER


def model_input_keys(cfg: ModelConfig) -> tuple[str, ...]:
    """Batch keys passed positionally to ``model(...)`` for this family.

    decoder-only: ``model(inputs_BL, positions_BL, segment_ids_BL)``;
    encoder-decoder: ``model(enc_inputs_BS, enc_positions_BS, enc_segment_ids_BS,
    inputs_BL, positions_BL, segment_ids_BL)`` where ``inputs`` are the decoder
    inputs (targets shifted right behind the decoder start token).
    """
    return SEQ2SEQ_INPUTS if is_encoder_decoder(cfg) else DECODER_INPUTS


def build_model(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Build the model for ``cfg.family``.

    With a mesh active (``jaxft.sharding.use_mesh``) parameters are sharded as
    they are created, by their logical axes (works eagerly, under
    ``nnx.eval_shape`` and under ``jax.jit``).  Without a mesh, flax's eager
    sharding would fail on the ``out_sharding`` annotations, so it is switched
    off here: parameters land unsharded, annotations kept as metadata.
    """
    if cfg.family not in FAMILIES:
        raise ValueError(f"model.family: unknown {cfg.family!r}; known: {', '.join(sorted(FAMILIES))}")
    no_mesh = jax.sharding.get_abstract_mesh().empty
    ctx = nnx.use_eager_sharding(False) if no_mesh else contextlib.nullcontext()
    with ctx:
        return FAMILIES[cfg.family](cfg, rngs=rngs)


class _ShapeOnlyKeys:
    """Stands in for ``nnx.Rngs`` when only shapes are wanted: every draw is one fixed key.
    ``nnx.Rngs`` bumps a traced counter per draw, and flax's update asks the tracer for
    ``.sharding``, whose error text jax builds by walking every equation traced so far:
    quadratic in the parameter count (3.3 s for a 24+24-layer mT5-large)."""

    def __init__(self):
        self._key = jax.random.key(0)

    def params(self) -> jax.Array:
        return self._key

    __call__ = params


def abstract_model(cfg: ModelConfig) -> nnx.Module:
    """``build_model(cfg)`` with ShapeDtypeStructs for arrays (``nnx.eval_shape``): the same
    graph and shardings, no memory, and no per-parameter RNG bookkeeping."""
    return nnx.eval_shape(lambda: build_model(cfg, rngs=_ShapeOnlyKeys()))  # type: ignore[arg-type]

