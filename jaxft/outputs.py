"""Safe outputs: every command that writes goes through `safe_output`.

    with safe_output(out, inputs=(src,), overwrite=args.overwrite) as tmp:
        write everything into tmp (a folder, or a file when `kind="file"`)

- an output that is, contains or lies inside an input is refused (so a
  command can never write over what it reads);
- an existing output is refused unless `overwrite`, and even then a folder
  jaxft did not write (one holding none of the files jaxft writes) is never
  replaced, nor a file by a folder or a folder by a file;
- everything is written to a hidden sibling (`.<name>.partial`) and renamed
  into place only when complete, so an interrupted or failed command leaves
  the old output (or nothing) behind, never a half-written one.  With
  `overwrite`, the old output is moved aside (`.<name>.old`) first and removed
  only after the new one is in place; a later command puts back an old output
  that an interruption left aside.

Paths are compared resolved (symlinks followed); URLs (``gs://``: `jaxft.paths`) as written.
The temporary name is the same on every process, so collective writes (orbax) work; only
process 0 creates, renames and removes.  On an object store the temporary sibling is moved
into place object by object (copy + delete: there is no rename), so an interrupted move can
leave a partial output there.  Errors are `OutputError` (a `ValueError`: the
CLI prints one line and exits 2).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, Iterator, Literal

from jaxft.paths import as_path, is_remote, lexists, makedirs, move, remove, write_atomic

Kind = Literal["dir", "file"]


class OutputError(ValueError):
    pass


def is_main_process() -> bool:
    try:
        import jax

        return jax.process_index() == 0
    except Exception:  # noqa: BLE001 - no jax backend: a single process
        return True


def _resolved(path: str | Path) -> Path:
    if is_remote(path):
        return as_path(path)
    return Path(os.path.abspath(os.path.expanduser(str(path)))).resolve()


def check_output(out: str | Path, inputs: Iterable[str | Path | None] = (), *, overwrite: bool = False,
                 kind: Kind = "dir", flag: str = "output") -> Path:
    """Refuse `out` when it is, contains or lies inside one of `inputs` (None and
    "hf:" hub ids are skipped), or exists (unless `overwrite`, and then only a
    `kind` jaxft wrote).  Returns `out` resolved.  `flag` names the argument in errors."""
    target = _resolved(out)
    for src in inputs:
        if src is None or str(src).startswith("hf:"):
            continue
        s = _resolved(src)
        if is_remote(s) != is_remote(target):  # a URL and a local path never overlap
            continue
        if target == s:
            raise OutputError(f"{flag} {out}: is an input of this command ({src}); choose a new path")
        if s in target.parents:
            raise OutputError(f"{flag} {out}: lies inside an input of this command ({src}); "
                              "choose a path outside it")
        if target in s.parents:
            raise OutputError(f"{flag} {out}: contains an input of this command ({src}); choose a new path")
    if not lexists(target):
        return target
    if not overwrite:
        raise OutputError(f"{flag} {out}: already exists; choose a new path or pass --overwrite")
    if target.is_dir() != (kind == "dir"):
        what, other = ("a folder", "a file") if target.is_dir() else ("a file", "a folder")
        raise OutputError(f"{flag} {out}: is {what}; refusing to replace it with {other} even with --overwrite")
    if kind == "dir" and not _looks_like_ours(target):
        raise OutputError(f"{flag} {out}: is a folder jaxft did not write ({_describe(target)}); "
                          "refusing to replace it even with --overwrite")
    return target


# names that mark a folder as a jaxft output: a jaxft folder, an HF folder, a sparse diff,
# a LoRA adapter (jaxft or HF PEFT), an evaluation report, a `jaxft data prepare` folder
_OURS = ("params", "model.yaml", "hf_config.json", "config.json", "eval.json", "diff.json", "adapter.json",
         "adapter_config.json", "model.safetensors.index.json", "manifest.json")


def _looks_like_ours(folder: Path) -> bool:
    """An existing folder --overwrite may replace: empty, or holding files jaxft writes."""
    names = {p.name for p in folder.iterdir()}
    return not names or bool(names & set(_OURS)) or any(n.endswith(".safetensors") for n in names)


def _describe(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _siblings(target: Path) -> tuple[Path, Path]:
    return target.parent / f".{target.name}.partial", target.parent / f".{target.name}.old"


@contextlib.contextmanager
def safe_output(out: str | Path, inputs: Iterable[str | Path | None] = (), *, overwrite: bool = False,
                kind: Kind = "dir", flag: str = "output") -> Iterator[Path]:
    """Yield a temporary path to write `out` into; rename it into place on success.
    For `kind="dir"` the temporary folder exists (empty) when yielded; for files
    only its parent does.  A failure inside the `with` removes the temporary path
    and leaves `out` as it was."""
    main = is_main_process()
    tmp, old = _siblings(_resolved(out))
    if main and lexists(old) and not lexists(_resolved(out)):
        _replace(old, _resolved(out))  # an interrupted overwrite left the old output aside: restore it
    target = check_output(out, inputs, overwrite=overwrite, kind=kind, flag=flag)
    if main:
        makedirs(target.parent)
        _remove(tmp)  # our own leftover of an interrupted command
        if kind == "dir":
            makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        if main:
            _remove(tmp)
        raise
    if main:
        _commit(tmp, target, old)


def _commit(tmp: Path, target: Path, old: Path) -> None:
    if not lexists(tmp):
        raise OutputError(f"{target}: nothing was written")
    if lexists(target):  # overwrite (checked in check_output)
        _remove(old)
        _replace(target, old)
        _replace(tmp, target)
        _remove(old)
    else:
        _replace(tmp, target)


def _replace(src: Path, dst: Path) -> None:
    """A rename; on an object store a move (copy + delete)."""
    if is_remote(src):
        move(src, dst)
    else:
        os.replace(src, dst)


_remove = remove  # a file or a folder, recursively (not following symlinks); nothing when absent


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a part
    (a URL: one object write, `jaxft.paths.write_atomic`)."""
    write_atomic(path, text.encode("utf-8"))


def read_jsonl(path: str | Path, *, strict: bool = False) -> list[dict]:
    """The JSON objects of a .jsonl file (e.g. a run's metrics.jsonl); a missing file is empty and
    blank lines are skipped.  A line that is not a JSON object (one cut short by a kill) is skipped,
    or with ``strict`` a ValueError naming the file and line."""
    import json

    path = path if hasattr(path, "read_text") else Path(path)  # a URL's epath stays one
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            out.append(row)
        elif strict:
            raise ValueError(f"{path}:{n}: not a JSON object: {line[:80]!r}")
    return out
