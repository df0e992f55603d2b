"""The tokenizer a run uses: `data.tokenizer.path` (a SentencePiece model, an HF
folder, or `hf:<folder or org/name>`), else the one the run trained into
`<run_dir>/tokenizer.model` (training it is `jaxft.train.setup`'s job)."""

from __future__ import annotations

from pathlib import Path

from jaxft.config.schema import DataConfig
from jaxft.data.tokenizer import Tokenizer
from jaxft.paths import as_path, is_remote, local_copy
from jaxft.runs.layout import RunDir


def configured_tokenizer(cfg: DataConfig, base_dir: Path) -> Tokenizer | None:
    """`data.tokenizer.path` loaded, or None when the run trains its own."""
    path_cfg = cfg.tokenizer.path
    if not path_cfg:
        return None
    if path_cfg.startswith("hf:"):  # an HF folder or hub id: its tokenizer with the family's ids
        from jaxft.interop.hf import resolve_path
        from jaxft.interop.hf_tokenizer import load_hf_tokenizer
        return load_hf_tokenizer(resolve_path(path_cfg))
    path = as_path(path_cfg)  # a URL (gs://...) is never joined to base_dir
    path = path if is_remote(path) or path.is_absolute() else base_dir / path
    if not path.exists():
        raise FileNotFoundError(f"data.tokenizer.path: {path} does not exist{_hub_hint(path, base_dir)}")
    if path.is_dir():
        from jaxft.interop.hf_tokenizer import load_hf_tokenizer
        return load_hf_tokenizer(local_copy(path))  # an HF folder at a URL: a local copy
    return Tokenizer.load(path)


def _hub_hint(path: Path, base_dir: Path) -> str:
    """A hint when the missing path, as written in the config, looks like a hub id ``org/name``."""
    from jaxft.interop.hf import looks_like_hub_id

    try:
        written = path.relative_to(Path(base_dir).resolve()).as_posix()
    except ValueError:
        try:
            written = path.relative_to(base_dir).as_posix()
        except ValueError:
            return ""
    return f" (for the Hugging Face hub model {written!r}, write hf:{written})" if looks_like_hub_id(written) else ""


def run_tokenizer(cfg: DataConfig, run_dir: Path, base_dir: Path) -> Tokenizer:
    """The configured tokenizer, else the run's trained one (which must exist); with
    `data.tokenizer.extend`, the extended copy in the run dir when the run wrote one."""
    if cfg.tokenizer.extend and RunDir(run_dir).tokenizer.is_file():
        return Tokenizer.load(RunDir(run_dir).tokenizer)
    tok = configured_tokenizer(cfg, base_dir)
    if tok is not None:
        return tok
    path = RunDir(run_dir).tokenizer
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no data.tokenizer.path and no trained {path.name} in the run dir")
    return Tokenizer.load(path)
