"""Train state, trainable-parameter filter and sharded initialisation.

The model is split once into (graphdef, trainable params, everything else).
Only the trainable part gets optimizer state, so frozen parameters cost no
optimizer memory.  This filter is the seam the PEFT methods plug into.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxft.config.schema import ModelConfig, PeftConfig, TrainConfig
from jaxft.models.registry import build_model


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # trainable parameters
    rest: nnx.State  # frozen parameters and any other variables
    opt_state: optax.OptState
    # Optional boolean tree shaped like `params`: updates are zeroed where False
    # (sparse fine-tuning applies its mask to updates, after the optimizer, so
    # weight decay cannot move frozen entries).
    mask: Any = None


def path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path)


def param_filter(cfg: TrainConfig) -> Callable[[tuple[Any, ...], Any], bool]:
    """nnx filter: a Param whose path matches a `trainable` regex and no `frozen` regex."""
    train_re = [re.compile(r) for r in cfg.trainable]
    frozen_re = [re.compile(r) for r in cfg.frozen]

    def is_trainable(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        p = path_str(path)
        return any(r.search(p) for r in train_re) and not any(r.search(p) for r in frozen_re)

    return is_trainable


def trainable_filter(cfg: TrainConfig, peft_cfg: PeftConfig | None = None):
    """What trains: the PEFT method's filter (LoRA adapters only), else `train.trainable`/`frozen`."""
    from jaxft import peft

    return peft.trainable_filter(peft_cfg or PeftConfig(), cfg)


def build_train_model(model_cfg: ModelConfig, peft_cfg: PeftConfig, seed: int) -> nnx.Module:
    from jaxft import peft

    rngs = nnx.Rngs(seed)
    return peft.transform_model(build_model(model_cfg, rngs=rngs), peft_cfg, rngs)


def make_init_fn(model_cfg: ModelConfig, train_cfg: TrainConfig, tx: optax.GradientTransformation,
                 seed: int, peft_cfg: PeftConfig | None = None) -> tuple[Callable[[], TrainState], nnx.GraphDef]:
    """Returns (init_fn, graphdef).  `init_fn()` builds the whole TrainState;
    call it under `jax.jit` (sharded init) or `jax.eval_shape` (abstract)."""
    peft_cfg = peft_cfg or PeftConfig()
    is_trainable = trainable_filter(train_cfg, peft_cfg)

    def init_fn() -> TrainState:
        model = build_train_model(model_cfg, peft_cfg, seed)
        _, params, rest = nnx.split(model, is_trainable, ...)
        # Sparse FT keeps a mask from the start (all True in phase 1) so the
        # state's structure, and so its checkpoints, never change mid-run.
        mask = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.bool_), params) if peft_cfg.method == "sparse" else None
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                          opt_state=tx.init(params), mask=mask)

    graphdef = split_graphdef(model_cfg, train_cfg, seed, peft_cfg)
    abstract = jax.eval_shape(init_fn)
    if not jax.tree.leaves(abstract.params):
        raise ValueError(f"train.trainable / train.frozen: no parameter is trainable "
                         f"(trainable={list(train_cfg.trainable)}, frozen={list(train_cfg.frozen)})")
    return init_fn, graphdef


def split_graphdef(model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int,
                   peft_cfg: PeftConfig | None = None) -> nnx.GraphDef:
    peft_cfg = peft_cfg or PeftConfig()
    model = nnx.eval_shape(lambda: build_train_model(model_cfg, peft_cfg, seed))
    graphdef, _, _ = nnx.split(model, trainable_filter(train_cfg, peft_cfg), ...)
    return graphdef


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Make `spec` valid for `shape`: a spec of another rank (e.g. Adafactor's
    factored moments, which inherit their parameter's metadata) is replicated,
    and a mesh axis that does not divide its dimension (a vocabulary of 32001
    over tensor=2) is dropped for that dimension."""
    if len(spec) > len(shape):
        return P()
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if dim % size == 0 else None)
    return P(*out)


def state_shardings(abstract_state: TrainState, mesh: Mesh) -> TrainState:
    """NamedShardings for every leaf, from the logical axis metadata on each Param
    (optimizer moments inherit their parameter's metadata)."""
    specs = nnx.get_partition_spec(abstract_state)
    return jax.tree.map(lambda s, a: NamedSharding(mesh, fit_spec(s, a.shape, mesh)), specs, abstract_state,
                        is_leaf=lambda x: isinstance(x, P))


def sharded_abstract(init_fn: Callable[[], TrainState], mesh: Mesh) -> tuple[TrainState, TrainState]:
    """(ShapeDtypeStructs carrying their shardings, the shardings) of the state
    `init_fn` builds: the restore target of a checkpoint and the input of AOT lowering."""
    abstract = jax.eval_shape(init_fn)
    shardings = state_shardings(abstract, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings), shardings


def init_train_state(init_fn: Callable[[], TrainState], mesh: Mesh) -> tuple[TrainState, TrainState]:
    """Sharded initialisation: abstract shapes -> shardings -> jitted init.
    No host ever materialises the full parameters.  Returns (state, shardings)."""
    abstract = jax.eval_shape(init_fn)
    shardings = state_shardings(abstract, mesh)
    state = jax.jit(init_fn, out_shardings=shardings)()
    return state, shardings


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
