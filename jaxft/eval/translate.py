"""Translation with a trained run, a jaxft folder or an HF checkpoint, and per-direction evaluation.

Inputs are built exactly as in training: decoder-only models get the prompt
template (`data.prompt_template`, language names) and continue after it;
encoder-decoder models get the source side of `Seq2SeqFeaturizer` (target tag
or source language code + eos) and, with `lang_tokens: lang_code`, the target
language code forced as the first output token.  Run dirs use their own data
config; HF and jaxft folders the family's convention (mBART-50 / NLLB codes) or
what the caller names (`data_config`: `lang_tokens`, `lang_code_style`).
With `chat_instruction` (`jaxft translate --chat`) a decoder-only model is prompted as in chat
training instead: each text is a user turn of the chat template (`jaxft.data.chat.ChatEncoder`)
and the output ends at the template's end-of-turn token; `Translator.reply` answers whole
conversations (`jaxft chat`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import sys
from pathlib import Path
from typing import Sequence

from flax import nnx

from jaxft.config.schema import Config, DataConfig, DecodeConfig, ModelConfig, SourceConfig
from jaxft.data.chat import ChatEncoder
from jaxft.data.pipeline import read_directions
from jaxft.data.seq2seq import Seq2SeqFeaturizer
from jaxft.data.sources import Example
from jaxft.data.tasks import render
from jaxft.eval.choice import evaluate_choices
from jaxft.eval.decode import decode_all
from jaxft.eval.metrics import score_direction
from jaxft.eval.report import EvalReport
from jaxft.eval.types import SplitModel
from jaxft.models.registry import abstract_model, is_encoder_decoder

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Translator:
    model: nnx.Module | SplitModel  # a SplitModel: the train state's layout (e.g. stacked layers)
    tokenizer: object
    model_cfg: ModelConfig
    data_cfg: DataConfig
    # decoder-only (`jaxft translate --chat`): each text is one user turn of the chat template
    # (`data.chat_template`, else the tokenizer's), this instruction formatted with the fields of
    # `data.prompt_template` (the text goes after it when it has no {src}), after a system prompt
    chat_instruction: str | None = None
    chat_system: str | None = None

    @property
    def encoder_decoder(self) -> bool:
        return is_encoder_decoder(self.model_cfg)

    def chat_encoder(self) -> ChatEncoder:
        """The chat template (`data.chat_template`, else the tokenizer's own) with the tokenizer."""
        if self.encoder_decoder:
            raise ValueError(f"chat: needs a decoder-only model, not an encoder-decoder ({self.model_cfg.family})")
        return ChatEncoder(self.tokenizer, self.data_cfg.chat_template)

    def chat_budget(self, max_new: int) -> int:
        """Prompt tokens left when ``max_new`` are generated within the model's `max_seq_len`."""
        budget = self.model_cfg.max_seq_len - max_new
        if budget < 1:
            raise ValueError(f"chat: --max-len {max_new} leaves no room for a prompt "
                             f"(model.max_seq_len {self.model_cfg.max_seq_len})")
        return budget

    def chat_turn(self, text: str, src_lang: str, tgt_lang: str) -> str:
        """The user turn that asks for the translation of ``text`` (``chat_instruction``)."""
        instruction = self.chat_instruction or ""
        instruction += "" if "{src}" in instruction else "\n{src}"
        try:
            return render(Example(text, "", src_lang, tgt_lang, "translation"), instruction.lstrip("\n"), "")[0]
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"--chat-instruction {self.chat_instruction!r}: {type(e).__name__} {e} (fields: {{src}}, "
                             f"{{src_lang}}, {{tgt_lang}}, {{src_name}}, {{tgt_name}}; braces as {{{{ }}}})") from None

    def inputs(self, texts: Sequence[str], src_lang: str, tgt_lang: str,
               max_new: int) -> tuple[list[list[int]], list[list[int]] | None]:
        """Token ids per text, and the forced first output tokens (or None)."""
        tok = self.tokenizer
        if self.chat_instruction is not None:
            chat, budget = self.chat_encoder(), self.chat_budget(max_new)
            system = [{"role": "system", "content": self.chat_system}] if self.chat_system else []
            return [chat.fit(system + [{"role": "user", "content": self.chat_turn(t, src_lang, tgt_lang)}],
                             budget)[0] for t in texts], None
        if self.encoder_decoder:
            cfg = dataclasses.replace(self.data_cfg, overlong="truncate")
            feat = Seq2SeqFeaturizer(tok, cfg, SourceConfig(type="text", src_lang=src_lang, tgt_lang=tgt_lang),
                                     decoder_start_id=self.model_cfg.decoder_start_id or 0, key="translate")
            seqs = [feat.tokens(Example(t, "x", src_lang, tgt_lang, "translation"))[0] for t in texts]
            forced = [list(feat.tgt_prefix)] * len(texts) if feat.tgt_prefix else None
            return seqs, forced
        budget = self.model_cfg.max_seq_len - max_new
        seqs = []
        for text in texts:
            prompt, _ = render(Example(text, "", src_lang, tgt_lang, "translation"),
                               self.data_cfg.prompt_template, self.data_cfg.target_template)
            ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)
            seqs.append(ids[-budget:])
        return seqs, None

    @property
    def tag_style(self) -> str:
        """How the target language is signalled: `prompt` or `chat` (decoder-only), else
        `data.lang_tokens` (with the code style for `lang_code`)."""
        if not self.encoder_decoder:
            return "prompt" if self.chat_instruction is None else "chat"
        mode = self.data_cfg.lang_tokens
        return f"lang_code ({self.data_cfg.lang_code_style})" if mode == "lang_code" else mode

    def stop_ids(self, chat: bool) -> tuple[int, ...]:
        """The tokens that end an output: the tokenizer's eos, in a chat after the template's end of turn."""
        ids = ((self.chat_encoder().end_of_turn(),) if chat else ()) + (self.tokenizer.eos_id,)
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def translate(self, texts: Sequence[str], src_lang: str, tgt_lang: str, decode: DecodeConfig,
                  batch_size: int = 16, *, progress: bool = False, desc: str | None = None) -> list[str]:
        """One translation per text; `progress`: a bar on stderr (only when it is a terminal)."""
        if not texts:
            return []
        seqs, forced = self.inputs(texts, src_lang, tgt_lang, decode.max_len)
        return self.generate(seqs, decode, batch_size, forced=forced, stops=self.stop_ids(self.chat_instruction
                                                                                          is not None),
                             desc=(desc or f"{src_lang}-{tgt_lang}") if progress else None)

    def reply(self, prompts: Sequence[Sequence[int]], decode: DecodeConfig, batch_size: int = 16, *,
              rng=None, desc: str | None = None) -> list[str]:
        """The assistant's reply to each chat prompt (``ChatEncoder.prompt`` / ``fit`` ids), decoded
        until the template's end-of-turn token or eos, without it; ``desc``: a progress bar."""
        return self.generate(prompts, decode, batch_size, stops=self.stop_ids(True), rng=rng, desc=desc)

    def generate(self, seqs: Sequence[Sequence[int]], decode: DecodeConfig, batch_size: int, *,
                 stops: tuple[int, ...], forced: Sequence[Sequence[int]] | None = None, rng=None,
                 desc: str | None = None) -> list[str]:
        """Each input's best output as text, up to its first ``stops`` token: decoding (every
        strategy, beam search included) ends a hypothesis at any of them."""
        decode = dataclasses.replace(decode, eos_id=stops[0] if stops else None, stop_ids=tuple(stops[1:]),
                                     pad_id=self.tokenizer.pad_id, decoder_start_id=self.model_cfg.decoder_start_id)
        bar = progress_bar(len(seqs), desc) if desc else None
        try:
            results = decode_all(self.model, seqs, config=decode, batch_size=batch_size,
                                 encoder_decoder=self.encoder_decoder, forced=forced, rng=rng,
                                 on_batch=bar.update if bar else None)
        finally:
            if bar:
                bar.close()
        n_forced, vocab = len(forced[0]) if forced else 0, self.tokenizer.vocab_size
        outs = []
        for best in results:
            tokens = best[0][0][n_forced:]
            end = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
            # ids past the tokenizer (the model's vocabulary padding, drawn by sampling) have no text
            outs.append(self.tokenizer.decode([t for t in tokens[:end] if t < vocab]))
        return outs


def progress_bar(total: int, desc: str):
    """A tqdm bar (sentences) on stderr when stderr is a terminal, else None: stdout carries translations."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sent", file=sys.stderr, leave=False, dynamic_ncols=True)


def split_directions(data: DataConfig, base_dir: Path, split: str,
                     sources: Sequence[SourceConfig] | None = None) -> list:
    """The directions of `data.dev` or `data.test` (`split`), or of `sources` (read as that split)."""
    if split not in ("dev", "test"):
        raise ValueError(f"eval: --split must be dev or test, got {split!r}")
    chosen = tuple(sources) if sources is not None else getattr(data, split)
    return read_directions(dataclasses.replace(data, **{split: chosen}), base_dir, split=split)


def evaluate(translator: Translator, cfg: Config, *, base_dir: Path, decode: DecodeConfig | None = None,
             max_examples: int | None = None, split: str = "dev", sources: Sequence[SourceConfig] | None = None,
             settings: dict | None = None, progress: bool = False) -> EvalReport:
    """Decode the `split` directions (`data.dev` / `data.test`, or `sources`; `eval.directions`
    selects among the configured ones, default all) with ``decode`` (default `eval.decode`) and
    score them with sacreBLEU; with the split's own sources, also score its answer-choice
    (`jaxft.eval.choice`) and generation (`jaxft.eval.generation`) sources.  ``settings`` (model,
    split, ...) go into the report with the translator's tag style."""
    from jaxft.eval.generation import evaluate_generation

    ecfg = cfg.eval
    decode = decode or ecfg.decode
    limit = max_examples or ecfg.max_examples
    scores = {}
    for direction in split_directions(cfg.data, base_dir, split, sources):
        if sources is None and ecfg.directions and direction.name not in ecfg.directions:
            continue
        examples = list(itertools.islice((e for e in direction.examples
                                          if isinstance(e, Example) and e.task == "translation"), limit))
        if not examples:
            continue
        src_lang, tgt_lang = examples[0].src_lang, examples[0].tgt_lang
        hyps = translator.translate([e.src for e in examples], src_lang, tgt_lang, decode, ecfg.batch_size,
                                    progress=progress, desc=direction.name)
        scores[direction.name] = score_direction(hyps, [e.tgt for e in examples], tgt_lang=tgt_lang,
                                                 direction=direction.name)
    choices, generations, outputs = {}, {}, []
    if sources is None:
        scorer = (translator.model, translator.tokenizer, translator.model_cfg, cfg.data)
        choices = evaluate_choices(*scorer, base_dir=base_dir, split=split, batch_size=ecfg.batch_size,
                                   max_examples=limit)
        generations, outputs = evaluate_generation(*scorer, base_dir=base_dir, split=split, decode=decode,
                                                   batch_size=ecfg.batch_size, max_examples=limit,
                                                   progress_bar=progress_bar if progress else None)
    if not scores and not choices and not generations:
        where = "--src / --ref" if sources is not None else f"data.{split} / eval.directions"
        raise ValueError(f"eval: no {split} translation direction, answer-choice or generation source to evaluate "
                         f"({where})")
    tiers = {k: list(v) for k, v in (("high", ecfg.tier_high), ("mid", ecfg.tier_mid), ("low", ecfg.tier_low)) if v}
    return EvalReport(scores, tiers or None, settings={**(settings or {}), "split": None if sources else split,
                                                        "tag_style": translator.tag_style}, choices=choices,
                      generations=generations, outputs=outputs)


def evaluation_inputs(cfg: Config, *, base_dir: Path, run_dir: Path, config_path: Path | None = None,
                      sources: Sequence[SourceConfig] = ()) -> list[Path]:
    """What `jaxft eval` reads, so that `--out` can be refused inside (or over) any of it: the
    model (run dir or folder), the config file, the data files of `data.train` / `data.dev` /
    `data.test` and of `sources`, the tokenizer and the base model (`model.init_from`,
    `peft.compose`)."""
    from jaxft.data.sources import expand_sources
    from jaxft.peft.compose import parse_spec

    from jaxft.paths import as_path, is_remote  # a URL (gs://) stays one: never a local --out

    found: list[Path] = [as_path(run_dir)] + ([Path(config_path)] if config_path else [])
    for split, section in (("train", cfg.data.train), ("dev", cfg.data.dev), ("test", cfg.data.test),
                           ("test", tuple(sources))):
        for src in expand_sources(section, Path(base_dir), section=f"data.{split}", split=split):
            found += [as_path(p) for p in (src.path, src.src_path, src.tgt_path, src.tfds_data_dir) if p]
    init_from = cfg.model.init_from or ""
    named = [(cfg.data.tokenizer.path or "").removeprefix("hf:"), init_from.partition(":")[2]]
    named += [parse_spec(spec)[0] for spec in cfg.peft.compose]
    found += [as_path(p) if is_remote(p) else Path(base_dir) / p for p in named if p]  # an absolute p stays itself
    return found


def load_run(run_dir: Path, *, which: str | int = "latest") -> tuple[Translator, Config]:
    """The model of a training run dir (its `config.yaml`, tokenizer and newest checkpoint, the
    best one kept by evaluation during training, or step `which`), opened read-only, without an
    optimizer."""
    from jaxft.paths import as_path
    from jaxft.runs.model import restore_model
    from jaxft.runs.tokenizer import run_tokenizer

    run_dir = as_path(run_dir)  # a local path or a URL
    restored = restore_model(run_dir, which)
    cfg = restored.config
    tokenizer = run_tokenizer(cfg.data, run_dir, run_dir)
    return Translator(restored.model(), tokenizer, cfg.model, cfg.data), cfg


FAMILY_LANG_TOKENS = {"mbart": ("lang_code", "mbart50"), "m2m_100": ("lang_code", "flores")}  # HF model_type


def folder_data_config(model_type: str, data_cfg: DataConfig | None = None, *, convention: bool = True) -> DataConfig:
    """The data config an HF folder translates with: ``data_cfg`` (a config's `data:`, or flags)
    where it names `lang_tokens` (or ``convention`` is off), else the family's convention
    (mBART-50 / NLLB codes)."""
    data_cfg = data_cfg or DataConfig()
    if not convention or data_cfg.lang_tokens != "none" or model_type not in FAMILY_LANG_TOKENS:
        return data_cfg
    mode, style = FAMILY_LANG_TOKENS[model_type]
    return dataclasses.replace(data_cfg, lang_tokens=mode, lang_code_style=style)


def _translator(model_cfg: ModelConfig, params, tokenizer, data_cfg: DataConfig) -> Translator:
    abstract = abstract_model(model_cfg)
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    return Translator(nnx.merge(graphdef, params, rest), tokenizer, model_cfg, data_cfg)


def load_hf_dir(path: str | Path, data_cfg: DataConfig | None = None, *, convention: bool = True) -> Translator:
    """An HF checkpoint folder (or `hf:org/name`, a hub id): model, tokenizer, and the language
    tokens of ``data_cfg`` or of the family's convention (`folder_data_config`)."""
    from jaxft.interop.hf import load_hf, read_hf_config, resolve_path
    from jaxft.interop.hf_tokenizer import load_hf_tokenizer

    directory = resolve_path(str(path))
    model_cfg, params = load_hf(directory)
    data_cfg = folder_data_config(read_hf_config(directory).get("model_type", ""), data_cfg, convention=convention)
    return _translator(model_cfg, params, load_hf_tokenizer(directory), data_cfg)


def load_jaxft_dir(path: str | Path, data_cfg: DataConfig | None = None) -> Translator:
    """A jaxft folder (`jaxft convert` / `jaxft export --format jaxft`: model.yaml + params/ +
    tokenizer/) with the language tokens of ``data_cfg`` (default none)."""
    from jaxft.interop import convert
    from jaxft.interop.hf_tokenizer import load_hf_tokenizer

    path = Path(path)
    model_cfg = convert.read_model_yaml(path / convert.MODEL_YAML)
    tok_dir = path / convert.TOKENIZER
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"{path}: no {convert.TOKENIZER}/ folder (the jaxft folder has no tokenizer)")
    models = sorted(tok_dir.glob("*.model"))
    tokenizer = load_hf_tokenizer(models[0] if len(models) == 1 else tok_dir)
    params = convert.restore_params(path / convert.PARAMS, model_cfg)
    return _translator(model_cfg, params, tokenizer, data_cfg or DataConfig())


def is_jaxft_dir(path: Path) -> bool:
    from jaxft.interop import convert

    return (path / convert.MODEL_YAML).is_file() and (path / convert.PARAMS).is_dir()


def load_translator(source: str, which: str | int = "latest", *, data_cfg: DataConfig | None = None,
                    lang_tokens: str | None = None,
                    lang_code_style: str | None = None) -> tuple[Translator, Config | None]:
    """A run dir, HF folder or jaxft folder; hub ids only as `hf:<org/name>` (a missing path is an
    error).  ``data_cfg``: the `data:` an HF / jaxft folder translates with (run dirs use their
    own); ``lang_tokens`` / ``lang_code_style`` override the tag style of any of them."""
    from jaxft.interop.hf import not_found

    given = {k: v for k, v in (("lang_tokens", lang_tokens), ("lang_code_style", lang_code_style)) if v}
    if given:
        data_cfg = dataclasses.replace(data_cfg or DataConfig(), **given)
    from jaxft.paths import as_path

    path = as_path(source)  # a URL (gs://bucket/run) stays one
    if source.startswith("hf:") or (path / "config.json").is_file():
        hf = source if source.startswith("hf:") else path
        return load_hf_dir(hf, data_cfg, convention="lang_tokens" not in given), None
    if not path.exists():
        raise not_found(source, "run dir, jaxft folder or HF checkpoint folder")
    if is_jaxft_dir(path):
        return load_jaxft_dir(path, data_cfg), None
    translator, cfg = load_run(path, which=which)
    if given:
        translator.data_cfg = dataclasses.replace(translator.data_cfg, **given)
    return translator, cfg
