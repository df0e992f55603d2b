"""Hugging Face checkpoints (``config.json`` + safetensors) <-> jaxft ``(ModelConfig, nnx.State)``.

Import streams one tensor at a time: read it (numpy), convert it to our layout,
cast it, and place it straight onto its ``NamedSharding`` with
``jax.make_array_from_callback`` (each device gets only its slice).  The
shardings come from the abstract model's logical axes under
``jaxft.sharding.use_mesh``.  Export gathers one tensor at a time and writes
``transformers``-loadable shards.  Family specifics live in
``jaxft.interop.families`` (decoder-only: llama, qwen2, gemma, gemma2, bloom;
encoder-decoder: t5, mt5, umt5, mbart, m2m_100 / NLLB).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxft.config.errors import FileFormatError, read_json
from jaxft.config.schema import ModelConfig
from jaxft.interop.families import Family, family_for_hf, family_for_model
from jaxft.interop.families.common import Tensor
from jaxft.interop.placement import export_fn, layout_fn, place, stored_sharding
from jaxft.interop.safetensors_io import CheckpointReader, stream_order, write_sharded_stream
from jaxft.models.registry import abstract_model
from jaxft.paths import is_remote, local_copy
from jaxft.sharding import fit_spec, to_host, use_mesh

log = logging.getLogger(__name__)

_PARAM_DTYPES = ("float32", "bfloat16")
# Tensors some checkpoints carry that hold nothing we need.
_IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# Fields that change the parameters or the function they compute (init_params_from checks them).
_NOT_ARCHITECTURE = ("preset", "max_seq_len", "init_std", "param_dtype", "dtype", "remat", "init_from",
                     "decoder_start_id", "rope_scaling", "dropout", "attention_dropout", "activation_dropout",
                     "scan_layers", "attention_kernel")


# --------------------------------------------------------------------------- paths and configs


def looks_like_hub_id(text: str) -> bool:
    """``org/name``: what a Hugging Face hub id looks like (it may also be a relative path)."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", text)) and not text.startswith(".")


def not_found(text: str, what: str = "checkpoint folder") -> FileNotFoundError:
    """``<text>: no such <what>``, suggesting ``hf:<text>`` when it looks like a hub id."""
    hint = f" (for the Hugging Face hub model {text!r}, write hf:{text})" if looks_like_hub_id(text) else ""
    return FileNotFoundError(f"{text}: no such {what}{hint}")


def resolve_path(spec: str | Path) -> Path:
    """A local checkpoint folder.  ``hf:<folder>`` is one too, and ``hf:<org/name>`` naming no
    local folder is fetched from the Hugging Face hub (``download_from_hub``); without the
    ``hf:`` prefix nothing is ever downloaded: a missing path is an error."""
    text = str(spec)
    hub = text.startswith("hf:")
    text = text[3:] if hub else text
    if is_remote(text):  # hf:gs://bucket/model: a local copy, made once (safetensors are memory-mapped)
        return local_copy(text)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path}: expected a folder with config.json and *.safetensors")
    if not hub:
        raise not_found(text)
    if not looks_like_hub_id(text):
        raise FileNotFoundError(f"hf:{text}: no such folder, and not a hub id (org/name)")
    return download_from_hub(text)


def download_from_hub(repo_id: str) -> Path:
    """The local snapshot of hub model ``repo_id`` (config, safetensors, tokenizer files)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"hf:{repo_id}: no such folder, and huggingface_hub is not installed to fetch "
                                "it from the hub (pip install huggingface_hub, or download it first)") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # noqa: BLE001 - network / hub errors of many types: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"hf:{repo_id}: cannot fetch it from the Hugging Face hub: {first}") from None


def read_hf_config(directory: str | Path) -> dict:
    """``config.json`` of an HF folder; errors (not JSON, not an object, no model_type) name the file."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json")
    config = read_json(path, "config.json")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise FileFormatError(f"{path}: no 'model_type' (is this a Hugging Face model's config.json?)")
    return config


def _config_error(directory: str | Path, e: Exception) -> FileFormatError:
    """A family's complaint about ``config.json`` (or a malformed value in it), naming the file."""
    msg = str(e).removeprefix("config.json: ") if isinstance(e, ValueError) else \
        f"unexpected value ({type(e).__name__}: {e})"
    return FileFormatError(f"{Path(directory) / 'config.json'}: {msg}")


def _family(directory: str | Path, hf_config: dict) -> Family:
    try:
        return family_for_hf(hf_config)
    except ValueError as e:
        raise _config_error(directory, e) from None


def _model_config(directory: str | Path, hf_config: dict) -> ModelConfig:
    try:
        return hf_config_to_model_config(hf_config)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise _config_error(directory, e) from None


def hf_config_to_model_config(hf_config: dict) -> ModelConfig:
    """HF ``config.json`` (as a dict) -> jaxft ``ModelConfig``; ``ValueError`` names the
    unsupported field and value."""
    return family_for_hf(hf_config).to_model_config(hf_config)


def model_config_to_hf_config(cfg: ModelConfig, *, model_type: str | None = None,
                              dtype: str | None = None) -> dict:
    """jaxft ``ModelConfig`` -> HF ``config.json`` dict (``ValueError`` if HF cannot express it)."""
    family = family_for_model(cfg, model_type)
    out: dict[str, Any] = {"architectures": [family.architecture], "model_type": family.model_type}
    out.update(family.to_hf_config(cfg))
    out["dtype"] = _dtype_name(dtype or cfg.param_dtype)
    return out


def _dtype_name(dtype: Any) -> str:
    name = jnp.dtype(dtype).name
    if name not in _PARAM_DTYPES:
        raise ValueError(f"dtype: {name!r} is not a parameter dtype; use one of {', '.join(_PARAM_DTYPES)}")
    return name


def path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path)


# --------------------------------------------------------------------------- import


def abstract_params(cfg: ModelConfig, mesh: Mesh | None = None) -> tuple[list, dict[str, NamedSharding]]:
    """``(flat abstract Param state, {path: NamedSharding})`` of ``build_model(cfg)``; no memory used."""
    if mesh is None:
        _, params, _ = nnx.split(abstract_model(cfg), nnx.Param, ...)
        return list(nnx.to_flat_state(params)), {}
    with use_mesh(mesh):
        _, params, _ = nnx.split(abstract_model(cfg), nnx.Param, ...)
        specs = nnx.get_partition_spec(params)
    flat = list(nnx.to_flat_state(params))
    shardings = {path_str(p): NamedSharding(mesh, fit_spec(s.get_value(), v.shape, mesh))
                 for (p, v), (_, s) in zip(flat, nnx.to_flat_state(specs))}
    return flat, shardings


def _present(name: str, reader: CheckpointReader, family: Family) -> bool:
    return name in reader or any(name.startswith(p) and name[len(p):] in reader
                                 for p in ("model.", *family.base_prefixes))


def _hf_shape(t: Tensor, abstract: dict[str, Any]) -> tuple[int, ...] | None:
    """The shape ``t.to_hf`` gives for our parameters' shapes (the HF tensor's expected
    shape), computed on zero-stride arrays; None if it cannot be worked out."""
    try:
        zeros = [np.broadcast_to(np.zeros((), np.uint8), abstract[p].shape) for p in t.ours]
        return tuple(np.shape(t.to_hf(*zeros)))
    except Exception:  # noqa: BLE001 - the check after to_ours still applies
        return None


def _read_tensor(t: Tensor, name: str, reader: CheckpointReader, abstract: dict[str, Any]) -> tuple:
    """The HF tensor ``name`` in our layout(s); a wrong shape names the file, tensor and both shapes."""
    arr, file = reader.get(name), reader.files[name]
    want = _hf_shape(t, abstract)
    if want is not None and tuple(arr.shape) != want:
        raise ValueError(f"{file}: tensor {name!r} has shape {list(arr.shape)} but the model of config.json "
                         f"needs {list(want)} (config.json and weights disagree)")
    try:
        parts = t.to_ours(arr)
    except ValueError as e:  # a reshape that cannot fit, or a check of its values
        raise ValueError(f"{file}: tensor {name!r} (shape {list(arr.shape)}): {e}") from None
    for path, part in zip(t.ours, parts):
        if part.shape != abstract[path].shape:
            raise ValueError(f"{file}: tensor {name!r} of shape {list(arr.shape)} does not fit "
                             f"{path} {list(abstract[path].shape)} (config.json and weights disagree)")
    return parts


def _read_on_device(t: Tensor, name: str, reader: CheckpointReader, want: Any,
                    sharding: NamedSharding | None) -> jax.Array:
    """A layout-only tensor (``Tensor.layout``): the HF array goes to the device as stored
    (e.g. bfloat16, contiguous) and is transposed, reshaped and cast there by one compiled
    function per layout and shape, output on its sharding.  On a CPU this is 3-5x faster
    than numpy's strided transpose and cast, and the host holds only the stored bytes."""
    arr, file = reader.get(name), reader.files[name]
    expected = _hf_shape(t, {t.ours[0]: want})
    if expected is None or tuple(arr.shape) != expected:
        return place(np.asarray(_read_tensor(t, name, reader, {t.ours[0]: want})[0], dtype=want.dtype), sharding)
    fn = layout_fn(t, tuple(arr.shape), np.dtype(arr.dtype).name, np.dtype(want.dtype).name, sharding)
    if sharding is None:
        out = fn(place(arr, None))
    else:  # each device gets the stored slice its output slice comes from: no communication
        out = fn(place(arr, stored_sharding(t.layout, sharding, len(want.shape), arr.ndim)))
    if out.shape != want.shape:  # a family mapping bug: the shape check above said it fits
        raise ValueError(f"{file}: tensor {name!r} of shape {list(arr.shape)} does not fit "
                         f"{t.ours[0]} {list(want.shape)} (config.json and weights disagree)")
    return out


def _hf_name(name: str, reader: CheckpointReader, family: Family) -> str:
    if name in reader:
        return name
    for prefix in ("model.", *family.base_prefixes):  # headless checkpoints (saved from *Model)
        if name.startswith(prefix) and name[len(prefix):] in reader:
            return name[len(prefix):]
    raise ValueError(f"{reader.directory}: checkpoint has no tensor {name!r} (the config.json says it should)")


def load_hf_params(directory: str | Path, cfg: ModelConfig, *, mesh: Mesh | None = None,
                   hf_config: dict | None = None) -> nnx.State:
    """The HF checkpoint in ``directory`` as the Param state of ``build_model(cfg)``."""
    directory = Path(directory)
    hf_config = hf_config if hf_config is not None else read_hf_config(directory)
    family = _family(directory, hf_config)
    flat, shardings = abstract_params(cfg, mesh)
    abstract = {path_str(p): v for p, v in flat}
    tensors = family.tensors(cfg)
    covered = [p for t in tensors for p in t.ours]
    if sorted(covered) != sorted(abstract):  # a family mapping bug, not a user error
        missing, extra = set(abstract) - set(covered), set(covered) - set(abstract)
        raise AssertionError(f"{family.model_type} mapping does not match the model: "
                             f"unmapped {sorted(missing)[:5]}, unknown {sorted(extra)[:5]}")
    reader = CheckpointReader(directory)
    values: dict[str, jax.Array] = {}
    used: set[str] = set()
    for t in tensors:
        if not _present(t.hf, reader, family):
            if t.optional:
                continue
            if t.fallback is not None and _present(t.fallback, reader, family):
                t = dataclasses.replace(t, hf=t.fallback)
        name = _hf_name(t.hf, reader, family)
        used.add(name)
        if t.layout is not None and len(t.ours) == 1 and (jax.process_count() == 1 or t.ours[0] in shardings):
            values[t.ours[0]] = _read_on_device(t, name, reader, abstract[t.ours[0]], shardings.get(t.ours[0]))
            continue
        parts = _read_tensor(t, name, reader, abstract)
        for path, part in zip(t.ours, parts):
            values[path] = place(np.asarray(part, dtype=abstract[path].dtype), shardings.get(path))
        del parts
    ignorable = [re.compile(r) for r in family.ignorable]
    unused = [k for k in reader.keys() if k not in used and not _IGNORABLE.search(k)
              and not (k == "lm_head.weight" and cfg.tie_embeddings) and not any(r.search(k) for r in ignorable)]
    if unused:
        raise ValueError(f"{directory}: checkpoint tensors with no place in the model "
                         f"(an option this importer does not support?): {unused[:5]}")
    return nnx.from_flat_state([(p, v.replace(values[path_str(p)])) for p, v in flat])


def load_hf(path_or_id: str | Path, *, dtype: Any = None, mesh: Mesh | None = None,
            ) -> tuple[ModelConfig, nnx.State]:
    """``(ModelConfig, Param state)`` of an HF checkpoint folder (or ``hf:<org/name>`` hub id).

    ``dtype`` sets ``param_dtype`` (default float32: master weights for
    finetuning); the compute ``dtype`` keeps ModelConfig's default.  With a
    ``mesh`` every parameter lands on its sharding directly.
    """
    directory = resolve_path(path_or_id)
    hf_config = read_hf_config(directory)
    cfg = _model_config(directory, hf_config)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, param_dtype=_dtype_name(dtype))
    return cfg, load_hf_params(directory, cfg, mesh=mesh, hf_config=hf_config)


def init_params_from(spec: str, cfg: ModelConfig, mesh: Mesh | None) -> nnx.State:
    """``model.init_from: "hf:<folder or org/name>"`` -> the Param state for ``cfg`` (its
    ``param_dtype``, sharded over ``mesh``).  The checkpoint's architecture must match ``cfg``."""
    if not isinstance(spec, str) or not spec.startswith("hf:"):
        raise ValueError(f"model.init_from: expected 'hf:<folder or org/name>', got {spec!r}")
    directory = resolve_path(spec)
    hf_config = read_hf_config(directory)
    loaded = _model_config(directory, hf_config)

    def arch(c: ModelConfig) -> dict:
        c = dataclasses.replace(c, n_kv_heads=c.kv_heads, head_dim=c.dim_per_head)
        return {k: v for k, v in dataclasses.asdict(c).items() if k not in _NOT_ARCHITECTURE}

    want, got = arch(cfg), arch(loaded)
    diff = [k for k in want if want[k] != got[k]]
    if diff:
        k = diff[0]
        raise ValueError(f"model.{k}: the config says {want[k]!r} but {spec} has {got[k]!r} "
                         f"(mismatched: {', '.join('model.' + d for d in diff)})")
    return load_hf_params(directory, cfg, mesh=mesh, hf_config=hf_config)


# --------------------------------------------------------------------------- export


def _export_shape(t: Tensor, flat: dict[str, Any]) -> tuple[int, ...]:
    """The shape of ``t``'s HF tensor for our parameters' shapes, without computing it."""
    shapes = [tuple(flat[p].shape) for p in t.ours]
    try:
        return tuple(jax.eval_shape(t.to_hf, *(jax.ShapeDtypeStruct(s, np.float32) for s in shapes)).shape)
    except Exception:  # noqa: BLE001 - a numpy-only mapping: zero-stride arrays cost no memory
        return tuple(np.shape(t.to_hf(*(np.broadcast_to(np.zeros((), np.float32), s) for s in shapes))))


def save_hf(cfg: ModelConfig, state: nnx.State, out_dir: str | Path, *, tokenizer_path: str | Path | None = None,
            max_shard_size: int | str = "2GB", dtype: Any = None, model_type: str | None = None,
            extra_config: dict | None = None) -> Path:
    """Write ``state`` (the Param state of ``build_model(cfg)``) as an HF checkpoint folder.

    ``dtype``: stored dtype (default ``cfg.param_dtype``).  ``model_type`` forces
    the HF family (default: inferred from ``cfg``).  ``extra_config`` adds
    ``config.json`` fields (token ids...); with a ``tokenizer_path`` (a
    SentencePiece ``.model`` or an HF tokenizer folder) its files are copied and
    its bos/eos/pad ids written.  Every process must call this (arrays are
    gathered one at a time); only process 0 writes.
    """
    from jaxft.interop.hf_tokenizer import copy_tokenizer, special_token_ids

    out_dir = Path(out_dir)
    family = family_for_model(cfg, model_type)
    config = model_config_to_hf_config(cfg, model_type=family.model_type, dtype=dtype)
    np_dtype = jnp.dtype(config["dtype"])
    if tokenizer_path is not None:
        config.update(special_token_ids(tokenizer_path))
    config.update(extra_config or {})
    flat = {path_str(p): v for p, v in nnx.to_flat_state(state)}
    tensors = family.tensors(cfg)
    covered = {p for t in tensors for p in t.ours}
    if covered != set(flat):
        raise ValueError(f"state does not match model config: missing {sorted(covered - set(flat))[:5]}, "
                         f"unexpected {sorted(set(flat) - covered)[:5]}")

    def on_device(t):  # a layout-only tensor's transpose and cast, dispatched on its devices (async)
        value = flat[t.ours[0]] if len(t.ours) == 1 else None
        value = value.get_value() if isinstance(value, nnx.Variable) else value
        if t.layout is not None and isinstance(value, jax.Array):
            return export_fn(t, tuple(value.shape), np.dtype(value.dtype).name, np.dtype(np_dtype).name)(value)
        return None

    # shapes first: the files' headers are written before their tensors are gathered one at a time
    by_name = {t.hf: t for t in tensors}
    specs = [(t.hf, _export_shape(t, flat), np.dtype(np_dtype)) for t in tensors]
    order = stream_order(specs, max_shard_size)
    after = dict(zip(order, order[1:]))
    started: dict[str, Any] = {}

    def host(name):
        """The finished HF array; the next tensor's device work starts first, so that it runs while
        this one is gathered and written.  Every process calls this in `order` (the gathers)."""
        if (following := after.get(name)) is not None:
            started[following] = on_device(by_name[following])
        t = by_name[name]
        value = started.pop(name) if name in started else on_device(t)
        if value is not None:
            return np.asarray(to_host(value), dtype=np_dtype)
        return np.asarray(t.to_hf(*(to_host(flat[p]) for p in t.ours)), dtype=np_dtype)

    if jax.process_index() != 0:
        for name in order:  # take part in the gathers, in the writer's order
            host(name)
        return out_dir
    write_sharded_stream(specs, host, out_dir, max_shard_size)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer_path is not None:
        copy_tokenizer(tokenizer_path, out_dir, model_type=family.model_type, max_length=cfg.max_seq_len)
    return out_dir
