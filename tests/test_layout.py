"""The package layout keeps its promises: no import circles, each seam imports only what sits below it, and every
public name of the contract imports from where the reference puts it.

Imports are read from the source with ``ast`` (module-level and function-level alike, so a lazy import that closes
a circle is caught too); imports under ``if TYPE_CHECKING:`` are annotations only, never executed, and not counted.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted((SOURCE / "cairn").rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _imported(module: str, path: Path) -> set[str]:
    """The cairn modules ``module`` imports when it runs (a ``from package import name`` names the submodule when
    ``name`` is one); implicit imports of parent packages are left out, as Python finishes those first."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("cairn"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import: up from this module's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            if base.startswith("cairn"):
                for alias in node.names:
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: _imported(module, path) for module, path in MODULES.items()}


def _circles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in GRAPH[module]:
            if imported not in index:
                connect(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            connect(module)
    return circles


def test_no_module_imports_itself_back_even_lazily() -> None:
    assert _circles() == []


def _edges_from(prefix: str) -> list[tuple[str, str]]:
    return [
        (module, imported)
        for module, imports in GRAPH.items()
        if module == prefix or module.startswith(prefix + ".")
        for imported in sorted(imports)
    ]


def _inside(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


# (who, what it must not import): each seam imports only what sits below it
LAYERS = [
    ("cairn.checkpoint", "cairn.loggers"),
    ("cairn.checkpoint", "cairn.trainer"),
    ("cairn.checkpoint", "cairn.cli"),
    ("cairn.checkpoint.save", "cairn.checkpoint.load"),
    ("cairn.checkpoint.save", "cairn.checkpoint.tools"),
    ("cairn.checkpoint.load", "cairn.checkpoint.tools"),
    ("cairn.storage", "cairn.checkpoint"),
    ("cairn.storage", "cairn.loggers"),
    ("cairn.storage", "cairn.trainer"),
    ("cairn.storage", "cairn.core"),
    ("cairn.core", "cairn.checkpoint"),
    ("cairn.core", "cairn.loggers"),
    ("cairn.core", "cairn.storage"),
    ("cairn.core", "cairn.trainer"),
    ("cairn.loggers", "cairn.checkpoint"),
    ("cairn.loggers", "cairn.trainer"),
    ("cairn.names", "cairn"),
]


@pytest.mark.parametrize(("importer", "forbidden"), LAYERS, ids=[f"{a}-not-{b}" for a, b in LAYERS])
def test_each_seam_imports_only_what_sits_below_it(importer: str, forbidden: str) -> None:
    crossing = [(a, b) for a, b in _edges_from(importer) if _inside(b, forbidden) and not _inside(b, importer)]
    assert crossing == []


def test_the_checker_sees_lazy_imports() -> None:
    """A function-level import counts: the check above would otherwise pass on the very circles it is meant to find."""
    assert "cairn.storage.s3" in GRAPH["cairn.storage.uri"]  # store_from_uri imports the SDK's store on first use


PUBLIC = [
    ("cairn", ["Trainer", "State", "Event", "Time", "TimeUnit", "Timestamp", "Callback", "Algorithm"]),
    ("cairn.trainer", ["Trainer"]),
    ("cairn.core", ["State", "Event", "Time", "TimeUnit", "Timestamp", "Callback", "Algorithm"]),
    ("cairn.models", ["Model", "Classifier"]),
    ("cairn.callbacks", ["CheckpointSaver"]),
    ("cairn.loggers", ["RemoteUploaderDownloader", "InMemoryLogger"]),
    ("cairn.utils", ["ObjectStore", "S3ObjectStore", "GCSObjectStore", "OCIObjectStore", "LibcloudObjectStore"]),
    ("cairn.utils", ["FsspecObjectStore"]),
    ("cairn.utils.checkpoint", ["save_checkpoint", "load_checkpoint"]),
    ("cairn.checkpoint", ["read_checkpoint"]),
    ("cairn.errors", ["CairnError"]),
]


@pytest.mark.parametrize(("module", "names"), PUBLIC, ids=[module for module, _ in PUBLIC])
def test_every_public_name_of_the_contract_imports_from_its_place(module: str, names: list[str]) -> None:
    imported = importlib.import_module(module)
    assert [name for name in names if not hasattr(imported, name)] == []


def test_the_command_line_starts_without_torch_distributed_checkpoint() -> None:
    """``cairn ckpt ls`` stays quick: the layout must not drag the slow DCP import into the command line's start."""
    code = "import sys, cairn.cli.main; print('torch.distributed.checkpoint' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
