"""PEFT methods as objects: one protocol, three implementations, one dispatch point.

The trainer knows a method only through `PeftMethod`:

- `transform_model(model, rngs)`: tree surgery on a freshly built model (LoRA
  adapters); the model class is never forked.
- `trainable_filter()`: the nnx filter of what trains (and gets optimizer state).
- `wrap_optimizer(tx)`: extra gradient transformations (LT-SFT's L1 pull).
- `init_extra(params)`: extra train state carried from step 0 (LT-SFT's update mask).
- `checkpoint_base`: whether checkpoints hold the frozen parameters, or only what
  trains (the base is rebuilt from the config: theta0).
- `needs_theta0(resumed)`: whether the run must compute theta0 (to start from,
  or to rebuild the frozen base); `keeps_theta0`: whether it stays alive all run.
- `on_step(step, state, ctx)`: a per-step hook (LT-SFT's phase switch).
- `export(state, ctx)`: what the end of a run writes (an adapter, a sparse diff).

`method_for(peft_cfg, train_cfg)` is the only place a method name is looked up.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxft.config.schema import ModelConfig, PeftConfig, TrainConfig
from jaxft.interop.hf import path_str
from jaxft.models.scan import stack_like, unstack_layers
from jaxft.paths import staged

log = logging.getLogger(__name__)

Filter = Callable[[tuple[Any, ...], Any], bool]


def param_filter(cfg: TrainConfig) -> Filter:
    """nnx filter: a Param whose path matches a `train.trainable` regex and no `train.frozen` regex."""
    train_re = [re.compile(r) for r in cfg.trainable]
    frozen_re = [re.compile(r) for r in cfg.frozen]

    def is_trainable(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        p = path_str(path)
        return any(r.search(p) for r in train_re) and not any(r.search(p) for r in frozen_re)

    return is_trainable


@dataclasses.dataclass
class StepContext:
    """What a method's per-step hook and export may use (built by the trainer)."""

    theta0: Any  # the starting trainable parameters (an nnx.State), or None when the method keeps none
    optimizer: optax.GradientTransformation
    shardings: Any  # the train state's shardings
    copy: Callable[[Any], Any]  # trainable params -> a copy in fresh buffers with their shardings
    graphdef: nnx.GraphDef
    run_dir: Path
    seed: int


class PeftMethod:
    """The protocol, with full finetuning's behaviour as the default of every part."""

    name: ClassVar[str]
    checkpoint_base: ClassVar[bool] = True
    keeps_theta0: ClassVar[bool] = False

    def __init__(self, cfg: PeftConfig, train_cfg: TrainConfig, model_cfg: ModelConfig | None = None):
        self.cfg, self.train_cfg, self.model_cfg = cfg, train_cfg, model_cfg

    def transform_model(self, model: nnx.Module, rngs: nnx.Rngs) -> nnx.Module:
        return model

    def trainable_filter(self) -> Filter:
        return param_filter(self.train_cfg)

    def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        return tx

    def init_extra(self, params: nnx.State) -> Any:
        return None

    def needs_theta0(self, resumed: bool) -> bool:
        return not resumed or not self.checkpoint_base

    def updated_entries(self, params: nnx.State) -> int:
        """How many parameter entries the finished run changes (its size as a fine-tuning)."""
        return sum(int(x.size) for x in jax.tree.leaves(params))

    def on_step(self, step: int, state: Any, ctx: StepContext) -> Any:
        return state

    def export(self, state: Any, ctx: StepContext) -> Path | None:
        return None


class FullFinetune(PeftMethod):
    """No PEFT: `train.trainable` / `train.frozen` choose what trains."""

    name = "none"


class _BaseFree(PeftMethod):
    """PEFT methods store only what trains unless `peft.save_base`."""

    @property
    def checkpoint_base(self) -> bool:  # type: ignore[override]
        return self.cfg.save_base


class LoRA(_BaseFree):
    """LoRA adapters attached by tree surgery; only the adapter `peft.lora.name` trains."""

    name = "lora"

    def transform_model(self, model: nnx.Module, rngs: nnx.Rngs) -> nnx.Module:
        from jaxft.peft.lora import adapter_saves, apply_lora

        init_from = self.model_cfg.init_from if self.model_cfg is not None else None
        for directory in self.cfg.lora.load if init_from else ():
            # loaded adapters go in before init_from, which would overwrite the tensors they replace
            if saves := adapter_saves(directory):
                raise ValueError(f"peft.lora.load: {directory} replaces {saves[0]} (modules_to_save), which "
                                 f"model.init_from would overwrite; list it in peft.compose instead (applied "
                                 f"after init_from)")
        return apply_lora(model, self.cfg.lora, rngs=rngs)

    def trainable_filter(self) -> Filter:
        from jaxft.peft.lora import lora_trainable_filter

        return lora_trainable_filter(self.cfg.lora)

    def export(self, state: Any, ctx: StepContext) -> Path | None:
        from jaxft.peft.lora import save_adapter

        with staged(ctx.run_dir / "adapter") as out:  # a remote run dir: written locally, uploaded
            save_adapter(out, nnx.merge(ctx.graphdef, unstack_layers(state.params), unstack_layers(state.rest)),
                         self.cfg.lora, self.model_cfg)
        return ctx.run_dir / "adapter"


class SparseFT(_BaseFree):
    """Lottery-Ticket Sparse Fine-Tuning: full phase 1, mask selection, masked phase 2."""

    name = "sparse"
    keeps_theta0 = True

    def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        from jaxft.peft.sparse import l1_pull

        return optax.chain(l1_pull(self.cfg.sparse.l1), tx) if self.cfg.sparse.l1 > 0 else tx

    def init_extra(self, params: nnx.State) -> Any:
        # all True in phase 1, so the state's structure (and its checkpoints) never change mid-run
        return jax.tree.map(lambda p: jnp.ones(p.shape, jnp.bool_), params)

    def needs_theta0(self, resumed: bool) -> bool:
        return True  # phase 2 resets to theta0, and the diff is theta - theta0

    def updated_entries(self, params: nnx.State) -> int:  # K maskable entries + the dense tensors
        from jaxft.peft.sparse import classify, flat_with_paths, resolve_k

        paths, leaves, _ = flat_with_paths(unstack_layers(params))  # per-layer paths, as classify knows them
        kinds = classify(paths, self.cfg.sparse)
        size = lambda kind: sum(int(x.size) for x, c in zip(leaves, kinds) if c == kind)  # noqa: E731
        return resolve_k(self.cfg.sparse.k, size("maskable")) + size("dense")

    def on_step(self, step: int, state: Any, ctx: StepContext) -> Any:
        if step != self.cfg.sparse.phase1_steps:
            return state
        from jaxft.peft.sparse import select_mask

        # chosen on per-layer paths (the same entries whatever the storage), stored like the params
        mask = stack_like(select_mask(unstack_layers(state.params), unstack_layers(ctx.theta0), self.cfg.sparse,
                                      seed=ctx.seed), state.params)
        mask = jax.device_put(mask, ctx.shardings.mask)
        opt_state = jax.jit(ctx.optimizer.init, out_shardings=ctx.shardings.opt_state)(ctx.theta0)
        kept = sum(int(m.sum()) for m in jax.tree.leaves(mask))
        total = sum(m.size for m in jax.tree.leaves(mask))
        log.info("sparse fine-tuning phase 2: %d of %d entries trainable (%.4f%%)", kept, total,
                 100 * kept / total)
        params = ctx.copy(ctx.theta0)  # theta0 itself stays alive (the step donates its state)
        return state.replace(params=params, opt_state=opt_state, mask=mask)

    def export(self, state: Any, ctx: StepContext) -> Path | None:
        from jaxft.peft.sparse import save_diff

        with staged(ctx.run_dir / "sparse_diff") as out:  # a remote run dir: written locally, uploaded
            save_diff(out, *(unstack_layers(t) for t in (state.params, ctx.theta0, state.mask)), self.cfg.sparse)
        return ctx.run_dir / "sparse_diff"


METHODS: dict[str, type[PeftMethod]] = {m.name: m for m in (FullFinetune, LoRA, SparseFT)}


def method_for(cfg: PeftConfig | None, train_cfg: TrainConfig, model_cfg: ModelConfig | None = None) -> PeftMethod:
    """The one dispatch point: `peft.method` -> its method object (`model_cfg` is
    recorded in exported adapters)."""
    cfg = cfg or PeftConfig()
    if cfg.method not in METHODS:
        raise ValueError(f"peft.method: unknown {cfg.method!r}; known: {', '.join(METHODS)}")
    return METHODS[cfg.method](cfg, train_cfg, model_cfg)
