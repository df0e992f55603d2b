"""Optimizers and learning-rate schedules from `OptimizerConfig` (optax).

Parameter groups (`optimizer.groups`): each parameter takes the first group
whose `pattern` regex matches its path ("layers/0/attn/q/kernel"); its whole
update (weight decay included) is multiplied by `lr_scale`, and `weight_decay`,
when set, replaces the default decay rate.  Decay applies, as by default, only
to matrices (ndim >= 2), never to norms or biases.  With groups, AdamW is built
from its parts (scale_by_adam -> per-parameter decay -> learning rate -> group
scale: the same arithmetic as optax.adamw); without groups the optimizer and its
state are exactly what they were before groups existed.

`l1` (sparse fine-tuning, `jaxft.peft.sparse.l1_pull`): an L1 pull towards the
parameters the optimizer was initialised with, added to the gradients before
clipping.  It stores a copy of those parameters in the optimizer state.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxft.config.schema import OptimizerConfig, ParamGroup
from jaxft.models.scan import STACKED
from jaxft.peft.sparse import l1_pull


def schedule_lengths(cfg: OptimizerConfig, total_steps: int) -> tuple[int, int]:
    """(warmup, decay): the warmup's steps and the decay's after it (`decay_steps`, default
    `total_steps`, counts from step 0)."""
    return cfg.warmup_steps, max((cfg.decay_steps or total_steps) - cfg.warmup_steps, 1)


def make_schedule(cfg: OptimizerConfig, total_steps: int, lr: float | jax.Array | None = None,
                  lengths: tuple[int | jax.Array, int | jax.Array] | None = None) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then the configured decay.

    - cosine / linear: decay to `lr * end_lr_ratio` at `decay_steps` (default: total_steps).
    - rsqrt: `lr * sqrt(warmup / step)` after warmup (T5 style), flat before.
    - constant: `lr` after warmup.

    `lr`: the peak, `cfg.lr` when None; `lengths`: (warmup, decay) steps, `schedule_lengths`
    when None.  Either may be traced scalars (the train step's run inputs,
    `jaxft.train.run_inputs`), so that they are inputs of a compiled step, not constants; whether
    there is a warmup at all is the config's (`warmup_steps` > 0).
    """
    peak = cfg.lr if lr is None else lr
    warmup, decay = schedule_lengths(cfg, total_steps) if lengths is None else lengths
    alpha = cfg.end_lr_ratio
    # optax's formulas (cosine_decay_schedule, linear_schedule, join_schedules) over lengths that
    # may be traced.  With constant lengths XLA folds each division by a length into a product with
    # its float32 reciprocal; an input length is divided by: the learning rates agree to float32
    # rounding (tests/test_train_step.py)
    if cfg.schedule == "cosine":
        def after(count):
            cosine = 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(count, decay) / decay))
            return peak * ((1 - alpha) * cosine + alpha)
    elif cfg.schedule == "linear":
        def after(count):
            return _linear(peak, peak * alpha, decay, count)
    elif cfg.schedule == "rsqrt":
        offset = jnp.maximum(warmup, 1) if isinstance(warmup, jax.Array) else max(warmup, 1)

        def after(count):
            return peak * jnp.sqrt(offset / (count + offset))
    else:
        def after(count):
            return peak
    if cfg.warmup_steps <= 0:
        return after

    def schedule(count):
        return jnp.where(count < warmup, _linear(0.0, peak, warmup, count), after(count - warmup))

    return schedule


def _linear(start, end, steps, count):
    """From `start` at count 0 to `end` at `steps`, then flat."""
    return (start - end) * (1 - jnp.clip(count, 0, steps) / steps) + end


def decay_mask(params):
    """Weight decay only on matrices (ndim >= 2 per layer): not on norms, biases or scalars."""
    return _per_leaf(params, lambda path, p: _layer_ndim(path, p) >= 2)


def _layer_ndim(path: str, p) -> int:
    """A parameter's rank as one layer has it (stacked layers carry a leading layer axis)."""
    return p.ndim - 1 if STACKED in path.split("/") else p.ndim


def _per_layer(path: str, p, fn):
    """fn(path) of a parameter; for stacked layers one value per layer (fn of the per-layer path
    ``.../layers/{i}/...``), a scalar when they agree, else an array that broadcasts over the leaf."""
    parts = path.split("/")
    if STACKED not in parts:
        return fn(path)
    at = parts.index(STACKED)
    values = [fn("/".join(parts[:at] + [str(i)] + parts[at + 1:])) for i in range(p.shape[0])]
    if all(v is values[0] or v == values[0] for v in values):
        return values[0]
    # one float32 value per layer (a traced rate's among constants: its value, the same numbers)
    per_layer = [v.value if isinstance(v, RateInput) else jnp.float32(v) for v in values]
    return jnp.stack(per_layer).astype(jnp.float32).reshape((-1,) + (1,) * (p.ndim - 1))


def group_of(path: str, groups: Sequence[ParamGroup]) -> ParamGroup | None:
    """The first group whose pattern matches `path` (re.search), else None."""
    for g in groups:
        if re.search(g.pattern, path):
            return g
    return None


def _per_leaf(tree: Any, fn) -> Any:
    """A tree like `tree` of Python scalars fn(path, leaf)."""
    from jaxft.peft.sparse import keypath_str

    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return jax.tree_util.tree_unflatten(treedef, [fn(keypath_str(kp), x) for kp, x in flat])


class RateInput:
    """A traced rate (a run input) that multiplies an array in that array's dtype, as the Python
    float it stands for does (jax's weak typing): ``rate * p`` with bf16 parameters stays bf16
    rather than promoting the update to float32, so the step computes what it computed with the
    rate as a constant (optax's decay computes ``g + rate * p``)."""

    def __init__(self, value: jax.Array):
        self.value = value

    def __mul__(self, other):
        if isinstance(other, (int, float)):
            return RateInput(self.value * other)
        return self.value.astype(jnp.result_type(other)) * other

    __rmul__ = __mul__


def add_group_decay(default: float | RateInput, groups: Sequence[ParamGroup],
                    sign: float = 1.0) -> optax.GradientTransformation:
    """updates += sign * wd(path) * params on matrices; wd from the first matching group, else `default`."""

    def rate(path: str) -> float:
        g = group_of(path, groups)
        return default if g is None or g.weight_decay is None else g.weight_decay

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("add_group_decay needs the params")
        rates = _per_leaf(params, lambda path, p: _per_layer(path, p, rate) if _layer_ndim(path, p) >= 2 else 0.0)
        return jax.tree.map(lambda u, p, r: u + sign * r * p if _nonzero(r) else u, updates, params, rates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def scale_by_group(groups: Sequence[ParamGroup]) -> optax.GradientTransformation:
    """updates *= lr_scale of the first matching group (1 when none matches)."""

    def update_fn(updates, state, params=None):
        del params
        def scale(path: str) -> float:
            g = group_of(path, groups)
            return g.lr_scale if g else 1.0

        scales = _per_leaf(updates, lambda path, u: _per_layer(path, u, scale))
        return jax.tree.map(lambda u, s: (u * s).astype(u.dtype) if _nonzero(s - 1.0) else u, updates, scales), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _nonzero(x) -> bool:
    """Whether a per-leaf rate (a Python scalar, or per-layer values, or a traced rate) is not all zero."""
    return isinstance(x, RateInput) or hasattr(x, "shape") or bool(x != 0)


def make_optimizer(cfg: OptimizerConfig, total_steps: int, *, l1: float = 0.0, lr: float | jax.Array | None = None,
                   lengths: tuple[jax.Array, jax.Array] | None = None,
                   weight_decay: float | RateInput | None = None) -> optax.GradientTransformation:
    """`l1` > 0 adds the L1 pull towards the initial params (sparse fine-tuning phase 1).
    `lr`, `lengths`: the schedule's peak and lengths (`make_schedule`); `weight_decay`: the
    default decay rate, `cfg.weight_decay` when None (a `RateInput` for a traced one).  The
    state's structure depends on none of them."""
    schedule = make_schedule(cfg, total_steps, lr, lengths)
    wd = cfg.weight_decay if weight_decay is None else weight_decay
    for i, g in enumerate(cfg.groups):
        try:
            re.compile(g.pattern)
        except re.error as e:
            raise ValueError(f"optimizer.groups[{i}].pattern: {g.pattern!r} is not a valid regex: {e}") from None
    parts = []
    if l1 > 0:
        parts.append(l1_pull(l1))
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    grouped = bool(cfg.groups)
    if cfg.name == "adamw":
        if grouped:
            parts += [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
                      add_group_decay(wd, cfg.groups),
                      optax.scale_by_learning_rate(schedule)]
        else:
            parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                     weight_decay=wd, mask=decay_mask))
    elif cfg.name == "adafactor":
        # optax.adafactor adds its (lr-independent) decay just before flipping the sign
        rate = None if grouped or not cfg.weight_decay else wd
        parts.append(optax.adafactor(schedule, decay_rate=cfg.adafactor_decay_rate, weight_decay_rate=rate,
                                     weight_decay_mask=decay_mask, clipping_threshold=None))
        if grouped:
            parts.append(add_group_decay(wd, cfg.groups, sign=-1.0))
    else:  # the schema's Literal makes this unreachable from config files
        raise ValueError(f"optimizer.name: unknown optimizer {cfg.name!r}")
    if grouped:
        parts.append(scale_by_group(cfg.groups))
    return optax.chain(*parts)
