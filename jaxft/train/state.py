"""Train state, trainable-parameter filter and sharded initialisation.

The model is split once into (graphdef, trainable params, everything else).
Only the trainable part gets optimizer state, so frozen parameters cost no
optimizer memory.  This filter is the seam the PEFT methods plug into.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from jaxft.config.schema import ModelConfig, PeftConfig, TrainConfig
from jaxft.models.scan import stack_layers
from jaxft.interop.hf import path_str  # noqa: F401 - re-exported: parameter paths as "a/b/c"
from jaxft.peft.methods import method_for
from jaxft.runs.model import split_train_model
from jaxft.sharding import sharded_abstract, tree_shardings
from jaxft.train.run_inputs import replicated, seed_value

state_shardings = tree_shardings  # NamedShardings of a TrainState (moments inherit their params' axes)
__all__ = ["TrainState", "InitFn", "make_init_fn", "init_train_state", "sharded_abstract", "state_shardings", "checkpoint_items", "copy_state",
           "count_params", "path_str"]


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


class InitFn:
    """``init_fn()`` builds the whole TrainState (call it under `jax.jit` or `jax.eval_shape`);
    ``abstract`` is its ShapeDtypeStruct tree, traced once per mesh context (the variables'
    metadata records whether a mesh was set) and kept: `sharded_abstract` and
    `init_train_state` read it instead of tracing the model again."""

    def __init__(self, fn: Callable[..., TrainState], seed: int):
        self._fn, self.seed = fn, seed
        self._abstract: dict[Any, TrainState] = {}

    def __call__(self, seed: jax.Array | None = None) -> TrainState:
        """The state from ``seed`` (an array: an input of a jitted init), else from the init's own seed."""
        return self._fn(self.seed if seed is None else seed)

    def sharded(self, shardings: Any, mesh: Mesh, then: Callable[[TrainState], Any] = lambda state: state) -> Any:
        """``then(state)`` computed on the devices, laid out as ``shardings``.  The seed is an input of
        the compiled init, not a constant: runs that differ in `train.seed` share its program."""
        def init_train_state(seed):
            return then(self(seed))

        return jax.jit(init_train_state, out_shardings=shardings)(replicated(seed_value(self.seed), mesh))

    @property
    def abstract(self) -> TrainState:
        key = jax.sharding.get_abstract_mesh()
        if key not in self._abstract:
            self._abstract[key] = jax.eval_shape(self)
        return self._abstract[key]


def make_init_fn(model_cfg: ModelConfig, train_cfg: TrainConfig, tx: optax.GradientTransformation,
                 seed: int, peft_cfg: PeftConfig | None = None, *, stacked: bool | None = None,
                 ) -> tuple[InitFn, nnx.GraphDef]:
    """Returns (init_fn, graphdef).  `init_fn()` builds the whole TrainState;
    call it under `jax.jit` (sharded init) or `jax.eval_shape` (abstract).  ``stacked`` (default:
    ``model.scan_layers``; a run passes `jaxft.runs.model.stores_stacked`): the state stores each
    stack of layers stacked (`jaxft.models.scan.stack_layers`); the graphdef stays per layer and
    the step builds the model with `jaxft.models.scan.merged`.  The model is traced once here
    (the graphdef is read from that trace): a 32-layer model's build is most of lowering's time."""
    method = method_for(peft_cfg, train_cfg, model_cfg)
    stacked = model_cfg.scan_layers if stacked is None else stacked
    graphdefs: list[nnx.GraphDef] = []

    def init_fn(seed) -> TrainState:
        graphdef, params, rest = split_train_model(model_cfg, method, seed)
        graphdefs[:] = graphdefs or [graphdef]  # the first trace's (this context's, below)
        if stacked:
            params, rest = stack_layers(params, rest)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                          opt_state=tx.init(params), mask=method.init_extra(params))

    init = InitFn(init_fn, seed)
    if not jax.tree.leaves(init.abstract.params):
        raise ValueError(f"train.trainable / train.frozen: no parameter is trainable "
                         f"(trainable={list(train_cfg.trainable)}, frozen={list(train_cfg.frozen)})")
    return init, graphdefs[0]


def init_train_state(init_fn: Callable[[], TrainState], mesh: Mesh) -> tuple[TrainState, TrainState]:
    """Sharded initialisation: abstract shapes -> shardings -> jitted init.
    No host ever materialises the full parameters; an `InitFn`'s seed is an input of the compiled
    init (`InitFn.sharded`).  Returns (state, shardings)."""
    _, shardings = sharded_abstract(init_fn, mesh)  # an `InitFn`'s kept abstract, else traced
    if isinstance(init_fn, InitFn):
        return init_fn.sharded(shardings, mesh), shardings
    state = jax.jit(init_fn, out_shardings=shardings)()
    return state, shardings


def checkpoint_items(state: TrainState, checkpoint_base: bool) -> dict[str, Any]:
    """The checkpoint items of a (concrete or abstract) state: `params`, `train` (step,
    optimizer state, mask) and, unless the method rebuilds the frozen part, `rest`."""
    items = {"params": state.params, "train": {"step": state.step, "opt_state": state.opt_state, "mask": state.mask}}
    if checkpoint_base:
        items["rest"] = state.rest
    return items


def copy_state(state: Any, shardings: Any) -> Any:
    """A copy in fresh buffers, so donating it to the train step leaves `state` alive
    (sparse FT needs theta0 at the end of phase 1 and to write the diff)."""
    return jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=shardings)(state)


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
