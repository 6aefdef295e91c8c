"""The dependency rule, checked on the source: ``worker/ → server/ → dykaf/``, and no import cycles.

The import graph is read with ``ast`` from every module of the product (top-level imports and the
ones inside functions alike, since a cycle dodged by a function-local import is still a cycle).
Importing ``a.b.c`` runs the ``__init__`` of ``a`` and ``a.b`` first, so an import also points at
those packages, except where the importer is inside them (they are already being initialised).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("dykaf", "server", "worker", "web", "migrations")

# Function-local imports of first-party modules that stay local, each with its reason. Anything
# else is imported at the top of the module (a local import that only dodges a cycle hides it).
LOCAL_IMPORT_ALLOWED: dict[tuple[str, str], str] = {
    (
        "server.jobs.spec",
        "dykaf.baselines.registry",
    ): "torch: the Celery app imports the contract and must stay cheap",
    (
        "server.api.routes.registry",
        "dykaf.baselines.registry",
    ): "torch: loaded on the first request, the API starts fast",
    ("worker.execute", "worker.training.runner"): "torch: loaded inside the task, never before the pool",
    ("worker.execute", "worker.training.checkpoint"): "torch: loaded inside the task, never before the pool",
    ("worker.execute", "worker.distributed.launch"): "torch: loaded inside the task, never before the pool",
    (
        "worker.distributed.rank_main",
        "worker.execute",
    ): "SQLAlchemy/Celery: only ranks of a service run write to the database",
    ("worker.cli", "worker.local"): "torch: `dykaf-lab run` only; the other commands start fast",
    ("worker.training.runner", "worker.lm.hf"): "transformers/peft: only runs that export or fine-tune",
    (
        "worker.lm.cli_data",
        "worker.lm.prepare",
    ): "numpy/tokenizers: data commands only",
    ("worker.lm.cli_data", "worker.lm.shards"): "numpy: the data commands only; --help starts fast",
    ("worker.lm.cli_data", "worker.lm.presets"): "torch: the presets command only; --help starts fast",
}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    line: int
    local: bool  # inside a function


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def product_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[_module_name(path)] = path
    return modules


def _is_package(module: str, modules: dict[str, Path]) -> bool:
    return modules[module].name == "__init__.py"


def _resolve(node: ast.ImportFrom, importer: str, modules: dict[str, Path]) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not _is_package(importer, modules):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _first_party(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def imports_of(module: str, modules: dict[str, Path]) -> list[Import]:
    """First-party imports of ``module`` (``from a import b`` names module ``a.b`` when it is one)."""
    tree = ast.parse(modules[module].read_text(encoding="utf-8"))
    found: list[Import] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(child, module, modules)
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                if _first_party(target):
                    found.append(Import(module, target, getattr(child, "lineno", 0), local))
            visit(child, inner)

    visit(tree, False)
    return found


def _known(target: str, modules: dict[str, Path]) -> str | None:
    """The product module ``target`` names (``import a.b.c`` where c is a class: ``a.b``)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module in modules:
        own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        if _is_package(module, modules):
            own_packages.add(module)
        for item in imports_of(module, modules):
            target = _known(item.target, modules)
            if target is None:
                continue
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                step = ".".join(parts[:i])
                if step in modules and step not in own_packages and step != module:
                    graph[module].add(step)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def _all_imports() -> list[Import]:
    modules = product_modules()
    return [item for module in modules for item in imports_of(module, modules)]


def _crossing(source: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{item.importer}:{item.line} imports {item.target}"
        for item in _all_imports()
        if item.importer.split(".")[0] == source and item.target.split(".")[0] in forbidden
    ]


def test_the_library_imports_nothing_of_the_product() -> None:
    assert _crossing("dykaf", ("server", "worker", "web", "migrations")) == []


def test_the_server_never_imports_the_worker() -> None:
    assert _crossing("server", ("worker",)) == []


def test_migrations_and_web_import_no_worker() -> None:
    assert _crossing("migrations", ("worker",)) + _crossing("web", ("worker",)) == []


def test_no_import_cycles_between_modules() -> None:
    cycle = find_cycle(import_graph(product_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_function_local_first_party_imports_are_on_the_allow_list() -> None:
    modules = product_modules()
    unexpected = [
        f"{item.importer}:{item.line} imports {item.target} inside a function"
        for item in _all_imports()
        if item.local and (item.importer, _known(item.target, modules)) not in LOCAL_IMPORT_ALLOWED
    ]
    assert unexpected == []


def test_the_allow_list_has_no_stale_entries() -> None:
    modules = product_modules()
    used = {(item.importer, _known(item.target, modules)) for item in _all_imports() if item.local}
    assert sorted(set(LOCAL_IMPORT_ALLOWED) - used) == []


# --- the checker itself -------------------------------------------------------------------------
def test_find_cycle_reports_a_cycle_and_accepts_a_tree() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_inside_functions_and_relative_imports_are_seen(tmp_path: Path) -> None:
    source = "from . import b\n\ndef f():\n    from server.x import y\n    import worker.z\n"
    modules = {"server.pkg.a": tmp_path / "a.py", "server.pkg.b": tmp_path / "b.py"}
    modules["server.pkg.a"].write_text(source)
    found = imports_of("server.pkg.a", modules)
    assert [(i.target, i.local) for i in found] == [
        ("server.pkg.b", False),
        ("server.x", True),
        ("worker.z", True),
    ]
