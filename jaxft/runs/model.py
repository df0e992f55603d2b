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
from jaxft.models.registry import build_model
from jaxft.peft.methods import PeftMethod, method_for
from jaxft.runs.checkpoint import Checkpointer
from jaxft.runs.layout import RunDir
from jaxft.sharding import make_mesh, sharded_abstract, use_mesh

log = logging.getLogger(__name__)

SHAPE_FREE = ("preset", "init_from", "remat", "dropout", "attention_dropout",
              "activation_dropout")  # model keys that do not change the parameters


def build_train_model(model_cfg: ModelConfig, method: PeftMethod, seed: int) -> nnx.Module:
    """The model as the run trains it: built from the config, then the PEFT method's tree surgery."""
    rngs = nnx.Rngs(seed)
    return method.transform_model(build_model(model_cfg, rngs=rngs), rngs)


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
    """`model.init_from`: "hf:<folder or org/name>" (Hugging Face weights) or
    "run:<run dir>" (the newest checkpoint of another jaxft run, e.g. the base
    model a language or task adaptation starts from; opened read-only)."""
    if spec.startswith("hf:"):
        from jaxft.interop.hf import init_params_from

        return init_params_from(spec, cfg.model, mesh)
    if spec.startswith("run:"):
        base = restore_model(Path(spec[4:]), mesh=mesh)
        shape = lambda c: {k: v for k, v in vars(c).items() if k not in SHAPE_FREE}  # noqa: E731
        if shape(base.config.model) != shape(cfg.model):
            diff = [k for k in shape(cfg.model) if shape(cfg.model)[k] != shape(base.config.model)[k]]
            raise ValueError(f"model.init_from: {spec} has a different model ({', '.join('model.' + d for d in diff)})")
        return nnx.state(base.model(), nnx.Param)
    raise ValueError(f"model.init_from: expected 'hf:<folder or org/name>' or 'run:<run dir>', got {spec!r} "
                     f"(write hf:{spec} for a Hugging Face folder or hub model, run:{spec} for a jaxft run dir)")


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


def restore_model(run_dir: str | Path, which: str = "latest", *, mesh: Mesh | None = None) -> RestoredModel:
    """The model of a run dir's newest (`latest`) or best (`best`) readable checkpoint,
    without its optimizer state.  Read-only: unreadable checkpoints are skipped with a
    warning, never moved; nothing in the run dir is written."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    method = method_for(cfg.peft, cfg.train, cfg.model)
    mesh = mesh or make_mesh(cfg.mesh)
    with use_mesh(mesh):
        def fn():
            _, params, rest = split_train_model(cfg.model, method, cfg.train.seed)
            return {"params": params, "rest": rest}

        targets, _ = sharded_abstract(fn, mesh)
        if not method.checkpoint_base:
            del targets["rest"]
        ckpt = Checkpointer(RunDir(run_dir).checkpoint_dir(which), read_only=True)
        try:
            restored = ckpt.restore_latest(targets)
        finally:
            ckpt.close()
        if restored is None:
            raise FileNotFoundError(f"{run_dir}: no readable {which} checkpoint")
        step, items = restored
        rest = items.get("rest")
        if rest is None:
            rest = initial_rest(cfg, method, mesh)
        graphdef = split_train_model(cfg.model, method, cfg.train.seed, abstract=True)[0]
    return RestoredModel(graphdef, items["params"], rest, cfg, step, run_dir)


