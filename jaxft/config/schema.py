"""Typed, frozen configuration schema.

Every section is a frozen dataclass; each layer of the stack receives only its
own section (the model gets ``ModelConfig``, the data pipeline ``DataConfig``...),
never the whole ``Config``.  Loading, overlays and validation live in
``jaxft.config.loader``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

# Sections kept in their own modules (re-exported here: import them from jaxft.config.schema).
from jaxft.config.schema_data import DataConfig, SourceConfig, TokenizerConfig  # noqa: F401
from jaxft.config.schema_peft import LoraConfig, PeftConfig, SparseConfig  # noqa: F401


@dataclass(frozen=True)
class RopeScalingConfig:
    """RoPE frequency scaling (HF ``rope_scaling``)."""

    type: Literal["linear", "llama3", "yarn"] = "linear"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """A model preset: shape and architecture switches, nothing else."""

    family: str = "decoder"  # decoder | t5 | bart
    preset: str | None = None  # name of configs/models/<preset>.yaml merged under this section
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 4  # encoder-decoder families: encoder layers
    n_decoder_layers: int | None = None  # encoder-decoder families; None -> n_layers
    n_heads: int = 8
    n_kv_heads: int | None = None  # None -> n_heads (MHA); 1 -> MQA
    head_dim: int | None = None  # None -> d_model // n_heads
    mlp_dim: int = 1376
    # gelu = tanh approximation (BLOOM, T5 gated-gelu); gelu_exact = erf GELU (mBART)
    activation: Literal["swiglu", "geglu", "gelu", "gelu_exact", "relu"] = "swiglu"
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-6
    norm_plus_one: bool = False  # Gemma: scale is (1 + w), w initialised at 0
    # rope / alibi (decoder-only); relative = T5 bucketed bias; learned = mBART
    # (with position_offset 2); sinusoidal = M2M100 / NLLB
    position: Literal["rope", "alibi", "none", "relative", "learned", "sinusoidal"] = "rope"
    position_offset: int = 0  # mBART's learned positions start at index 2
    relative_buckets: int = 32  # T5 relative_attention_num_buckets
    relative_max_distance: int = 128  # T5 relative_attention_max_distance
    relative_bias_per_layer: bool = False  # umT5: every layer has its own bias table
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig | None = None
    qkv_bias: bool = False  # Qwen2, BLOOM
    attn_out_bias: bool = False  # BLOOM
    mlp_bias: bool = False  # BLOOM
    embed_scale: bool = False  # Gemma: embeddings * sqrt(d_model)
    embed_norm: bool = False  # BLOOM: LayerNorm right after the embedding
    tie_embeddings: bool = False
    attn_logit_softcap: float | None = None  # Gemma 2
    final_logit_softcap: float | None = None  # Gemma 2
    post_norms: bool = False  # Gemma 2 sandwich norms: norm the attn / mlp output before the residual add
    query_pre_attn_scalar: float | None = None  # Gemma 2: attention scale is this**-0.5 (None: head_dim)
    sliding_window: int | None = None  # Gemma 2: local layers see the last `sliding_window` positions
    sliding_window_pattern: int = 2  # layer i is local iff (i + 1) % pattern != 0 (Gemma 2: even layers)
    max_seq_len: int = 2048
    init_std: float = 0.02
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    # Per layer (jax.checkpoint policy, jaxft/models/layers.py): none; full (keep only each layer's
    # input); dots / dots_no_batch (keep the products' results, recompute the rest and a fused attention
    # kernel's forward); dots_attention (dots, and a fused attention kernel's results: on a GPU 17% fewer
    # temporaries than none at no extra products; on a TPU no gain, docs/pod_planning.md)
    remat: Literal["none", "full", "dots", "dots_no_batch", "dots_attention"] = "none"
    # One jax.lax.scan over the layers (compiled once, not n times): compile time and its host
    # memory stop growing with depth; parameters keep their per-layer paths (jaxft/models/scan.py).
    scan_layers: bool = False
    # Fused attention where the platform has it: auto (GPU cuDNN flash / TPU splash, else XLA),
    # xla, cudnn, splash; a call a kernel cannot take falls back to XLA (jaxft/models/kernels.py).
    attention_kernel: Literal["auto", "xla", "cudnn", "splash"] = "auto"
    # Dropout in training only, each in [0, 1): residual branches (+ embeddings, T5 stack outputs),
    # attention probabilities, MLP hidden after the activation (sites: jaxft/models/<family>.py).
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    decoder_start_id: int | None = None  # encoder-decoder: first decoder input (T5: pad 0, mBART: eos 2)
    init_from: str | None = None  # e.g. "hf:/path" (HF interop issue)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh. -1 on one axis means "all remaining devices" (of one slice).

    Multi-slice (DCN): ``dcn_data`` / ``dcn_fsdp`` split the slices between the data and
    fsdp axes; their product is the number of slices.  The mesh keeps the three axes, the
    DCN factor outermost (``data`` spans ``dcn_data * data`` devices), so only the gradient
    reduction (data) or the parameter gathers (fsdp) cross the slow links."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1


@dataclass(frozen=True)
class ParamGroup:
    """Parameters whose path matches `pattern` get `lr_scale` x the learning rate
    and, if set, their own weight decay."""

    pattern: str = ".*"
    lr_scale: float = 1.0
    weight_decay: float | None = None


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adamw", "adafactor"] = "adamw"
    lr: float = 3e-4
    schedule: Literal["cosine", "linear", "rsqrt", "constant"] = "cosine"
    warmup_steps: int = 0
    decay_steps: int | None = None  # None -> train.steps
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    adafactor_decay_rate: float = 0.8  # Adafactor's second-moment decay (T5 / optax default)
    clip_norm: float | None = 1.0
    groups: tuple[ParamGroup, ...] = ()  # first matching group wins; unmatched params use the defaults


@dataclass(frozen=True)
class DistillConfig:
    """Word-level knowledge distillation from a frozen teacher, computed in the same step
    (off while `teacher` is unset).  The teacher must share the student's vocabulary."""

    teacher: str | None = None  # "run:<run dir>" (its newest checkpoint) or "hf:<folder>"
    alpha: float = 0.5  # loss = (1 - alpha) * cross-entropy + alpha * T^2 * KL(teacher || student)
    temperature: float = 1.0  # T: both distributions softened by it
    top_k: int = 0  # KL over the teacher's k most likely tokens (renormalised); 0 = the whole vocabulary


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    global_batch: int = 8  # sequences per optimizer step, over all devices
    microbatches: int = 1  # gradient accumulation: global_batch is split in this many
    seed: int = 0
    log_every: int = 10
    dev_every: int = 0  # 0 = only at the start and the end
    dev_batches: int = 4
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    # Loss over sequence chunks of at most this many tokens, never holding the whole [B, L, V]
    # logits (the largest activation with 250k vocabularies); 0 = full logits.  A
    # sequence of at most one chunk takes the full-logits path unchanged.
    loss_chunk: int = 512
    # A budget for the logits, MiB of float32 per device (batch over the data axes, vocabulary
    # over tensor): sequences whose whole logits fit it are not chunked (chunking costs
    # head-sized gradient buffers); longer ones get chunks of at most loss_chunk tokens that fit
    # it (a 250k vocabulary at 8 sequences per device: 128).  0 = loss_chunk alone.
    loss_chunk_mib: float = 1024.0
    trainable: tuple[str, ...] = (".*",)  # regexes over parameter paths ("layers/0/attn/q/kernel")
    frozen: tuple[str, ...] = ()  # regexes; win over `trainable`
    progress_bar: bool = True
    # A step whose loss or gradients are not finite never updates the state (its
    # update is dropped and counted).  skip: go on, but stop with an error after
    # `max_nonfinite` such steps in a row; stop: stop at the first one.
    nonfinite: Literal["skip", "stop"] = "skip"
    max_nonfinite: int = 10
    # Warn when a step's loss exceeds spike_factor x the median of the last
    # spike_window losses (0 = off).
    spike_factor: float = 5.0
    spike_window: int = 100
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # steps (0 = only at the end and on preemption)
    every_minutes: float = 0.0  # also after this many minutes since the last save (0 = off)
    keep: int = 3
    async_save: bool = True


DECODE_STRATEGIES = ("greedy", "beam", "sample")


@dataclass(frozen=True)
class DecodeConfig:
    """Decoding settings (`eval.decode`, `jaxft translate`, `jaxft.eval.decode.generate`).

    ``eos_id`` / ``pad_id`` / ``decoder_start_id`` come from the tokenizer and the
    model: ``Translator.translate`` overwrites them, callers of ``generate`` set them.
    """

    strategy: Literal["greedy", "beam", "sample"] = "beam"
    max_len: int = 128  # generated tokens, forced ids and EOS included
    min_len: int = 0  # EOS is masked until this many tokens were generated
    beam_size: int = 4
    n_best: int = 1  # hypotheses (beam) or samples (sample) returned per input
    length_penalty: float = 0.6  # alpha; 0 = plain summed log-prob
    length_penalty_mode: Literal["gnmt", "hf"] = "gnmt"  # ((5+len)/6)^alpha  |  len^alpha
    early_stopping: Literal["bound", "full"] = "bound"  # beam: see jaxft.eval.beam
    temperature: float = 1.0  # sample; 0 = greedy
    top_k: int = 0  # sample; 0 = off
    top_p: float = 1.0  # sample; 1 = off
    repetition_penalty: float = 1.0  # HF: seen tokens' logits / it (x it if < 0); 1 = off
    no_repeat_ngram_size: int = 0  # HF: no n-gram of this size twice (prompt included); 0 = off
    forced_ids: tuple[int, ...] = ()  # the first output tokens of every row
    eos_id: int | None = 1
    # more tokens that end an output as eos does (HF: a list of eos_token_id), e.g. a chat
    # template's end of turn beside the tokenizer's eos; masked before min_len like eos
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    decoder_start_id: int | None = None  # encoder-decoder: first decoder input (T5 0, mBART 2)

    @property
    def stops(self) -> tuple[int, ...]:
        """Every token that ends an output: ``eos_id`` (when set), then ``stop_ids``."""
        return ((self.eos_id,) if self.eos_id is not None else ()) + tuple(self.stop_ids)

    def __post_init__(self):
        def bad(name: str, why: str):
            raise ValueError(f"decode.{name}: {why}, got {getattr(self, name)!r}")
        if self.strategy not in DECODE_STRATEGIES:
            bad("strategy", f"must be one of {', '.join(DECODE_STRATEGIES)}")
        if self.max_len < 1:
            bad("max_len", "must be >= 1")
        if not 0 <= self.min_len <= self.max_len:
            bad("min_len", "must be in [0, max_len]")
        if self.beam_size < 1:
            bad("beam_size", "must be >= 1")
        if self.n_best < 1 or (self.strategy == "beam" and self.n_best > self.beam_size):
            bad("n_best", "must be >= 1 (and <= beam_size for beam search)")
        if self.strategy == "greedy" and self.n_best != 1:
            bad("n_best", "greedy returns one hypothesis")
        if self.length_penalty_mode not in ("gnmt", "hf"):
            bad("length_penalty_mode", "must be gnmt or hf")
        if self.early_stopping not in ("bound", "full"):
            bad("early_stopping", "must be bound or full")
        if self.temperature < 0:
            bad("temperature", "must be >= 0")
        if self.top_k < 0:
            bad("top_k", "must be >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", "must be > 0")
        if self.no_repeat_ngram_size < 0:
            bad("no_repeat_ngram_size", "must be >= 0")
        if len(self.forced_ids) > self.max_len:
            bad("forced_ids", "more forced ids than max_len")


@dataclass(frozen=True)
class EvalConfig:
    """Decoding + sacreBLEU evaluation of the dev directions (`jaxft eval`, and
    during training every `every` steps, keeping the best checkpoint)."""

    every: int = 0  # 0 = not during training
    directions: tuple[str, ...] = ()  # dev direction names; empty = all
    max_examples: int = 200  # per direction
    batch_size: int = 16
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    # averaged over directions; acc / acc_norm: over the answer-choice sources (task multiple_choice);
    # em / gen_chrf: exact match / chrF over the generation sources (task generation)
    best_metric: Literal["chrf", "bleu", "chrfpp", "acc", "acc_norm", "em", "gen_chrf"] = "chrf"
    tier_high: tuple[str, ...] = ()  # languages or direction names per resource tier
    tier_mid: tuple[str, ...] = ()
    tier_low: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    run_dir: str = "runs/default"
    # The persistent XLA compilation cache (jaxft.train.compile_cache): auto = $JAX_COMPILATION_CACHE_DIR,
    # else ~/.cache/jaxft/xla (bounded); off; or a folder / URL.  Restarts and repeated runs skip compiling.
    compile_cache: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)


def to_dict(cfg: Any) -> Any:
    """Config dataclass -> plain YAML/JSON-able data."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    return cfg
