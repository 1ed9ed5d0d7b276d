"""The package's layout in figures: modules, their sizes, import circles, long functions.

    python scripts/layout_figures.py [PACKAGE_DIR]

Reads the source with :mod:`ast` (nothing is imported). Every import counts, the ones inside a
function too: a lazy import that closes a loop is still a loop. A module is a ``.py`` file of the
package (``__init__.py`` files included); sizes are physical lines. An import circle is a strongly
connected group of two or more modules in the graph of "module A imports module B". A function's
length runs from its ``def`` (decorators excluded) to its last line; methods are named
``Class.method``. tests/test_layout.py checks the same graph.
"""

from __future__ import annotations

import ast
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "napari_kidseg"
LONG_FUNCTION = 100  # lines


def module_name(path: Path, package_dir: Path) -> str:
    rel = path.relative_to(package_dir.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules(package_dir: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package."""
    return {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, modules) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source (lazy imports included)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, name, is_package)
            # `from . import files` names a module; `from .files import atomic_path` names a function
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            # `import napari_kidseg.io.files` imports the module (and, along the way, its packages)
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(package_dir: Path = PACKAGE) -> dict[str, set[str]]:
    modules = package_modules(package_dir)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan), each sorted, largest first."""
    index, low, on_stack, stack, circles = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(circles, key=lambda g: (-len(g), g))


def long_functions(package_dir: Path = PACKAGE, limit: int = LONG_FUNCTION) -> list[tuple[str, int]]:
    """(module:function, lines) of every function longer than ``limit`` lines, longest first."""
    found = []
    for name, path in package_modules(package_dir).items():
        tree = ast.parse(path.read_text(), str(path))

        def walk(node, prefix, module=name):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = child.end_lineno - child.lineno + 1
                    if length > limit:
                        found.append((f"{module}:{prefix}{child.name}", length))
                    walk(child, f"{prefix}{child.name}.")
                elif isinstance(child, ast.ClassDef):
                    walk(child, f"{prefix}{child.name}.")

        walk(tree, "")
    return sorted(found, key=lambda f: (-f[1], f[0]))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    package_dir = Path(argv[0]).resolve() if argv else PACKAGE
    modules = package_modules(package_dir)
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules.items()}
    largest = max(sizes, key=sizes.get)
    circles = import_circles(import_graph(package_dir))
    long = long_functions(package_dir)
    print(f"modules: {len(modules)} (.py files under {package_dir.name}/, __init__.py included)")
    print(f"largest module: {sizes[largest]} lines ({largest})")
    print(f"median module: {statistics.median(sizes.values()):g} lines")
    print(f"import circles: {len(circles)}")
    for group in circles:
        print("  " + " <-> ".join(group))
    print(f"functions over {LONG_FUNCTION} lines: {len(long)}")
    for fn, length in long:
        print(f"  {length:5d}  {fn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
