"""Local paths and URLs (``gs://``, ``s3://``, ``az://``) behind one small interface.

    as_path("runs/x")           -> pathlib.Path("runs/x")           (exactly as before)
    as_path("gs://bucket/run")  -> etils.epath.Path("gs://bucket/run")  (fsspec / gcsfs, or tf.io.gfile)

Both have the pathlib API (``/``, ``exists``, ``is_dir``, ``iterdir``, ``read_text``,
``write_text``, ``open``, ``mkdir``, ``glob``), so code that only uses it works on both.  What
object stores do not have is decided here, once (docs/remote.md):

- no rename: an atomic replace of a small file is one object write (`write_atomic`); a move
  (`move`) is copy + delete, object by object;
- no append, no ``pread``, no mmap: files that need them are used through a local copy
  (`local_copy`: downloaded once into ``$JAXFT_CACHE/remote``, keyed by URL, size and mtime,
  streamed, so memory does not grow with the file) or written locally and uploaded
  (`upload`, `staged`);
- no file locks: only process 0 writes a run dir's small files.

Never call ``pathlib.Path(p)`` on a path that may be remote: ``Path(epath.Path("gs://b/x"))`` is
``/gs/b/x``, and epath's ``resolve()`` / ``absolute()`` turn ``gs://`` into ``./gs:/``; use
`as_path` and `absolute`.  ``file://`` URLs are local paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
SCHEMES = ("gs", "s3", "az")  # what etils.epath reaches (gcsfs / s3fs / adlfs must be installed)


def is_remote(path: Any) -> bool:
    """A URL other than ``file://`` (``gs://bucket/run``)."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    return bool(_URL.match(text)) and not text.startswith("file://")


def as_path(path: Any) -> Any:
    """``pathlib.Path`` for a local path, ``etils.epath.Path`` for a URL (an unsupported scheme
    is a ValueError naming it)."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    if not is_remote(text):
        return path if isinstance(path, Path) else Path(text.removeprefix("file://"))
    scheme = text.split("://", 1)[0]
    if scheme not in SCHEMES:
        raise ValueError(f"{text}: unsupported URL scheme {scheme}:// (supported: "
                         f"{', '.join(s + '://' for s in SCHEMES)}, or a local path)")
    from etils import epath

    return epath.Path(text)


def config_dir(path: Any) -> Path:
    """The folder a config's relative paths (run dir, data, tokenizer) are resolved against: a
    local file's own folder; for a config read from a URL, the working directory (docs/remote.md)."""
    return Path.cwd() if is_remote(path) else Path(path).resolve().parent


def absolute(path: Any) -> Any:
    """A local path made absolute (not resolved); a URL as it is."""
    return as_path(path) if is_remote(path) else as_path(path).absolute()


def write_atomic(path: Any, data: bytes) -> None:
    """Readers see the old or the new content, never a part: a local file is written to a
    hidden sibling, fsynced and renamed; an object store replaces an object in one write."""
    path = as_path(path)
    if is_remote(path):
        path.write_bytes(data)
        return
    tmp = path.parent / f".{path.name}.partial"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _files(root: Any) -> list[tuple[str, Any]]:
    """(relative name, path) of every file under the folder `root`, sorted (``iterdir`` only:
    epath refuses recursive globs on object stores)."""
    out, todo = [], [("", as_path(root))]
    while todo:
        rel, folder = todo.pop()
        for p in folder.iterdir():
            name = f"{rel}/{p.name}" if rel else p.name
            if p.is_dir():
                todo.append((name, p))
            else:
                out.append((name, p))
    return sorted(out, key=lambda x: x[0])


def _copy_file(src: Any, dst: Any) -> None:
    """Stream one file between any two places (local or remote)."""
    src, dst = as_path(src), as_path(dst)
    if not is_remote(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as f, dst.open("wb") as g:
        shutil.copyfileobj(f, g, 8 << 20)


def copy(src: Any, dst: Any) -> None:
    """Copy a file or a folder (recursively) from anywhere to anywhere, object by object."""
    src, dst = as_path(src), as_path(dst)
    if not src.is_dir():
        _copy_file(src, dst)
        return
    for name, p in _files(src):
        _copy_file(p, dst / name)


def remove(path: Any) -> None:
    """Remove a file or a folder (recursively); nothing when it does not exist."""
    path = as_path(path)
    if not is_remote(path):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
    elif path.is_dir():
        path.rmtree()
    elif path.exists():
        path.unlink()


def move(src: Any, dst: Any) -> None:
    """Rename locally; on an object store copy then delete (not atomic: a move interrupted
    midway leaves both, never neither)."""
    if not is_remote(src) and not is_remote(dst):
        shutil.move(os.fspath(src), os.fspath(dst))
        return
    copy(src, dst)
    remove(src)


def cache_home() -> Path:
    """``$JAXFT_CACHE``, else ``$XDG_CACHE_HOME/jaxft`` (``~/.cache/jaxft``)."""
    if os.environ.get("JAXFT_CACHE"):
        return Path(os.environ["JAXFT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxft"


def _ends(path: Any, size: int, n: int = 65536) -> str:
    """A digest of the first and last `n` bytes (mtimes of object stores are whole seconds)."""
    h = hashlib.sha256()
    with as_path(path).open("rb") as f:
        h.update(f.read(n))
        if size > n:
            f.seek(max(n, size - n))
            h.update(f.read(n))
    return h.hexdigest()[:16]


def local_copy(path: Any) -> Path:
    """A local path to read `path` through: itself when local; for a URL, a copy (file or
    folder) at ``<cache_home>/remote/<digest>/<its name>``, downloaded once per URL + size + mtime + a digest of
    each file's ends (a changed object gets a new copy), streamed, written under a temporary
    name and renamed."""
    if not is_remote(path):
        return as_path(path)
    src = as_path(path)
    if not src.exists():
        raise FileNotFoundError(f"{path}: does not exist")
    files = _files(src) if src.is_dir() else [("", src)]
    stats = [(name, p.stat()) for name, p in files]
    key = [os.fspath(src)] + [[name, st.length, str(st.mtime), _ends(p, st.length)]
                              for (name, st), (_, p) in zip(stats, files)]
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    dst = cache_home() / "remote" / digest / src.name  # the copy keeps its name (tokenizer.model)
    if os.path.lexists(dst):
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=".", suffix=".partial"))
    try:
        log.info("copying %s (%d file(s), %d bytes) to %s", path, len(files), sum(st.length for _, st in stats), dst)
        for name, p in files:
            _copy_file(p, tmp / name if name else tmp / "file")
        os.replace(tmp / "file" if src.is_file() else tmp, dst)
    except OSError:
        if not os.path.lexists(dst):  # else another process on this host copied it first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def upload(local: Any, dst: Any) -> None:
    """Copy a local file or folder to `dst` (a URL or a local path); files of the same names
    are replaced, others there are left."""
    copy(local, dst)


@contextlib.contextmanager
def staged(target: Any) -> Iterator[Path]:
    """A local folder to write `target` into: `target` itself when local; for a URL a
    temporary local folder, uploaded to `target` when the block succeeds (one process)."""
    if not is_remote(target):
        yield as_path(target)
        return
    tmp = Path(tempfile.mkdtemp(prefix="jaxft-staged-"))
    try:
        yield tmp
        upload(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def makedirs(path: Any) -> None:
    """``mkdir -p`` for a local folder; nothing for a URL (object stores have no folders, and
    gcsfs would create a missing bucket)."""
    if not is_remote(path):
        as_path(path).mkdir(parents=True, exist_ok=True)


def lexists(path: Any) -> bool:
    """``os.path.lexists`` for a local path (a broken symlink exists); ``exists`` for a URL."""
    return as_path(path).exists() if is_remote(path) else os.path.lexists(path)


def beside(file: Any, rel: str) -> Any:
    """`rel` resolved against the folder of `file` (a config file): a local path normalised
    (`file` resolved); under a URL's folder for a URL `file`; an absolute path or a URL `rel`
    as it is."""
    if is_remote(rel):
        return as_path(rel)
    if not is_remote(file):
        return Path(os.path.normpath(Path(file).resolve().parent / rel))
    scheme, rest = os.fspath(as_path(file)).split("://", 1)
    return as_path(f"{scheme}://" + posixpath.normpath(posixpath.join(posixpath.dirname(rest), rel)))


def local_path(value: str) -> Path:
    """argparse type of an output written with local-file APIs (safetensors, SentencePiece): a
    URL is refused (rather than becoming a local ``gs:/...`` folder)."""
    if is_remote(value):
        import argparse

        raise argparse.ArgumentTypeError(f"{value}: must be a local path (write it locally, then copy it: "
                                         "gcloud storage cp -r)")
    return Path(value)
