"""`jaxft export RUN_DIR OUT`: a run's model as a standalone checkpoint folder.

The run dir is opened read-only (`restore_model`).  LoRA adapters are merged
into the kernels (the export is a plain model of the run's family); a sparse
or composed run is exported as the finished parameters.  Formats:

- `jaxft`: `params/` + `model.yaml` (+ `tokenizer/`), the layout `jaxft convert`
  writes: usable as `jaxft compose` / `jaxft diff` input or `model.init_from`;
- `hf`: config.json + safetensors (+ tokenizer files) that `transformers` loads.

The output is written next to its final path and renamed into place, so a
failed export leaves nothing half-written; an existing OUT is refused, as is an
OUT inside the run dir.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
from flax import nnx

from jaxft.runs.model import restore_model
from jaxft.runs.layout import RunDir

FORMATS = ("jaxft", "hf")


def check_output(out: Path, *inputs: Path) -> None:
    """An output path must be new and must not be (or lie inside) an input."""
    out = Path(out).resolve()
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose a new output path")
    for src in inputs:
        src = Path(src).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ValueError(f"{out}: the output may not be {src} or lie inside it (an input)")


def plain_params(model: nnx.Module) -> nnx.State:
    """The model's parameters with every LoRA adapter merged into its kernel and removed."""
    from jaxft.peft.lora import adapters, merge_lora

    if any(True for _ in adapters(model)):
        merge_lora(model, drop=True)
    return nnx.state(model, nnx.Param)


def run_checkpoint(run_dir: str | Path, which: str = "latest"):
    """A run dir's model as a `jaxft.peft.compose.Checkpoint` (LoRA merged), opened read-only:
    what `jaxft compose` / `jaxft diff` take when given a run dir."""
    from jaxft.peft.compose import Checkpoint

    restored = restore_model(Path(run_dir), which)
    return Checkpoint("run", Path(run_dir), restored.config.model, plain_params(restored.model()))


def export_run(run_dir: str | Path, out: str | Path, *, which: str = "latest", fmt: str = "jaxft",
               dtype: str | None = None) -> Path:
    """Write the run's model to `out` in `fmt`; returns `out`."""
    from jaxft.interop import convert
    from jaxft.interop.hf import save_hf

    if fmt not in FORMATS:
        raise ValueError(f"export: --format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    run_dir, out = Path(run_dir), Path(out)
    check_output(out, run_dir)
    restored = restore_model(run_dir, which)
    cfg = restored.config
    params = plain_params(restored.model())
    tokenizer = cfg.data.tokenizer.path or None
    tok_path = RunDir(run_dir).tokenizer if tokenizer is None else Path(tokenizer.removeprefix("hf:"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial"  # the same name on every process (writes are collective)
    if jax.process_index() == 0 and tmp.exists():
        shutil.rmtree(tmp)  # our own leftover of an interrupted export
    try:
        if fmt == "hf":
            save_hf(cfg.model, params, tmp, tokenizer_path=tok_path if tok_path.exists() else None, dtype=dtype)
        else:
            convert.save_params(tmp / convert.PARAMS, params)
            convert.write_model_yaml(tmp / convert.MODEL_YAML, cfg.model)
            if tok_path.is_file():
                (tmp / convert.TOKENIZER).mkdir(exist_ok=True)
                shutil.copyfile(tok_path, tmp / convert.TOKENIZER / tok_path.name)
        if jax.process_index() == 0:
            tmp.rename(out)
    except BaseException:
        if jax.process_index() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
