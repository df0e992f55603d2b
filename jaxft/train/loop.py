"""The host training loop: set up, resume, step, log, evaluate, checkpoint.

All numerics live in `step.py`; this file only orchestrates.  The loop
dispatches step k+1 before reading step k's metrics, so the host never stalls
the device on a metrics fetch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxft.config.schema import Config, DataConfig, to_dict
from jaxft.data.pipeline import build_dev_batches, build_train_pipeline, training_texts
from jaxft.data.tokenizer import Tokenizer, train_tokenizer
from jaxft.data.vocab import required_pieces
from jaxft.models.flops import train_flops_per_token
from jaxft.models.registry import is_encoder_decoder, model_input_keys
from jaxft.sharding import batch_sharding, make_mesh, use_mesh
from jaxft.train import initial, resume
from jaxft.train.checkpoint import Checkpointer
from jaxft.train.evaluation import BestKeeper
from jaxft.train.metrics import MetricsWriter, Progress, device_peak_flops, read_jsonl
from jaxft.peft import l1_strength
from jaxft.train.optim import make_optimizer, make_schedule
from jaxft.train.state import count_params, make_init_fn, sharded_abstract
from jaxft.train.step import jit_eval_step, jit_train_step, make_eval_step, make_train_step

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    step: int
    dev_before: dict[str, float]
    dev_after: dict[str, float]
    losses: dict[int, float]


def prepare_tokenizer(cfg: DataConfig, run_dir: Path, base_dir: Path) -> Tokenizer:
    """Load `data.tokenizer.path`, or train one from the training sources into the run dir."""
    tcfg = cfg.tokenizer
    if tcfg.path:
        if tcfg.path.startswith("hf:"):  # an HF folder or hub id: its tokenizer with the family's ids
            from jaxft.interop.hf import resolve_path
            from jaxft.interop.tokenizer import load_hf_tokenizer
            return load_hf_tokenizer(resolve_path(tcfg.path[3:]))
        path = Path(tcfg.path)
        path = path if path.is_absolute() else base_dir / path
        if not path.exists():
            raise FileNotFoundError(f"data.tokenizer.path: {path} does not exist")
        if path.is_dir():
            from jaxft.interop.tokenizer import load_hf_tokenizer
            return load_hf_tokenizer(path)
        return Tokenizer.load(path)
    if not tcfg.train_vocab_size:
        raise ValueError("data.tokenizer: set `path` to a SentencePiece model or `train_vocab_size` to train one")
    path = run_dir / "tokenizer.model"
    if jax.process_index() == 0 and not path.exists():
        log.info("training a %d-piece %s tokenizer on the training sources -> %s",
                 tcfg.train_vocab_size, tcfg.model_type, path)
        symbols = list(dict.fromkeys(required_pieces(cfg, base_dir) + list(tcfg.user_defined_symbols)))
        try:
            train_tokenizer(training_texts(cfg, base_dir), path, tcfg, user_defined_symbols=symbols)
        except RuntimeError as e:  # sentencepiece reports bad sizes as RuntimeError
            raise ValueError(f"data.tokenizer.train_vocab_size: sentencepiece cannot train "
                             f"{tcfg.train_vocab_size} pieces: {str(e).splitlines()[0]}") from e
    multihost_utils.sync_global_devices("jaxft:tokenizer")
    return Tokenizer.load(path)


def to_global(batch: dict[str, np.ndarray], sharding, global_rows: int) -> dict[str, jax.Array]:
    """This process's rows -> one global array per key."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_rows,) + v.shape[1:])
            for k, v in batch.items()}


def local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's contiguous block of rows of a global host batch."""
    n, p, i = next(iter(batch.values())).shape[0], jax.process_count(), jax.process_index()
    return {k: v[i * n // p:(i + 1) * n // p] for k, v in batch.items()}


def dev_losses(eval_step, state, dev: dict[str, list], sharding, rows: int) -> dict[str, float]:
    out = {}
    for name, batches in dev.items():
        sums = [eval_step(state, to_global(local_rows(b), sharding, rows)) for b in batches]
        loss = sum(float(s["loss_sum"]) for s in sums)
        weight = sum(float(s["weight_sum"]) for s in sums)
        out[name] = loss / max(weight, 1.0)
    return out


def train(cfg: Config, *, base_dir: Path, stop_after: int | None = None) -> TrainResult:
    """Train (or resume) the run in `cfg.run_dir`.  `stop_after` ends this
    process after that many steps, as a preemption would (used by tests)."""
    run_dir = Path(cfg.run_dir)
    tcfg = cfg.train
    is_main = jax.process_index() == 0
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    resume.check_compatible(ckpt, cfg, run_dir)  # before anything in the run dir is written
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        resume.write_config(cfg, run_dir)

    tokenizer = prepare_tokenizer(cfg.data, run_dir, base_dir)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} pieces ({tokenizer.path})")
    mesh = make_mesh(cfg.mesh)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if (tcfg.global_batch // tcfg.microbatches) % dp:
        raise ValueError(f"train.global_batch / train.microbatches = {tcfg.global_batch // tcfg.microbatches} rows "
                         f"per microbatch must be divisible by the {dp} data-parallel devices (mesh data x fsdp)")
    schedule = make_schedule(cfg.optimizer, tcfg.steps)
    tx = make_optimizer(cfg.optimizer, tcfg.steps, l1=l1_strength(cfg.peft))
    init_fn, graphdef = make_init_fn(cfg.model, tcfg, tx, tcfg.seed, cfg.peft)
    sparse = cfg.peft.method == "sparse"

    with use_mesh(mesh):
        abstract, shardings = sharded_abstract(init_fn, mesh)
        bsharding = batch_sharding(mesh)
        restored = ckpt.restore_latest(initial.checkpointed_part(abstract, cfg))
        seq2seq = {"encoder_decoder": True, "decoder_start_id": cfg.model.decoder_start_id} \
            if is_encoder_decoder(cfg.model) else {}
        pipeline = build_train_pipeline(cfg.data, tokenizer, global_batch=tcfg.global_batch, base_dir=base_dir,
                                        process_index=jax.process_index(), process_count=jax.process_count(),
                                        **seq2seq)
        needs_theta0 = restored is None or sparse or not (cfg.peft.method == "none" or cfg.peft.save_base)
        theta0 = initial.initial_state(init_fn, shardings, graphdef, cfg, mesh) if needs_theta0 else None
        if restored is None:
            state, start = (initial.copy_state(theta0, shardings) if sparse else theta0), 0
        else:
            start, state, data_state = restored
            state = initial.merge_restored(state, theta0, cfg)
            pipeline.set_state(data_state)
            log.info("resumed %s from step %d", run_dir, start)
        n_params = count_params(state.params)
        log.info("model: %s params (%s trainable), mesh %s", f"{count_params(state.params) + count_params(state.rest):,}",
                 f"{n_params:,}", dict(mesh.shape))

        keys = model_input_keys(cfg.model)
        train_step = jit_train_step(make_train_step(graphdef, tx, tcfg, schedule, keys), shardings, bsharding)
        eval_step = jit_eval_step(make_eval_step(graphdef, tcfg, keys), shardings, bsharding)
        dev = build_dev_batches(cfg.data, tokenizer, batch_size=tcfg.global_batch, base_dir=base_dir,
                                max_batches=tcfg.dev_batches, **seq2seq)
        writer = MetricsWriter(run_dir, enabled=is_main)
        keeper = BestKeeper(cfg, run_dir, base_dir, tokenizer, graphdef) if cfg.eval.every else None
        if start == 0 and dev:
            before = dev_losses(eval_step, state, dev, bsharding, tcfg.global_batch)
            writer.write(0, {"dev_loss": before}, kind="dev")
        flops_per_step = train_flops_per_token(cfg.model, cfg.data.seq_len) * tcfg.global_batch * cfg.data.seq_len
        peak = device_peak_flops() * jax.device_count()

        progress = Progress(start, tcfg.steps, tcfg.progress_bar)
        losses: dict[int, float] = {}
        pending: tuple[int, dict] | None = None
        t_last, step_last = time.perf_counter(), start
        end = tcfg.steps if stop_after is None else min(tcfg.steps, start + stop_after)

        def flush(step: int, metrics: dict) -> None:
            nonlocal t_last, step_last
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            losses[step] = m["loss"]
            if step % tcfg.log_every == 0 or step == end:
                dt = time.perf_counter() - t_last
                steps_done = max(step - step_last, 1)
                m["seq_tokens_per_s"] = steps_done * tcfg.global_batch * cfg.data.seq_len / dt
                m["mfu"] = steps_done * flops_per_step / dt / peak
                t_last, step_last = time.perf_counter(), step
                writer.write(step, m)
                progress.update(step, f"loss {m['loss']:.4f} lr {m['lr']:.2e} |g| {m['grad_norm']:.3f}")

        delay = float(os.environ.get("JAXFT_STEP_DELAY", "0"))  # slows runs down for kill tests
        for step in range(start + 1, end + 1):
            if delay:
                time.sleep(delay)
            batch = to_global(next(pipeline), bsharding, tcfg.global_batch)
            state, metrics = train_step(state, batch)
            if sparse and step == cfg.peft.sparse.phase1_steps:
                state = initial.start_sparse_phase2(state, theta0, tx, shardings, cfg)
            if pending is not None:
                flush(*pending)
            pending = (step, metrics)
            if tcfg.dev_every and step % tcfg.dev_every == 0 and step != tcfg.steps and dev:
                writer.write(step, {"dev_loss": dev_losses(eval_step, state, dev, bsharding, tcfg.global_batch)},
                             kind="dev")
            if keeper is not None and (step % cfg.eval.every == 0 or step == tcfg.steps):
                keeper.evaluate(step, state, pipeline.get_state(), writer)
            if step % cfg.checkpoint.every == 0 or step == end:
                ckpt.save(step, initial.checkpointed_part(state, cfg), pipeline.get_state(), to_dict(cfg))
        if pending is not None:
            flush(*pending)
        progress.close()
        after: dict[str, float] = {}
        if end == tcfg.steps and dev:
            after = dev_losses(eval_step, state, dev, bsharding, tcfg.global_batch)
            writer.write(end, {"dev_loss": after}, kind="dev")
        if end == tcfg.steps and cfg.peft.method != "none":
            out = initial.write_peft_outputs(state, theta0, graphdef, cfg, run_dir)
            log.info("wrote %s", out)
        ckpt.close()
        writer.close()
        if keeper is not None:
            keeper.close()
    dev_hist = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "dev"]
    before = dev_hist[0]["dev_loss"] if dev_hist and dev_hist[0]["step"] == 0 else {}
    return TrainResult(run_dir=run_dir, step=end, dev_before=before, dev_after=after, losses=losses)


def dev_table(result: TrainResult) -> str:
    """Markdown table of per-direction dev loss before and after training."""
    rows = ["| direction | dev loss before | dev loss after | change |", "|---|---:|---:|---:|"]
    for name in sorted(result.dev_after or result.dev_before):
        b, a = result.dev_before.get(name, float("nan")), result.dev_after.get(name, float("nan"))
        rows.append(f"| {name} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    return "\n".join(rows)
