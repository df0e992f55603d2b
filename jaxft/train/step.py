"""The pure, jitted train and eval steps.

A batch is a dict of [B, L] arrays: ``inputs``, ``targets``, ``weights``
(float, 1 on target tokens), ``segment_ids`` (1..n per packed example, 0 =
padding) and ``positions``; encoder-decoder batches add ``enc_inputs``,
``enc_segment_ids`` and ``enc_positions`` [B, S].  Which keys the model takes
is `jaxft.models.registry.model_input_keys`.  The loss is a *token* mean over the whole global
batch: microbatches accumulate summed losses and summed gradients in one fp32
buffer and divide once at the end, so gradient accumulation equals the large
batch exactly (up to float summation order).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from jaxft.config.schema import TrainConfig
from jaxft.models import kernels
from jaxft.models.dropout import dropout_rng, has_dropout, step_key
from jaxft.models.registry import DECODER_INPUTS
from jaxft.models.scan import merged
from jaxft.sharding import constrain
from jaxft.train.losses import chunked_distill_sums, chunked_token_losses, summed_token_losses, token_losses
from jaxft.train.run_inputs import RunInputs
from jaxft.train.state import TrainState

# token_losses lives in jaxft.train.losses; re-exported here for its older callers
__all__ = ["Batch", "CompileThenMeet", "abstract_batch", "jit_eval_step", "jit_train_step", "make_eval_step", "make_loss_fn",
           "make_train_step", "token_losses"]

Batch = dict[str, jax.Array]


def make_loss_fn(graphdef: nnx.GraphDef, cfg: TrainConfig, input_keys: tuple[str, ...] = DECODER_INPUTS,
                 teacher_graphdef: nnx.GraphDef | None = None,
                 terms: dict[str, float | jax.Array] | None = None) -> Callable[..., tuple[jax.Array, dict]]:
    """``loss_fn(params, rest, batch, rng=None, teacher=None) -> (loss_sum, aux)``.
    ``train.loss_chunk`` > 0 computes the loss from the model's last hidden states,
    at most ``loss_chunk`` sequence tokens at a time, fewer where one chunk's logits would
    pass ``loss_chunk_mib`` per device (`jaxft.train.losses.chunked_token_losses`),
    never holding the whole [B, L, V] logits; 0 takes the full logits from ``model(...)``.
    ``rng``: the model runs with dropout drawn from this key (`jaxft.models.dropout`); None:
    none.  With ``teacher_graphdef`` (``train.distill``), ``teacher`` is the frozen teacher's
    state: its logits enter the loss (`jaxft.train.losses.distill_token_sums`) and aux gains
    ``kl_sum``; the teacher runs without dropout and gets no gradient.  ``terms``: the
    ``label_smoothing`` and ``z_loss`` weights instead of the config's (run inputs:
    `jaxft.train.run_inputs.RunInputs.loss_terms`)."""
    _check_loss_config(cfg)
    kw = dict(label_smoothing=cfg.label_smoothing, z_loss=cfg.z_loss) if terms is None else terms
    dcfg = cfg.distill

    def loss_fn(params: nnx.State, rest: nnx.State, batch: Batch, rng: jax.Array | None = None,
                teacher: nnx.State | None = None):
        with merged(graphdef, params, rest) as model:  # stacked layers (`stack_layers`) scan as stored
            return _loss(model, [batch[k] for k in input_keys], batch, rng, teacher)

    def _loss(model, inputs, batch, rng, teacher):
        if teacher_graphdef is not None:
            teacher_model = nnx.merge(teacher_graphdef, teacher)
            teacher_h = jax.lax.stop_gradient(teacher_model.hidden(*inputs))
            with dropout_rng(rng):
                hidden = model.hidden(*inputs)
            sums = chunked_distill_sums(hidden, model.logits, teacher_h, teacher_model.logits, batch["targets"],
                                        batch["weights"], chunk=cfg.loss_chunk or hidden.shape[1],
                                        budget_mib=cfg.loss_chunk_mib if cfg.loss_chunk else 0, alpha=dcfg.alpha,
                                        temperature=dcfg.temperature, top_k=dcfg.top_k, **kw)
        elif cfg.loss_chunk:
            if not hasattr(model, "hidden"):
                raise ValueError(f"train.loss_chunk: {type(model).__name__} has no hidden()/logits() split; set 0")
            with dropout_rng(rng):
                hidden = model.hidden(*inputs)
            sums = chunked_token_losses(hidden, model.logits, batch["targets"], batch["weights"],
                                        chunk=cfg.loss_chunk, budget_mib=cfg.loss_chunk_mib, **kw)
        else:
            with dropout_rng(rng):
                logits = model(*inputs)
            sums = summed_token_losses(logits, batch["targets"], batch["weights"], **kw)
        aux = dict(zip(AUX_KEYS, sums))
        return aux["loss_sum"], aux

    return loss_fn


AUX_KEYS = ("loss_sum", "z_loss_sum", "weight_sum", "kl_sum")  # kl_sum: distillation only


def _check_loss_config(cfg: TrainConfig) -> None:
    if cfg.loss_chunk < 0:
        raise ValueError(f"train.loss_chunk: must be >= 0 (0 = full logits), got {cfg.loss_chunk}")


def _split_microbatches(batch: Batch, n: int) -> Batch:
    """[B, L] -> [n, B/n, L] taking rows m, m+n, m+2n... for microbatch m, so every
    microbatch stays spread over all data-parallel devices."""

    def split(x):
        x = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: TrainConfig,
                    schedule: optax.Schedule, input_keys: tuple[str, ...] = DECODER_INPUTS,
                    teacher_graphdef: nnx.GraphDef | None = None, run_inputs: RunInputs | None = None,
                    ) -> Callable[..., tuple[TrainState, dict]]:
    """``train_step(state, batch[, teacher])``: the teacher's state with a ``teacher_graphdef`` (+ metric ``kl``).

    With ``run_inputs`` the step takes the run's values (`RunInputs.values`: peak learning rate,
    seed, schedule lengths, weight decay, loss terms) last, ``train_step(state, batch[, teacher],
    values)``, and builds its optimizer, schedule and loss from them (``tx`` and ``schedule`` are
    then not used): one program for every run that differs only in those values."""
    if run_inputs is None:
        one_step = _one_step(graphdef, jax.grad(make_loss_fn(graphdef, cfg, input_keys, teacher_graphdef),
                                                has_aux=True), cfg)

        def train_step(state: TrainState, batch: Batch, teacher: nnx.State | None = None):
            return one_step(state, batch, teacher, tx, schedule, cfg.seed)
    else:
        _check_loss_config(cfg)  # the loss is built when the step is traced: its config is checked now

        def train_step(state: TrainState, batch: Batch, *rest):
            teacher, values = rest if teacher_graphdef is not None else (None, rest[0])
            loss_fn = make_loss_fn(graphdef, cfg, input_keys, teacher_graphdef, run_inputs.loss_terms(values))
            one_step = _one_step(graphdef, jax.grad(loss_fn, has_aux=True), cfg)
            return one_step(state, batch, teacher, run_inputs.tx(values), run_inputs.schedule(values), values["seed"])
    return train_step


def _one_step(graphdef: nnx.GraphDef, grad_fn, cfg: TrainConfig):
    def one_step(state: TrainState, batch: Batch, teacher, tx, schedule, seed) -> tuple[TrainState, dict]:
        # Dropout keys depend on train.seed, the step and the microbatch only (exact resume, any
        # mesh); a model without dropout (or LoRA dropout) gets none: the program without it.
        key = None
        with merged(graphdef, state.params, state.rest) as model:
            if has_dropout(model):
                key = step_key(seed, state.step)
        grads, aux = _summed_grads(grad_fn, cfg.microbatches, state, batch, key, teacher)
        denom = jnp.maximum(aux["weight_sum"], 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
        grad_norm = optax.global_norm(grads)
        # a step whose loss or gradients are not finite changes nothing but the step
        # counter (the data it read is consumed): its update is dropped, params and
        # optimizer state stay finite; the loop's guard counts and stops (train.nonfinite).
        finite = jnp.isfinite(aux["loss_sum"]) & jnp.isfinite(grad_norm)
        params, opt_state = _keep_if(finite, lambda _: _apply_update(tx, grads, state), (state.params, state.opt_state))
        metrics = {
            "loss": aux["loss_sum"] / denom,
            "z_loss": aux["z_loss_sum"] / denom,
            "tokens": aux["weight_sum"],
            # non-padding input tokens, decoder + encoder side (jaxft.models.flops: nonpad_tokens_per_s)
            "nonpad_tokens": sum(jnp.sum(batch[k] > 0, dtype=jnp.int32)
                                 for k in ("segment_ids", "enc_segment_ids") if k in batch),
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "skipped": 1.0 - finite.astype(jnp.float32),
        }
        if "kl_sum" in aux:
            metrics["kl"] = aux["kl_sum"] / denom
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return one_step


def _summed_grads(grad_fn, microbatches: int, state: TrainState, batch: Batch, key, teacher):
    """(summed gradients, summed aux) over the batch; microbatches accumulate in fp32."""
    if microbatches == 1:
        return grad_fn(state.params, state.rest, batch, key, teacher)
    micro = _split_microbatches(batch, microbatches)
    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    zero_aux = {k: jnp.zeros((), jnp.float32) for k in AUX_KEYS[:3 if teacher is None else 4]}

    def body(carry, xs):
        g_acc, a_acc = carry
        mb, mb_key = (xs, None) if key is None else (xs[0], jax.random.fold_in(key, xs[1]))
        g, a = grad_fn(state.params, state.rest, mb, mb_key, teacher)
        g_acc = jax.tree.map(lambda acc, x: acc + x.astype(jnp.float32), g_acc, g)
        return (g_acc, jax.tree.map(jnp.add, a_acc, a)), None

    xs = micro if key is None else (micro, jnp.arange(microbatches))
    (grads, aux), _ = jax.lax.scan(body, (zero_grads, zero_aux), xs)
    return grads, aux


def _apply_update(tx: optax.GradientTransformation, grads: Any, state: TrainState) -> tuple[Any, Any]:
    """(params, opt_state) after one optimizer update; LT-SFT's mask zeroes frozen entries."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if state.mask is not None:
        updates = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, state.mask)
    return optax.apply_updates(state.params, updates), opt_state


def _keep_if(finite: jax.Array, update: Callable, old: Any) -> Any:
    """``update(None)`` where ``finite``, else ``old`` (the donated state), in the form each
    compiler handles best.  XLA:CPU: a ``lax.cond``, since selecting new vs old keeps the old
    moments alive while the fused update writes the new ones into their donated buffers, and
    it copied every optimizer buffer per step (9% of a small model's step).  Elsewhere a
    select: on TPU the cond cost more (a v5e plan of the tiny test model: +30% HBM bytes, +3.8
    MB temporaries on 8.4 MB of parameters); see docs/decisions.md."""
    if kernels.platform() == "cpu":
        return jax.lax.cond(finite, update, lambda _: old, None)
    return jax.tree.map(lambda new, prev: jnp.where(finite, new, prev), update(None), old)


def make_eval_step(graphdef: nnx.GraphDef, cfg: TrainConfig,
                   input_keys: tuple[str, ...] = DECODER_INPUTS) -> Callable[[TrainState, Batch], dict]:
    """Summed loss and weight over a batch (callers divide after summing batches)."""
    loss_fn = make_loss_fn(graphdef, dataclasses.replace(cfg, label_smoothing=0.0, z_loss=0.0), input_keys)

    def eval_step(state: TrainState, batch: Batch) -> dict:
        _, aux = loss_fn(state.params, state.rest, batch)
        return {"loss_sum": aux["loss_sum"], "weight_sum": aux["weight_sum"]}

    return eval_step


def jit_train_step(step_fn, state_shardings: TrainState, batch_sharding: NamedSharding, teacher_shardings=None,
                   run_inputs: bool = False):
    """Explicit in/out shardings (one batch sharding for every batch array); the state is
    donated (updated in place).  ``teacher_shardings``: the step takes the teacher's state third.
    ``run_inputs``: the step takes the run's values last (`make_train_step`), replicated."""
    replicated = NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    ins = (state_shardings, batch_sharding) + (() if teacher_shardings is None else (teacher_shardings,))
    ins += (replicated,) if run_inputs else ()
    return jax.jit(step_fn, in_shardings=ins, out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def jit_eval_step(eval_fn, state_shardings: TrainState, batch_sharding: NamedSharding):
    replicated = NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    return jax.jit(eval_fn, in_shardings=(state_shardings, batch_sharding), out_shardings=replicated)


def abstract_batch(global_batch: int, seq_len: int, batch_sharding: NamedSharding,
                   encoder_seq_len: int | None = None) -> dict[str, Any]:
    """ShapeDtypeStructs of a global batch: with the abstract state this is all
    `jit(...).lower()` needs (ahead-of-time compilation for TPU slices).
    `encoder_seq_len` adds the encoder-side arrays of a seq2seq batch."""
    def sds(length, dtype):
        return jax.ShapeDtypeStruct((global_batch, length), dtype, sharding=batch_sharding)
    batch = {"inputs": sds(seq_len, jnp.int32), "targets": sds(seq_len, jnp.int32),
             "weights": sds(seq_len, jnp.float32), "segment_ids": sds(seq_len, jnp.int32),
             "positions": sds(seq_len, jnp.int32)}
    if encoder_seq_len is not None:
        batch.update(enc_inputs=sds(encoder_seq_len, jnp.int32), enc_segment_ids=sds(encoder_seq_len, jnp.int32),
                     enc_positions=sds(encoder_seq_len, jnp.int32))
    return batch


COMPILE_BARRIER_S = 3600  # how long a process that compiled first waits for the others


class CompileThenMeet:
    """A jitted step that, in a multi-process run, is compiled ahead of time on its first
    call and then waits at a coordination-service barrier for every other process to have
    compiled it too, before it first executes.

    Processes reach their first step seconds to minutes apart (data indexing, restore,
    compiling under a busy CPU); the first execution of a program with cross-process
    collectives sets up their communicators, and that set-up has a short fixed deadline
    (gloo's is 30 s on CPU).  Meeting at a barrier first, whose deadline we choose, makes the
    set-up start together.  One process runs the jitted function as it is.  Later calls reuse
    the compiled program, so every call must have the first call's shapes and shardings."""

    def __init__(self, jitted, name: str):
        self.jitted, self.name = jitted, name
        self._compiled = None

    def __call__(self, *args):
        if jax.process_count() == 1:
            return self.jitted(*args)
        if self._compiled is None:
            from orbax.checkpoint.multihost import get_barrier_sync_fn
            self._compiled = self.jitted.lower(*args).compile()
            get_barrier_sync_fn()(key=f"jaxft:compiled:{self.name}", timeout_ms=COMPILE_BARRIER_S * 1000)
        return self._compiled(*args)
