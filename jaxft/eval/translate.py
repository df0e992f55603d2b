"""Translation with a trained run or an HF checkpoint, and per-direction evaluation.

Inputs are built exactly as in training: decoder-only models get the prompt
template (`data.prompt_template`, language names) and continue after it;
encoder-decoder models get the source side of `Seq2SeqFeaturizer` (target tag
or source language code + eos) and, with `lang_tokens: lang_code`, the target
language code forced as the first output token.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from pathlib import Path
from typing import Sequence

from flax import nnx

from jaxft.config.schema import Config, DataConfig, DecodeConfig, ModelConfig, SourceConfig
from jaxft.data.pipeline import read_directions
from jaxft.data.seq2seq import Seq2SeqFeaturizer
from jaxft.data.sources import Example
from jaxft.data.tasks import render
from jaxft.eval.decode import decode_all
from jaxft.eval.metrics import score_direction
from jaxft.eval.report import EvalReport
from jaxft.models.registry import build_model, is_encoder_decoder

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Translator:
    model: nnx.Module
    tokenizer: object
    model_cfg: ModelConfig
    data_cfg: DataConfig

    @property
    def encoder_decoder(self) -> bool:
        return is_encoder_decoder(self.model_cfg)

    def inputs(self, texts: Sequence[str], src_lang: str, tgt_lang: str,
               max_new: int) -> tuple[list[list[int]], list[list[int]] | None]:
        """Token ids per text, and the forced first output tokens (or None)."""
        tok = self.tokenizer
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

    def translate(self, texts: Sequence[str], src_lang: str, tgt_lang: str, decode: DecodeConfig,
                  batch_size: int = 16) -> list[str]:
        if not texts:
            return []
        seqs, forced = self.inputs(texts, src_lang, tgt_lang, decode.max_len)
        decode = dataclasses.replace(decode, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                                     decoder_start_id=self.model_cfg.decoder_start_id)
        results = decode_all(self.model, seqs, config=decode, batch_size=batch_size,
                             encoder_decoder=self.encoder_decoder, forced=forced)
        n_forced = len(forced[0]) if forced else 0
        return [self.tokenizer.decode(best[0][0][n_forced:]) for best in results]


def evaluate(translator: Translator, cfg: Config, *, base_dir: Path, decode: DecodeConfig | None = None,
             max_examples: int | None = None) -> EvalReport:
    """Decode the dev directions (`eval.directions`, default all) with ``decode`` (default
    `eval.decode`) and score them with sacreBLEU."""
    ecfg = cfg.eval
    decode = decode or ecfg.decode
    limit = max_examples or ecfg.max_examples
    scores = {}
    for direction in read_directions(cfg.data, base_dir, split="dev"):
        if ecfg.directions and direction.name not in ecfg.directions:
            continue
        examples = list(itertools.islice((e for e in direction.examples
                                          if isinstance(e, Example) and e.task == "translation"), limit))
        if not examples:
            continue
        src_lang, tgt_lang = examples[0].src_lang, examples[0].tgt_lang
        hyps = translator.translate([e.src for e in examples], src_lang, tgt_lang, decode, ecfg.batch_size)
        scores[direction.name] = score_direction(hyps, [e.tgt for e in examples], tgt_lang=tgt_lang,
                                                 direction=direction.name)
    if not scores:
        raise ValueError("eval: no dev translation direction to evaluate (data.dev / eval.directions)")
    tiers = {k: list(v) for k, v in (("high", ecfg.tier_high), ("mid", ecfg.tier_mid), ("low", ecfg.tier_low)) if v}
    return EvalReport(scores, tiers or None)


def evaluation_inputs(cfg: Config, *, base_dir: Path, run_dir: Path, config_path: Path | None = None) -> list[Path]:
    """What `jaxft eval` reads, so that `--out` can be refused inside (or over) any of it: the run
    dir, the config file, the data files of `data.train` / `data.dev`, the tokenizer and the
    base model (`model.init_from`, `peft.compose`)."""
    from jaxft.data.sources import expand_sources
    from jaxft.peft.compose import parse_spec

    found: list[Path] = [Path(run_dir)] + ([Path(config_path)] if config_path else [])
    for split in ("train", "dev"):
        sources = cfg.data.train if split == "train" else cfg.data.dev
        for src in expand_sources(sources, Path(base_dir), section=f"data.{split}", split=split):
            found += [Path(p) for p in (src.path, src.src_path, src.tgt_path, src.tfds_data_dir) if p]
    init_from = cfg.model.init_from or ""
    named = [(cfg.data.tokenizer.path or "").removeprefix("hf:"), init_from.partition(":")[2]]
    named += [parse_spec(spec)[0] for spec in cfg.peft.compose]
    found += [Path(base_dir) / p for p in named if p]  # an absolute p stays itself
    return found


def load_run(run_dir: Path, *, which: str = "latest") -> tuple[Translator, Config]:
    """The model of a training run dir (its `config.yaml`, tokenizer and newest checkpoint, or
    the best one kept by evaluation during training), opened read-only, without an optimizer."""
    from jaxft.runs.model import restore_model
    from jaxft.runs.tokenizer import run_tokenizer

    restored = restore_model(Path(run_dir), which)
    cfg = restored.config
    tokenizer = run_tokenizer(cfg.data, Path(run_dir), Path(run_dir))
    return Translator(restored.model(), tokenizer, cfg.model, cfg.data), cfg


def load_hf_dir(path: str | Path, data_cfg: DataConfig | None = None) -> Translator:
    """An HF checkpoint folder (or `hf:org/name`, a hub id): model, tokenizer, and the family's language-token convention."""
    from jaxft.interop.hf import load_hf, read_hf_config, resolve_path
    from jaxft.interop.hf_tokenizer import load_hf_tokenizer

    directory = resolve_path(str(path))
    model_cfg, params = load_hf(directory)
    model_type = read_hf_config(directory).get("model_type", "")
    if data_cfg is None:
        lang = {"mbart": ("lang_code", "mbart50"), "m2m_100": ("lang_code", "flores")}.get(model_type)
        data_cfg = DataConfig(lang_tokens=lang[0], lang_code_style=lang[1]) if lang else DataConfig()
    abstract = nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    model = nnx.merge(graphdef, params, rest)
    return Translator(model, load_hf_tokenizer(directory), model_cfg, data_cfg)


def load_translator(source: str, which: str = "latest") -> tuple[Translator, Config | None]:
    """A run dir or HF folder; hub ids only as `hf:<org/name>` (a missing path is an error)."""
    from jaxft.interop.hf import not_found

    if source.startswith("hf:"):
        return load_hf_dir(source), None
    path = Path(source)
    if not path.exists():
        raise not_found(source, "run dir or HF checkpoint folder")
    if (path / "config.json").is_file():
        return load_hf_dir(path), None
    return load_run(path, which=which)
