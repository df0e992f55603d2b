"""Building blocks shared by every model family, each parameter with logical axes.

Conventions (flax gemma / nanodo):
- Parameters are stored in ``param_dtype`` and cast to the compute ``dtype`` at
  use; norms are computed in float32.
- Every ``nnx.Param`` carries ``out_sharding=(logical names...)`` that
  ``jaxft.sharding.LOGICAL_RULES`` maps onto the mesh.
- Shape suffixes name the axes: B batch, L length, D d_model (embed), F mlp,
  H heads, K head_dim, V vocab.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.config.schema import ModelConfig
from jaxft.models import kernels
from jaxft.models.dropout import check_rate, dropout, dropout_rng, next_key
from jaxft.sharding import constrain

Axes = tuple[str | None, ...]
ACT = ("batch", "length", "embed")
HEADS = ("batch", "length", "heads", "head_dim")


def normal_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Axes, std: float,
                 param_dtype: jnp.dtype) -> nnx.Param:
    value = jax.random.normal(rngs.params(), tuple(shape), jnp.float32) * std
    return nnx.Param(value.astype(param_dtype), out_sharding=axes)


def const_param(shape: Sequence[int], axes: Axes, fill: float, param_dtype: jnp.dtype) -> nnx.Param:
    return nnx.Param(jnp.full(tuple(shape), fill, param_dtype), out_sharding=axes)


class Embed(nnx.Module):
    """Token embedding table ``embedding`` [vocab, embed]; ``attend`` is the tied output head."""

    def __init__(self, vocab_size: int, features: int, *, init_std: float,
                 param_dtype: jnp.dtype, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.embedding = normal_param(rngs, (vocab_size, features), ("vocab", "embed"),
                                      init_std, param_dtype)
        self.dtype = dtype

    def __call__(self, ids_BL: jax.Array) -> jax.Array:
        # FSDP: gather the table's embed shards at use (as for every weight); a lookup into an
        # embed-sharded table would leave the output sharded on embed instead of batch.
        table_VD = constrain(self.embedding[...].astype(self.dtype), ("vocab", None))
        return constrain(jnp.take(table_VD, ids_BL, axis=0), ("batch", "length", "embed"))

    def attend(self, x_BLD: jax.Array) -> jax.Array:
        """Tied output projection: float32 logits ``x @ embedding.T``."""
        table_VD = constrain(self.embedding[...].astype(self.dtype), ("vocab", None))
        return dense(x_BLD.astype(self.dtype), table_VD.T, 1, out_dtype=jnp.float32, master=self.embedding[...].T)


def dense(x: jax.Array, w: jax.Array, n_in: int, *, out_dtype: jnp.dtype | None = None,
          master: jax.Array | None = None) -> jax.Array:
    """``x[..., *in] . w[*in, *out] -> [..., *out]``: the trailing ``n_in`` dims of x contract
    with the leading ``n_in`` dims of w.

    On the CPU the contraction is done as one 2-D matmul ([tokens, in] . [in, out]).  XLA:CPU
    turns a dot_general that contracts or keeps several dims into transposed copies of the
    activations, fused into the producers' elementwise work (the SwiGLU backward's went from 3
    ms to 22 ms per layer, 32M LLaMA): the 2-D form keeps every weight gradient a plain matmul.
    Other platforms take the dot_general as is (the TPU compiler contracts several dims
    natively, and a reshape across tiled minor dims can cost a relayout).

    A wider ``out_dtype`` than the inputs' (the head's float32 logits of bf16 states) keeps the
    backward pass in the inputs' dtype (`_widened_dot`); ``master``, the parameter ``w`` was cast from
    (default ``w``), receives the weight gradient in its own dtype, straight from the product.
    """
    lead, ins, outs = x.shape[:x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
    out_dtype = jnp.dtype(out_dtype or jnp.result_type(x, w))
    master = w if master is None else master
    widened = x.dtype == w.dtype and out_dtype.itemsize > x.dtype.itemsize

    def dot(x, w, master, dims):
        return _widened_dot(x, w, master, dims, out_dtype) if widened else _plain_dot(x, w, dims, out_dtype)

    if kernels.platform() == "cpu" and (len(lead) != 1 or len(ins) != 1 or len(outs) != 1):
        k, m = math.prod(ins), math.prod(outs)
        return dot(x.reshape(-1, k), w.reshape(k, m), master.reshape(k, m) if widened else None,
                   (((1,), (0,)), ((), ()))).reshape(lead + outs)
    return dot(x, w, master, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))


def _plain_dot(x: jax.Array, w: jax.Array, dims, out_dtype: jnp.dtype) -> jax.Array:
    return jax.lax.dot_general(x, w, dims, preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _widened_dot(x, w, master, dims, out_dtype):
    """A dot of narrow inputs (bf16) into a wide result (float32) whose backward casts the
    cotangent to the inputs' dtype first, as for every other matmul of a mixed-precision step.
    Autodiff would run both backward products in float32 (TF32 on a GPU, half the bf16 rate),
    on [tokens, vocab] cotangents: the largest products of a 250k-vocabulary step.  The weight
    gradient goes to ``master`` (``w``'s float32 parameter, or ``w``) in ``master``'s dtype: the
    product accumulates in float32 anyway, and a chunked loss then adds it to its float32 sum in
    the product's epilogue instead of in a pass of its own (``w`` gets none)."""
    return _plain_dot(x, w, dims, out_dtype)


def _widened_fwd(x, w, master, dims, out_dtype):
    return _plain_dot(x, w, dims, out_dtype), (x, w, jnp.zeros((0,), master.dtype))  # master's dtype, no bytes


def _widened_bwd(dims, out_dtype, res, ct):
    x, w, master_like = res
    ct = ct.astype(x.dtype)
    _, vjp_x = jax.vjp(lambda x: _plain_dot(x, w, dims, x.dtype), x)
    lead = tuple(range(x.ndim - len(dims[0][0])))  # x's and ct's leading (token) dims
    g_w = jax.lax.dot_general(x, ct, ((lead, lead), ((), ())), preferred_element_type=master_like.dtype)
    return vjp_x(ct)[0], None, g_w


_widened_dot.defvjp(_widened_fwd, _widened_bwd)


class Linear(nnx.Module):
    """Dense map from the trailing ``in_shape`` dims of x to ``out_shape``.

    ``kernel`` has shape ``in_shape + out_shape`` (e.g. q: [embed, heads, head_dim],
    o: [heads, head_dim, embed]); the optional ``bias`` has shape ``out_shape``.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], *,
                 in_axes: Axes, out_axes: Axes, use_bias: bool = False, init_std: float,
                 param_dtype: jnp.dtype, dtype: jnp.dtype, out_dtype: jnp.dtype | None = None,
                 rngs: nnx.Rngs):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        assert len(in_axes) == len(in_shape) and len(out_axes) == len(out_shape)
        self.kernel = normal_param(rngs, in_shape + out_shape, tuple(in_axes) + tuple(out_axes),
                                   init_std, param_dtype)
        self.bias = const_param(out_shape, tuple(out_axes), 0.0, param_dtype) if use_bias else None
        self.n_in = len(in_shape)
        self.dtype = dtype
        self.out_dtype = out_dtype or dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        y = dense(x.astype(self.dtype), kernel.astype(self.dtype), self.n_in, out_dtype=self.out_dtype, master=kernel)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.out_dtype)
        return y


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale`` in float32; Gemma's ``plus_one`` uses ``(1 + scale)``, scale init 0."""

    def __init__(self, features: int, *, eps: float, plus_one: bool = False,
                 param_dtype: jnp.dtype, dtype: jnp.dtype):
        self.scale = const_param((features,), ("norm",), 0.0 if plus_one else 1.0, param_dtype)
        self.eps, self.plus_one, self.dtype = eps, plus_one, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return recomputed(_rms_norm, self.eps, self.plus_one, self.dtype)(x, self.scale[...])


class LayerNorm(nnx.Module):
    """Mean/variance LayerNorm with ``scale`` and ``bias``, computed in float32."""

    def __init__(self, features: int, *, eps: float, plus_one: bool = False,
                 param_dtype: jnp.dtype, dtype: jnp.dtype):
        self.scale = const_param((features,), ("norm",), 0.0 if plus_one else 1.0, param_dtype)
        self.bias = const_param((features,), ("norm",), 0.0, param_dtype)
        self.eps, self.plus_one, self.dtype = eps, plus_one, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return recomputed(_layer_norm, self.eps, self.plus_one, self.dtype)(x, self.scale[...], self.bias[...])


def recomputed(fn: Callable, *static) -> Callable:
    """``fn(*static, *arrays)`` whose backward pass keeps only its array inputs and recomputes the
    rest (``jax.checkpoint``).  For the elementwise / per-row work between matmuls: a bf16 norm's
    autodiff would keep two float32 copies of its [B, L, D] input, SwiGLU four more [B, L, F]
    arrays beside gate and up (silu's sigmoid and products, the hidden `down` reads);
    recomputing them in the backward is elementwise work fused into what reads them there.

    Inside a scanned layer (``scanned_body``) without the CSE barrier: the scan's loops already
    keep the recomputation apart from the forward, and the barrier would keep each residual's
    slice out of the stacked buffer as a copy of its own (XLA cannot fuse a ``dynamic_slice``
    across it): 2 x 0.37 GB per layer at the 1B shape's b8 x 2048 on a GPU."""
    return jax.checkpoint(functools.partial(fn, *static), prevent_cse=not _SCANNED.get())


_SCANNED = contextvars.ContextVar("jaxft_scanned_body", default=False)


@contextlib.contextmanager
def scanned_body():
    """While tracing one layer as the body of ``jax.lax.scan`` (``models.scan``)."""
    token = _SCANNED.set(True)
    try:
        yield
    finally:
        _SCANNED.reset(token)


def _rms_norm(eps: float, plus_one: bool, dtype: jnp.dtype, x: jax.Array, scale: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    scale = scale.astype(jnp.float32)
    return (y * (1.0 + scale if plus_one else scale)).astype(dtype)


def _layer_norm(eps: float, plus_one: bool, dtype: jnp.dtype, x: jax.Array, scale: jax.Array,
                bias: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    scale = scale.astype(jnp.float32)
    y = y * (1.0 + scale if plus_one else scale) + bias.astype(jnp.float32)
    return y.astype(dtype)


def make_norm(kind: str, features: int, *, eps: float, plus_one: bool,
              param_dtype: jnp.dtype, dtype: jnp.dtype) -> RMSNorm | LayerNorm:
    if kind == "rmsnorm":
        return RMSNorm(features, eps=eps, plus_one=plus_one, param_dtype=param_dtype, dtype=dtype)
    if kind == "layernorm":
        return LayerNorm(features, eps=eps, plus_one=plus_one, param_dtype=param_dtype, dtype=dtype)
    raise ValueError(f"model.norm: unknown norm {kind!r}; known: rmsnorm, layernorm")


def norm_from_config(cfg: ModelConfig) -> RMSNorm | LayerNorm:
    """The model's norm over d_model (``model.norm``, ``norm_eps``, ``norm_plus_one``)."""
    return make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, plus_one=cfg.norm_plus_one,
                     param_dtype=jnp.dtype(cfg.param_dtype), dtype=jnp.dtype(cfg.dtype))


def gelu_tanh(x: jax.Array) -> jax.Array:
    """Tanh-approximate GELU (HF ``gelu_pytorch_tanh`` / BLOOM's ``bloom_gelu_forward``)."""
    return jax.nn.gelu(x, approximate=True)


def gelu_exact(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU: HF ``gelu`` (mBART's ``activation_function``)."""
    return jax.nn.gelu(x, approximate=False)


# activation name -> (nonlinearity, gated).  Gated: down(act(gate(x)) * up(x)).
ACTIVATIONS = {
    "swiglu": (jax.nn.silu, True),
    "geglu": (gelu_tanh, True),
    "gelu": (gelu_tanh, False),
    "gelu_exact": (gelu_exact, False),
    "relu": (jax.nn.relu, False),
}


class MLP(nnx.Module):
    """Gated (``gate``, ``up``, ``down``) or plain (``up``, ``down``) feed-forward block;
    ``activation_dropout`` acts on the hidden h_BLF after the activation (and gate)."""

    def __init__(self, d_model: int, mlp_dim: int, *, activation: str, use_bias: bool,
                 init_std: float, param_dtype: jnp.dtype, dtype: jnp.dtype, rngs: nnx.Rngs,
                 activation_dropout: float = 0.0):
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation: unknown {activation!r}; known: {sorted(ACTIVATIONS)}")
        self.act, gated = ACTIVATIONS[activation]
        kw = dict(use_bias=use_bias, init_std=init_std, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        up = dict(in_axes=("embed",), out_axes=("mlp",), **kw)
        self.gate = Linear((d_model,), (mlp_dim,), **up) if gated else None
        self.up = Linear((d_model,), (mlp_dim,), **up)
        self.down = Linear((mlp_dim,), (d_model,), in_axes=("mlp",), out_axes=("embed",), **kw)
        self.activation_dropout_rate = check_rate("model.activation_dropout", activation_dropout)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        up_BLF = self.up(x_BLD)
        gate_BLF = self.gate(x_BLD) if self.gate is not None else None
        # the backward keeps gate and up alone: the hidden h_BLF that `down` reads is recomputed
        # (`down` enters as its state, whatever module it is; its dropout keys are drawn once)
        graphdef, state = nnx.split(self.down)
        return recomputed(_activated_down, self.act, self.activation_dropout_rate, graphdef)(gate_BLF, up_BLF, state)


def _activated_down(act: Callable, rate: float, down_def, gate_BLF: jax.Array | None, up_BLF: jax.Array,
                    down_state) -> jax.Array:
    h_BLF = act(up_BLF) if gate_BLF is None else act(gate_BLF) * up_BLF
    h_BLF = constrain(dropout(h_BLF, rate), ("batch", "length", "mlp"))
    return nnx.merge(down_def, down_state)(h_BLF)


def mlp_from_config(cfg: ModelConfig, rngs: nnx.Rngs) -> MLP:
    """The model's feed-forward block (``activation``, ``mlp_dim``, ``mlp_bias``, ``init_std``)."""
    return MLP(cfg.d_model, cfg.mlp_dim, activation=cfg.activation, use_bias=cfg.mlp_bias,
               init_std=cfg.init_std, param_dtype=jnp.dtype(cfg.param_dtype),
               dtype=jnp.dtype(cfg.dtype), rngs=rngs, activation_dropout=cfg.activation_dropout)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2 soft capping ``tanh(x / cap) * cap`` (identity when cap is None)."""
    return x if cap is None else jnp.tanh(x / cap) * cap



# --------------------------------------------------------------------------- stack helpers

# the primitives of the fused attention kernels' forward pass (their outputs include what the
# kernel's backward reads: the output and the softmax statistics): cuDNN's (jax's private cuDNN
# module) and a Pallas kernel's (splash on a TPU)
FUSED_ATTENTION_PRIMITIVES = frozenset({"dot_product_attention_fwd_wrapper", "pallas_call"})


def _dots_and_attention(prim, *args, **params) -> bool:
    """Save every product and the fused attention kernels' results: recompute the rest."""
    return (jax.checkpoint_policies.checkpoint_dots(prim, *args, **params)
            or prim.name in FUSED_ATTENTION_PRIMITIVES)


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # "dots" recomputes a fused kernel's attention forward in the backward pass: its custom VJP's
    # residuals are the kernel's outputs, which no product policy saves
    "dots_attention": _dots_and_attention,
}


def check_remat(remat: str) -> None:
    if remat != "none" and remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat: unknown {remat!r}; known: none, {', '.join(REMAT_POLICIES)}")


def remat_call(fn: Callable, remat: str) -> Callable:
    """``fn(layer, *arrays)`` (a per-layer call) under ``jax.checkpoint`` with policy
    ``model.remat`` ("none": as is).

    The layer enters as its state (``nnx.split``) and is merged inside the checkpointed
    function, which is then a pure function of arrays (as in the scan over layers):
    ``nnx.remat`` could not lift the variables of wrapped modules ("Cannot mutate Param
    from a different trace level").  The forward pass does not write variables.

    While dropout is active each call draws its own dropout key and passes it in as an
    argument: ``jax.checkpoint`` reuses one trace for all layers, so a trace-time counter
    would give every layer the same masks.  Masks are the same for every ``model.remat``."""
    def keyed(key: jax.Array | None, layer, *args):
        with dropout_rng(key):
            return fn(layer, *args)

    if remat == "none":
        return lambda layer, *args: keyed(next_key(), layer, *args)
    policy = REMAT_POLICIES[remat]

    def call(layer, *args):
        graphdef, state = nnx.split(layer)
        pure = lambda state, key, *a: keyed(key, nnx.merge(graphdef, state), *a)  # noqa: E731
        return jax.checkpoint(pure, policy=policy)(state, next_key(), *args)
    return call


def default_segment_ids(shape_BL: tuple[int, ...], segment_ids_BL: jax.Array | None) -> jax.Array:
    """``segment_ids_BL`` or, when None, one unpacked example per row (all ones)."""
    return jnp.ones(tuple(shape_BL[:2]), jnp.int32) if segment_ids_BL is None else segment_ids_BL


def default_positions(shape_BL: tuple[int, ...], positions_BL: jax.Array | None,
                      segment_ids_BL: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(positions_BL, segment_ids_BL), one unpacked example per row where not given."""
    if positions_BL is None:
        B, L = shape_BL[:2]
        positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    return positions_BL, default_segment_ids(shape_BL, segment_ids_BL)
