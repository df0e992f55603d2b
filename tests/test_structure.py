"""The package's shape: no import cycles, and no layer imports a higher one.

The import graph is read from the source (AST), counting imports inside
functions too.  The layer order is written once, in docs/architecture.md (the
```layers block), and read from there.  The checkers are tested on synthetic
packages so they are known to fail when a cycle or an upward import appears.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxft"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
MAX_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(path: Path, package_dir: Path) -> str:
    rel = path.relative_to(package_dir.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in the file), resolved to files."""
    top = package_dir.name
    files = {module_name(p, package_dir): p for p in package_dir.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]  # a submodule, else a name in base
            for t in targets:
                if t == top or t.startswith(top + "."):
                    r = resolve(t)
                    if r and r != mod:
                        graph[mod].add(r)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def read_layers(doc: Path) -> list[list[str]]:
    """The ```layers block: one layer per line, lowest first; names on one line are peers."""
    match = re.search(r"```layers\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)
    assert match, f"{doc}: no ```layers block"
    return [line.split("#")[0].split() for line in match.group(1).splitlines() if line.split("#")[0].strip()]


def layer_of(module: str) -> str:
    """jaxft.train.loop -> train; jaxft.cli -> cli."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def upward_imports(graph: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    """Imports from a layer into a higher layer or a peer of the same layer (each as 'a -> b')."""
    rank = {name: i for i, names in enumerate(layers) for name in names}
    bad = []
    for mod, targets in sorted(graph.items()):
        a = layer_of(mod)
        for t in sorted(targets):
            b = layer_of(t)
            if a == b:
                continue
            if a not in rank or b not in rank:
                bad.append(f"{mod} -> {t} (layer {a if a not in rank else b!r} is not in the layer list)")
            elif rank[b] >= rank[a]:
                bad.append(f"{mod} -> {t} ({a} may not import {b})")
    return bad


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for mod, targets in graph.items():
        a = layer_of(mod)
        out.setdefault(a, set()).update(layer_of(t) for t in targets if layer_of(t) != a)
    return out


# --------------------------------------------------------------------------- the real package


def test_no_import_cycles_between_files():
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycles_between_packages():
    cycle = find_cycle(package_graph(import_graph(PACKAGE)))
    assert cycle is None, "package cycle: " + " -> ".join(cycle)


def test_no_layer_imports_a_higher_one():
    layers = read_layers(ARCHITECTURE)
    bad = upward_imports(import_graph(PACKAGE), layers)
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_every_package_is_in_the_layer_list():
    names = {n for layer in read_layers(ARCHITECTURE) for n in layer}
    found = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    found |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert found <= names, f"missing from docs/architecture.md: {sorted(found - names)}"


def test_models_know_nothing_of_peft_training_or_data():
    graph = import_graph(PACKAGE)
    for mod, targets in graph.items():
        if mod.startswith("jaxft.models"):
            assert not [t for t in targets if t.split(".")[1] in ("peft", "train", "data", "runs", "eval")], mod
    text = "\n".join(p.read_text() for p in (PACKAGE / "models").rglob("*.py"))
    assert "lora" not in text.lower()


def test_library_files_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not big, f"files over {MAX_LINES} lines: {big}"


# --------------------------------------------------------------------------- the checkers can fail


def make_package(tmp: Path, files: dict[str, str]) -> Path:
    pkg = tmp / "jaxft"
    for rel, text in files.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for d in [pkg, *[p for p in pkg.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    return pkg


LAYERS = [["config"], ["models"], ["train"], ["eval"]]


def test_checker_finds_a_cycle_through_a_function_local_import(tmp_path):
    pkg = make_package(tmp_path, {
        "eval/beam.py": "def f():\n    from jaxft.eval.decode import g\n",
        "eval/decode.py": "from jaxft.eval import beam\n",
    })
    assert find_cycle(import_graph(pkg)) == ["jaxft.eval.beam", "jaxft.eval.decode", "jaxft.eval.beam"]


def test_checker_finds_an_upward_import(tmp_path):
    pkg = make_package(tmp_path, {
        "train/loop.py": "import jaxft.models.core\n",
        "models/core.py": "def f():\n    from jaxft.eval.translate import t\n",
        "eval/translate.py": "from jaxft.train import loop\n",
    })
    graph = import_graph(pkg)
    assert upward_imports(graph, LAYERS) == ["jaxft.models.core -> jaxft.eval.translate (models may not import eval)"]
    assert find_cycle(package_graph(graph)) is not None


def test_checker_accepts_a_clean_package(tmp_path):
    pkg = make_package(tmp_path, {
        "models/core.py": "from jaxft.config import schema\n",
        "config/schema.py": "X = 1\n",
        "eval/translate.py": "from jaxft.train.loop import run\nfrom . import other\n",
        "eval/other.py": "import jaxft.models.core as c\n",
        "train/loop.py": "from ..models import core\n",
    })
    graph = import_graph(pkg)
    assert find_cycle(graph) is None and upward_imports(graph, LAYERS) == []
    assert graph["jaxft.train.loop"] == {"jaxft.models.core"}


def test_read_layers(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("x\n```layers\nconfig  # lowest\n\ndata models\ncli\n```\n")
    assert read_layers(doc) == [["config"], ["data", "models"], ["cli"]]


def test_train_and_runs_functions_stay_short():
    long = []
    for pkg in ("train", "runs"):
        for path in (PACKAGE / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions too long:\n" + "\n".join(long)
