"""`jaxft export RUN_DIR OUT`: a run's model as a standalone checkpoint folder.

The run dir is opened read-only (`restore_model`).  LoRA adapters are merged
into the kernels (the export is a plain model of the run's family); a sparse
or composed run is exported as the finished parameters.  Formats:

- `jaxft`: `params/` + `model.yaml` (+ `tokenizer/`), the layout `jaxft convert`
  writes: usable as `jaxft compose` / `jaxft diff` input or `model.init_from`;
- `hf`: config.json + safetensors (+ tokenizer files) that `transformers` loads.

The output goes through `jaxft.outputs.safe_output`: written next to its final
path and renamed into place, so a failed export leaves nothing half-written; an
OUT that is, contains or lies inside the run dir (or the tokenizer it reads) is
refused, as is an existing OUT unless `overwrite`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from flax import nnx

from jaxft.outputs import check_output, is_main_process, safe_output
from jaxft.runs.model import restore_model
from jaxft.runs.layout import RunDir

FORMATS = ("jaxft", "hf")


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


def checkpoint_or_path(path: str | Path):
    """A run dir opens read-only as its restored model; other folders are returned as they are
    (read by jaxft.peft.compose)."""
    return run_checkpoint(path) if RunDir(Path(path)).is_run() else path


def export_run(run_dir: str | Path, out: str | Path, *, which: str = "latest", fmt: str = "jaxft",
               dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write the run's model to `out` in `fmt`; returns `out`."""
    if fmt not in FORMATS:
        raise ValueError(f"export: --format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    run_dir, out = Path(run_dir), Path(out)
    check_output(out, [run_dir], overwrite=overwrite, flag="OUT")  # before the (slow) restore
    restored = restore_model(run_dir, which)
    cfg = restored.config
    params = plain_params(restored.model())
    tokenizer = cfg.data.tokenizer.path or None
    tok_path = RunDir(run_dir).tokenizer if tokenizer is None else Path(tokenizer.removeprefix("hf:"))
    with safe_output(out, [run_dir, tok_path], overwrite=overwrite, flag="OUT") as tmp:
        _write(tmp, cfg, params, tok_path, fmt, dtype)
    return out


def _write(tmp: Path, cfg, params: nnx.State, tok_path: Path, fmt: str, dtype: str | None) -> None:
    from jaxft.interop import convert
    from jaxft.interop.hf import save_hf

    if fmt == "hf":
        save_hf(cfg.model, params, tmp, tokenizer_path=tok_path if tok_path.exists() else None, dtype=dtype)
        return
    convert.save_params(tmp / convert.PARAMS, params)
    if is_main_process():
        convert.write_model_yaml(tmp / convert.MODEL_YAML, cfg.model)
        if tok_path.is_file():
            (tmp / convert.TOKENIZER).mkdir(exist_ok=True)
            shutil.copyfile(tok_path, tmp / convert.TOKENIZER / tok_path.name)
