"""`jaxft export RUN_DIR OUT`: a run's model as a standalone checkpoint folder.

The run dir is opened read-only (`restore_model`); `which` is `latest`, `best`
or a step number.  By default LoRA adapters are merged into the kernels (the
export is a plain model of the run's family); a sparse or composed run is
exported as the finished parameters.  Formats:

- `jaxft`: `params/` + `model.yaml` (+ `tokenizer/`), the layout `jaxft convert`
  writes: usable as `jaxft compose` / `jaxft diff` input or `model.init_from`;
- `hf`: config.json + safetensors (+ tokenizer files) that `transformers` loads.

With `adapter=True` only what the run trained is written, never the base:

- LoRA, `hf`: an HF PEFT folder (adapter_config.json + adapter_model.safetensors)
  for `peft.PeftModel.from_pretrained` on the HF base (`model.init_from`);
- LoRA, `jaxft`: the run's adapter folder (adapter.json + adapter.safetensors, the
  PEFT folder in `peft/`), as training writes it to `<run_dir>/adapter/`;
- LT-SFT, `jaxft`: the sparse diff theta - theta0 (diff.json + diff.safetensors), as
  training writes it to `<run_dir>/sparse_diff/`; it has no HF format.

The output goes through `jaxft.outputs.safe_output`: written next to its final
path and renamed into place, so a failed export leaves nothing half-written; an
OUT that is, contains or lies inside the run dir (or the tokenizer it reads) is
refused, as is an existing OUT unless `overwrite`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
from flax import nnx

from jaxft.outputs import check_output, is_main_process, safe_output
from jaxft.paths import as_path, is_remote, local_copy
from jaxft.runs.model import read_run_config, restore_model
from jaxft.runs.layout import RunDir

FORMATS = ("jaxft", "hf")


def plain_params(model: nnx.Module) -> nnx.State:
    """The model's parameters with every LoRA adapter merged into its kernel and removed."""
    from jaxft.peft.lora import adapters, merge_lora

    if any(True for _ in adapters(model)):
        merge_lora(model, drop=True)
    return nnx.state(model, nnx.Param)


def run_checkpoint(run_dir: str | Path, which: str | int = "latest"):
    """A run dir's model as a `jaxft.peft.compose.Checkpoint` (LoRA merged), opened read-only:
    what `jaxft compose` / `jaxft diff` take when given a run dir."""
    from jaxft.peft.compose import Checkpoint

    restored = restore_model(as_path(run_dir), which)
    return Checkpoint("run", as_path(run_dir), restored.config.model, plain_params(restored.model()))


def checkpoint_or_path(path: str | Path):
    """A run dir opens read-only as its restored model; other folders are returned as they are
    (read by jaxft.peft.compose)."""
    return run_checkpoint(path) if RunDir(path).is_run() else path


def export_run(run_dir: str | Path, out: str | Path, *, which: str | int = "latest", fmt: str = "jaxft",
               adapter: bool = False, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write the run's model (or, with `adapter`, only its LoRA adapter / sparse diff) to
    `out` in `fmt`; returns `out`."""
    if fmt not in FORMATS:
        raise ValueError(f"export: --format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    run_dir, out = as_path(run_dir), as_path(out)  # RUN_DIR may be a URL (gs://); OUT is written locally
    if is_remote(out):
        raise ValueError(f"export: OUT {out}: write it to a local folder, then copy it (gcloud storage cp -r)")
    check_output(out, [run_dir], overwrite=overwrite, flag="OUT")  # before the (slow) restore
    if adapter:
        _check_adapter(read_run_config(run_dir), run_dir, fmt)
    restored = restore_model(run_dir, which)
    cfg = restored.config
    extended = cfg.data.tokenizer.extend and RunDir(run_dir).tokenizer.is_file()  # the run's grown copy
    tokenizer = None if extended else (cfg.data.tokenizer.path or None)
    tok_path = RunDir(run_dir).tokenizer if tokenizer is None else as_path(tokenizer.removeprefix("hf:"))
    tok_path = local_copy(tok_path) if is_remote(tok_path) and tok_path.exists() else tok_path
    if adapter:
        with safe_output(out, [run_dir], overwrite=overwrite, flag="OUT") as tmp:
            _write_adapter(tmp, restored, fmt)
        return out
    params = plain_params(restored.model())
    with safe_output(out, [run_dir, tok_path], overwrite=overwrite, flag="OUT") as tmp:
        _write(tmp, cfg, params, tok_path, fmt, dtype)
    return out


def write_chat_template(folder: Path, setting: str | None) -> None:
    """The run's ``data.chat_template`` (a built-in name or a Jinja string) as the exported HF
    folder's chat template: ``chat_template.jinja`` (transformers >= 4.43) and the
    ``chat_template`` of ``tokenizer_config.json`` (older readers), so ``apply_chat_template``
    renders what the model was trained on.  Unset: the tokenizer's own, copied with it."""
    if not setting:
        return
    from jaxft.data.chat import BUILTIN_TEMPLATES

    source = BUILTIN_TEMPLATES.get(setting, setting)
    (folder / "chat_template.jinja").write_text(source, encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        data["chat_template"] = source
        config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_adapter(cfg, run_dir: Path, fmt: str) -> None:
    """Refuse `--adapter` where there is nothing (or no format) to write, before the restore."""
    method = cfg.peft.method
    if method not in ("lora", "sparse"):
        raise ValueError(f"export --adapter: {run_dir} trained with peft.method {method} (no adapter or "
                         "sparse diff to write); export the model without --adapter")
    if method == "sparse" and fmt == "hf":
        raise ValueError(f"export --adapter: {run_dir} is an LT-SFT run; its sparse diff has no Hugging Face "
                         "format (use --format jaxft, or export the model without --adapter)")


def _write_adapter(tmp: Path, restored, fmt: str) -> None:
    """The trained LoRA adapter (HF PEFT or jaxft) or the sparse diff of `restored`, into `tmp`."""
    cfg = restored.config
    if cfg.peft.method == "sparse":
        from jaxft.peft.sparse import save_diff

        theta0 = theta0_params(cfg)
        mask = jax.tree.map(lambda a, b: a != b, restored.params, theta0)  # the entries phase 2 moved
        save_diff(tmp, restored.params, theta0, mask, cfg.peft.sparse)
        return
    from jaxft.peft.lora import save_adapter

    if fmt == "jaxft":
        save_adapter(tmp, restored.model(), cfg.peft.lora, cfg.model)
        return
    staged = tmp / ".jaxft-adapter"
    save_adapter(staged, restored.model(), cfg.peft.lora, cfg.model)
    if is_main_process():
        meta = json.loads((staged / "adapter.json").read_text())
        if not meta.get("peft"):
            raise ValueError(f"export --adapter --format hf: no HF PEFT form for this adapter: "
                             f"{meta.get('peft_skipped')} (use --format jaxft)")
        for item in (staged / "peft").iterdir():
            item.rename(tmp / item.name)
        shutil.rmtree(staged)


def theta0_params(cfg) -> nnx.State:
    """The trainable parameters a run started from (fresh init, `model.init_from`, `peft.compose`)."""
    from jaxft.peft.methods import method_for
    from jaxft.runs.model import init_variables, start_from
    from jaxft.sharding import make_mesh, use_mesh

    method = method_for(cfg.peft, cfg.train, cfg.model)
    mesh = make_mesh(cfg.mesh)
    with use_mesh(mesh):
        model = nnx.merge(*init_variables(cfg, method, mesh))
        start_from(model, cfg, mesh)
        return nnx.split(model, method.trainable_filter(), ...)[1]


def _write(tmp: Path, cfg, params: nnx.State, tok_path: Path, fmt: str, dtype: str | None) -> None:
    from jaxft.interop import convert
    from jaxft.interop.hf import save_hf

    if fmt == "hf":
        save_hf(cfg.model, params, tmp, tokenizer_path=tok_path if tok_path.exists() else None, dtype=dtype)
        if is_main_process():
            write_chat_template(tmp, cfg.data.chat_template)
        return
    convert.save_params(tmp / convert.PARAMS, params)
    if is_main_process():
        convert.write_model_yaml(tmp / convert.MODEL_YAML, cfg.model)
        if tok_path.is_file():
            (tmp / convert.TOKENIZER).mkdir(exist_ok=True)
            shutil.copyfile(tok_path, tmp / convert.TOKENIZER / tok_path.name)
