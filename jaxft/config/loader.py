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
import logging
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

import jaxft
from jaxft.config.checks import _origin_of, validate
from jaxft.config.errors import ConfigError, Key, Origin, Origins, Tree, format_key, utf8_position
from jaxft.config.schema import Config, ModelConfig, to_dict
from jaxft.paths import as_path, beside, is_remote

__all__ = ["ConfigError", "Origin", "config_diff", "dump_config", "format_key", "load_config", "load_typed",
           "validate"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and exponent-only floats (``3e-4``)."""


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _parse(text: str, source: str, prefix: Key = ()) -> tuple[Any, Origins]:
    """YAML text -> plain data, plus the origin (file, line) of every mapping key and list item."""
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
        loader = _Loader(text)  # checks every character first
    except yaml.reader.ReaderError as e:
        what = "a NUL byte (is it a binary file?)" if e.character == 0 else f"character U+{e.character:04X}"
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError(f"invalid YAML: {what} (control characters are not allowed)",
                          origin=Origin(source, line)) from None
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
    real = path if is_remote(path) else path.resolve()
    if real in stack:
        chain = " -> ".join(str(p) for p in (*stack, real))
        raise ConfigError(f"cycle in base files: {chain}", ("base",) if ref else (), ref or Origin(str(path)))
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {str(path)!r}: {e.strerror}", ("base",) if ref else (), ref) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = utf8_position(raw, e)
        raise ConfigError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {col}); save it as UTF-8",
                          origin=Origin(str(path), line)) from None
    tree, origins = _parse(text, str(path))
    if not isinstance(tree := {} if tree is None else tree, dict):
        raise ConfigError("the top level must be a mapping", origin=Origin(str(path), 1))
    origins = _legacy_decode_keys(tree, origins, str(path))
    bases, here = tree.pop("base", None), origins.get(("base",))
    origins = {k: o for k, o in origins.items() if k[:1] != ("base",)}
    bases = [bases] if isinstance(bases, str) else ([] if bases is None else bases)
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError("expected a path or a list of paths", ("base",), here)
    merged: tuple[Tree, Origins] = ({}, {})
    for base in bases:
        merged = _merge(merged, _load_file(beside(path, base), (*stack, real), here))  # as data paths
    return _merge(merged, (tree, origins))


def _apply_override(tree: Tree, origins: Origins, text: str) -> tuple[Tree, Origins]:
    """``a.b[0].c=value``: replaces the value at that key (value parsed as YAML)."""
    here = Origin("--set")
    raw_key, sep, raw_value = text.partition("=")
    parts = re.findall(r"([^.\[\]]+)|\[(\d+)\]", raw_key.strip())
    key: Key = tuple(int(i) if i else name for name, i in parts)
    if not sep or not key or not isinstance(key[0], str):
        raise ConfigError(f"expected key=value, got {text!r}", origin=here)
    if key[:1] == ("eval",) and len(key) > 1 and key[1] in LEGACY_DECODE_KEYS:
        log.warning("--set: %s is an old key, read as eval.decode.%s", format_key(key), format_key(key[1:]))
        key = ("eval", "decode") + key[1:]
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


LEGACY_DECODE_KEYS = ("strategy", "beam_size", "length_penalty", "max_len")  # eval.<k> -> eval.decode.<k>


def _legacy_decode_keys(tree: Tree, origins: Origins, source: str) -> Origins:
    """Old run dirs' flat ``eval.strategy`` / ``beam_size`` / ``length_penalty`` / ``max_len``
    move under ``eval.decode`` (with a warning); a file with both forms is an error."""
    section = tree.get("eval")
    old = [k for k in LEGACY_DECODE_KEYS if k in section] if isinstance(section, dict) else []
    if not old:
        return origins
    if "decode" in section:
        raise ConfigError("old flat key and eval.decode in one file; move it under eval.decode",
                          ("eval", old[0]), origins.get(("eval", old[0]), Origin(source)))
    log.warning("%s: old keys %s, read as %s", source, ", ".join(f"eval.{k}" for k in old),
                ", ".join(f"eval.decode.{k}" for k in old))
    section["decode"] = {k: section.pop(k) for k in old}
    moved = {("eval", "decode") + k[1:] if k[:1] == ("eval",) and len(k) > 1 and k[1] in old else k: o
             for k, o in origins.items()}
    moved[("eval", "decode")] = origins[("eval", old[0])]
    return moved


def _preset_dirs(config_path: Path) -> list[Path]:
    """Where ``model.preset`` files are looked for, first match wins."""
    near = [d / "configs" / "models" for d in ([] if is_remote(config_path) else config_path.resolve().parents)]
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
    spots.append((data, "index_dir", ("data", "index_dir")))
    for split in ("train", "dev", "test"):
        for i, source in enumerate(data.get(split) or []):
            if isinstance(source, dict):
                spots += [(source, k, ("data", split, i, k)) for k in _PATH_KEYS]
    for node, k, key in spots:
        value, origin = node.get(k), origins.get(key)
        if isinstance(value, str) and origin and origin.source != "--set" and "://" not in value \
                and not value.startswith(("hf:", "run:")):
            node[k] = str(beside(origin.source, value))  # a URL value is never resolved (above)


def _check_init_from(tree: Tree, origins: Origins) -> None:
    """``model.init_from`` names its kind: ``hf:`` (a Hugging Face folder, or hub id ``org/name``)
    or ``run:``; a bare path is refused here, naming the file and line, never guessed at."""
    model = tree.get("model")
    spec = model.get("init_from") if isinstance(model, dict) else None
    if isinstance(spec, str) and not spec.startswith(("hf:", "run:")):
        raise ConfigError(f"expected 'hf:<folder or org/name>' or 'run:<run dir>', got {spec!r} (write "
                          f"hf:{spec} for a Hugging Face folder or hub model, run:{spec} for a jaxft run dir)",
                          ("model", "init_from"), origins.get(("model", "init_from")))


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
    if tp is Any:
        return v
    if origin is dict and isinstance(v, dict):  # dict[str, X]: keys are free (config keys, axis names)
        return {k: _convert(args[1], x, key + (k,), where) for k, x in v.items()}
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
    try:
        return cls(**kwargs)
    except ValueError as e:  # a section's own checks (__post_init__), e.g. eval.decode
        raise ConfigError(str(e), origin=where(key)) from None


# ---------------------------------------------------------------- validation


# -------------------------------------------------------------------- public


def load_typed(path: str | Path, cls: type) -> tuple[Any, Callable[[Key], Origin | None]]:
    """A YAML file checked against the dataclass ``cls`` (``file:line: key:`` errors, as configs), and
    a function giving any key's origin (for later errors)."""
    tree, origins = _load_file(Path(path))
    where = lambda key: _origin_of(key, origins, Origin(str(path)))  # noqa: E731
    return _build(cls, tree, (), where), where


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load, merge (bases, overrides, preset), type-check and validate a YAML config (a path or a URL)."""
    path = as_path(path)
    tree, origins = _load_file(path)
    for text in overrides:
        tree, origins = _apply_override(tree, origins, text)
    tree, origins = _apply_preset(tree, origins, path)
    _resolve_paths(tree, origins)
    _check_init_from(tree, origins)
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
