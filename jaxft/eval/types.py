"""Types shared by the decoding modules (``decode`` -> ``beam`` -> here), so imports go one way."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeOutput:
    tokens: jax.Array  # [B, n, max_len] int32
    scores: jax.Array  # [B, n] float32, best first for beam search
    lengths: jax.Array  # [B, n] int32: generated tokens incl. forced ids and EOS


@dataclasses.dataclass(frozen=True)
class SplitModel:
    """A model as its graphdef and states, which may hold stacked layers
    (`jaxft.models.scan.stack_layers`): what evaluation during training decodes and scores with,
    so a run with ``model.scan_layers`` neither unstacks a copy of its parameters nor unrolls its
    layers to evaluate.  Everything that takes a model for decoding or scoring takes one."""

    graphdef: nnx.GraphDef
    states: tuple


def split_model(model: nnx.Module | SplitModel) -> tuple[nnx.GraphDef, tuple]:
    """(graphdef, states) of a module or a `SplitModel`; `merged(graphdef, *states)` (inside a jit)
    gives the model back."""
    if isinstance(model, SplitModel):
        return model.graphdef, tuple(model.states)
    graphdef, state = nnx.split(model)
    return graphdef, (state,)
