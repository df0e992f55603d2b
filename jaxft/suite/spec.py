"""Suite files: a matrix of runs from one YAML file, expanded into a plan.

    suite_dir: ../../runs/suites/demo    # relative to this file
    experiment: ../experiments/demo_adapt.yaml
    set: {train.steps: 60}               # every run
    stages:
      - name: adapt
        grid: {peft.method: [lora, sparse]}   # cartesian product of the axes
        zip: {optimizer.lr: [3e-3, 1e-3], train.warmup: [5, 10]}   # parallel lists
        seeds: [0, 1]                   # the axis `seed`: train.seed and data.seed
        run_name: "{peft.method}-s{train.seed}"
      - name: recipes
        variants:                       # named sets of overrides: the axis `variant`
          full: {peft.method: none, optimizer.lr: 1e-4}
          lora: {peft.method: lora, optimizer.lr: 3e-3}
      - name: compose
        set: {model.init_from: "run:{adapt.lora-s0}"}   # another stage's run dir

Paths set in the suite file (``model.init_from: run:<dir>``, ``data.tokenizer.path``,
``data.index_dir``, the paths of ``data.train`` / ``data.dev`` / ``data.test`` sources, ``suite_dir``,
``experiment``) are relative to the suite file.

A run is ``<stage>.<name>`` in ``<suite_dir>/<stage>.<name>/``; its name comes from
``run_name`` (``{config.key}`` placeholders filled with the run's axis values) or, by default,
the variant and axis values joined by ``-`` (the stage name when there are none).  ``{stage.name}``
in an override value becomes that run's folder (so ``run:{...}`` for ``model.init_from``,
``{...}/sparse_diff`` in ``peft.compose``) and makes the run depend on it: only earlier stages
can be named.  Every run's config is loaded (experiment + overrides) when the suite is
expanded, so a bad key fails before anything runs, naming the suite file's line.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Any

from jaxft.config.errors import ConfigError, Key
from jaxft.config.loader import load_config, load_typed
from jaxft.config.schema import Config

SEED_KEYS = ("train.seed", "data.seed")  # `seeds: [..]` sets both: initialisation and data order
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
_RUN_REF = re.compile(r"\{([A-Za-z0-9][A-Za-z0-9_+=-]*\.[^{}]+)\}")  # {stage.name}; {src} / {tgt} stay
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    experiment: str | None = None  # default: the suite's
    set: dict[str, Any] = dataclasses.field(default_factory=dict)
    grid: dict[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)
    zip: dict[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)
    seeds: tuple[int, ...] = ()
    variants: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # name -> overrides
    run_name: str | None = None


@dataclasses.dataclass(frozen=True)
class SuiteSpec:
    suite_dir: str
    experiment: str
    stages: tuple[StageSpec, ...]
    set: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """One run of a suite: ``jaxft train <experiment> --set <overrides> --set run_dir=<run_dir>``."""

    id: str  # "<stage>.<name>"
    stage: str
    run_dir: Path
    experiment: Path
    overrides: tuple[str, ...]  # "key=<JSON value>", in order
    axes: dict[str, Any]  # the run's axis values
    depends: tuple[str, ...]  # ids of the runs it names
    config: Config = dataclasses.field(repr=False, compare=False, default=None)

    def command(self, python: str = "jaxft") -> list[str]:
        out = [*python.split(), "train", str(self.experiment)]
        for o in (*self.overrides, f"run_dir={self.run_dir}"):
            out += ["--set", o]
        return out


@dataclasses.dataclass(frozen=True)
class Suite:
    path: Path
    suite_dir: Path
    runs: tuple[RunPlan, ...]

    def run(self, run_id: str) -> RunPlan:
        return next(r for r in self.runs if r.id == run_id)


def _combos(stage: StageSpec, key: Key, where) -> list[dict[str, Any]]:
    for axis, values in (*stage.grid.items(), *stage.zip.items()):
        if not values:
            raise ConfigError("an axis needs at least one value", key + (axis,), where(key + (axis,)))
    lengths = {len(v) for v in stage.zip.values()}
    if len(lengths) > 1:
        raise ConfigError(f"zip axes must have equal lengths, got {sorted(lengths)}", key + ("zip",),
                          where(key + ("zip",)))
    grid = [dict(zip(stage.grid, values)) for values in itertools.product(*stage.grid.values())]
    zipped = [dict(zip(stage.zip, values)) for values in zip(*stage.zip.values())] or [{}]
    seeds = [{"seed": s} for s in stage.seeds] or [{}]
    variants = [{"variant": name} for name in stage.variants] or [{}]
    axis_keys = set(stage.grid) | set(stage.zip)
    overlap = set(stage.grid) & set(stage.zip) | (set(SEED_KEYS) & axis_keys if stage.seeds else set())
    for name, overrides in stage.variants.items():
        if not _NAME.match(name):
            raise ConfigError(f"variant name {name!r}: letters, digits, _ . + = - only", key + ("variants", name),
                              where(key + ("variants", name)))
        overlap |= axis_keys & set(overrides)
    if overlap:
        raise ConfigError(f"{sorted(overlap)[0]!r} is an axis twice (grid, zip, seeds and variants must not share "
                          f"a key)", key, where(key))
    return [{**v, **g, **z, **s} for v in variants for g in grid for z in zipped for s in seeds]


def _value_text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def _run_name(stage: StageSpec, axes: dict[str, Any], key: Key, where) -> str:
    if stage.run_name is None:
        name = "-".join(_value_text(v) for v in axes.values()) or stage.name
    else:
        def fill(m: re.Match) -> str:
            if m.group(1) in SEED_KEYS and "seed" in axes:
                return _value_text(axes["seed"])
            if m.group(1) not in axes:
                raise ConfigError(f"run_name names {m.group(1)!r}, not an axis of this stage ({sorted(axes)})",
                                  key + ("run_name",), where(key + ("run_name",)))
            return _value_text(axes[m.group(1)])

        name = _PLACEHOLDER.sub(fill, stage.run_name)
    name = re.sub(r"[^A-Za-z0-9_.+=-]+", "_", name).strip("_.")
    if not _NAME.match(name):
        raise ConfigError(f"run name {name!r} is empty or not file-name safe", key, where(key))
    return name


def _substitute(value: Any, runs: dict[str, RunPlan], stage_names: list[str], key: Key, where,
                used: set[str]) -> Any:
    """``{stage.name}`` -> that run's folder, in strings anywhere in ``value``."""
    if isinstance(value, str):
        def fill(m: re.Match) -> str:
            ref = m.group(1)
            if ref not in runs:
                stage = ref.split(".", 1)[0]
                why = ("a later stage or this one: runs may only name earlier stages' runs"
                       if stage in stage_names else f"no such run (runs so far: {sorted(runs)[:6]})")
                raise ConfigError(f"{{{ref}}}: {why}", key, where(key))
            used.add(ref)
            return str(runs[ref].run_dir)

        return _RUN_REF.sub(fill, value)
    if isinstance(value, list | tuple):
        return [_substitute(v, runs, stage_names, key, where, used) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, runs, stage_names, key + (k,), where, used) for k, v in value.items()}
    return value


_PATH_KEYS = ("data.tokenizer.path", "data.index_dir")
_SOURCE_PATH_KEYS = ("path", "src_path", "tgt_path", "tfds_data_dir")  # in data.train / dev / test items
_SOURCE_KEY = re.compile(r"^data\.(train|dev|test)(\[\d+\])?(\.(\w+))?$")


def _local(here: Path, value: Any) -> Any:
    if isinstance(value, str) and value and not Path(value).is_absolute() and "://" not in value:
        return str((here / value).resolve())
    return value


def _relative_sources(here: Path, key: str, value: Any) -> Any:
    """``data.train`` / ``data.dev`` (a list of sources), ``data.train[i]`` (one) or
    ``data.train[i].src_path`` (one path): their file paths, relative to the suite file."""
    m = _SOURCE_KEY.match(key)
    if m is None:
        return value
    if m.group(4):
        return _local(here, value) if m.group(2) and m.group(4) in _SOURCE_PATH_KEYS else value
    fix = lambda src: ({k: _local(here, v) if k in _SOURCE_PATH_KEYS else v for k, v in src.items()}  # noqa: E731
                       if isinstance(src, dict) else src)
    if m.group(2):
        return fix(value)
    return [fix(src) for src in value] if isinstance(value, list) else value


def _relative_to(here: Path, key: str, value: Any) -> Any:
    """Paths in the suite file are relative to it, as data paths are to their config file:
    ``model.init_from: run:<dir>`` / ``hf:<existing folder>``, ``data.tokenizer.path``, sources."""
    if key.startswith(("data.train", "data.dev", "data.test")):
        return _relative_sources(here, key, value)
    if not isinstance(value, str):
        return value
    if key == "model.init_from" and value.startswith(("run:", "hf:")):
        kind, path = value.split(":", 1)
        if not Path(path).is_absolute() and (kind == "run" or (here / path).exists()):
            return f"{kind}:{(here / path).resolve()}"
    elif key in _PATH_KEYS and not Path(value).is_absolute():
        return str((here / value).resolve())
    return value



def load_suite(path: str | Path, *, check_configs: bool = True) -> Suite:
    """Read, validate and expand a suite file (see the module docstring)."""
    path = Path(path)
    spec, where = load_typed(path, SuiteSpec)
    here = path.resolve().parent
    suite_dir = (here / spec.suite_dir).resolve()
    if not spec.stages:
        raise ConfigError("a suite needs at least one stage", ("stages",), where(("stages",)))
    stage_names = [s.name for s in spec.stages]
    runs: dict[str, RunPlan] = {}
    for i, stage in enumerate(spec.stages):
        key: Key = ("stages", i)
        if not _NAME.match(stage.name) or "." in stage.name:
            raise ConfigError(f"stage name {stage.name!r}: letters, digits, _ + = - only", key + ("name",),
                              where(key + ("name",)))
        if stage.name in stage_names[:i]:
            raise ConfigError(f"stage name {stage.name!r} is used twice", key + ("name",), where(key + ("name",)))
        experiment = (here / (stage.experiment or spec.experiment)).resolve()
        for axes in _combos(stage, key, where):
            name = _run_name(stage, axes, key, where)
            run_id = f"{stage.name}.{name}"
            if run_id in runs:
                raise ConfigError(f"two runs are named {run_id!r} (their axis values give the same name; "
                                  f"set run_name)", key, where(key))
            used: set[str] = set()
            overrides = []
            seed = {k: axes["seed"] for k in SEED_KEYS} if "seed" in axes else {}
            variant = stage.variants.get(axes.get("variant"), {})
            values = {k: v for k, v in axes.items() if k not in ("seed", "variant")}
            for k, v in ({**spec.set, **stage.set, **variant, **values, **seed}).items():
                v = _relative_to(here, k, _substitute(v, runs, stage_names, key, where, used))
                overrides.append(f"{k}={json.dumps(v, ensure_ascii=False)}")
            plan = RunPlan(run_id, stage.name, suite_dir / run_id, experiment, tuple(overrides), axes,
                           tuple(sorted(used)))
            if check_configs:
                try:
                    cfg = load_config(experiment, [*overrides, f"run_dir={plan.run_dir}"])
                except ConfigError as e:
                    raise ConfigError(f"run {run_id}: {e}", origin=where(key)) from None
                plan = dataclasses.replace(plan, config=cfg)
            runs[run_id] = plan
    return Suite(path, suite_dir, tuple(runs.values()))
