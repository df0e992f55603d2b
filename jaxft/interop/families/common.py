"""Building blocks of a family mapping: tensor rules, layout transforms, config field helpers.

A family maps each HF tensor to one or more jaxft parameters (``Tensor``):
``to_ours`` turns the HF array into our layout(s), ``to_hf`` joins ours back.
HF ``nn.Linear`` weights are ``[out, in]``; our kernels are ``in_shape + out_shape``
(q: ``[embed, heads, head_dim]``, o: ``[heads, head_dim, embed]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from jaxft.config.schema import ModelConfig, RopeScalingConfig


@dataclass(frozen=True)
class Tensor:
    """One HF tensor <-> ``ours`` (jaxft parameter paths like ``layers/0/attn/q/kernel``).

    ``ours`` may be empty: a tensor checked on import (``to_ours`` raises if it is
    not what we assume, e.g. an all-zero bias) and written on export.  ``optional``:
    import skips it when absent.  ``fallback``: import reads this tensor instead
    when ``hf`` is absent (same layout; e.g. T5's ``lm_head.weight`` <- ``shared.weight``).
    """

    hf: str
    ours: tuple[str, ...]
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]
    optional: bool = False
    fallback: str | None = None
    # a hashable name of ``to_ours`` when it is a pure layout change (transpose / reshape) that
    # works on jax arrays too: import then runs it compiled on the device (one compile per
    # layout and shape) instead of as a strided numpy copy; None = numpy on the host
    layout: tuple | None = None


def identity(hf: str, ours: str) -> Tensor:
    return Tensor(hf, (ours,), lambda w: (w,), lambda w: w, layout=("identity",))


def reshaped(hf: str, ours: str, shape: Sequence[int]) -> Tensor:
    """Same data, our shape (e.g. a q bias ``[H*K]`` -> ``[H, K]``)."""
    shape = tuple(shape)
    return Tensor(hf, (ours,), lambda w: (w.reshape(shape),), lambda w: w.reshape(-1), layout=("reshape", shape))


def linear(hf: str, ours: str, in_shape: Sequence[int], out_shape: Sequence[int]) -> Tensor:
    """HF ``[prod(out), prod(in)]`` <-> ours ``in_shape + out_shape``."""
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return Tensor(hf, (ours,), lambda w: (w.T.reshape(in_shape + out_shape),),
                  lambda w: w.reshape(n_in, n_out).T, layout=("linear", in_shape, out_shape))


# --------------------------------------------------------------------------- config fields


def unsupported(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"config.json: {field}={value!r}: {why}")


def need(hf: dict, field: str, *aliases: str) -> Any:
    for key in (field, *aliases):
        if hf.get(key) is not None:
            return hf[key]
    raise ValueError(f"config.json: required field {field!r} is missing")


def expect(hf: dict, field: str, allowed: Sequence[Any], default: Any = None) -> Any:
    """The field's value, which must be one of ``allowed`` (absent -> ``default``)."""
    value = hf.get(field, default)
    if value not in allowed:
        raise unsupported(field, value, f"supported: {', '.join(repr(a) for a in allowed)}")
    return value


def rate(hf: dict, field: str, default: float) -> float:
    """A dropout probability field (absent or null -> HF's class ``default``), in [0, 1)."""
    value = hf.get(field)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise unsupported(field, value, "a dropout probability must be a number in [0, 1)")
    return float(value)


def head_dim_of(hf: dict, d_model: int, n_heads: int) -> int | None:
    """Explicit head_dim only when it differs from d_model // n_heads (keeps configs short)."""
    k = hf.get("head_dim")
    return None if k is None or k * n_heads == d_model else int(k)


# --------------------------------------------------------------------------- RoPE


_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "beta_fast", "beta_slow", "original_max_position_embeddings", "truncate"},
}


def rope_from_hf(hf: dict) -> tuple[float, RopeScalingConfig | None]:
    """``(rope_theta, scaling)`` from ``rope_parameters`` (transformers 5) or
    ``rope_theta`` + ``rope_scaling`` (transformers 4)."""
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rp = dict(hf.get(field) or {})
    if any(isinstance(v, dict) for v in rp.values()):
        raise unsupported(field, rp, "per-layer-type RoPE parameters are not supported")
    theta = float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in _ROPE_KEYS:
        raise unsupported(f"{field}.rope_type", kind, f"supported: {', '.join(_ROPE_KEYS)}")
    extra = set(rp) - _ROPE_KEYS[kind] - {"rope_type", "type", "rope_theta"}
    extra = {k for k in extra if rp[k] is not None and not (k == "partial_rotary_factor" and rp[k] == 1.0)}
    if extra:
        raise unsupported(f"{field}.{sorted(extra)[0]}", rp[sorted(extra)[0]], f"not supported for {kind!r}")
    if hf.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        raise unsupported("partial_rotary_factor", hf["partial_rotary_factor"], "only full rotary is supported")
    if kind == "default":
        return theta, None
    if kind == "yarn" and rp.get("truncate", True) is not True:
        raise unsupported(f"{field}.truncate", rp["truncate"], "only the truncated yarn ramp is supported")
    orig = int(rp.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
               or hf.get("max_position_embeddings") or 8192)
    if rp.get("factor") is None:
        raise unsupported(f"{field}.factor", None, f"{kind!r} RoPE scaling needs a factor")
    scaling = RopeScalingConfig(type=kind, factor=float(rp["factor"]), original_max_position=orig)
    if kind == "llama3":
        scaling = RopeScalingConfig(type=kind, factor=float(rp["factor"]), original_max_position=orig,
                                    low_freq_factor=float(rp["low_freq_factor"]),
                                    high_freq_factor=float(rp["high_freq_factor"]))
    if kind == "yarn":
        scaling = RopeScalingConfig(type=kind, factor=float(rp["factor"]), original_max_position=orig,
                                    beta_fast=float(rp.get("beta_fast") or 32.0),
                                    beta_slow=float(rp.get("beta_slow") or 1.0))
    return theta, scaling


def rope_to_hf(cfg: ModelConfig) -> dict:
    """``rope_parameters`` (transformers 5) plus the v4 spelling ``rope_theta``/``rope_scaling``."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    s = cfg.rope_scaling
    if s is not None:
        params.update(rope_type=s.type, factor=s.factor)
        if s.type in ("llama3", "yarn"):
            params["original_max_position_embeddings"] = s.original_max_position
        if s.type == "llama3":
            params.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
        if s.type == "yarn":
            params.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow)
    scaling = None if s is None else {k: v for k, v in params.items() if k != "rope_theta"}
    return {"rope_parameters": params, "rope_theta": cfg.rope_theta, "rope_scaling": scaling}


# --------------------------------------------------------------------------- export checks


def check_exportable(cfg: ModelConfig, model_type: str, **expected: Any) -> None:
    """Every ``model.<field>`` must have the value ``model_type`` can express."""
    for field, want in expected.items():
        got = getattr(cfg, field)
        ok = got in want if isinstance(want, (tuple, list, set, frozenset)) else got == want
        if not ok:
            raise ValueError(f"model.{field}={got!r} cannot be exported as HF {model_type!r} "
                             f"(needs {want!r})")


# --------------------------------------------------------------------------- llama-style layers


def llama_like_tensors(cfg: ModelConfig, prefix: str = "model.", *, gemma2: bool = False) -> list[Tensor]:
    """Tensors of the LLaMA naming scheme (LLaMA, Qwen2, Gemma, Gemma 2)."""
    D, H, G, K, F = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.mlp_dim
    out = [identity(f"{prefix}embed_tokens.weight", "embed/embedding")]
    for i in range(cfg.n_layers):
        hf, us = f"{prefix}layers.{i}.", f"layers/{i}/"
        for name, heads in (("q", H), ("k", G), ("v", G)):
            out.append(linear(f"{hf}self_attn.{name}_proj.weight", f"{us}attn/{name}/kernel", (D,), (heads, K)))
            if cfg.qkv_bias:
                out.append(reshaped(f"{hf}self_attn.{name}_proj.bias", f"{us}attn/{name}/bias", (heads, K)))
        out.append(linear(f"{hf}self_attn.o_proj.weight", f"{us}attn/o/kernel", (H, K), (D,)))
        if cfg.attn_out_bias:
            out.append(identity(f"{hf}self_attn.o_proj.bias", f"{us}attn/o/bias"))
        for name, (n_in, n_out) in (("gate", (D, F)), ("up", (D, F)), ("down", (F, D))):
            out.append(linear(f"{hf}mlp.{name}_proj.weight", f"{us}mlp/{name}/kernel", (n_in,), (n_out,)))
            if cfg.mlp_bias:
                out.append(identity(f"{hf}mlp.{name}_proj.bias", f"{us}mlp/{name}/bias"))
        out.append(identity(f"{hf}input_layernorm.weight", f"{us}attn_norm/scale"))
        if gemma2:
            out.append(identity(f"{hf}post_attention_layernorm.weight", f"{us}post_attn_norm/scale"))
            out.append(identity(f"{hf}pre_feedforward_layernorm.weight", f"{us}mlp_norm/scale"))
            out.append(identity(f"{hf}post_feedforward_layernorm.weight", f"{us}post_mlp_norm/scale"))
        else:
            out.append(identity(f"{hf}post_attention_layernorm.weight", f"{us}mlp_norm/scale"))
    out.append(identity(f"{prefix}norm.weight", "final_norm/scale"))
    if not cfg.tie_embeddings:
        out.append(linear("lm_head.weight", "lm_head/kernel", (D,), (cfg.vocab_size,)))
    return out
