"""Setting a run up: everything the step loop needs, built once.

`setup(cfg, base_dir)` checks the run dir can be (re)used, prepares the
tokenizer, the mesh, the optimizer and the PEFT method, the jitted steps, the
data pipeline and dev batches, and the starting state (restored, or theta0).
It returns a `Run`; `jaxft.train.loop.train` drives it with hooks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from orbax.checkpoint.multihost import get_barrier_sync_fn

from jaxft.config.schema import Config, DataConfig
from jaxft.data.pipeline import build_dev_batches, build_train_pipeline
from jaxft.data.tokenizer import Tokenizer, train_tokenizer
from jaxft.data.tokenizer_sample import tokenizer_sample
from jaxft.data.vocab import required_pieces
from jaxft.models.registry import is_encoder_decoder, model_input_keys
from jaxft.models.stacking import has_stacks, stack_owned, unstack_owned
from jaxft.outputs import atomic_write_text
from jaxft.paths import makedirs
from jaxft.peft.methods import PeftMethod, StepContext, method_for
from jaxft.runs import resume
from jaxft.runs.checkpoint import Checkpointer
from jaxft.runs.layout import RunDir
from jaxft.runs.model import start_from, stores_stacked
from jaxft.runs.teacher import Teacher, WithTeacher, load_teacher
from jaxft.runs.tokenizer import configured_tokenizer
from jaxft.sharding import batch_sharding, check_batch, make_mesh, use_mesh
from jaxft.train.compile_cache import use_compile_cache
from jaxft.train.metric_sinks import MetricsWriter
from jaxft.train.run_inputs import RunInputs, WithRunInputs
from jaxft.train.state import (InitFn, TrainState, checkpoint_items, copy_state, count_params, make_init_fn,
                               sharded_abstract)
from jaxft.train.step import CompileThenMeet, jit_eval_step, jit_train_step, make_eval_step, make_train_step

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """A set-up run: configuration, compiled steps, data, and the state to start from."""

    cfg: Config
    dirs: RunDir
    base_dir: Path
    mesh: Any
    tokenizer: Tokenizer
    method: PeftMethod
    tx: Any
    graphdef: Any
    shardings: TrainState
    batch_sharding: Any
    train_step: Any
    eval_step: Any
    pipeline: Any
    dev: dict[str, list]
    ckpt: Checkpointer
    writer: MetricsWriter
    state: TrainState  # where the loop starts (consumed: the step donates it)
    start: int
    theta0: nnx.State | None  # LT-SFT: the starting trainable parameters only (no optimizer state, no frozen rest)
    meta: dict[str, Any]  # small JSON facts checkpointed with the run (dev loss before training)
    end: int = 0  # the last step this process runs (set by the loop)
    save_now: bool = False  # set by the loop before a step's hooks: checkpoint this step
    fetched: list = dataclasses.field(default_factory=list)  # (step, metrics) the metrics hook fetched this step
    unhealthy: bool = False  # the guard saw non-finite losses up to the last fetched step
    data_wait: dict = dataclasses.field(default_factory=dict)  # step -> (start time, seconds blocked on its batch)

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    def step_context(self) -> StepContext:
        return StepContext(theta0=self.theta0, optimizer=self.tx, shardings=self.shardings,
                           copy=lambda p: copy_state(p, self.shardings.params), graphdef=self.graphdef,
                           run_dir=self.dirs.root, seed=self.cfg.train.seed)

    def checkpoint_items(self, state: TrainState) -> dict[str, Any]:
        return checkpoint_items(state, self.method.checkpoint_base)

    def to_global(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> one global array per key."""
        rows = self.cfg.train.global_batch
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v, (rows,) + v.shape[1:])
                for k, v in batch.items()}


TOKENIZER_BARRIER_S = 6 * 3600  # how long other processes wait for process 0 to train the tokenizer


def prepare_tokenizer(cfg: DataConfig, run_dir: Path, base_dir: Path, configured: Tokenizer | None = None
                      ) -> Tokenizer:
    """`configured` (`data.tokenizer.path`, loaded before the run dir is created, so a bad
    tokenizer file leaves nothing behind), or one trained into the run dir on a per-language,
    temperature-balanced sample of the training sources (`jaxft.data.tokenizer_sample`).
    `data.tokenizer.extend`: `configured` plus the pieces the data needs (docs/vocab.md)."""
    tok = configured if configured is not None else configured_tokenizer(cfg, base_dir)
    if tok is not None and cfg.tokenizer.extend:  # the pieces the data needs, added in a copy in the run dir
        from jaxft.runs.vocab_tokenizer import extended_tokenizer

        return extended_tokenizer(cfg, run_dir, base_dir, tok)
    if tok is not None:
        return tok
    tcfg = cfg.tokenizer
    if not tcfg.train_vocab_size:
        raise ValueError("data.tokenizer: set `path` to a SentencePiece model or `train_vocab_size` to train one")
    path = RunDir(run_dir).tokenizer
    if jax.process_index() == 0 and not path.exists():
        log.info("training a %d-piece %s tokenizer on a per-language sample of the training sources -> %s",
                 tcfg.train_vocab_size, tcfg.model_type, path)
        symbols = list(dict.fromkeys(required_pieces(cfg, base_dir) + list(tcfg.user_defined_symbols)))
        sample = tokenizer_sample(cfg, base_dir)
        train_tokenizer(sample.texts, path, tcfg, user_defined_symbols=symbols)
    # A coordination-service barrier, not a device collective: process 0 may spend minutes
    # training the tokenizer, longer than the collectives' (gloo's 30 s) set-up timeout.
    if jax.process_count() > 1:
        get_barrier_sync_fn()(key="jaxft:tokenizer", timeout_ms=TOKENIZER_BARRIER_S * 1000)
    return Tokenizer.load(path)


def _check_shapes(cfg: Config, tokenizer: Tokenizer, mesh) -> None:
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} pieces ({tokenizer.path})")
    check_batch(cfg.train.global_batch, cfg.train.microbatches, mesh)


def _theta0(init_fn: InitFn, shardings: TrainState, graphdef, tx, method: PeftMethod, cfg: Config, mesh) -> TrainState:
    """theta0 as a sharded TrainState, its optimizer state initialised from theta0 itself.
    `model.init_from` / `peft.compose` write the model's per-layer variables: the random state is
    built without optimizer state, unstacked and restacked array by array (`unstack_owned` /
    `stack_owned`), and the optimizer state is made once, from the loaded values, so start-up
    peaks at the parameters plus the loaded copy (what `params_from` reads), not several copies."""
    if not (cfg.model.init_from or cfg.peft.compose):
        return init_fn.sharded(shardings, mesh)
    state = init_fn.sharded(shardings.replace(opt_state=None), mesh, lambda s: s.replace(opt_state=None))
    stacked = has_stacks(state.params) or has_stacks(state.rest)
    model = nnx.merge(graphdef, unstack_owned(state.params), unstack_owned(state.rest))
    state = state.replace(params=None, rest=None)  # the model holds them now
    start_from(model, cfg, mesh)
    _, params, rest = nnx.split(model, method.trainable_filter(), ...)
    del model  # `stack_owned` deletes the per-layer arrays it holds
    if stacked:
        params, rest = jax.device_put(stack_owned(params, rest), (shardings.params, shardings.rest))
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    return state.replace(params=params, rest=rest, opt_state=opt_state)


def _start_state(run_parts: dict, init_fn, cfg: Config, method: PeftMethod, mesh):
    """(state, start step, theta0, meta): the newest readable checkpoint, else theta0."""
    ckpt, abstract, shardings, graphdef, tx = (run_parts[k] for k in ("ckpt", "abstract", "shardings", "graphdef",
                                                                       "tx"))
    restored = ckpt.restore_latest(checkpoint_items(abstract, method.checkpoint_base), restart=run_parts["restart"])
    needs = method.needs_theta0(restored is not None)
    theta0 = _theta0(init_fn, shardings, graphdef, tx, method, cfg, mesh) if needs else None
    if restored is None:
        # a method that keeps theta0 alive trains on a copy (the step donates its input)
        state = copy_state(theta0, shardings) if method.keeps_theta0 else theta0
        return state, 0, theta0.params if method.keeps_theta0 else None, {}, None
    start, items = restored
    rest = items["rest"] if method.checkpoint_base else theta0.rest
    train = items["train"]
    state = TrainState(step=train["step"], params=items["params"], rest=rest, opt_state=train["opt_state"],
                       mask=train["mask"])
    return state, start, theta0.params if method.keeps_theta0 else None, items.get("meta") or {}, items["data"]


def _write_sizes(state: TrainState, method: PeftMethod, mesh, dirs: RunDir) -> None:
    """Log the parameter counts and write them to params.json (what the suite report reads)."""
    sizes = {"params": count_params(state.params) + count_params(state.rest),
             "trainable": count_params(state.params), "updated": method.updated_entries(state.params),
             "method": method.name}
    log.info("model: %s params (%s trainable, %s updated), mesh %s", f"{sizes['params']:,}",
             f"{sizes['trainable']:,}", f"{sizes['updated']:,}", dict(mesh.shape))
    if jax.process_index() == 0:
        atomic_write_text(dirs.params_json, json.dumps(sizes, indent=1) + "\n")


def _steps(cfg: Config, graphdef, run_inputs: RunInputs, shardings, bsharding,
           teacher: Teacher | None) -> tuple[Any, CompileThenMeet]:
    """The jitted train and eval steps (compiled, then a barrier, before a multi-process run's
    first call); with a distillation teacher the train step also reads its state.  The learning
    rate and the seed are inputs of the train step (`jaxft.train.run_inputs`)."""
    keys, tcfg = model_input_keys(cfg.model), cfg.train
    step_fn = make_train_step(graphdef, None, tcfg, None, keys, teacher and teacher.graphdef, run_inputs)
    jitted = jit_train_step(step_fn, shardings, bsharding, teacher and teacher.shardings, run_inputs=True)
    train_step = WithRunInputs(CompileThenMeet(jitted, "train_step"), run_inputs.put(bsharding.mesh))
    eval_step = jit_eval_step(make_eval_step(graphdef, tcfg, keys), shardings, bsharding)
    eval_step = CompileThenMeet(eval_step, "eval_step")
    return (train_step if teacher is None else WithTeacher(train_step, teacher)), eval_step


def _checked_run_dir(run_dir) -> RunDir:
    """The run dir, refused when it holds something else.  Every process of a multi-process
    run looks before any of them writes (process 0 creates `checkpoints/` and `config.yaml`
    next): a process that looked in between saw a half-made run dir and refused it."""
    dirs = RunDir(run_dir)  # a local path or a URL (gs://...: jaxft.paths)
    if dirs.root.is_dir() and not dirs.is_run() and any(dirs.root.iterdir()):
        raise ValueError(f"run_dir {dirs.root}: exists, is not empty and is not a jaxft run dir (no config.yaml); "
                         "choose a new run_dir")
    if jax.process_count() > 1:  # a coordination-service barrier: processes may start minutes apart
        get_barrier_sync_fn()(key="jaxft:run_dir_checked", timeout_ms=TOKENIZER_BARRIER_S * 1000)
    return dirs


def setup(cfg: Config, *, base_dir: Path, restart: bool = False) -> Run:
    """Everything a run needs.  Refuses (before writing anything) a run dir whose
    checkpoints were made with an incompatible config.  `restart`: see `train`."""
    use_compile_cache(cfg.compile_cache)  # before anything compiles
    dirs = _checked_run_dir(cfg.run_dir)
    ckpt = Checkpointer(dirs.checkpoints, cfg.checkpoint)
    cfg = resume.check_compatible(ckpt, cfg, dirs.root)  # before anything in the run dir is written
    configured = configured_tokenizer(cfg.data, base_dir)
    fresh = not ckpt.steps()  # a resumed run's config.yaml is rewritten only once a checkpoint restored
    if jax.process_index() == 0:
        makedirs(dirs.root)
        if fresh:
            resume.write_config(cfg, dirs.root)
    tokenizer = prepare_tokenizer(cfg.data, dirs.root, base_dir, configured)
    mesh = make_mesh(cfg.mesh)
    _check_shapes(cfg, tokenizer, mesh)
    tcfg = cfg.train
    method = method_for(cfg.peft, tcfg, cfg.model)
    run_inputs = RunInputs(cfg.optimizer, tcfg, method.wrap_optimizer)
    tx = run_inputs.tx()
    init_fn, graphdef = make_init_fn(cfg.model, tcfg, tx, tcfg.seed, cfg.peft, stacked=stores_stacked(cfg))
    seq2seq = {"encoder_decoder": True, "decoder_start_id": cfg.model.decoder_start_id} \
        if is_encoder_decoder(cfg.model) else {}
    with use_mesh(mesh):
        abstract, shardings = sharded_abstract(init_fn, mesh)
        bsharding = batch_sharding(mesh)
        parts = {"ckpt": ckpt, "abstract": abstract, "shardings": shardings, "graphdef": graphdef, "tx": tx,
                 "restart": restart}
        state, start, theta0, meta, data_state = _start_state(parts, init_fn, cfg, method, mesh)
        if restart and start == 0:
            resume.set_aside_history(dirs)
        if not fresh and jax.process_index() == 0:
            resume.write_config(cfg, dirs.root)
        pipeline = build_train_pipeline(cfg.data, tokenizer, global_batch=tcfg.global_batch, base_dir=base_dir,
                                        process_index=jax.process_index(), process_count=jax.process_count(),
                                        **seq2seq)
        if data_state is not None:
            pipeline.set_state(data_state)
            log.info("resumed %s from step %d", dirs.root, start)
        _write_sizes(state, method, mesh, dirs)
        teacher = load_teacher(cfg, mesh, getattr(tokenizer, "path", None))
        train_step, eval_step = _steps(cfg, graphdef, run_inputs, shardings, bsharding, teacher)
        dev = build_dev_batches(cfg.data, tokenizer, batch_size=tcfg.global_batch, base_dir=base_dir,
                                max_batches=tcfg.dev_batches, **seq2seq)
    return Run(cfg=cfg, dirs=dirs, base_dir=base_dir, mesh=mesh, tokenizer=tokenizer, method=method, tx=tx,
               graphdef=graphdef, shardings=shardings, batch_sharding=bsharding, train_step=train_step,
               eval_step=eval_step, pipeline=pipeline, dev=dev, ckpt=ckpt,
               writer=MetricsWriter(dirs.root, enabled=jax.process_index() == 0, resume_step=start),
               state=state, start=start,
               theta0=theta0, meta=meta)

