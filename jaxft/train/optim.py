"""Optimizers and learning-rate schedules from `OptimizerConfig` (optax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxft.config.schema import OptimizerConfig


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then the configured decay.

    - cosine / linear: decay to `lr * end_lr_ratio` at `decay_steps` (default: total_steps).
    - rsqrt: `lr * sqrt(warmup / step)` after warmup (T5 style), flat before.
    - constant: `lr` after warmup.
    """
    warmup = cfg.warmup_steps
    decay_steps = max((cfg.decay_steps or total_steps) - warmup, 1)
    end = cfg.lr * cfg.end_lr_ratio
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, end, decay_steps)
    elif cfg.schedule == "rsqrt":
        offset = max(warmup, 1)

        def after(count):
            return cfg.lr * jnp.sqrt(offset / (count + offset))
    else:
        after = optax.constant_schedule(cfg.lr)
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def decay_mask(params):
    """Weight decay only on matrices (ndim >= 2): not on norms, biases or scalars."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    if cfg.name == "adamw":
        parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, mask=decay_mask))
    elif cfg.name == "adafactor":
        parts.append(optax.adafactor(schedule, decay_rate=cfg.b2, weight_decay_rate=cfg.weight_decay or None,
                                     weight_decay_mask=decay_mask, clipping_threshold=None))
    else:  # the schema's Literal makes this unreachable from config files
        raise ValueError(f"optimizer.name: unknown optimizer {cfg.name!r}")
    return optax.chain(*parts)
