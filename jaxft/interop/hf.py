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

from jaxft.config.schema import ModelConfig
from jaxft.interop.families import Family, family_for_hf, family_for_model
from jaxft.interop.safetensors_io import CheckpointReader, write_sharded
from jaxft.models.registry import build_model
from jaxft.sharding import fit_spec, to_host, use_mesh

log = logging.getLogger(__name__)

_PARAM_DTYPES = ("float32", "bfloat16")
# Tensors some checkpoints carry that hold nothing we need.
_IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# Fields that change the parameters or the function they compute (init_params_from checks them).
_NOT_ARCHITECTURE = ("preset", "max_seq_len", "init_std", "param_dtype", "dtype", "remat", "init_from",
                     "decoder_start_id", "rope_scaling")


# --------------------------------------------------------------------------- paths and configs


def resolve_path(path_or_id: str | Path) -> Path:
    """A local checkpoint folder, or a hub id (``org/name``) fetched with huggingface_hub."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path}: expected a folder with config.json and *.safetensors")
    text = str(path_or_id)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", text) or text.startswith("."):
        raise FileNotFoundError(f"{text}: no such checkpoint folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{text}: no such folder, and huggingface_hub is not installed to fetch it "
                                "from the hub (pip install huggingface_hub, or download it first)") from None
    return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))


def read_hf_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json")
    return json.loads(path.read_text())


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

    def build():
        return build_model(cfg, rngs=nnx.Rngs(0))

    if mesh is None:
        _, params, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
        return list(nnx.to_flat_state(params)), {}
    with use_mesh(mesh):
        _, params, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
        specs = nnx.get_partition_spec(params)
    flat = list(nnx.to_flat_state(params))
    shardings = {path_str(p): NamedSharding(mesh, fit_spec(s.get_value(), v.shape, mesh))
                 for (p, v), (_, s) in zip(flat, nnx.to_flat_state(specs))}
    return flat, shardings


def _place(arr: np.ndarray, sharding: NamedSharding | None) -> jax.Array:
    if sharding is None:
        return jnp.asarray(arr)
    return jax.make_array_from_callback(arr.shape, sharding, lambda index: arr[index])


def _present(name: str, reader: CheckpointReader, family: Family) -> bool:
    return name in reader or any(name.startswith(p) and name[len(p):] in reader
                                 for p in ("model.", *family.base_prefixes))


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
    family = family_for_hf(hf_config)
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
        arr = reader.get(name)
        parts = t.to_ours(arr)
        for path, part in zip(t.ours, parts):
            want = abstract[path]
            if part.shape != want.shape:
                raise ValueError(f"{directory}: tensor {name!r} of shape {list(arr.shape)} does not fit "
                                 f"{path} {list(want.shape)} (config.json and weights disagree)")
            values[path] = _place(np.asarray(part, dtype=want.dtype), shardings.get(path))
        del arr, parts
    ignorable = [re.compile(r) for r in family.ignorable]
    unused = [k for k in reader.keys() if k not in used and not _IGNORABLE.search(k)
              and not (k == "lm_head.weight" and cfg.tie_embeddings) and not any(r.search(k) for r in ignorable)]
    if unused:
        raise ValueError(f"{directory}: checkpoint tensors with no place in the model "
                         f"(an option this importer does not support?): {unused[:5]}")
    return nnx.from_flat_state([(p, v.replace(values[path_str(p)])) for p, v in flat])


def load_hf(path_or_id: str | Path, *, dtype: Any = None, mesh: Mesh | None = None,
            ) -> tuple[ModelConfig, nnx.State]:
    """``(ModelConfig, Param state)`` of an HF checkpoint folder (or hub id).

    ``dtype`` sets ``param_dtype`` (default float32: master weights for
    finetuning); the compute ``dtype`` keeps ModelConfig's default.  With a
    ``mesh`` every parameter lands on its sharding directly.
    """
    directory = resolve_path(path_or_id)
    hf_config = read_hf_config(directory)
    cfg = hf_config_to_model_config(hf_config)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, param_dtype=_dtype_name(dtype))
    return cfg, load_hf_params(directory, cfg, mesh=mesh, hf_config=hf_config)


def init_params_from(spec: str, cfg: ModelConfig, mesh: Mesh | None) -> nnx.State:
    """``model.init_from: "hf:<folder or org/name>"`` -> the Param state for ``cfg`` (its
    ``param_dtype``, sharded over ``mesh``).  The checkpoint's architecture must match ``cfg``."""
    if not isinstance(spec, str) or not spec.startswith("hf:"):
        raise ValueError(f"model.init_from: expected 'hf:<folder or org/name>', got {spec!r}")
    directory = resolve_path(spec[3:])
    hf_config = read_hf_config(directory)
    loaded = hf_config_to_model_config(hf_config)

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

    def hf_tensors():
        for t in tensors:
            yield t.hf, np.asarray(t.to_hf(*(to_host(flat[p]) for p in t.ours)), dtype=np_dtype)

    if jax.process_index() != 0:
        for _ in hf_tensors():  # take part in the gathers
            pass
        return out_dir
    write_sharded(hf_tensors(), out_dir, max_shard_size)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer_path is not None:
        copy_tokenizer(tokenizer_path, out_dir, model_type=family.model_type, max_length=cfg.max_seq_len)
    return out_dir
