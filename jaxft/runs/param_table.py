"""`jaxft params`: a model's parameter paths, shapes, dtypes and sizes, from abstract shapes
(`nnx.eval_shape`: no weights are materialised), so target regexes can be written and checked.

The source is an experiment config (YAML, `--set` overrides), a run dir (its config.yaml),
a jaxft folder (model.yaml + params/) or an HF folder (config.json).  With a config or run
dir the table is of the model as the run trains it (the PEFT method's surgery applied):
which tensors train, which Linears LoRA adapts (rank, alpha) and which it trains fully
(`peft.lora.modules_to_save`).  `match` keeps the paths a regex finds (``re.search``, as
every path regex in the config).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Sequence

from flax import nnx

from jaxft.config.schema import Config, ModelConfig
from jaxft.interop.hf import path_str
from jaxft.peft.methods import method_for
from jaxft.runs.layout import RunDir


@dataclasses.dataclass(frozen=True)
class ParamRow:
    path: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool | None  # None: the source has no training config
    note: str = ""  # "lora r=8 alpha=16" on an adapted kernel, "modules_to_save" on a tensor trained fully

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def read_source(source: str | Path, overrides: Sequence[str] = ()) -> tuple[ModelConfig, Config | None]:
    """``(model config, whole config or None)`` of a config file, run dir, jaxft folder or HF folder."""
    from jaxft.config.loader import load_config

    source = Path(source)
    if source.is_file():
        return (cfg := load_config(source, overrides)).model, cfg
    if overrides:
        raise ValueError(f"--set: only an experiment config takes overrides ({source} is a folder)")
    if RunDir(source).is_run():
        return (cfg := load_config(RunDir(source).config)).model, cfg
    from jaxft.interop import convert

    if (source / convert.MODEL_YAML).is_file():
        return convert.read_model_yaml(source / convert.MODEL_YAML), None
    if (source / "config.json").is_file():
        from jaxft.interop.hf import hf_config_to_model_config, read_hf_config

        return hf_config_to_model_config(read_hf_config(source)), None
    raise FileNotFoundError(f"{source}: not a config file, run dir (config.yaml), jaxft folder (model.yaml) "
                            "or HF folder (config.json)")


def _lora_notes(model: nnx.Module, cfg: Config) -> dict[str, str]:
    from jaxft.peft.lora import adapters, param_paths
    from jaxft.peft.lora_targets import saved_paths

    lcfg = cfg.peft.lora
    notes = {f"{path}/kernel": f"lora r={ad.rank} scale={ad.scale:g}" for path, _, _, ad in adapters(model, lcfg.name)}
    notes.update({p: "modules_to_save" for p in saved_paths(lcfg, param_paths(model))})
    return notes


def param_table(model_cfg: ModelConfig, cfg: Config | None = None) -> list[ParamRow]:
    """Every parameter of the (abstract) model, in path order; with `cfg`, of the train model."""
    from jaxft.models.registry import build_model

    if cfg is None:
        model = nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
        return [ParamRow(path_str(p), tuple(v.shape), str(v.dtype), None)
                for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    from jaxft.runs.model import build_train_model

    method = method_for(cfg.peft, cfg.train, cfg.model)
    model = nnx.eval_shape(lambda: build_train_model(cfg.model, method, cfg.train.seed))
    _, trainable, _ = nnx.split(model, method.trainable_filter(), ...)
    train_paths = {path_str(p) for p, _ in nnx.to_flat_state(trainable)}
    notes = _lora_notes(model, cfg) if cfg.peft.method == "lora" else {}
    return [ParamRow(s, tuple(v.shape), str(v.dtype), s in train_paths, notes.get(s, ""))
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) for s in [path_str(p)]]


def select(rows: list[ParamRow], match: str | None = None, trainable: bool = False) -> list[ParamRow]:
    if match is not None:
        try:
            regex = re.compile(match)
        except re.error as e:
            raise ValueError(f"--match: bad regex {match!r}: {e}") from None
        rows = [r for r in rows if regex.search(r.path)]
    if trainable:
        if rows and rows[0].trainable is None:
            raise ValueError("--trainable: needs an experiment config or a run dir (a model folder has no "
                             "training config)")
        rows = [r for r in rows if r.trainable]
    return rows


def format_table(rows: list[ParamRow], total: list[ParamRow]) -> str:
    """The rows as aligned text, then the counts (of these rows, of all, of what trains)."""
    cells = [(r.path, "[" + ", ".join(map(str, r.shape)) + "]", r.dtype, f"{r.size:,}",
              ", ".join(x for x in ("trainable" if r.trainable else "", r.note) if x)) for r in rows]
    head = ("path", "shape", "dtype", "count", "")
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(4)]
    fmt = lambda c: "  ".join([c[0].ljust(widths[0]), c[1].ljust(widths[1]), c[2].ljust(widths[2]),  # noqa: E731
                               c[3].rjust(widths[3]), c[4]]).rstrip()
    lines = [fmt(head)] + [fmt(c) for c in cells]
    n = sum(r.size for r in rows)
    all_n = sum(r.size for r in total)
    summary = f"{len(rows)} of {len(total)} tensors, {n:,} of {all_n:,} parameters"
    if total and total[0].trainable is not None:
        summary += f" ({sum(r.size for r in total if r.trainable):,} trainable)"
    return "\n".join(lines + [summary])
