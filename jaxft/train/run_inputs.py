"""The per-run numbers a compiled train step reads as inputs rather than as constants.

A study's runs usually differ in the learning rate and the seed.  Were they constants of the
step (the schedule closed over `optimizer.lr`, the dropout key over `train.seed`), every run
would lower to a different program and compile it afresh; as inputs, runs that differ only in
them lower to the same program, so the persistent compilation cache (`compile_cache`) serves
every run after the first.  The step's arithmetic is the same either way (tested).

`RunInputs` builds the optimizer and the schedule as functions of the peak learning rate (the
train step calls them with its traced input) and puts the values on the mesh, replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxft.config.schema import OptimizerConfig
from jaxft.interop.placement import place
from jaxft.train.optim import make_optimizer, make_schedule

@dataclasses.dataclass(frozen=True)
class RunInputs:
    """`wrap`: the PEFT method's `wrap_optimizer` (sparse fine-tuning's L1 pull)."""

    optimizer: OptimizerConfig
    total_steps: int
    seed: int
    wrap: Callable[[optax.GradientTransformation], optax.GradientTransformation] = lambda tx: tx

    def tx(self, lr: float | jax.Array | None = None) -> optax.GradientTransformation:
        """The run's optimizer with peak learning rate `lr` (`optimizer.lr` when None)."""
        return self.wrap(make_optimizer(self.optimizer, self.total_steps, lr=lr))

    def schedule(self, lr: float | jax.Array | None = None) -> optax.Schedule:
        return make_schedule(self.optimizer, self.total_steps, lr)

    def values(self) -> dict[str, np.ndarray]:
        """What the step receives.  The seed as jax.random.key takes a Python int (mod 2**32),
        so the dropout keys are those of a constant seed."""
        return {"lr": np.asarray(self.optimizer.lr, np.float32), "seed": seed_value(self.seed)}

    def abstract(self, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=_everywhere(mesh)) for k, v in self.values().items()}

    def put(self, mesh: Mesh) -> dict[str, jax.Array]:
        """The values on every device of `mesh` (replicated; every process holds the same)."""
        return {k: replicated(v, mesh) for k, v in self.values().items()}


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
