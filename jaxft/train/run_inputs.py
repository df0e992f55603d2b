"""The per-run numbers a compiled train step reads as inputs rather than as constants.

A study's runs differ in the learning rate, the seed, the schedule's lengths (`train.steps`,
`optimizer.warmup_steps` / `decay_steps`), the weight decay, label smoothing or z-loss.  Were
they constants of the step (the schedule closed over `optimizer.lr`, the dropout key over
`train.seed`...), every run would lower to a different program and compile it afresh; as
inputs, runs that differ only in them lower to the same program, so the persistent compilation
cache (`compile_cache`) serves every run after the first.  The step's arithmetic is the same
either way (tested), except that with constant schedule lengths XLA folds a division by a length
into a product with its reciprocal: the learning rate then differs in the last bit at some steps
(`docs/decisions.md`).  What a value turns on stays a property of the program: a warmup, a weight
decay, label smoothing or a z-loss that is 0 in the config is left out of it, so a sweep over
{0, 0.1} compiles twice and one over {0.1, 0.2} once.

`RunInputs` builds the optimizer, the schedule and the loss's terms as functions of the traced
values (the train step calls them with its input) and puts the values on the mesh, replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxft.config.schema import OptimizerConfig, TrainConfig
from jaxft.interop.placement import place
from jaxft.train.optim import RateInput, make_optimizer, make_schedule, schedule_lengths


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """`train`: the run's `train.steps` (the schedule's default length), seed, label smoothing and
    z-loss.  `wrap`: the PEFT method's `wrap_optimizer` (sparse fine-tuning's L1 pull)."""

    optimizer: OptimizerConfig
    train: TrainConfig
    wrap: Callable[[optax.GradientTransformation], optax.GradientTransformation] = lambda tx: tx

    def tx(self, values: dict[str, jax.Array] | None = None) -> optax.GradientTransformation:
        """The run's optimizer, from the traced `values` (`values()`'s keys), or from the config's
        numbers when None."""
        wd = RateInput(values["weight_decay"]) if values is not None and self.optimizer.weight_decay else None
        return self.wrap(make_optimizer(self.optimizer, self.train.steps, weight_decay=wd, **_schedule_args(values)))

    def schedule(self, values: dict[str, jax.Array] | None = None) -> optax.Schedule:
        return make_schedule(self.optimizer, self.train.steps, **_schedule_args(values))

    def loss_terms(self, values: dict[str, jax.Array]) -> dict[str, float | jax.Array]:
        """The loss's label smoothing and z-loss weights (`jaxft.train.step.make_loss_fn`): the
        traced values, or 0.0 (left out of the program) where the config has them off."""
        return {k: values[k] if getattr(self.train, k) else 0.0 for k in ("label_smoothing", "z_loss")}

    def values(self) -> dict[str, np.ndarray]:
        """What the step receives.  The seed as jax.random.key takes a Python int (mod 2**32),
        so the dropout keys are those of a constant seed."""
        opt, f32 = self.optimizer, lambda x: np.asarray(x, np.float32)  # noqa: E731
        warmup, decay = schedule_lengths(opt, self.train.steps)
        return {"lr": f32(opt.lr), "seed": seed_value(self.train.seed), "warmup": np.asarray(warmup, np.int32),
                "decay": np.asarray(decay, np.int32), "weight_decay": f32(opt.weight_decay),
                "label_smoothing": f32(self.train.label_smoothing), "z_loss": f32(self.train.z_loss)}

    def abstract(self, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=_everywhere(mesh)) for k, v in self.values().items()}

    def put(self, mesh: Mesh) -> dict[str, jax.Array]:
        """The values on every device of `mesh` (replicated; every process holds the same)."""
        return {k: replicated(v, mesh) for k, v in self.values().items()}


def _schedule_args(values: dict[str, jax.Array] | None) -> dict:
    """`make_schedule`'s peak and lengths from the traced values (none: the config's)."""
    return {} if values is None else {"lr": values["lr"], "lengths": (values["warmup"], values["decay"])}


def seed_value(seed: int) -> np.ndarray:
    """`seed` as an array that jax.random.key turns into the key of the Python int (mod 2**32)."""
    return np.asarray(seed % 2**32, np.uint32)


def replicated(value: np.ndarray, mesh: Mesh) -> jax.Array:
    """`value` on every device of `mesh` (every process holds the same value)."""
    return place(value, _everywhere(mesh))


def _everywhere(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


class WithRunInputs:
    """``step(*args)`` calling ``jitted(*args, values)``: the loop's interface, unchanged."""

    def __init__(self, jitted, values: dict[str, jax.Array]):
        self.jitted, self.values = jitted, values

    def __call__(self, *args):
        return self.jitted(*args, self.values)
