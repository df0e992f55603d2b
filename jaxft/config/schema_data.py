"""The `data:` section of the config schema (re-exported by `jaxft.config.schema`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class TokenizerConfig:
    path: str | None = None  # an existing SentencePiece .model
    # When `path` is missing and `train_vocab_size` is set, a tokenizer is
    # trained on the training sources and written to <run_dir>/tokenizer.model.
    train_vocab_size: int | None = None
    model_type: Literal["unigram", "bpe"] = "unigram"
    character_coverage: float = 0.9995
    byte_fallback: bool = True
    max_sentences: int = 200000
    # Extra single-token pieces for a trained tokenizer; the pieces the data
    # config needs (<2xx> tags, language codes, sentinels, <mask>) are added
    # automatically.
    user_defined_symbols: tuple[str, ...] = ()
    # With `path`: append the pieces the data needs that the tokenizer lacks (<2xx> tags, language
    # codes, sentinels, <mask>, plus user_defined_symbols) to a copy written to
    # <run_dir>/tokenizer.model; model.init_from's embedding / LM-head rows for them start as the
    # mean of the existing rows (model.vocab_size must hold the grown tokenizer). See docs/vocab.md.
    extend: bool = False


@dataclass(frozen=True)
class SourceConfig:
    """One data source. With `directions`, expands to one source per direction.

    Paths may contain ``{src}`` and ``{tgt}`` placeholders (language codes).
    Relative paths resolve against the folder of the config file that set them.
    """

    # tsv / jsonl / text: files read through a cached line index; tfds: tfds.data_source;
    # arrayrecord: ArrayRecord shards of JSON records (`jaxft data prepare` writes them);
    # parquet: Parquet files (converted once to a cached Arrow file); hf: a Hugging Face
    # dataset (`path`: a save_to_disk folder; or `hf_name` [+ `hf_config`], `hf_split`)
    type: Literal["tsv", "jsonl", "text", "tfds", "arrayrecord", "parquet", "hf"] = "tsv"
    # lm: causal LM on monolingual text (decoder-only); span_corruption (T5) and
    # infilling (mBART text infilling + sentence permutation) on monolingual
    # text (encoder-decoder)
    # multiple_choice / classification: evaluation only (data.dev / data.test): each answer
    # choice scored by the model's log-likelihood (`jaxft.eval.choice`, docs/recipes.md)
    # chat: multi-turn conversations (decoder-only): records hold `messages`, a list of {role:
    # system|user|assistant, content}; rendered with data.chat_template, loss on the assistant
    # turns only (jaxft.data.chat, docs/data.md)
    # generation: evaluation only: the model continues `prompt` (eval.decode) and the output is
    # scored against `references` by exact match and chrF (`jaxft.eval.generation`)
    task: Literal["translation", "prompt", "lm", "span_corruption", "infilling", "multiple_choice",
                  "classification", "chat", "generation"] = "translation"
    # multiple_choice JSONL layouts: generic (prompt, choices, label), xnli (premise, hypothesis,
    # label), xcopa (premise, question, choice1, choice2, label), xstorycloze (input_sentence_1..4,
    # sentence_quiz1/2, answer_right_ending), xwinograd (sentence with "_", option1/2, answer)
    choice_format: Literal["generic", "xnli", "xcopa", "xstorycloze", "xwinograd"] = "generic"
    # classification: the label words (label i -> choices[i]); xnli: overrides True/Neither/False
    choices: tuple[str, ...] = ()
    name: str | None = None  # defaults to "<src>-<tgt>" or the file stem
    path: str | None = None  # tsv / jsonl / monolingual text
    src_path: str | None = None  # text pairs (task translation) or monolingual text
    tgt_path: str | None = None
    src_lang: str | None = None
    tgt_lang: str | None = None
    directions: tuple[str, ...] = ()  # "en-de" or "eng_Latn-deu_Latn"
    src_field: str | None = None  # TSV header name / JSONL key; defaults per type
    tgt_field: str | None = None
    messages_field: str | None = None  # task chat: the record's list of messages; None -> "messages"
    header: bool = True  # TSV has a header row
    weight: float | None = None  # overrides the example count used for temperature sampling
    max_examples: int | None = None
    tfds_name: str | None = None
    tfds_split: str = "train"
    tfds_data_dir: str | None = None
    hf_name: str | None = None  # a hub id (or a local dataset folder / builder) for datasets.load_dataset
    hf_config: str | None = None
    hf_split: str = "train"
    # multiple_choice / classification / generation: the record's own name for each field the task
    # reads (`eval_fields`), e.g. {prompt: question, choices: options, label: answer}; `a.b` is field b
    # of a nested record a; for `choices`, `f1,f2,...` gathers several fields into the list
    # (src_field / tgt_field also name classification's text / label, generation's prompt / references)
    fields: dict[str, str] = field(default_factory=dict)

    def __hash__(self) -> int:  # `fields` is a dict: configs are hashed (caches, static jit arguments)
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v for v in vars(self).values()))


# The fields each evaluation-only task reads from a record (multiple_choice: per choice_format),
# and the source types it reads them from.
EVAL_FIELDS: dict[str, tuple[str, ...]] = {
    "generic": ("prompt", "choices", "label"),
    "xnli": ("premise", "hypothesis", "label"),
    "xcopa": ("premise", "question", "choice1", "choice2", "label"),
    "xstorycloze": (*(f"input_sentence_{i}" for i in range(1, 5)), "sentence_quiz1", "sentence_quiz2",
                    "answer_right_ending"),
    "xwinograd": ("sentence", "option1", "option2", "answer"),
    "classification": ("text", "label"),
    "generation": ("prompt", "references", "lang"),
}
EVAL_TYPES: dict[str, tuple[str, ...]] = {"multiple_choice": ("jsonl", "hf"), "classification": ("jsonl", "hf"),
                                          "generation": ("jsonl", "hf", "text")}


def eval_fields(task: str, choice_format: str) -> tuple[str, ...]:
    """The record fields an evaluation-only ``task`` reads (what `SourceConfig.fields` may map)."""
    return EVAL_FIELDS[choice_format if task == "multiple_choice" else task]


@dataclass(frozen=True)
class DataConfig:
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: tuple[SourceConfig, ...] = ()
    dev: tuple[SourceConfig, ...] = ()
    test: tuple[SourceConfig, ...] = ()  # as dev; scored only by `jaxft eval --split test`, never in training
    seq_len: int = 256  # decoder-side (or only) sequence length
    encoder_seq_len: int | None = None  # encoder-decoder: source side; None -> seq_len
    packing: bool = True
    # How the target language is signalled to an encoder-decoder model:
    # none; t5_tag = "<2xx>" token prepended to the source; lang_code = mBART/NLLB
    # language-code tokens (source code on the source side, target code forced
    # as the first decoder token).
    lang_tokens: Literal["none", "t5_tag", "lang_code"] = "none"
    lang_code_style: Literal["flores", "mbart50"] = "flores"  # eng_Latn (NLLB) or en_XX (mBART-50)
    noise_density: float = 0.15  # span corruption
    mean_noise_span_length: float = 3.0  # span corruption
    infilling_ratio: float = 0.35  # mBART text infilling: fraction of tokens masked
    infilling_poisson_lambda: float = 3.5
    temperature: float = 5.0  # p_i ~ n_i^(1/T); 1 = proportional, large = uniform
    prompt_template: str = "Translate from {src_name} to {tgt_name}:\n{src}\n"
    target_template: str = "{tgt}"
    # task chat: the Jinja chat template: chatml / llama3 (built in), a Jinja string, or None ->
    # the template of an HF tokenizer (data.tokenizer.path: its chat_template)
    chat_template: str | None = None
    bad_lines: Literal["skip", "error"] = "skip"  # malformed lines: counted skip or error
    overlong: Literal["skip", "truncate", "error"] = "skip"
    # Sources with at most this many records get their token lengths measured when the
    # pipeline is built (over-long examples skipped / reported before the rates are set);
    # larger ones are dealt with when drawn (counted in the periodic log).
    overlong_scan: int = 100000
    seed: int = 0
    index_dir: str | None = None  # line-index cache; None: $JAXFT_CACHE/index or ~/.cache/jaxft/index
    # Worker processes that tokenize and pack the batches ahead of the step (0: on the
    # training thread); each holds up to `prefetch` batches.  Batches are identical for
    # any number of workers.
    workers: int = 0
    prefetch: int = 2
