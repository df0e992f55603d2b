"""The starting point of a run, and the PEFT transitions the loop makes.

theta0 (the parameters a run starts from) is a pure function of the config:
fresh init by seed, then `model.init_from` (HF weights), then `peft.compose`
(sparse diffs / adapters applied to the base).  It is recomputed rather than
stored, so checkpoints stay small and resume still knows it (sparse fine-tuning
needs theta0 again at the end of phase 1 and to write the diff).
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxft.config.schema import Config
from jaxft.train.state import TrainState, trainable_filter

log = logging.getLogger(__name__)


def initial_state(init_fn, shardings: TrainState, graphdef: nnx.GraphDef, cfg: Config, mesh) -> TrainState:
    """theta0 as a sharded TrainState (fresh optimizer state)."""
    state = jax.jit(init_fn, out_shardings=shardings)()
    if not cfg.model.init_from and not cfg.peft.compose:
        return state
    model = nnx.merge(graphdef, state.params, state.rest)
    if cfg.model.init_from:
        nnx.update(model, params_from(cfg.model.init_from, cfg, mesh))
        log.info("initialised parameters from %s", cfg.model.init_from)
    if cfg.peft.compose:
        from jaxft.peft.compose import compose_into

        compose_into(model, cfg.peft.compose)
        log.info("composed into the base: %s", ", ".join(cfg.peft.compose))
    _, params, rest = nnx.split(model, trainable_filter(cfg.train, cfg.peft), ...)
    return state.replace(params=params, rest=rest)


def params_from(spec: str, cfg: Config, mesh) -> nnx.State:
    """`model.init_from`: "hf:<folder or org/name>" (Hugging Face weights) or
    "run:<run dir>" (the newest checkpoint of another jaxft run, e.g. the base
    model a language or task adaptation starts from)."""
    if spec.startswith("hf:"):
        from jaxft.interop.hf import init_params_from

        return init_params_from(spec, cfg.model, mesh)
    if spec.startswith("run:"):
        from jaxft.eval.translate import load_run

        translator, base_cfg = load_run(Path(spec[4:]))
        shape = lambda c: {k: v for k, v in vars(c).items() if k not in ("preset", "init_from", "remat")}  # noqa: E731
        if shape(base_cfg.model) != shape(cfg.model):
            diff = [k for k in shape(cfg.model) if shape(cfg.model)[k] != shape(base_cfg.model)[k]]
            raise ValueError(f"model.init_from: {spec} has a different model ({', '.join('model.' + d for d in diff)})")
        return nnx.state(translator.model, nnx.Param)
    raise ValueError(f"model.init_from: expected 'hf:<folder or org/name>' or 'run:<run dir>', got {spec!r}")


def copy_state(state: TrainState, shardings: TrainState) -> TrainState:
    """A copy in fresh buffers, so donating it to the train step leaves `state` alive
    (sparse FT needs theta0 at the end of phase 1 and to write the diff)."""
    return jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=shardings)(state)


def checkpointed_part(state: TrainState, cfg: Config) -> TrainState:
    """What a checkpoint holds: everything, or (peft.save_base false with a PEFT
    method) only what trains, the frozen base being rebuilt from the config."""
    if cfg.peft.method == "none" or cfg.peft.save_base:
        return state
    return state.replace(rest=None)


def merge_restored(restored: TrainState, fresh: TrainState, cfg: Config) -> TrainState:
    if cfg.peft.method == "none" or cfg.peft.save_base:
        return restored
    return restored.replace(rest=fresh.rest)


def start_sparse_phase2(state: TrainState, theta0: TrainState, tx: optax.GradientTransformation,
                        shardings: TrainState, cfg: Config) -> TrainState:
    """End of LT-SFT phase 1: select the mask from |theta - theta0|, reset to
    theta0, fresh optimizer; from now on updates are masked."""
    from jaxft.peft.sparse import select_mask

    mask = select_mask(state.params, theta0.params, cfg.peft.sparse, seed=cfg.train.seed)
    mask = jax.device_put(mask, shardings.mask)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(theta0.params)
    kept = sum(int(m.sum()) for m in jax.tree.leaves(mask))
    total = sum(m.size for m in jax.tree.leaves(mask))
    log.info("sparse fine-tuning phase 2: %d of %d entries trainable (%.4f%%)", kept, total, 100 * kept / total)
    params = copy_state(theta0, shardings).params  # theta0 itself stays alive (the step donates its state)
    return state.replace(params=params, opt_state=opt_state, mask=mask)


def write_peft_outputs(state: TrainState, theta0: TrainState, graphdef: nnx.GraphDef, cfg: Config,
                       run_dir: Path) -> Path | None:
    """At the end of a PEFT run: the sparse diff or the LoRA adapter, small and composable."""
    if cfg.peft.method == "sparse":
        from jaxft.peft.sparse import save_diff

        return save_diff(run_dir / "sparse_diff", state.params, theta0.params, state.mask, cfg.peft.sparse)
    if cfg.peft.method == "lora":
        from jaxft.peft.lora import save_adapter

        return save_adapter(run_dir / "adapter", nnx.merge(graphdef, state.params, state.rest), cfg.peft.lora,
                            cfg.model)
    return None
