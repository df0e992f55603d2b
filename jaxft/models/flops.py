"""Analytic parameter counts and training FLOPs (for MFU).

Convention (PaLM appendix B, extended to encoder-decoders and frozen weights).
Only matmuls count; the embedding lookup, norms, biases, position tables,
elementwise ops, masks and the optimizer do not.  A weight matrix of N entries
applied to one token costs

    forward 2N  +  activation gradient 2N  +  weight gradient 2N

where the activation gradient runs only when something trainable feeds the
matrix's input (lies below it in the graph) and the weight gradient only when
the matrix trains.  So: full finetuning 6N; a frozen matrix under trainable
ones (an adapted base, `train.frozen`) 4N; a frozen matrix with nothing
trainable below it 2N (JAX never builds that backward).  Low-rank adapter
factors that PEFT attaches below a kernel's module (``<linear>/<group>/<name>/a``
[d_in, r] and ``.../b`` [r, d_out]) are matmuls too: trained, rank r on a
d_in x d_out kernel, they add 6 r (d_in + d_out) (``a``: 4 r d_in where nothing
below trains).  LT-SFT (`peft.method: sparse`) computes dense
gradients in both phases (its mask zeroes updates, not gradients): 6N, as full
finetuning.  The output head counts (d_model x vocab), also when tied.

Tokens: encoder weights and the decoder's cross-attention k/v run on source
tokens (``data.encoder_seq_len``), everything else on target tokens
(``data.seq_len``).  Attention, per layer: ``q k^T`` and ``probs v`` cost
``2 Lq Lk n_heads head_dim`` each forward; backward d-probs, dq, dk and dv cost
as much each, when needed (3x forward in full finetuning).  Masks are not
subtracted.

The metrics built on this (`jaxft.train.hooks.MetricsHook`):

- ``mfu``: `train_flops_per_example` at the padded batch shapes (the compute
  that ran), with the run's real trainable / frozen split, x global batch x
  steps / seconds / (peak FLOP/s x devices).
- ``seq_tokens_per_s``: decoder slots (global batch x seq_len, padding included) per second.
- ``tokens_per_s``: real target tokens (``tokens``: summed loss weights) per second.
- ``nonpad_tokens_per_s``: non-padding input tokens (``segment_ids > 0``, decoder
  plus encoder side: the step's ``nonpad_tokens``) per second.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterator

from jaxft.config.schema import ModelConfig

_GATED = ("swiglu", "geglu")
_END = 1 << 30  # layer index of what follows the last layer (final norm, head)
# (layer, stage) in the residual stream; parallel branches share a stage
_STAGES = {"attn_norm": 0, "attn/q": 1, "attn/k": 1, "attn/v": 1, "attn/rel_bias": 1, "attn/o": 3,
           "post_attn_norm": 4, "cross_norm": 5, "cross/q": 6, "cross/k": 6, "cross/v": 6, "cross/o": 8,
           "mlp_norm": 9, "mlp/gate": 10, "mlp/up": 10, "mlp/down": 11, "post_mlp_norm": 12}
_STACK = {"embed": (-1, 0), "pos_embed": (-1, 1), "embed_norm": (-1, 1), "rel_bias": (0, 1),
          "final_norm": (_END, 0), "lm_head": (_END, 1)}
_LAYER = re.compile(r"^(?:(encoder|decoder)/)?layers/(\d+)/(.+)$")
_NONE = (_END + 1, 0)  # "nothing trainable"


def _norm_params(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == "layernorm" else 1)


def _layer_matmul_params(cfg: ModelConfig) -> int:
    D, H, G, K, F = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.mlp_dim
    attn = D * H * K + 2 * D * G * K + H * K * D
    mlp = (3 if cfg.activation in _GATED else 2) * D * F
    return attn + mlp


def _n_decoder_layers(cfg: ModelConfig) -> int:
    if cfg.family == "t5":
        return cfg.n_decoder_layers or cfg.n_layers
    return cfg.n_layers if cfg.n_decoder_layers is None else cfg.n_decoder_layers


def param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters ``build_model(cfg)`` creates."""
    if cfg.family == "bart":
        return bart_param_count(cfg)
    if cfg.family == "t5":
        return t5_param_count(cfg)
    if cfg.family != "decoder":
        raise ValueError(f"param_count: model.family {cfg.family!r} is not supported yet; known: decoder")
    D, H, G, K, F, V = (cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.mlp_dim,
                        cfg.vocab_size)
    layer = _layer_matmul_params(cfg) + (4 if cfg.post_norms else 2) * _norm_params(cfg)
    if cfg.qkv_bias:
        layer += H * K + 2 * G * K
    if cfg.attn_out_bias:
        layer += D
    if cfg.mlp_bias:
        layer += (2 if cfg.activation in _GATED else 1) * F + D
    total = V * D + cfg.n_layers * layer + _norm_params(cfg)
    if cfg.embed_norm:
        total += _norm_params(cfg)
    if not cfg.tie_embeddings:
        total += D * V
    return total


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Full-finetuning FLOPs per (target) token, source and target both ``seq_len``
    (kept for its callers; `train_flops_per_example` takes both lengths and frozen weights)."""
    if cfg.family in ("t5", "bart"):
        return _encdec_flops(cfg, seq_len, seq_len) / seq_len
    if cfg.family != "decoder":
        raise ValueError(f"train_flops_per_token: model.family {cfg.family!r} is not supported yet")
    matmul = cfg.n_layers * _layer_matmul_params(cfg) + cfg.d_model * cfg.vocab_size
    attention = 2 * cfg.n_layers * seq_len * cfg.n_heads * cfg.dim_per_head
    return 6.0 * matmul + 6.0 * attention


def _encdec_flops(cfg: ModelConfig, src_len: int, tgt_len: int) -> int:
    """Full-finetuning FLOPs of one T5 / mBART example: ``src_len`` source, ``tgt_len`` target tokens."""
    D, H, K, F, V = cfg.d_model, cfg.n_heads, cfg.dim_per_head, cfg.mlp_dim, cfg.vocab_size
    n_enc, n_dec = cfg.n_layers, _n_decoder_layers(cfg)
    attn, kv = 4 * D * H * K, 2 * D * H * K
    mlp = (3 if cfg.family == "t5" and cfg.activation in _GATED else 2) * D * F
    encoder = src_len * (6 * n_enc * (attn + mlp) + 12 * n_enc * src_len * H * K)
    cross_kv = src_len * 6 * n_dec * kv
    decoder = tgt_len * (6 * (n_dec * (2 * attn - kv + mlp) + D * V) + 12 * n_dec * (tgt_len + src_len) * H * K)
    return encoder + cross_kv + decoder


def train_flops_per_example(cfg: ModelConfig, tgt_len: int, src_len: int | None = None, *,
                            trainable: Any = None, frozen: Any = None) -> float:
    """Training FLOPs of one example: ``tgt_len`` decoder (or only) tokens and, for
    encoder-decoders, ``src_len`` (None -> ``tgt_len``) encoder tokens.

    Without ``trainable``: full finetuning, closed form.  With it: computed from the
    parameter trees themselves (the train state's ``params`` and ``rest``, concrete
    or abstract): every kernel and adapter factor by its shape, its trainability and
    whether anything trainable lies below it (module docstring).  Raises ValueError
    on a parameter path it does not know.
    """
    encdec = cfg.family in ("t5", "bart")
    src_len = tgt_len if src_len is None else src_len
    if trainable is None and encdec:
        return float(_encdec_flops(cfg, src_len, tgt_len))
    if trainable is None:
        return tgt_len * train_flops_per_token(cfg, tgt_len)
    leaves = [_parse(p, n, t, encdec) for tree, t in ((trainable, True), (frozen, False)) for p, n in _sizes(tree)]
    return float(_tree_flops(cfg, leaves, tgt_len, src_len, encdec))


def _sizes(tree: Any) -> Iterator[tuple[str, int]]:
    """``(path "a/b/c", size)`` of every Param of an nnx.State (other Variables skipped); a stacked
    stack of layers (`jaxft.models.scan.stack_layers`) counts as its layers, one path each."""
    if tree is None:
        return
    from flax import nnx

    from jaxft.models.scan import STACKED

    for path, v in nnx.to_flat_state(tree):
        if isinstance(v, nnx.Variable) and not isinstance(v, nnx.Param):
            continue
        parts = [str(p) for p in path]
        if STACKED not in parts:
            yield "/".join(parts), math.prod(v.shape)
            continue
        at, n = parts.index(STACKED), v.shape[0]
        for i in range(n):
            yield "/".join(parts[:at] + [str(i)] + parts[at + 1:]), math.prod(v.shape[1:])


def _parse(path: str, size: int, trains: bool, encdec: bool) -> dict:
    """A leaf's stream, (layer, stage), module (its Linear / norm / table) and kind."""
    module, _, kind = path.rpartition("/")
    parts = path.split("/")
    if kind in ("a", "b") and len(parts) > 3:  # adapter factors <linear>/<group>/<name>/{a,b}
        module, kind = "/".join(parts[:-3]), "/".join(parts[-3:])
    m = _LAYER.match(module)
    if m:
        stream, pos = m[1] or "decoder", (int(m[2]), _STAGES.get(m[3]))
    else:
        head, _, name = module.partition("/") if module.startswith(("encoder/", "decoder/")) else ("", "", module)
        stream = head or ("shared" if encdec and name == "embed" else "decoder")
        pos = _STACK.get(name)
    if pos is None or pos[1] is None:
        raise ValueError(f"train FLOPs: unknown parameter path {path!r}")
    return {"path": path, "module": module, "kind": kind, "stream": stream, "pos": pos, "size": size,
            "trains": trains}


def _tree_flops(cfg: ModelConfig, leaves: list[dict], tgt_len: int, src_len: int, encdec: bool) -> int:
    """Sum over the parsed leaves: matmuls by size and trainability, then each attention."""
    low = {"encoder": _NONE, "decoder": _NONE}  # earliest trainable position per stream
    for leaf in (x for x in leaves if x["trains"]):
        for s in ("encoder", "decoder") if leaf["stream"] == "shared" else (leaf["stream"],):
            low[s] = min(low[s], leaf["pos"])
    enc_side = low["encoder"] != _NONE  # something trainable feeds the encoder output
    if enc_side:  # ... which enters the decoder at the first cross-attention
        low["decoder"] = min(low["decoder"], (0, _STAGES["cross/k"]))
    trains_in: dict[str, bool] = {}  # any trainable leaf in the module (kernel, bias, adapters)
    for leaf in leaves:
        trains_in[leaf["module"]] = trains_in.get(leaf["module"], False) or leaf["trains"]
    kind_trains = {(x["module"], x["kind"]): x["trains"] for x in leaves}

    def below(stream: str, pos: tuple[int, int]) -> bool:
        return low[stream] < pos

    total = 0
    for leaf in leaves:
        module, kind, n = leaf["module"], leaf["kind"], leaf["size"]
        cross_kv = re.search(r"layers/\d+/cross/(k|v)$", module) is not None
        tokens = src_len if leaf["stream"] == "encoder" or cross_kv else tgt_len
        stream = "decoder" if leaf["stream"] == "shared" else leaf["stream"]
        up = enc_side if cross_kv else below(stream, leaf["pos"])
        if kind == "kernel" or kind.endswith("/a"):
            total += tokens * 2 * n * (1 + up + leaf["trains"])
        elif kind.endswith("/b"):  # its input x . a needs a gradient when a trains or x does
            a_trains = kind_trains.get((module, kind[:-1] + "a"), False)
            total += tokens * 2 * n * (1 + (up or a_trains) + leaf["trains"])
        elif module == "embed" and cfg.tie_embeddings:  # the tied head
            total += tgt_len * 2 * n * (1 + below("decoder", _STACK["lm_head"]) + leaf["trains"])
    pre = "decoder/" if encdec else ""
    for j in range(_n_decoder_layers(cfg) if encdec else cfg.n_layers):
        total += _attention_flops(cfg, f"{pre}layers/{j}/attn", tgt_len, tgt_len, below("decoder", (j, 1)),
                                  below("decoder", (j, 1)), trains_in, trains_in.get(f"{pre}rel_bias", False))
        if encdec:
            total += _attention_flops(cfg, f"{pre}layers/{j}/cross", tgt_len, src_len,
                                      below("decoder", (j, 6)), enc_side, trains_in, False)
    for j in range(cfg.n_layers if encdec else 0):
        total += _attention_flops(cfg, f"encoder/layers/{j}/attn", src_len, src_len, below("encoder", (j, 1)),
                                  below("encoder", (j, 1)), trains_in, trains_in.get("encoder/rel_bias", False))
    return total


def _attention_flops(cfg: ModelConfig, base: str, q_len: int, kv_len: int, q_up: bool, kv_up: bool,
                     trains_in: dict[str, bool], shared_bias_trains: bool) -> int:
    """Scores and mixing of one attention: 2 matmuls forward; backward d-probs (when q, k
    or a bias table needs a gradient), dq, dk, dv (each when its branch does)."""
    q = q_up or trains_in.get(f"{base}/q", False)
    k = kv_up or trains_in.get(f"{base}/k", False)
    v = kv_up or trains_in.get(f"{base}/v", False)
    bias = shared_bias_trains or trains_in.get(f"{base}/rel_bias", False)
    one = 2 * q_len * kv_len * cfg.n_heads * cfg.dim_per_head
    return one * (2 + (q or k or bias) + q + k + v)


def bart_param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters ``Bart(cfg)`` creates (mBART / NLLB / M2M100).

    Multi-head attention (q, k, v, o) per encoder layer, twice (self + cross)
    per decoder layer; plain MLP; LayerNorms before each block and after each
    stack; learned position tables only for ``position: learned``.
    """
    D, H, K, F, V = cfg.d_model, cfg.n_heads, cfg.dim_per_head, cfg.mlp_dim, cfg.vocab_size
    norm = _norm_params(cfg)
    attn = 4 * D * H * K + (3 * H * K if cfg.qkv_bias else 0) + (D if cfg.attn_out_bias else 0)
    mlp = 2 * D * F + (F + D if cfg.mlp_bias else 0)
    n_dec = _n_decoder_layers(cfg)
    per_stack = norm + (norm if cfg.embed_norm else 0)  # final_norm (+ embed_norm)
    if cfg.position == "learned":
        per_stack += (cfg.max_seq_len + cfg.position_offset) * D
    total = V * D + 2 * per_stack
    total += cfg.n_layers * (attn + mlp + 2 * norm) + n_dec * (2 * attn + mlp + 3 * norm)
    if not cfg.tie_embeddings:
        total += D * V
    return total


def bart_train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """mBART / NLLB full-finetuning FLOPs per decoder token, source and target both
    ``seq_len``; the MLP is always plain (up, down).  See `train_flops_per_example`."""
    return _encdec_flops(cfg, seq_len, seq_len) / seq_len


def t5_param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters ``T5(cfg)`` creates (T5 / mT5 / umT5).

    Shared embedding; q, k, v, o (no biases) once per encoder layer and twice
    (self + cross) per decoder layer; MLP without biases; RMS norms before each
    block and after each stack; relative-bias tables [buckets, heads]: one per
    stack, or one per self-attention layer (``relative_bias_per_layer``, umT5).
    """
    D, H, K, F, V = cfg.d_model, cfg.n_heads, cfg.dim_per_head, cfg.mlp_dim, cfg.vocab_size
    n_enc, n_dec = cfg.n_layers, _n_decoder_layers(cfg)
    attn = 4 * D * H * K
    mlp = (3 if cfg.activation in _GATED else 2) * D * F
    norm = _norm_params(cfg)
    tables = n_enc + n_dec if cfg.relative_bias_per_layer else 2
    total = V * D + tables * cfg.relative_buckets * H + 2 * norm
    total += n_enc * (attn + mlp + 2 * norm) + n_dec * (2 * attn + mlp + 3 * norm)
    if not cfg.tie_embeddings:
        total += D * V
    return total


def t5_train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """T5 full-finetuning FLOPs per decoder token, source and target both ``seq_len``::

        6 * (N_enc + N_dec + d_model * vocab)
        + 6 * 2 * seq_len * n_heads * head_dim * (n_enc + 2 * n_dec)

    (``N_dec``: self-attention, cross-attention and MLP weights; the head counts
    even when tied).  See `train_flops_per_example` for unequal lengths."""
    return _encdec_flops(cfg, seq_len, seq_len) / seq_len
