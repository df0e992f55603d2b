"""A run's model: built from its config, started from theta0, restored for inference.

theta0 (the parameters a run starts from) is a pure function of the config:
fresh init by seed, then `model.init_from` (HF weights or another run), then
`peft.compose` (sparse diffs / adapters applied to the base).  It is recomputed
rather than stored, so PEFT checkpoints stay small.

`restore_model(run_dir, which)` returns graphdef + params + rest + config of a
run dir without building an optimizer, and opens the run dir read-only.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxft.config.schema import Config, ModelConfig
from jaxft.models.layer_init import CountedKeys
from jaxft.models.registry import build_model
from jaxft.models.scan import stack_layers, unstack_owned
from jaxft.paths import as_path
from jaxft.peft.methods import PeftMethod, method_for
from jaxft.runs.checkpoint import Checkpointer
from jaxft.runs.layout import RunDir
from jaxft.sharding import make_mesh, sharded_abstract, use_mesh

log = logging.getLogger(__name__)

SHAPE_FREE = ("preset", "init_from", "remat", "dropout", "attention_dropout",
              "activation_dropout", "dtype")  # model keys that do not change the parameters


def stores_stacked(cfg: Config) -> bool:
    """Whether the train state stores each stack of layers as one stacked array per parameter kind
    (`jaxft.models.scan.stack_layers`): with ``model.scan_layers``, unless the optimizer is
    Adafactor, whose factored moments and parameter scale are per tensor (stacked, they would
    span all layers); Adafactor runs keep per-layer storage and stack inside the step."""
    return bool(cfg.model.scan_layers) and cfg.optimizer.name != "adafactor"


def build_train_model(model_cfg: ModelConfig, method: PeftMethod, seed: int) -> nnx.Module:
    """The model as the run trains it: built from the config, then the PEFT method's tree surgery."""
    rngs = CountedKeys(seed)  # nnx.Rngs(seed)'s draws, cheap to trace
    return method.transform_model(build_model(model_cfg, rngs=rngs), rngs)  # type: ignore[arg-type]


def split_train_model(model_cfg: ModelConfig, method: PeftMethod, seed: int, *,
                      abstract: bool = False) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable, rest) of the train model; `abstract`: shapes only, nothing allocated."""
    def build():
        return build_train_model(model_cfg, method, seed)

    return nnx.split(nnx.eval_shape(build) if abstract else build(), method.trainable_filter(), ...)


def init_variables(cfg: Config, method: PeftMethod, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Sharded fresh init (no host holds the full parameters): (graphdef, trainable, rest)."""
    def fn():
        return split_train_model(cfg.model, method, cfg.train.seed)[1:]

    _, shardings = sharded_abstract(fn, mesh)
    params, rest = jax.jit(fn, out_shardings=shardings)()
    return split_train_model(cfg.model, method, cfg.train.seed, abstract=True)[0], params, rest


def start_from(model: nnx.Module, cfg: Config, mesh: Mesh) -> bool:
    """Turn a freshly initialised model into theta0, in place: `model.init_from`, then
    `peft.compose`.  Returns whether anything changed."""
    if cfg.model.init_from:
        nnx.update(model, params_from(cfg.model.init_from, cfg, mesh))
        log.info("initialised parameters from %s", cfg.model.init_from)
    if cfg.peft.compose:
        from jaxft.peft.compose import compose_into

        compose_into(model, cfg.peft.compose)
        log.info("composed into the base: %s", ", ".join(cfg.peft.compose))
    return bool(cfg.model.init_from or cfg.peft.compose)


def params_from(spec: str, cfg: Config, mesh: Mesh) -> nnx.State:
    """`model.init_from`: "hf:<folder or org/name>" (Hugging Face weights) or "run:<dir>": the
    newest checkpoint of another jaxft run (opened read-only; e.g. the base model a language or task
    adaptation starts from), or a jaxft folder (`params/` + `model.yaml`: what `jaxft export`,
    `jaxft convert` and `jaxft vocab` write).

    The source's vocabulary size may differ from `model.vocab_size` only with
    `data.tokenizer.extend` (its rows are then grown for the added pieces); otherwise the error
    names the value to set (a folder `jaxft vocab` grew or trimmed: docs/vocab.md)."""
    if spec.startswith("hf:"):
        from jaxft.interop.hf import hf_config_to_model_config, init_params_from, read_hf_config, resolve_path

        source = hf_config_to_model_config(read_hf_config(resolve_path(spec))).vocab_size
        state = init_params_from(spec, dataclasses.replace(cfg.model, vocab_size=source), mesh)
    elif spec.startswith("run:"):
        src_cfg, state = _jaxft_params(as_path(spec[4:]), mesh)  # run:gs://... too
        shape = lambda c: {k: v for k, v in vars(c).items() if k not in SHAPE_FREE + ("vocab_size",)}  # noqa: E731
        if shape(src_cfg) != shape(cfg.model):
            diff = [k for k in shape(cfg.model) if shape(cfg.model)[k] != shape(src_cfg)[k]]
            raise ValueError(f"model.init_from: {spec} has a different model ({', '.join('model.' + d for d in diff)})")
    else:
        raise ValueError(f"model.init_from: expected 'hf:<folder or org/name>' or 'run:<run dir>', got {spec!r} "
                         f"(write hf:{spec} for a Hugging Face folder or hub model, run:{spec} for a jaxft run dir)")
    return _fit_vocab(state, spec, cfg)


def _jaxft_params(path: Path, mesh: Mesh) -> tuple[ModelConfig, nnx.State]:
    """(model config, Param state) of a run dir (its newest checkpoint) or a jaxft folder."""
    if RunDir(path).is_run():
        base = restore_model(path, mesh=mesh)
        return base.config.model, nnx.state(base.model(), nnx.Param)
    from jaxft.interop import convert

    if not (path / convert.MODEL_YAML).is_file() or not (path / convert.PARAMS).is_dir():
        raise FileNotFoundError(f"model.init_from: run:{path} is neither a run dir (config.yaml) nor a jaxft "
                                f"folder ({convert.MODEL_YAML} + {convert.PARAMS}/)")
    src_cfg = convert.read_model_yaml(path / convert.MODEL_YAML)
    return src_cfg, convert.restore_params(path / convert.PARAMS, src_cfg, mesh)


def _fit_vocab(state: nnx.State, spec: str, cfg: Config) -> nnx.State:
    """`state` with `model.vocab_size` rows (`data.tokenizer.extend`), or an error naming the value to set."""
    from jaxft.models.embedding_resize import vocab_size_of

    source, want = vocab_size_of(state), cfg.model.vocab_size
    tcfg = cfg.data.tokenizer
    if tcfg.extend and tcfg.path:
        from jaxft.runs.tokenizer import configured_tokenizer
        from jaxft.runs.vocab_tokenizer import grow_for_extension, run_extension

        ext = run_extension(cfg.data, Path("."), configured_tokenizer(cfg.data, Path(".")))
        if ext.added or source != want:
            log.info("model.init_from: %d vocabulary rows -> %d (data.tokenizer.extend: %d pieces added, mean "
                     "init)", source, want, len(ext.added))
            return grow_for_extension(state, ext, want)
        return state
    if source != want:
        raise ValueError(f"model.vocab_size: the config says {want} but model.init_from {spec} has {source} rows "
                         f"(a grown or trimmed vocabulary?): set model.vocab_size: {source} and data.tokenizer.path "
                         "to its tokenizer, or data.tokenizer.extend: true to grow it for the data's pieces")
    return state


def initial_rest(cfg: Config, method: PeftMethod, mesh: Mesh) -> nnx.State:
    """The frozen part of theta0 (what a base-free PEFT checkpoint does not store)."""
    graphdef, params, rest = init_variables(cfg, method, mesh)
    model = nnx.merge(graphdef, params, rest)
    start_from(model, cfg, mesh)
    _, _, rest = nnx.split(model, method.trainable_filter(), ...)
    return rest


@dataclasses.dataclass
class RestoredModel:
    graphdef: nnx.GraphDef
    params: nnx.State  # what the run trained
    rest: nnx.State  # everything else (the frozen base)
    config: Config
    step: int
    run_dir: Path

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params, self.rest)


def read_run_config(run_dir: Path) -> Config:
    from jaxft.config.loader import load_config

    rd = RunDir(run_dir)
    if not rd.is_run():
        raise FileNotFoundError(f"{run_dir}: not a run dir (no config.yaml)")
    return load_config(rd.config)


def checkpoint_folder(run_dir: Path, which: str | int) -> Path:
    """Where `which` (`latest`, `best` or a step number) is kept: `checkpoints/`, else `best/`;
    a missing step is a ValueError listing the steps there are."""
    rd = RunDir(run_dir)
    if isinstance(which, str):
        return rd.checkpoint_dir(which)
    found = {}
    for name in ("latest", "best"):
        ckpt = Checkpointer(rd.checkpoint_dir(name), read_only=True)
        found[name] = ckpt.steps()
        ckpt.close()
        if which in found[name]:
            return rd.checkpoint_dir(name)
    kept = ", ".join(map(str, found["latest"])) or "none"
    best = f"; best: {', '.join(map(str, found['best']))}" if found["best"] else ""
    raise ValueError(f"checkpoint {which}: {run_dir} has no checkpoint of step {which} (steps: {kept}{best})")


def restore_model(run_dir: str | Path, which: str | int = "latest", *, mesh: Mesh | None = None) -> RestoredModel:
    """The model of a run dir's newest (`latest`) or best (`best`) readable checkpoint, or
    of step `which` (an int: in `checkpoints/` or `best/`), without its optimizer state.
    Read-only: unreadable checkpoints are skipped with a warning (a chosen step is an
    error), never moved; nothing in the run dir is written."""
    run_dir = as_path(run_dir)  # a local path or a URL
    cfg = read_run_config(run_dir)
    folder = checkpoint_folder(run_dir, which)  # a missing step fails before anything is built
    method = method_for(cfg.peft, cfg.train, cfg.model)
    mesh = mesh or make_mesh(cfg.mesh)
    with use_mesh(mesh):
        stacked = stores_stacked(cfg)

        def fn():
            _, params, rest = split_train_model(cfg.model, method, cfg.train.seed)
            if stacked:  # the layout the run's train state (and so its checkpoints) had
                params, rest = stack_layers(params, rest)
            return {"params": params, "rest": rest}

        targets, _ = sharded_abstract(fn, mesh)
        if not method.checkpoint_base:
            del targets["rest"]
        ckpt = Checkpointer(folder, read_only=True)
        try:
            restored = ckpt.restore_latest(targets) if isinstance(which, str) else \
                (which, ckpt.restore_step(which, targets))
        finally:
            ckpt.close()
        if restored is None:
            raise FileNotFoundError(f"{run_dir}: no readable {which} checkpoint")
        step, items = restored
        rest = items.get("rest")
        if stacked:  # callers see per-layer paths, as the model and every exported format has them
            # (each restored stack freed once sliced: no second copy of the parameters at any time)
            items["params"], rest = items["params"] and unstack_owned(items["params"]), rest and unstack_owned(rest)
        if rest is None:
            rest = initial_rest(cfg, method, mesh)
        graphdef = split_train_model(cfg.model, method, cfg.train.seed, abstract=True)[0]
    return RestoredModel(graphdef, items["params"], rest, cfg, step, run_dir)


