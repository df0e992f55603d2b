"""YAML config loading: ``base:`` overlays, model presets, ``--set`` overrides, strict typing.

    cfg = load_config("configs/experiments/x.yaml", ["optimizer.lr=3e-4"])

Resolution, later winning: base files (in listed order, recursively) < the file
itself < ``--set`` overrides.  Dicts merge key by key; lists and scalars replace.
Then ``model.preset: NAME`` merges ``configs/models/NAME.yaml`` *under* the model
section.  Every key remembers where it was set (an :class:`Origin`), so errors
name the file and line the user has to edit, on one line::

    configs/experiments/x.yaml:12: optimizer.lrr: unknown key (did you mean 'lr'?)

YAML dialect: only ``true``/``false`` are booleans (``no``, ``on``... are language
codes, not booleans), and ``3e-4`` is a float.  Relative data paths resolve against
the folder of the file that set them.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

import jaxft
from jaxft.config.schema import Config, ModelConfig, to_dict

Key = tuple[str | int, ...]  # ("data", "train", 2, "src_lang")
Tree = dict[str, Any]
Origins = dict[Key, "Origin"]


@dataclass(frozen=True)
class Origin:
    """Where a key was set: a file (and line), or ``--set``."""

    source: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.source}:{self.line}" if self.line else self.source


class ConfigError(ValueError):
    """A config problem; ``str()`` is one line: ``file:line: key.path: message``."""

    def __init__(self, message: str, key: Key = (), origin: Origin | None = None):
        text = (f"{origin}: " if origin else "") + (f"{format_key(key)}: " if key else "") + message
        super().__init__(re.sub(r"\s*\n\s*", " ", text))


def format_key(key: Key) -> str:
    """``("data", "train", 2, "src_lang")`` -> ``data.train[2].src_lang``."""
    out = ""
    for part in key:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and exponent-only floats (``3e-4``)."""


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    _FLOAT, re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _parse(text: str, source: str, prefix: Key = ()) -> tuple[Any, Origins]:
    """YAML text -> plain data, plus the origin (file, line) of every mapping key and list item."""
    loader = _Loader(text)
    origins: Origins = {}

    def build(node: yaml.Node, key: Key) -> Any:
        if isinstance(node, yaml.MappingNode):
            n_explicit = sum(k.tag != "tag:yaml.org,2002:merge" for k, _ in node.value)
            loader.flatten_mapping(node)  # YAML merge keys (<<: *anchor) come first
            n_merged, out, explicit = len(node.value) - n_explicit, {}, set()
            for i, (k_node, v_node) in enumerate(node.value):
                k, here = loader.construct_object(k_node, deep=True), Origin(source, k_node.start_mark.line + 1)
                if not isinstance(k, str):
                    raise ConfigError(f"keys must be strings, got {k!r}", key, here)
                if i >= n_merged:
                    if k in explicit:
                        raise ConfigError("duplicate key", key + (k,), here)
                    explicit.add(k)
                origins[key + (k,)] = here
                out[k] = build(v_node, key + (k,))
            return out
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                origins[key + (i,)] = Origin(source, item.start_mark.line + 1)
            return [build(item, key + (i,)) for i, item in enumerate(node.value)]
        return loader.construct_object(node, deep=True)

    try:
        node = loader.get_single_node()
        return (None if node is None else build(node, prefix)), origins
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"invalid YAML: {problem}", origin=Origin(source, mark.line + 1 if mark else None)) from None
    finally:
        loader.dispose()


# ------------------------------------------------------------------ merge, load


def _merge(base: tuple[Tree, Origins], top: tuple[Tree, Origins]) -> tuple[Tree, Origins]:
    """Deep-merge ``top`` over ``base``: dicts key by key, anything else replaces."""
    replaced: list[Key] = []

    def merge(b: Tree, t: Tree, key: Key) -> Tree:
        out = dict(b)
        for k, v in t.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = merge(out[k], v, key + (k,))
            else:
                out[k] = v
                replaced.append(key + (k,))
        return out

    tree = merge(base[0], top[0], ())
    origins = {k: o for k, o in base[1].items() if not any(k[: len(r)] == r for r in replaced)}
    origins.update(top[1])
    return tree, origins


def _load_file(path: Path, stack: tuple[Path, ...] = (), ref: Origin | None = None) -> tuple[Tree, Origins]:
    """One YAML file with its ``base:`` overlays merged underneath it."""
    real = path.resolve()
    if real in stack:
        chain = " -> ".join(str(p) for p in (*stack, real))
        raise ConfigError(f"cycle in base files: {chain}", ("base",) if ref else (), ref or Origin(str(path)))
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {str(path)!r}: {e.strerror}", ("base",) if ref else (), ref) from None
    tree, origins = _parse(text, str(path))
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise ConfigError("the top level must be a mapping", origin=Origin(str(path), 1))
    bases, here = tree.pop("base", None), origins.get(("base",))
    origins = {k: o for k, o in origins.items() if k[:1] != ("base",)}
    bases = [bases] if isinstance(bases, str) else ([] if bases is None else bases)
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError("expected a path or a list of paths", ("base",), here)
    merged: tuple[Tree, Origins] = ({}, {})
    for base in bases:
        merged = _merge(merged, _load_file(Path(os.path.normpath(path.parent / base)), (*stack, real), here))
    return _merge(merged, (tree, origins))


def _apply_override(tree: Tree, origins: Origins, text: str) -> tuple[Tree, Origins]:
    """``a.b[0].c=value``: replaces the value at that key (value parsed as YAML)."""
    here = Origin("--set")
    raw_key, sep, raw_value = text.partition("=")
    parts = re.findall(r"([^.\[\]]+)|\[(\d+)\]", raw_key.strip())
    key: Key = tuple(int(i) if i else name for name, i in parts)
    if not sep or not key or not isinstance(key[0], str):
        raise ConfigError(f"expected key=value, got {text!r}", origin=here)
    value, value_origins = _parse(raw_value, "--set", key)
    value_origins = dict.fromkeys(value_origins, here)
    tree = copy.deepcopy(tree)
    node: Any = tree
    for i, part in enumerate(key):
        if isinstance(part, int) and not (isinstance(node, list) and part < len(node)):
            raise ConfigError("no such list item", key[: i + 1], here)
        if isinstance(part, str) and not isinstance(node, dict):
            raise ConfigError("not a mapping", key[:i], here)
        if i == len(key) - 1:
            node[part] = value
        else:
            node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
    origins = {k: o for k, o in origins.items() if k[: len(key)] != key}
    for n in range(1, len(key) + 1):
        origins.setdefault(key[:n], here)
    origins.update(value_origins)
    return tree, origins


def _preset_dirs(config_path: Path) -> list[Path]:
    """Where ``model.preset`` files are looked for, first match wins."""
    near = [d / "configs" / "models" for d in config_path.resolve().parents]
    return near + [Path(jaxft.__file__).resolve().parents[1] / "configs" / "models"]


def _apply_preset(tree: Tree, origins: Origins, config_path: Path) -> tuple[Tree, Origins]:
    """Merge ``configs/models/<model.preset>.yaml`` under the model section (explicit keys win)."""
    model = tree.get("model")
    name = model.get("preset") if isinstance(model, dict) else None
    if name is None:
        return tree, origins
    here = origins.get(("model", "preset"))
    if not isinstance(name, str):
        raise ConfigError(f"expected a preset name, got {name!r}", ("model", "preset"), here)
    dirs = _preset_dirs(config_path)
    found = next((d / f"{name}.yaml" for d in dirs if (d / f"{name}.yaml").is_file()), None)
    if found is None:
        if {f.name for f in dataclasses.fields(ModelConfig)} <= set(model):
            return tree, origins  # every key is explicit (a dumped config): nothing to add
        known = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")})
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; looked in {', '.join(map(str, dirs))}"
        raise ConfigError(f"unknown preset {name!r}{hint}", ("model", "preset"), here)
    preset, preset_origins = _load_file(found)
    if set(preset) == {"model"} and isinstance(preset["model"], dict):  # also accept `model:`-wrapped presets
        return _merge((preset, preset_origins), (tree, origins))
    wrapped = {("model",) + k: o for k, o in preset_origins.items()}
    return _merge(({"model": preset}, wrapped), (tree, origins))


_PATH_KEYS = ("path", "src_path", "tgt_path", "tfds_data_dir")


def _resolve_paths(tree: Tree, origins: Origins) -> None:
    """Relative data paths resolve against the folder of the file that set them (not ``--set``)."""
    data = tree.get("data")
    if not isinstance(data, dict):
        return
    spots: list[tuple[Any, str | int, Key]] = []
    if isinstance(data.get("tokenizer"), dict):
        spots.append((data["tokenizer"], "path", ("data", "tokenizer", "path")))
    for split in ("train", "dev"):
        for i, source in enumerate(data.get(split) or []):
            if isinstance(source, dict):
                spots += [(source, k, ("data", split, i, k)) for k in _PATH_KEYS]
    for node, k, key in spots:
        value, origin = node.get(k), origins.get(key)
        if isinstance(value, str) and origin and origin.source != "--set" and "://" not in value \
                and not value.startswith(("hf:", "run:")):
            node[k] = os.path.normpath(Path(origin.source).resolve().parent / value)


# -------------------------------------------------------------------- typing


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return f"list of {_type_name(args[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _value_name(v: Any) -> str:
    kind = {dict: "mapping", list: "list", type(None): "null"}.get(type(v), type(v).__name__)
    return kind if isinstance(v, (dict, list)) else f"{kind} {v!r}"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


Where = Callable[[Key], Origin | None]


def _convert(tp: Any, v: Any, key: Key, where: Where, shown: Any = None) -> Any:
    """Check ``v`` against the annotation ``tp`` and convert (list -> tuple, int -> float, dict -> dataclass)."""
    shown = shown or tp
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # the schema only uses `X | None`
        (rest,) = (a for a in args if a is not type(None))
        return None if v is None else _convert(rest, v, key, where, shown)
    if origin is Literal:
        if any(v == a and type(v) is type(a) for a in args):
            return v
        allowed = ", ".join(repr(a) for a in args)
        raise ConfigError(f"expected one of {allowed}; got {_value_name(v)}", key, where(key))
    elif origin is tuple and isinstance(v, list):
        return tuple(_convert(args[0], x, key + (i,), where) for i, x in enumerate(v))
    elif dataclasses.is_dataclass(tp) and isinstance(v, dict):
        return _build(tp, v, key, where)
    elif tp is float and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    elif tp in (int, str, bool) and type(v) is tp:
        return v
    hint = " (quote it if it is text)" if isinstance(v, (bool, int, float)) and str in args + (tp,) else ""
    raise ConfigError(f"expected {_type_name(shown)}, got {_value_name(v)}{hint}", key, where(key))


def _build(cls: type, data: Mapping[str, Any], key: Key, where: Where) -> Any:
    """A dict -> the dataclass ``cls``, rejecting unknown keys with a suggestion."""
    hints = _hints(cls)
    kwargs = {}
    for k, v in data.items():
        if k not in hints:
            close = difflib.get_close_matches(k, list(hints), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key{hint}", key + (k,), where(key + (k,)))
        kwargs[k] = _convert(hints[k], v, key + (k,), where)
    return cls(**kwargs)


# ---------------------------------------------------------------- validation


class Check(NamedTuple):
    """``ok(cfg)`` must hold; errors name ``keys[0]`` and the file of the first key that was set."""

    keys: tuple[str, ...]
    ok: Callable[[Config], bool]
    message: str  # str.format'ed with c=cfg


def _get(cfg: Any, key: str) -> Any:
    return functools.reduce(lambda obj, name: getattr(obj, name, None), key.split("."), cfg)


def _bound(key: str, op: Literal[">", ">="], low: float, below: float | None = None) -> Check:
    """``key op low`` (and ``key < below``); ``None`` (an unset optional) passes."""
    def ok(c: Config) -> bool:
        v = _get(c, key)
        return v is None or ((v > low if op == ">" else v >= low) and (below is None or v < below))
    return Check((key,), ok, f"must be {op} {low}" if below is None else f"must be in [{low}, {below})")


_CHECKS: tuple[Check, ...] = (
    *(_bound(f"model.{k}", ">", 0) for k in (
        "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim", "max_seq_len")),
    _bound("model.rope_scaling.factor", ">", 0),
    Check(("model.d_model", "model.n_heads", "model.head_dim"),
          lambda c: c.model.head_dim is not None or c.model.d_model % c.model.n_heads == 0,
          "must be a multiple of model.n_heads={c.model.n_heads} (or set model.head_dim)"),
    Check(("model.n_kv_heads", "model.n_heads"), lambda c: c.model.n_heads % c.model.kv_heads == 0,
          "must divide model.n_heads={c.model.n_heads}"),
    *(Check((f"mesh.{k}",), lambda c, k=k: _get(c.mesh, k) == -1 or _get(c.mesh, k) >= 1,
            "must be -1 (all remaining devices) or >= 1") for k in ("data", "fsdp", "tensor")),
    Check(("mesh",), lambda c: [c.mesh.data, c.mesh.fsdp, c.mesh.tensor].count(-1) <= 1,
          "must have at most one axis set to -1"),
    _bound("data.seq_len", ">", 0),
    _bound("data.temperature", ">", 0),
    *(_bound(f"train.{k}", ">", 0) for k in ("steps", "global_batch", "microbatches", "log_every")),
    Check(("train.global_batch", "train.microbatches"), lambda c: c.train.global_batch % c.train.microbatches == 0,
          "must be a multiple of train.microbatches={c.train.microbatches}"),
    *(_bound(f"train.{k}", ">=", 0) for k in ("dev_every", "z_loss")),
    _bound("train.label_smoothing", ">=", 0, 1),
    *(_bound(f"optimizer.{k}", ">=", 0) for k in ("lr", "warmup_steps", "end_lr_ratio", "weight_decay")),
    *(_bound(f"optimizer.{k}", ">", 0) for k in ("decay_steps", "clip_norm")),
    *(_bound(f"optimizer.{k}", ">=", 0, 1) for k in ("b1", "b2")),
    Check(("optimizer.warmup_steps", "train.steps"), lambda c: c.optimizer.warmup_steps <= c.train.steps,
          "must be <= train.steps={c.train.steps}"),
    _bound("checkpoint.every", ">=", 0),
    _bound("checkpoint.keep", ">", 0),
)


def _origin_of(key: Key, origins: Mapping[Key, Origin], fallback: Origin | None) -> Origin | None:
    """The origin of ``key``, else of its closest set ancestor, else ``fallback``."""
    for n in range(len(key), 0, -1):
        if key[:n] in origins:
            return origins[key[:n]]
    return fallback


def validate(cfg: Config, origins: Mapping[Key, Origin] | None = None, fallback: str | None = None) -> Config:
    """Reject impossible values (``_CHECKS``); returns ``cfg`` unchanged when all hold."""
    origins = origins or {}
    for check in _CHECKS:
        if check.ok(cfg):
            continue
        keys = [tuple(k.split(".")) for k in check.keys]
        origin = next((origins[k] for k in keys if k in origins), None)
        origin = origin or _origin_of(keys[0], origins, Origin(fallback) if fallback else None)
        value = _get(cfg, check.keys[0])
        value_text = "" if dataclasses.is_dataclass(value) else f", got {value!r}"
        raise ConfigError(check.message.format(c=cfg) + value_text, keys[0], origin)
    return cfg


# -------------------------------------------------------------------- public


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load, merge (bases, overrides, preset), type-check and validate a YAML config."""
    path = Path(path)
    tree, origins = _load_file(path)
    for text in overrides:
        tree, origins = _apply_override(tree, origins, text)
    tree, origins = _apply_preset(tree, origins, path)
    _resolve_paths(tree, origins)
    fallback = Origin(str(path))
    cfg = _build(Config, tree, (), lambda key: _origin_of(key, origins, fallback))
    return validate(cfg, origins, str(path))


def dump_config(cfg: Config) -> str:
    """YAML text of ``cfg`` (every key explicit); ``load_config`` reads it back equal."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True, default_flow_style=False)


def config_diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ (lists of sources compared item by item)."""
    out: list[str] = []

    def diff(x: Any, y: Any, key: Key) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in [*x, *(k for k in y if k not in x)]:
                diff(x.get(k), y.get(k), key + (k,))
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y) and all(
            isinstance(v, dict) for v in x + y
        ):
            for i, (u, v) in enumerate(zip(x, y)):
                diff(u, v, key + (i,))
        elif x != y:
            out.append(format_key(key))

    diff(to_dict(a), to_dict(b), ())
    return out
