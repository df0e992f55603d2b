"""Fused attention kernels where the platform has one (`model.attention_kernel`).

- ``cudnn`` (GPU): ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's flash
  attention, with the same mask / bias arguments as the XLA path; bfloat16 / float16 only.
- ``splash`` (TPU): the Pallas splash-attention kernel, run per device in a ``shard_map``
  (rows over the batch axes, heads over ``tensor``), with the segment ids of packed rows
  and a causal or full block mask instead of a dense mask; no additive bias (ALiBi, T5's
  relative bias), sequence lengths multiples of 128.  ``interpret=True`` runs the same kernel
  on the CPU (tests).
- ``xla``: `jaxft.models.attention.attend`'s einsum / ``jax.nn.dot_product_attention`` path.

``auto`` (the default) takes the platform's kernel: the platform of the active mesh's devices
(abstract TPU devices count as TPU, so `jaxft plan` compiles what a TPU run runs), else the
default backend.  A kernel that cannot take a call (platform, dtype, bias, soft-cap, dropout,
shapes) falls back to ``xla`` with one log line per reason.

The models pass a ``SegmentMask`` where the dense mask comes from segment ids (the full
forward of every self-attention), so a kernel gets what it needs and the XLA path its dense
mask; XLA drops whichever the chosen path does not use.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

KERNELS = ("auto", "xla", "cudnn", "splash")
_PLATFORM_KERNEL = {"gpu": "cudnn", "cuda": "cudnn", "rocm": "cudnn", "tpu": "splash"}
_SPLASH_BLOCK = 128  # sequence lengths must be multiples of the kernel's smallest block
_SPLASH_MIN_HEAD_DIM = 64  # `auto` only: smaller heads take XLA attention (see `choose`)
# Tests: run the splash kernel on the CPU through the Pallas interpreter (slow; same numerics)
INTERPRET_ON_CPU = False


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegmentMask:
    """A self-attention mask as segment ids (a fused kernel's input) and as the dense
    mask_B1LS it equals (the XLA path's).  ``causal``: keys after the query are masked."""

    dense: jax.Array
    q_segments_BL: jax.Array
    kv_segments_BS: jax.Array
    causal: bool = dataclasses.field(metadata=dict(static=True))


def dense_mask(mask: Any) -> jax.Array:
    return mask.dense if isinstance(mask, SegmentMask) else mask


_warned: set[str] = set()


def _fallback(kernel: str, why: str) -> str:
    key = f"{kernel}: {why}"
    if key not in _warned:
        _warned.add(key)
        log.info("attention: %s kernel not used (%s); XLA attention instead", kernel, why)
    return "xla"


def _mesh_platform() -> str | None:
    mesh = jax.sharding.get_abstract_mesh()  # inside jit too; carries its devices' platform
    device = getattr(mesh, "abstract_device", None) if mesh is not None and not mesh.empty else None
    return getattr(device, "platform", None)


def platform() -> str:
    """The platform attention runs on: the active mesh's devices, else the default backend."""
    return _mesh_platform() or jax.default_backend()


def materialized(tree: Any) -> Any:
    """``tree``'s arrays unchanged, computed once where a model hands one value to every layer.

    XLA:CPU fuses an elementwise producer into each of its consumers and evaluates it per element
    there: RoPE's sin / cos per element of every layer's q and k, a beam pool's mask (compares over
    the ancestry) in every layer's softmax. Its pipeline drops `optimization_barrier`s, but it does
    not fuse such a producer into a gather, so on the CPU each array is read through ``take`` with
    the identity indices of its last axis (a copy of the array, once). Other platforms get the
    arrays as they are (nothing measured there to say the copy pays).
    """
    if platform() != "cpu":
        return tree

    def one(x: jax.Array) -> jax.Array:
        return (jnp.take(x, jnp.arange(x.shape[-1]), axis=-1, mode="clip")
                if x.ndim and x.shape[-1] > 1 else x)

    return jax.tree.map(one, tree)


def choose(kernel: str, q_BLHK: jax.Array, k_BSGK: jax.Array, mask: Any, *, has_bias: bool,
           logit_softcap: float | None, dropout: bool) -> str:
    """The kernel this call runs: ``kernel`` resolved (``auto``) and checked, else ``xla``."""
    if kernel not in KERNELS:
        raise ValueError(f"model.attention_kernel: unknown {kernel!r}; known: {', '.join(KERNELS)}")
    where = platform()
    auto = kernel == "auto"
    if auto:
        kernel = _PLATFORM_KERNEL.get(where, "xla")
    if kernel == "xla":
        return "xla"
    if dropout:
        return _fallback(kernel, "attention dropout")
    if kernel == "cudnn":
        if _PLATFORM_KERNEL.get(where) != "cudnn":
            return _fallback(kernel, f"needs a GPU, running on {where}")
        if q_BLHK.dtype not in (jnp.bfloat16, jnp.float16):
            return _fallback(kernel, f"needs bfloat16 / float16, got {q_BLHK.dtype} (model.dtype)")
        if logit_softcap is not None:
            return _fallback(kernel, "logit soft-capping")
        return "cudnn"
    if where != "tpu" and not (where == "cpu" and INTERPRET_ON_CPU):
        return _fallback(kernel, f"needs a TPU, running on {where}")
    if not isinstance(mask, SegmentMask):
        return _fallback(kernel, "the mask is not made of segment ids (cross-attention, local layers, decoding)")
    if has_bias:
        return _fallback(kernel, "an additive attention bias (ALiBi / relative position bias)")
    L, S = q_BLHK.shape[1], k_BSGK.shape[1]
    if L % _SPLASH_BLOCK or S % _SPLASH_BLOCK:
        return _fallback(kernel, f"sequence lengths {L}, {S} are not multiples of {_SPLASH_BLOCK}")
    if q_BLHK.shape[2] % k_BSGK.shape[2]:
        return _fallback(kernel, "query heads not a multiple of kv heads")
    if auto and q_BLHK.shape[3] < _SPLASH_MIN_HEAD_DIM:
        # TPU pads a head to 128 lanes: the kernel's [B, H, L, K] copies of tiny heads cost more
        # than the scores they save (a v5e plan, head_dim 32, L 128: 17.4 GiB against 14)
        return _fallback(kernel, f"head_dim {q_BLHK.shape[3]} < {_SPLASH_MIN_HEAD_DIM} under auto")
    return "splash"


# GPU: tell cuDNN a causal self-attention is causal, so it skips the tiles above the diagonal (a
# dense mask alone becomes an additive bias that cuDNN must apply to every tile).  Benchmarks flip it.
CUDNN_CAUSAL = True


def cudnn_attention(q_BLHK, k_BSGK, v_BSGK, *, mask: Any, bias_BHLS, scale: float) -> jax.Array:
    """cuDNN flash attention.  ``mask``: a dense mask_B1LS or a ``SegmentMask``; a causal one is also
    passed as ``is_causal`` (the dense mask still carries the segments of packed rows)."""
    causal = CUDNN_CAUSAL and isinstance(mask, SegmentMask) and mask.causal and \
        q_BLHK.shape[1] == k_BSGK.shape[1]
    return jax.nn.dot_product_attention(q_BLHK, k_BSGK, v_BSGK, bias=bias_BHLS, mask=dense_mask(mask), scale=scale,
                                        is_causal=causal, implementation="cudnn")


def _block(length: int) -> int:
    """The largest of 512 / 256 / 128 that divides ``length`` (a multiple of 128: `choose`)."""
    return next(b for b in (512, 256, _SPLASH_BLOCK) if length % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, L: int, S: int, causal: bool, softcap: float | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.CausalMask((L, S)) if causal else sm.FullMask((L, S))
    block_q, block_kv = _block(L), _block(S)
    blocks = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                           block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                           block_q_dq=block_q, block_kv_dq=block_kv)
    return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=blocks, head_shards=1, q_seq_shards=1,
                              attn_logits_soft_cap=softcap, interpret=interpret)


def splash_attention(q_BLHK, k_BSGK, v_BSGK, mask: SegmentMask, *, scale: float,
                     logit_softcap: float | None = None, interpret: bool | None = None) -> jax.Array:
    """Splash attention of [B, L, H, K] queries over [B, S, G, K] keys / values (G divides H),
    masked by ``mask``'s segment ids (and causality); out_BLHK.  Under a mesh it runs per
    device: rows over the batch axes, heads over ``tensor`` (when they divide)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    from jaxft.sharding import logical_to_spec

    dtype = q_BLHK.dtype
    interpret = platform() == "cpu" if interpret is None else interpret

    def local(q, k, v, q_seg, kv_seg):
        B, L, H, _ = q.shape
        kernel = _splash_kernel(H, L, k.shape[1], mask.causal, logit_softcap, interpret)
        q = (q * scale).astype(dtype)  # the kernel does not scale the logits
        run = lambda q1, k1, v1, qs, ks: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(qs, ks))  # noqa: E731
        out_BHLK = jax.vmap(run)(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                 q_seg, kv_seg)
        return out_BHLK.transpose(0, 2, 1, 3).astype(dtype)

    args = (q_BLHK, k_BSGK, v_BSGK, mask.q_segments_BL.astype(jnp.int32), mask.kv_segments_BS.astype(jnp.int32))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return local(*args)
    heads = logical_to_spec(("batch", "length", "heads", "head_dim"))
    batch, head_axes = heads[0], heads[2]
    tensor = np.prod([mesh.shape[a] for a in ((head_axes,) if isinstance(head_axes, str) else head_axes or ())])
    if q_BLHK.shape[2] % tensor or k_BSGK.shape[2] % tensor:
        head_axes = None
    qkv = jax.sharding.PartitionSpec(batch, None, head_axes, None)
    seg = jax.sharding.PartitionSpec(batch, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, seg, seg), out_specs=qkv,
                         check_vma=False)(*args)
