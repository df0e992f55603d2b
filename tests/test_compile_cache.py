"""The persistent compilation cache (`compile_cache`, `jaxft.train.compile_cache`): which folder
each setting names, and that a restarted run reads its compiled train step from it."""

from pathlib import Path

import jax
import pytest
import yaml
from jax._src import monitoring  # test only: jax's cache-hit events
from jax.experimental.compilation_cache import compilation_cache

from jaxft.config.errors import ConfigError
from jaxft.config.loader import load_config
from jaxft.config.schema import to_dict
from jaxft.runs.resume import incompatible_keys
from jaxft.train.compile_cache import DEFAULT_MAX_GIB, cache_dir, use_compile_cache
from trainutil import write_run_config

KEYS = ("jax_compilation_cache_dir", "jax_compilation_cache_max_size", "jax_persistent_cache_min_compile_time_secs")


@pytest.fixture
def own_cache():
    """The session's cache settings (conftest) back afterwards, whatever the test pointed jax at."""
    saved = {k: getattr(jax.config, k) for k in KEYS}
    yield
    compilation_cache.reset_cache()
    for k, v in saved.items():
        jax.config.update(k, v)


@pytest.fixture
def hits():
    events: list[str] = []

    def listen(event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            events.append(event)

    monitoring.register_event_listener(listen)
    yield events
    monitoring.unregister_event_listener(listen)


def test_settings_name_their_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/launch/cache")  # what tpu_scripts export
    assert cache_dir("auto") == "/launch/cache"
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("JAXFT_CACHE", str(tmp_path))
    assert cache_dir("auto") == str(tmp_path / "xla")
    assert cache_dir("off") is None and cache_dir("") is None
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir("~/xc") == str(tmp_path / "xc")
    assert cache_dir("gs://bucket/xc") == "gs://bucket/xc"


def test_default_folder_is_bounded_an_explicit_one_is_not_off_turns_it_off(own_cache, monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("JAXFT_CACHE", str(tmp_path))
    jax.config.update("jax_compilation_cache_max_size", -1)
    assert use_compile_cache("auto") == str(tmp_path / "xla") == jax.config.jax_compilation_cache_dir
    assert jax.config.jax_compilation_cache_max_size == DEFAULT_MAX_GIB * 2**30
    jax.config.update("jax_compilation_cache_max_size", -1)
    assert use_compile_cache(str(tmp_path / "mine")) == str(tmp_path / "mine")
    assert jax.config.jax_compilation_cache_max_size == -1
    assert use_compile_cache("off") is None and jax.config.jax_compilation_cache_dir is None


def run_config(tmp_path, compile_cache: str, *, dropout: float = 0.0, name: str = "run", **changes):
    """The tests' run config; ``changes``: "section.key" -> value (`optimizer.lr`...)."""
    path = write_run_config(tmp_path, steps=2, name=name, extra={"model.dropout": dropout, **changes})
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "compile_cache": compile_cache}, sort_keys=False))
    return load_config(path)


def test_an_unwritable_folder_is_an_error_or_for_auto_no_cache(own_cache, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="compile_cache: cannot create"):
        use_compile_cache(str(blocker / "xla"))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("JAXFT_CACHE", str(blocker))
    assert use_compile_cache("auto") is None and jax.config.jax_compilation_cache_dir is None


def test_the_key_is_checked_and_safe_to_change_on_resume(tmp_path):
    assert run_config(tmp_path, "off").compile_cache == "off"
    with pytest.raises(ConfigError, match="compile_cache"):
        load_config(write_run_config(tmp_path, steps=2), ["compile_cache=[1]"])
    saved = to_dict(run_config(tmp_path, "auto"))
    assert not incompatible_keys(saved, to_dict(run_config(tmp_path, "/elsewhere")))
    before = {k: v for k, v in saved.items() if k != "compile_cache"}  # a run dir from before the key
    assert not incompatible_keys(before, to_dict(run_config(tmp_path, "off")))
    assert incompatible_keys(saved, {**saved, "train": {**saved["train"], "seed": 7}})  # the check still bites


def test_a_restarted_run_reads_its_train_step_from_the_cache(own_cache, hits, tmp_path):
    from jaxft.train.loop import train

    cache = tmp_path / "xla"
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.jit(lambda x: x * 2.5 + 1)(1.0)  # jax opens the session's cache (conftest) before the run names its own
    cfg = run_config(tmp_path, str(cache))
    assert train(cfg, base_dir=tmp_path, stop_after=1).step == 1
    assert jax.config.jax_compilation_cache_dir == str(cache)
    written = {p.name.split("-")[0] for p in Path(cache).iterdir()}
    assert "jit_train_step" in written
    jax.clear_caches()  # as a new process: nothing compiled in memory
    hits.clear()
    assert train(cfg, base_dir=tmp_path).step == 2  # resumes from step 1
    assert hits  # the step (and the rest) came from the folder
    assert {p.name.split("-")[0] for p in Path(cache).iterdir()} >= written


def test_runs_differing_in_their_numbers_share_their_init_and_train_step(own_cache, hits, tmp_path):
    """A study's second run (another learning rate, seed, warmup, length and weight decay, with
    dropout) compiles neither its init nor its train step: the seed is an input of the init, all
    are inputs of the step (`jaxft.train.run_inputs`), so the two runs' programs are the same ones.  (Eager ops that
    other tests of this process compiled before the first run are written by the second only.)"""
    from jaxft.train.loop import train

    cache = tmp_path / "xla"
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.jit(lambda x: x * 2.5 + 1)(1.0)  # jax opens the session's cache (conftest) before the run names its own
    first = run_config(tmp_path, str(cache), dropout=0.1)
    assert train(first, base_dir=tmp_path, stop_after=1).step == 1
    programs = lambda: {p.name for p in Path(cache).iterdir()  # noqa: E731
                        if p.name.split("-")[0] in ("jit_train_step", "jit_init_train_state", "jit_eval_step")}
    written = programs()
    assert {name.split("-")[0] for name in written} == {"jit_train_step", "jit_init_train_state", "jit_eval_step"}
    jax.clear_caches()  # as a new process: nothing compiled in memory
    hits.clear()
    swept = {"optimizer.lr": 1e-3, "train.seed": 5, "optimizer.warmup_steps": 3, "train.steps": 4,
             "optimizer.weight_decay": 0.05}
    second = run_config(tmp_path, str(cache), dropout=0.1, name="run2", **swept)
    first_values = (first.optimizer.lr, first.train.seed, first.optimizer.warmup_steps, first.train.steps,
                    first.optimizer.weight_decay)
    assert all(a != b for a, b in zip(first_values, swept.values()))
    assert train(second, base_dir=tmp_path, stop_after=1).step == 1
    assert programs() == written and hits
