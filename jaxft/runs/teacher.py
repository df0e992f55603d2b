"""The frozen teacher of word-level distillation (`train.distill.teacher`).

`load_teacher(cfg, mesh)` restores it -- ``run:<run dir>`` (the newest checkpoint, any
PEFT method: adapters stay attached) or ``hf:<folder or org/name>`` -- sharded over the
student's mesh by its own logical axes, and checks that it can teach this student: the
same kind of model (decoder-only or encoder-decoder: both read the same batch), the
same ``model.vocab_size`` and, when both tokenizers are known, the same pieces.  The
teacher has no optimizer state and is never checkpointed: a resumed run loads it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxft.config.schema import Config, ModelConfig
from jaxft.models.registry import build_model, is_encoder_decoder
from jaxft.paths import as_path
from jaxft.runs.layout import RunDir
from jaxft.runs.model import read_run_config, restore_model
from jaxft.sharding import use_mesh

log = logging.getLogger(__name__)
KEY = "train.distill.teacher"


@dataclasses.dataclass
class Teacher:
    graphdef: nnx.GraphDef
    state: nnx.State  # every variable of the teacher (frozen)
    shardings: Any  # of `state`: the train step's in_shardings for it
    model: ModelConfig
    tokenizer: Path | None  # its SentencePiece model when known (run dirs)


def teacher_model_config(spec: str) -> ModelConfig:
    """The teacher's ModelConfig from its config alone (nothing loaded): for checks and plans."""
    if spec.startswith("run:"):
        return read_run_config(as_path(spec[4:])).model
    from jaxft.interop.hf import hf_config_to_model_config, read_hf_config, resolve_path

    return hf_config_to_model_config(read_hf_config(resolve_path(spec)))


def load_teacher(cfg: Config, mesh: Mesh, student_tokenizer: Path | None = None) -> Teacher | None:
    """The teacher named by `train.distill.teacher` (None when unset), checked against the student."""
    spec = cfg.train.distill.teacher
    if not spec:
        return None
    check_teacher(cfg.model, teacher_model_config(spec), spec)
    with use_mesh(mesh):
        if spec.startswith("run:"):
            restored = restore_model(as_path(spec[4:]), mesh=mesh)
            graphdef, state = nnx.split(restored.model())
            tokenizer = RunDir(spec[4:]).tokenizer
            model_cfg = restored.config.model
        else:
            from jaxft.interop.hf import load_hf

            model_cfg, state = load_hf(spec, mesh=mesh)
            graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0))))
            tokenizer = None
    if tokenizer is not None and student_tokenizer is not None and tokenizer.exists() and \
            _digest(tokenizer) != _digest(student_tokenizer):
        raise ValueError(f"{KEY}: {spec} has another tokenizer ({tokenizer}) than the student "
                         f"({student_tokenizer}); distillation compares the two models token by token, "
                         "so their vocabularies must be the same")
    shardings = jax.tree.map(lambda a: a.sharding, state)
    n = sum(x.size for x in jax.tree.leaves(state))
    log.info("distilling from %s: %s %s, %s params", spec, model_cfg.family, model_cfg.preset or "", f"{n:,}")
    return Teacher(graphdef, state, shardings, model_cfg, tokenizer)


def check_teacher(student: ModelConfig, teacher: ModelConfig, spec: str) -> None:
    if is_encoder_decoder(student) != is_encoder_decoder(teacher):
        kind = lambda c: "an encoder-decoder" if is_encoder_decoder(c) else "a decoder-only"  # noqa: E731
        raise ValueError(f"{KEY}: {spec} is {kind(teacher)} model ({teacher.family}) and the student "
                         f"{kind(student)} one ({student.family}); both must read the same batches")
    if teacher.vocab_size != student.vocab_size:
        raise ValueError(f"{KEY}: {spec} has model.vocab_size {teacher.vocab_size}, the student "
                         f"{student.vocab_size}; distillation needs the same vocabulary")


def _digest(path: Path) -> str:
    return hashlib.sha256(as_path(path).read_bytes()).hexdigest()


class WithTeacher:
    """``step(state, batch)`` calling ``jitted(state, batch, teacher_state)``: the loop's
    interface for a distilling train step."""

    def __init__(self, jitted, teacher: Teacher):
        self.jitted, self.teacher = jitted, teacher

    def __call__(self, state, batch):
        return self.jitted(state, batch, self.teacher.state)
