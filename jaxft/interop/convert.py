"""``jaxft convert``: HF checkpoint folder <-> jaxft folder.

A jaxft folder holds::

    model.yaml       the resolved ModelConfig as a ``model:`` section (``jaxft config show``
                     accepts it; use it as a ``base:`` of an experiment or a preset)
    params/          orbax checkpoint of the Param state (paths as in decoder.py's docstring)
    hf_config.json   the source config.json (token ids etc. carried back on export)
    tokenizer/       the source's tokenizer files, when it had any
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import yaml
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxft.config.schema import ModelConfig, to_dict
from jaxft.outputs import check_output, safe_output
from jaxft.interop.hf import abstract_params, load_hf, path_str, read_hf_config, resolve_path, save_hf
from jaxft.interop.hf_tokenizer import TOKENIZER_FILES
from jaxft.paths import absolute

MODEL_YAML, PARAMS, HF_CONFIG, TOKENIZER = "model.yaml", "params", "hf_config.json", "tokenizer"
_PASSTHROUGH = ("bos_token_id", "eos_token_id", "pad_token_id")


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def save_params(directory: str | Path, state: nnx.State) -> None:
    """Orbax checkpoint of a Param state (string keys: ``layers/0/attn/q/kernel``)."""
    import orbax.checkpoint as ocp

    tree = _nested({path_str(p): v.get_value() for p, v in nnx.to_flat_state(state)})
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(directory).absolute(), tree, force=True)


def restore_params(directory: str | Path, cfg: ModelConfig, mesh: Mesh | None = None) -> nnx.State:
    """The Param state of ``build_model(cfg)`` from ``save_params``' layout (sharded over ``mesh``)."""
    import orbax.checkpoint as ocp

    flat, shardings = abstract_params(cfg, mesh)
    default = NamedSharding(jax.sharding.Mesh(jax.devices()[:1], ("x",)), P())
    abstract = _nested({path_str(p): jax.ShapeDtypeStruct(v.shape, v.dtype,
                                                          sharding=shardings.get(path_str(p), default))
                        for p, v in flat})
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(absolute(directory), abstract)  # a URL (gs://) as it is

    def get(path: tuple) -> Any:
        node = tree
        for part in path:
            node = node[str(part)]
        return node

    return nnx.from_flat_state([(p, v.replace(get(p))) for p, v in flat])


def write_model_yaml(path: str | Path, cfg: ModelConfig) -> None:
    Path(path).write_text(yaml.safe_dump({"model": to_dict(cfg)}, sort_keys=False))


def read_model_yaml(path: str | Path) -> ModelConfig:
    from jaxft.config.loader import load_config

    return load_config(path).model


def hf_to_jaxft(src: str | Path, out: str | Path, *, dtype: Any = None,
                overwrite: bool = False) -> tuple[ModelConfig, Path]:
    """HF folder (or `hf:org/name`, a hub id) -> the new jaxft folder `out` (`jaxft.outputs.safe_output`: never
    over the source; an existing `out` only with `overwrite`).  Returns ``(cfg, out)``."""
    check_output(out, [_local(src)], overwrite=overwrite, flag="OUT")  # before a download
    directory = resolve_path(src)
    with safe_output(out, [_local(src), directory], overwrite=overwrite, flag="OUT") as tmp:
        cfg, state = load_hf(directory, dtype=dtype)
        save_params(tmp / PARAMS, state)
        if jax.process_index() == 0:
            write_model_yaml(tmp / MODEL_YAML, cfg)
            (tmp / HF_CONFIG).write_text(json.dumps(read_hf_config(directory), indent=2) + "\n")
            files = [n for n in TOKENIZER_FILES if (directory / n).is_file()]
            if files:
                (tmp / TOKENIZER).mkdir()
                for name in files:
                    shutil.copyfile(directory / name, tmp / TOKENIZER / name)
    return cfg, Path(out)


def _local(src: str | Path) -> Path | None:
    """`src` as a local path when it is one (not a hub id)."""
    return Path(src) if Path(src).expanduser().exists() else None


def jaxft_to_hf(src: str | Path, out: str | Path, *, dtype: Any = None, max_shard_size: int | str = "2GB",
                model_type: str | None = None, overwrite: bool = False) -> tuple[ModelConfig, Path]:
    """jaxft folder (``hf_to_jaxft``'s layout) -> the new HF folder `out` that ``transformers``
    loads (`jaxft.outputs.safe_output`, as `hf_to_jaxft`)."""
    src = Path(src)
    check_output(out, [src], overwrite=overwrite, flag="OUT")
    if not (src / MODEL_YAML).is_file() or not (src / PARAMS).is_dir():
        raise FileNotFoundError(f"{src}: expected {MODEL_YAML} and {PARAMS}/ (the layout `jaxft convert "
                                "hf-to-jaxft` writes)")
    cfg = read_model_yaml(src / MODEL_YAML)
    state = restore_params(src / PARAMS, cfg)
    extra = {}
    if (src / HF_CONFIG).is_file():
        hf = json.loads((src / HF_CONFIG).read_text())
        extra = {k: hf[k] for k in _PASSTHROUGH if hf.get(k) is not None}
        model_type = model_type or hf.get("model_type")
    tokenizer = src / TOKENIZER if (src / TOKENIZER).is_dir() else None
    with safe_output(out, [src], overwrite=overwrite, flag="OUT") as tmp:
        save_hf(cfg, state, tmp, tokenizer_path=tokenizer, max_shard_size=max_shard_size, dtype=dtype,
                model_type=model_type, extra_config=extra)
    return cfg, Path(out)


def describe(cfg: ModelConfig) -> str:
    return (f"d_model={cfg.d_model}, n_layers={cfg.n_layers}, n_heads={cfg.n_heads}, "
            f"vocab_size={cfg.vocab_size}, param_dtype={cfg.param_dtype}")
