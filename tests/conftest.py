"""Every test runs JAX on 8 fake CPU devices so all sharding paths are exercised."""

import os

# Tests run tiny models, so their time is XLA's compile, not the run: with LLVM's backend
# optimisations off the heaviest test files run in 0.64x the time (137 vs 215 s; the HLO
# passes, fusion and layouts are unchanged).  Benchmarks and `jaxft` itself never see these flags.  A flag already in
# XLA_FLAGS is kept as given.
_flags = os.environ.get("XLA_FLAGS", "")
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
              "--xla_llvm_disable_expensive_passes=true"):
    if _flag.split("=")[0] not in _flags:
        _flags += " " + _flag
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the whole test session: set here in
# the controlling pytest process (before xdist starts its workers), it is
# inherited by both workers and by every `jaxft` subprocess a test launches, so
# the many identical tiny train / eval steps compile once.  A cached executable
# is the same program, so bitwise-equality tests are unaffected.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="jaxft-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    _owner = os.getpid()
    atexit.register(lambda: os.getpid() == _owner and shutil.rmtree(_cache, ignore_errors=True))

# Line indexes and converted Arrow files of data sources (jaxft.data.index) go to a
# session folder, not ~/.cache/jaxft.
if "JAXFT_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _data_cache = tempfile.mkdtemp(prefix="jaxft-test-data-cache-")
    os.environ["JAXFT_CACHE"] = _data_cache
    _data_owner = os.getpid()
    atexit.register(lambda: os.getpid() == _data_owner and shutil.rmtree(_data_cache, ignore_errors=True))

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA

