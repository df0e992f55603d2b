"""Ahead-of-time lowering of the train step from abstract inputs alone.

Nothing is allocated: the state and batch are ShapeDtypeStructs with
shardings.  With abstract TPU devices (`jax.experimental.topologies`) this
compiles for a pod slice on a CPU-only machine and reports per-device memory
and FLOPs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxft.config.schema import Config
from jaxft.models.registry import abstract_model, build_model, is_encoder_decoder, model_input_keys
from jaxft.runs.model import stores_stacked
from jaxft.runs.teacher import check_teacher, teacher_model_config
from jaxft.sharding import batch_sharding, check_batch, make_mesh, use_mesh
from jaxft.peft.methods import method_for
from jaxft.train.run_inputs import RunInputs
from jaxft.train.state import make_init_fn, sharded_abstract
from jaxft.train.step import abstract_batch, jit_train_step, make_train_step


@dataclasses.dataclass
class LoweredStep:
    lowered: jax.stages.Lowered
    state: Any  # the abstract TrainState (ShapeDtypeStructs carrying their shardings)
    teacher: Any  # the teacher's abstract state, or None
    mesh: Mesh
    run_inputs: RunInputs  # the step's last argument: `run_inputs.put(mesh)` (`jaxft.train.run_inputs`)


def lower_train_step(cfg: Config, devices: Sequence[jax.Device] | None = None) -> jax.stages.Lowered:
    return lower_step_parts(cfg, devices).lowered


def lower_step_parts(cfg: Config, devices: Sequence[jax.Device] | None = None) -> LoweredStep:
    mesh = make_mesh(cfg.mesh, devices)
    check_batch(cfg.train.global_batch, cfg.train.microbatches, mesh)
    run_inputs = RunInputs(cfg.optimizer, cfg.train, method_for(cfg.peft, cfg.train, cfg.model).wrap_optimizer)
    tx = run_inputs.tx()
    with use_mesh(mesh):  # traced once, under the mesh (`InitFn`)
        init_fn, graphdef = make_init_fn(cfg.model, cfg.train, tx, cfg.train.seed, cfg.peft,
                                         stacked=stores_stacked(cfg))
        abstract, shardings = sharded_abstract(init_fn, mesh)
        bsharding = batch_sharding(mesh)
        keys = model_input_keys(cfg.model)
        teacher = _abstract_teacher(cfg, mesh)  # distillation: the teacher's weights are inputs too
        step_fn = make_train_step(graphdef, None, cfg.train, None, keys, teacher and teacher[0], run_inputs)
        step = jit_train_step(step_fn, shardings, bsharding, teacher and teacher[2], run_inputs=True)
        enc_len = (cfg.data.encoder_seq_len or cfg.data.seq_len) if is_encoder_decoder(cfg.model) else None
        batch = abstract_batch(cfg.train.global_batch, cfg.data.seq_len, bsharding, enc_len)
        lowered = step.lower(abstract, batch, *(() if teacher is None else (teacher[1],)), run_inputs.abstract(mesh))
    return LoweredStep(lowered, abstract, teacher and teacher[1], mesh, run_inputs)


def _abstract_teacher(cfg: Config, mesh):
    """(graphdef, abstract state, shardings) of `train.distill.teacher`, from its config alone
    (adapters of a PEFT teacher run are left out: small next to its base)."""
    if not cfg.train.distill.teacher:
        return None
    model_cfg = teacher_model_config(cfg.train.distill.teacher)
    check_teacher(cfg.model, model_cfg, cfg.train.distill.teacher)
    graphdef, _ = nnx.split(abstract_model(model_cfg))
    state, shardings = sharded_abstract(lambda: nnx.split(build_model(model_cfg, rngs=nnx.Rngs(0)))[1], mesh)
    return graphdef, state, shardings
