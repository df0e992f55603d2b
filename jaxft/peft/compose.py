"""Composing fine-tunings: sparse diffs and LoRA adapters added to a base model.

- `compose_into(model, specs)`: what the trainer does with `peft.compose`
  ("path" or "path*scale"; a sparse diff dir has diff.json, a LoRA adapter dir
  has adapter.json).
- `compose_checkpoint(base, items, out)`: `jaxft compose`; BASE is a jaxft folder
  (`jaxft convert hf-to-jaxft`: params/ + model.yaml) or an HF folder
  (config.json + safetensors), and the result is written in the same format.
  Both write through `jaxft.outputs.safe_output`: OUT may not be, contain or lie
  inside an input, and an existing OUT is replaced only with `overwrite`.
- `diff_checkpoints(finetuned, base, out, sparse_k)`: `jaxft diff`; fine-tuning
  transfer vectors delta = finetuned - base, dense or the top-K entries by
  |delta|, in `save_diff`'s format, so `jaxft compose` (or `peft.compose`)
  applies them, with a scale, to any base of the same architecture.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import jax
from flax import nnx

from jaxft.config.schema import ModelConfig, SparseConfig
from jaxft.outputs import safe_output
from jaxft.paths import as_path, is_remote, local_copy
from jaxft.peft import sparse

ADAPTER_JSON = "adapter.json"


def parse_spec(spec: str) -> tuple[str, float]:
    """"path", "path*0.5" or "path * 0.5" -> (path, scale)."""
    head, star, tail = spec.rpartition("*")
    if star:
        try:
            return head.strip(), float(tail.strip())
        except ValueError:
            pass
    return spec.strip(), 1.0


def _apply_one(model: nnx.Module, path: str, scale: float, where: str) -> None:
    # a diff / adapter on gs:// is read through a local copy (safetensors reads local files)
    p = local_copy(path) if is_remote(path) and as_path(path).exists() else as_path(path)
    if sparse.is_diff_dir(p):
        try:
            sparse.apply_diff(model, sparse.load_diff(p), scale)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{where}: {path}: {e}") from e
    elif (p / ADAPTER_JSON).is_file():
        from jaxft.peft.lora import merge_adapter_dir_into

        try:
            merge_adapter_dir_into(model, p, scale)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{where}: {path}: {e}") from e
    elif not p.exists():
        raise FileNotFoundError(f"{where}: {path} does not exist")
    else:
        raise ValueError(f"{where}: {path} is neither a sparse diff (no {sparse.DIFF_JSON}) nor a LoRA "
                         f"adapter (no {ADAPTER_JSON})")


def compose_into(model: nnx.Module, specs: Sequence[str], *, key: str = "peft.compose") -> nnx.Module:
    """Add every diff / adapter in `specs` to `model` (in place), in order."""
    for i, spec in enumerate(specs):
        path, scale = parse_spec(spec)
        _apply_one(model, path, scale, f"{key}[{i}]")
    return model


# --------------------------------------------------------------------------- checkpoints (CLI)


@dataclasses.dataclass
class Checkpoint:
    kind: str  # "jaxft" | "hf" | "run" (a run dir's restored model; written back as a jaxft folder)
    path: Path
    cfg: ModelConfig
    params: nnx.State


def load_checkpoint(path: str | Path) -> Checkpoint:
    from jaxft.interop import convert

    path = Path(path)
    if (path / convert.MODEL_YAML).is_file() and (path / convert.PARAMS).is_dir():
        cfg = convert.read_model_yaml(path / convert.MODEL_YAML)
        return Checkpoint("jaxft", path, cfg, convert.restore_params(path / convert.PARAMS, cfg))
    if (path / "config.json").is_file():
        from jaxft.interop.hf import load_hf

        cfg, params = load_hf(path)
        return Checkpoint("hf", path, cfg, params)
    raise FileNotFoundError(f"{path}: not a jaxft folder (model.yaml + params/) nor an HF folder (config.json)")


def save_checkpoint(like: Checkpoint, params: nnx.State, out: str | Path) -> Path:
    """Write `params` in `like`'s format into the folder `out` (which exists: `safe_output`'s
    temporary folder), carrying its config and tokenizer files along."""
    from jaxft.interop import convert

    out = Path(out)
    if like.kind in ("run", "jaxft"):  # a run dir's model (`jaxft.runs.export.run_checkpoint`) -> a jaxft folder
        convert.save_params(out / convert.PARAMS, params)
        if jax.process_index() != 0:
            return out
        if like.kind == "run":
            convert.write_model_yaml(out / convert.MODEL_YAML, like.cfg)
            return out
        shutil.copyfile(like.path / convert.MODEL_YAML, out / convert.MODEL_YAML)
        for name in (convert.HF_CONFIG, convert.TOKENIZER):
            src = like.path / name
            if src.is_dir():
                shutil.copytree(src, out / name, dirs_exist_ok=True)
            elif src.is_file():
                shutil.copyfile(src, out / name)
        return out
    from jaxft.interop.hf import read_hf_config, save_hf
    from jaxft.interop.hf_tokenizer import TOKENIZER_FILES

    hf = read_hf_config(like.path)
    extra = {k: hf[k] for k in convert._PASSTHROUGH if hf.get(k) is not None}
    dtype = hf.get("torch_dtype") or hf.get("dtype")
    tokenizer = like.path if any((like.path / n).is_file() for n in TOKENIZER_FILES) else None
    return save_hf(like.cfg, params, out, tokenizer_path=tokenizer, model_type=hf.get("model_type"),
                   extra_config=extra, dtype=dtype if dtype in ("float32", "bfloat16") else None)


def _model_from(ckpt: Checkpoint) -> nnx.Module:
    from jaxft.models.registry import abstract_model, build_model

    abstract = abstract_model(ckpt.cfg)
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):  # non-parameter variables need real values
        model = build_model(ckpt.cfg, rngs=nnx.Rngs(0))
        nnx.update(model, ckpt.params)
        return model
    return nnx.merge(graphdef, ckpt.params, rest)


def _source(c: str | Path | Checkpoint) -> Path:
    return c.path if isinstance(c, Checkpoint) else Path(c)


def compose_inputs(base: str | Path | Checkpoint, items: Sequence[str]) -> list[Path]:
    """What `jaxft compose` reads: the base and every diff / adapter (`--out` may overlap none)."""
    return [_source(base)] + [Path(parse_spec(spec)[0]) for spec in items]


def compose_checkpoint(base: str | Path | Checkpoint, items: Sequence[str], out: str | Path, *,
                       revert: bool = False, overwrite: bool = False) -> Path:
    """`jaxft compose`: BASE + each item ("path[*scale]"), or minus each with `revert`, written
    to the new folder `out` (`jaxft.outputs.safe_output`: never over an input; an existing
    `out` only with `overwrite`)."""
    inputs = compose_inputs(base, items)
    with safe_output(out, inputs, overwrite=overwrite, flag="--out") as tmp:
        ckpt = base if isinstance(base, Checkpoint) else load_checkpoint(base)
        sign = -1.0 if revert else 1.0
        signed = []
        for spec in items:
            path, scale = parse_spec(spec)
            signed.append(f"{path}*{sign * scale!r}")
        model = compose_into(_model_from(ckpt), signed, key="compose")
        save_checkpoint(ckpt, nnx.state(model, nnx.Param), tmp)
    return Path(out)


def diff_checkpoints(finetuned: str | Path | Checkpoint, base: str | Path | Checkpoint, out: str | Path, *,
                     sparse_k: float | None = None, overwrite: bool = False) -> Path:
    """`jaxft diff`: finetuned - base, dense (default) or the top `sparse_k` entries by |delta|
    (a count >= 1 or a proportion < 1 of all entries), written to the new folder `out`
    (`jaxft.outputs.safe_output`, as `compose_checkpoint`)."""
    with safe_output(out, [_source(finetuned), _source(base)], overwrite=overwrite, flag="--out") as tmp:
        ft, b = (c if isinstance(c, Checkpoint) else load_checkpoint(c) for c in (finetuned, base))
        _check_same_architecture(ft, b)
        if sparse_k is None:
            cfg = SparseConfig(k=0, dense=(".*",))
            mask = jax.tree.map(lambda x: True, ft.params)
        else:
            cfg = SparseConfig(k=sparse_k, mask_type="lt")
            mask = sparse.select_mask(ft.params, b.params, cfg, seed=0)
        sparse.save_diff(tmp, ft.params, b.params, mask, cfg)
        if jax.process_index() == 0:
            meta_path = tmp / sparse.DIFF_JSON
            meta: dict[str, Any] = json.loads(meta_path.read_text())
            meta.update(source={"finetuned": str(ft.path), "base": str(b.path)})
            meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return Path(out)


def _check_same_architecture(ft: Checkpoint, b: Checkpoint) -> None:
    ft_paths, ft_leaves, _ = sparse.flat_with_paths(ft.params)
    b_paths, b_leaves, _ = sparse.flat_with_paths(b.params)
    if ft_paths != b_paths or any(x.shape != y.shape for x, y in zip(ft_leaves, b_leaves)):
        bad = next((p for p, x, y in zip(ft_paths, ft_leaves, b_leaves) if x.shape != y.shape), None)
        raise ValueError(f"diff: {ft.path} and {b.path} are not the same architecture"
                         + (f" ({bad}: {ft_leaves[ft_paths.index(bad)].shape} vs "
                            f"{b_leaves[b_paths.index(bad)].shape})" if bad else ""))


def parse_compose_args(tokens: Sequence[str], add: Sequence[str]) -> tuple[str, list[str]]:
    """`BASE [+ DIFF [* SCALE]] ...` (also "DIFF*SCALE" as one token) plus `--add` items ->
    (base, ["path*scale", ...])."""
    if not tokens:
        raise ValueError("compose: BASE is required")
    base, rest = tokens[0], list(tokens[1:])
    items: list[str] = []
    i = 0
    while i < len(rest):
        if rest[i] != "+":
            raise ValueError(f"compose: expected '+' before {rest[i]!r} (usage: BASE + DIFF [* SCALE] ...)")
        if i + 1 >= len(rest):
            raise ValueError("compose: '+' must be followed by a diff or adapter path")
        spec, i = rest[i + 1], i + 2
        if i < len(rest) and rest[i] == "*":
            if i + 1 >= len(rest):
                raise ValueError(f"compose: '*' after {spec!r} must be followed by a scale")
            try:
                spec = f"{spec}*{float(rest[i + 1])!r}"
            except ValueError:
                raise ValueError(f"compose: scale {rest[i + 1]!r} for {spec!r} is not a number") from None
            i += 2
        items.append(spec)
    return base, items + list(add)
