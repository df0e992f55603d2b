"""Token cross-entropy (+ z-loss, label smoothing), whole or chunked along the sequence.

`token_losses` takes full float32 logits_BLV.  `chunked_token_losses` takes the
last hidden states h_BLD and the model's head (``model.logits``: h [B, C, D] ->
float32 logits [B, C, V]) and computes the same summed losses over sequence
chunks of at most ``chunk`` tokens in a `jax.lax.scan`.  Differentiated, the loss
sum's gradient is taken chunk by chunk in the same pass (`scan_chunks`), so the
step never holds more than one chunk's [B, C, V] logits (and their gradient)
instead of [B, L, V], and no chunk's logits are rebuilt in the backward pass.
Same formulas, same sums up to float summation order; a sequence whose logits fit
the budget (`chunk_within`) takes the plain, unchunked path.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.extend.core
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxft.models import kernels, topk
from jaxft.sharding import constrain, logical_to_spec, ways

Sums = tuple[jax.Array, jax.Array, jax.Array]  # (loss_sum, z_loss_sum, weight_sum), float32


def token_losses(logits_BLV: jax.Array, targets_BL: jax.Array, label_smoothing: float | jax.Array,
                 z_loss: float | jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token (loss, z_loss term), float32.  The weights may be traced scalars (run inputs);
    label smoothing is computed unless it is the constant 0."""
    logits_BLV = logits_BLV.astype(jnp.float32)
    log_z_BL = log_sum_exp(logits_BLV, one_pass=_one_pass_here())
    target_logit_BL = picked(logits_BLV, targets_BL)
    nll_BL = log_z_BL - target_logit_BL
    if not isinstance(label_smoothing, (int, float)) or label_smoothing > 0:
        mean_logit_BL = jnp.mean(logits_BLV, axis=-1)
        smooth_BL = log_z_BL - mean_logit_BL  # cross-entropy against the uniform distribution
        nll_BL = (1.0 - label_smoothing) * nll_BL + label_smoothing * smooth_BL
    zl_BL = z_loss * jnp.square(log_z_BL)
    return nll_BL + zl_BL, zl_BL


def _one_pass_here() -> bool:
    """One read of the logits for their log-sum-exp where it was measured to pay: on a GPU (the
    loss is memory-bound there; XLA:CPU computes, and two exponentials per element would cost it),
    with the vocabulary whole on each device (a sharded one takes jax's two passes)."""
    if kernels.platform() != "gpu":
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return mesh is None or mesh.empty or ways(logical_to_spec(("vocab",))[0], mesh) == 1


def log_sum_exp(x: jax.Array, *, one_pass: bool) -> jax.Array:
    """``log(sum(exp(x), -1))`` in float32.  ``one_pass``: one read of ``x`` (an online reduction
    carrying the running maximum and the sum scaled to it) instead of two (the maximum, then the
    sum): a 256k vocabulary's float32 logits are 1 GB per loss chunk of 1024 tokens."""
    return _one_pass_lse(x) if one_pass else jax.nn.logsumexp(x, axis=-1)


@jax.custom_vjp
def _one_pass_lse(x: jax.Array) -> jax.Array:
    def combine(a, b):
        (m1, s1), (m2, s2) = a, b
        m = jnp.maximum(m1, m2)  # equal maxima (-inf included) weigh 1, not exp(nan)
        return m, s1 * jnp.where(m1 == m, 1.0, jnp.exp(m1 - m)) + s2 * jnp.where(m2 == m, 1.0, jnp.exp(m2 - m))

    x = x.astype(jnp.float32)
    m, s = jax.lax.reduce((x, jnp.ones_like(x)), (jnp.float32(-jnp.inf), jnp.float32(0.0)), combine, (x.ndim - 1,))
    return m + jnp.log(s)


def _one_pass_lse_fwd(x):
    lse = _one_pass_lse(x)
    return lse, (x, lse)


def _one_pass_lse_bwd(res, g):
    x, lse = res
    return ((g[..., None] * jnp.exp(x.astype(jnp.float32) - lse[..., None])).astype(x.dtype),)


_one_pass_lse.defvjp(_one_pass_lse_fwd, _one_pass_lse_bwd)


def picked(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
    """``logits_BLV[..., targets_BL]``: a gather forward, and a backward that places the cotangent
    by comparing each vocabulary index with the target (elementwise, so XLA fuses it with the
    softmax's gradient and the cast after it) instead of autodiff's scatter-add into [B, L, V]
    zeros, which stood between them: a 256k vocabulary's [tokens, V] float32 gradient was written
    and read once more per loss chunk on a GPU.  The same values."""
    return _picked(logits_BLV.shape[-1], logits_BLV, targets_BL)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _picked(vocab: int, logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]


def _picked_fwd(vocab, logits_BLV, targets_BL):
    return _picked(vocab, logits_BLV, targets_BL), targets_BL


def _picked_bwd(vocab, targets_BL, g_BL):
    hit_BLV = jax.lax.broadcasted_iota(targets_BL.dtype, (*targets_BL.shape, vocab), targets_BL.ndim) == \
        targets_BL[..., None]
    return jnp.where(hit_BLV, g_BL[..., None], jnp.zeros((), g_BL.dtype)), None


_picked.defvjp(_picked_fwd, _picked_bwd)


def summed_token_losses(logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array, *,
                        label_smoothing: float, z_loss: float) -> Sums:
    """Weighted sums of `token_losses` over all tokens: (loss_sum, z_loss_sum, weight_sum)."""
    loss_BL, zl_BL = token_losses(logits_BLV, targets_BL, label_smoothing, z_loss)
    w_BL = weights_BL.astype(jnp.float32)
    return jnp.sum(loss_BL * w_BL), jnp.sum(zl_BL * w_BL), jnp.sum(w_BL)


def chunk_layout(length: int, chunk: int) -> tuple[int, int]:
    """(n_chunks, chunk_len): the fewest chunks of at most ``chunk`` tokens, balanced so
    that the padding ``n_chunks * chunk_len - length`` is below ``n_chunks``."""
    if chunk < 1:
        raise ValueError(f"train.loss_chunk: must be >= 1 for the chunked loss, got {chunk}")
    n = max(1, math.ceil(length / chunk))
    return n, math.ceil(length / n)


def chunk_within(chunk: int, budget_mib: float, batch: int, length: int, vocab: int) -> int:
    """The loss's chunk length with a logits budget of ``budget_mib`` MiB per device of the active
    mesh (batch over the data axes, the vocabulary over the tensor axis, as the head shards
    them): the whole sequence (``length``: no chunking) when its float32 [batch, length, vocab]
    logits fit the budget, else at most ``chunk`` tokens whose logits fit it.  ``budget_mib`` 0:
    ``chunk`` as is.  Chunking costs head-sized buffers (the weight gradient accumulated over
    the chunks): below the budget the whole logits are cheaper (docs/decisions.md)."""
    if budget_mib <= 0:
        return chunk
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty:
        batch_ways, vocab_ways = (ways(axes, mesh) for axes in logical_to_spec(("batch", "vocab")))
        batch, vocab = -(-batch // batch_ways), -(-vocab // vocab_ways)
    token_bytes = 4 * batch * vocab  # float32 logits of one token position, per device
    if length * token_bytes <= budget_mib * 2 ** 20:
        return length
    return max(1, min(chunk, int(budget_mib * 2 ** 20 // token_bytes)))


def scan_chunks(fn: Callable[..., tuple[jax.Array, ...]], arrays: tuple[jax.Array, ...],
                logical: tuple[tuple[str | None, ...], ...], *, chunk: int) -> tuple[jax.Array, ...]:
    """``fn(*arrays)`` -- a tuple of sums over the sequence axis (scalars or per-row) -- computed over chunks of
    at most ``chunk`` tokens and added up.  Each array is [B, L, ...] with ``logical`` axis
    names for its chunks; padding to whole chunks is zeros, so ``fn`` must give padded
    tokens zero weight (a zero weights array does).

    Differentiated, the first sum's gradient is computed in the same pass over the chunks
    (`_fused_sums`): each chunk's logits are built once, their gradient taken at once, and only
    the gradients w.r.t. the chunk inputs and the arrays ``fn`` closes over (the head's
    parameters, those that are differentiated) are kept: no chunk is recomputed in the backward
    pass, so the head costs what it costs unchunked (forward, input and weight gradients)."""
    B, L = arrays[0].shape[:2]
    n, C = chunk_layout(L, chunk)
    if n == 1:  # one chunk: the plain computation
        return fn(*arrays)
    pad = n * C - L

    def by_chunk(x, names):  # [B, L, ...] -> [n, B, C, ...], scanned over chunks
        if pad:
            x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        x = x.reshape((B, n, C) + x.shape[2:]).swapaxes(0, 1)
        return constrain(x, (None,) + names)

    xs = tuple(by_chunk(x, names) for x, names in zip(arrays, logical))
    # the arrays `fn` closes over become arguments, so the custom gradient can see them
    fn_c, consts = jax.closure_convert(lambda *c: fn(*(constrain(x, nm) for x, nm in zip(c, logical))),
                                       *(x[0] for x in xs))
    return _fused_sums(fn_c, xs, tuple(consts))


def _summed(fn_c: Callable, xs: tuple, consts: tuple) -> tuple[jax.Array, ...]:
    """The chunk sums added up, each chunk's body rematerialised (what a plain backward pass runs)."""
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_sums(x, consts):
        return fn_c(*x, *consts)

    def body(carry, x):
        return tuple(a + b for a, b in zip(carry, chunk_sums(x, consts))), None

    zeros = tuple(jnp.zeros(o.shape, o.dtype) for o in jax.eval_shape(fn_c, *(x[0] for x in xs), *consts))
    sums, _ = jax.lax.scan(body, zeros, xs)
    return sums


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_sums(fn_c: Callable, xs: tuple, consts: tuple) -> tuple[jax.Array, ...]:
    return _summed(fn_c, xs, consts)


def _fused_fwd(fn_c: Callable, xs: tuple, consts: tuple):
    """One pass: the sums and, for a scalar first sum, its gradient w.r.t. every differentiated
    chunk input (stacked per chunk) and closed-over array (accumulated in float32)."""
    xs_v, consts_v = tuple(p.value for p in xs), tuple(p.value for p in consts)
    dx, dc = [p.perturbed for p in xs], [p.perturbed for p in consts]
    shapes = jax.eval_shape(fn_c, *(x[0] for x in xs_v), *consts_v)
    if shapes[0].ndim or not (any(dx) or any(dc)):  # per-row sums: the plain backward pass
        return _summed(fn_c, xs_v, consts_v), (None, None, xs_v, consts_v)
    acc0 = tuple(jnp.zeros(c.shape, jnp.float32) if d else None for c, d in zip(consts_v, dc))
    fn_h, casts = hoisted_casts(fn_c, tuple(x[0] for x in xs_v), consts_v)
    cast_v = tuple(consts_v[i].astype(dtype) for i, dtype in casts)  # once, outside the loop
    inputs, diff = consts_v + cast_v, list(dc) + [dc[i] for i, _ in casts]
    owner = list(range(len(consts_v))) + [i for i, _ in casts]  # the const each input's gradient adds to

    def body(carry, x):
        sums, acc = carry

        def of(x_diff, c_diff):
            xi, ci = iter(x_diff), iter(c_diff)
            return fn_h(*(next(xi) if d else v for v, d in zip(x, dx)),
                        *(next(ci) if d else v for v, d in zip(inputs, diff)))

        out, vjp = jax.vjp(of, [v for v, d in zip(x, dx) if d], [c for c, d in zip(inputs, diff) if d])
        g_x, g_c = vjp(tuple(jnp.ones_like(o) if i == 0 else jnp.zeros_like(o) for i, o in enumerate(out)))
        acc = list(acc)
        for i, g in zip((o for o, d in zip(owner, diff) if d), g_c):
            acc[i] = acc[i] + g.astype(jnp.float32)
        g_x = iter(g_x)
        return (tuple(a + b for a, b in zip(sums, out)), tuple(acc)), tuple(next(g_x) if d else None for d in dx)

    zeros = tuple(jnp.zeros(o.shape, o.dtype) for o in shapes)
    (sums, g_c), g_x = jax.lax.scan(body, (zeros, acc0), xs_v)
    return sums, (g_x, g_c, xs_v, consts_v)


def hoisted_casts(fn_c: Callable, args: tuple, consts: tuple) -> tuple[Callable, list[tuple[int, jnp.dtype]]]:
    """``fn_c`` without its casts of closed-over arrays to a narrower float dtype, and those casts
    as (const index, dtype): the caller casts once, before its loop, and passes the results
    after the consts (``fn(*args, *consts, *casts)``).  XLA:GPU left such a cast (a bf16 model's
    float32 head) inside the loop: a 256k x 2048 head, 3 GB of memory traffic per chunk.  The same
    arithmetic; the gradient w.r.t. a cast is its const's too, widened (as the cast's transpose
    would), which the caller adds."""
    closed, shapes = jax.make_jaxpr(fn_c, return_shape=True)(*args, *consts)
    jaxpr = closed.jaxpr
    const_vars = jaxpr.invars[len(args):]
    first: dict[tuple[int, jnp.dtype], Any] = {}  # (const, dtype) -> the one hoisted cast's variable
    same: dict[Any, Any] = {}  # a repeated cast's variable -> that one
    eqns = []
    for eqn in jaxpr.eqns:
        cast = eqn.primitive.name == "convert_element_type"
        i = next((i for i, v in enumerate(const_vars) if v is eqn.invars[0]), None) if cast else None
        dtype = jnp.dtype(eqn.params["new_dtype"]) if cast else None
        if i is None or not (jnp.issubdtype(consts[i].dtype, jnp.floating) and jnp.issubdtype(
                dtype, jnp.floating) and dtype.itemsize < consts[i].dtype.itemsize):
            eqns.append(eqn)
        elif (i, dtype) in first:
            same[eqn.outvars[0]] = first[i, dtype]
        else:
            first[i, dtype] = eqn.outvars[0]
    if not first:
        return fn_c, []
    sub = lambda vs: [same.get(v, v) if not isinstance(v, jax.extend.core.Literal) else v for v in vs]  # noqa: E731
    inner = jaxpr.replace(eqns=[e.replace(invars=sub(e.invars)) for e in eqns],
                          invars=[*jaxpr.invars, *first.values()], outvars=sub(jaxpr.outvars),
                          debug_info=jaxpr.debug_info.with_unknown_names())
    casts = list(first)
    flat = jax.extend.core.jaxpr_as_fun(jax.extend.core.ClosedJaxpr(inner, closed.consts))
    return (lambda *a: jax.tree.unflatten(jax.tree.structure(shapes), flat(*a))), casts


def _fused_bwd(fn_c: Callable, res, cts):
    """The stored gradients times the first sum's cotangent; the plain (rematerialised) backward
    pass where another sum has a cotangent too."""
    g_x, g_c, xs, consts = res
    fused = g_x is not None and not isinstance(cts[0], SymbolicZero) and \
        all(isinstance(c, SymbolicZero) for c in cts[1:])
    if not fused:
        cts = tuple(jnp.zeros(c.shape, c.dtype) if isinstance(c, SymbolicZero) else c for c in cts)
        _, vjp = jax.vjp(lambda xs, consts: _summed(fn_c, xs, consts), xs, consts)
        return vjp(cts)
    ct = cts[0]
    return (tuple(None if g is None else g * ct.astype(g.dtype) for g in g_x),
            tuple(None if g is None else (g * ct).astype(c.dtype) for g, c in zip(g_c, consts)))


_fused_sums.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


_H, _T = ("batch", "length", "embed"), ("batch", "length")


def _vocab(head_fn: Callable[[jax.Array], jax.Array], hidden_BLD: jax.Array) -> int:
    return jax.eval_shape(head_fn, hidden_BLD[:, :1]).shape[-1]


def chunked_token_losses(hidden_BLD: jax.Array, head_fn: Callable[[jax.Array], jax.Array],
                         targets_BL: jax.Array, weights_BL: jax.Array, *, chunk: int,
                         label_smoothing: float, z_loss: float, budget_mib: float = 0) -> Sums:
    """`summed_token_losses(head_fn(hidden_BLD), ...)` without materialising [B, L, V]:
    `scan_chunks` over the sequence (the batch axis stays on the data axes and the
    vocabulary on the tensor axis: ``head_fn`` constrains its logits as the full path does),
    chunks of at most ``chunk`` tokens and `chunk_within` ``budget_mib``."""
    def sums(h_BCD, t_BC, w_BC):
        return summed_token_losses(head_fn(h_BCD), t_BC, w_BC, label_smoothing=label_smoothing, z_loss=z_loss)

    chunk = chunk_within(chunk, budget_mib, *hidden_BLD.shape[:2], _vocab(head_fn, hidden_BLD))
    return scan_chunks(sums, (hidden_BLD, targets_BL, weights_BL.astype(jnp.float32)), (_H, _T, _T), chunk=chunk)


def token_kl(teacher_BLV: jax.Array, student_BLV: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """Per-token KL(teacher || student) of the temperature-softened distributions, float32.
    ``top_k`` > 0: over the teacher's k most likely tokens only, both distributions
    renormalised over them (0 when the student agrees with the teacher there)."""
    t_BLV = teacher_BLV.astype(jnp.float32) / temperature
    s_BLV = student_BLV.astype(jnp.float32) / temperature
    if top_k:
        t_BLV, idx_BLK = topk.top_k(t_BLV, top_k)
        s_BLV = jnp.take_along_axis(s_BLV, idx_BLK, axis=-1)
    logp, logq = jax.nn.log_softmax(t_BLV, axis=-1), jax.nn.log_softmax(s_BLV, axis=-1)
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def distill_token_sums(student_BLV: jax.Array, teacher_BLV: jax.Array, targets_BL: jax.Array,
                       weights_BL: jax.Array, *, alpha: float, temperature: float, top_k: int,
                       label_smoothing: float, z_loss: float) -> tuple[jax.Array, ...]:
    """(loss_sum, z_loss_sum, weight_sum, kl_sum): per target token
    ``(1 - alpha) * cross-entropy + z-loss + alpha * T^2 * KL(teacher || student)``; alpha 0 is
    `summed_token_losses` exactly.  The teacher's logits get no gradient."""
    loss_BL, zl_BL = token_losses(student_BLV, targets_BL, label_smoothing, z_loss)
    kl_BL = token_kl(jax.lax.stop_gradient(teacher_BLV), student_BLV, temperature, top_k)
    total_BL = (1.0 - alpha) * (loss_BL - zl_BL) + zl_BL + (alpha * temperature ** 2) * kl_BL
    w_BL = weights_BL.astype(jnp.float32)
    return jnp.sum(total_BL * w_BL), jnp.sum(zl_BL * w_BL), jnp.sum(w_BL), jnp.sum(kl_BL * w_BL)


def chunked_distill_sums(student_h_BLD: jax.Array, student_head: Callable[[jax.Array], jax.Array],
                         teacher_h_BLD: jax.Array, teacher_head: Callable[[jax.Array], jax.Array],
                         targets_BL: jax.Array, weights_BL: jax.Array, *, chunk: int, budget_mib: float = 0,
                         **kw) -> tuple[jax.Array, ...]:
    """`distill_token_sums` of both models' logits, ``chunk`` tokens at a time (`scan_chunks`):
    neither model's [B, L, V] logits are ever held whole (``budget_mib``: both models' chunk
    logits together, `chunk_within`)."""
    def sums(hs_BCD, ht_BCD, t_BC, w_BC):
        return distill_token_sums(student_head(hs_BCD), teacher_head(ht_BCD), t_BC, w_BC, **kw)

    vocab = _vocab(student_head, student_h_BLD) + _vocab(teacher_head, teacher_h_BLD)
    chunk = chunk_within(chunk, budget_mib, *student_h_BLD.shape[:2], vocab)

    return scan_chunks(sums, (student_h_BLD, teacher_h_BLD, targets_BL, weights_BL.astype(jnp.float32)),
                       (_H, _H, _T, _T), chunk=chunk)
