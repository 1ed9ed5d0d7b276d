"""The package's layout rules, read from the source (fast, no display, nothing imported).

* no import circle among the package's modules, lazy imports inside functions included;
* nothing outside ``_widgets/`` imports Qt (qtpy or a binding) or napari; the one exception is
  the command line's ``kidseg review`` and ``kidseg demo``, which open a napari viewer
  (``import napari`` inside the command, never Qt);
* nothing outside ``_widgets/cascade_widget.py`` touches a name of the dock that starts with ``_``.

Each check is also run on a small package written here that breaks it, so none passes by
finding nothing.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "napari_kidseg"
DOCK = PACKAGE / "_widgets" / "cascade_widget.py"
GUI_MODULES = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "magicgui", "napari", "vispy")
VIEWER_LAUNCHERS = ("cli",)  # modules (or packages) that may `import napari` to open a viewer


def _layout():
    spec = importlib.util.spec_from_file_location("layout_figures", ROOT / "scripts" / "layout_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


layout = _layout()


def _write(root: Path, files: dict) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / next(iter(files)).split("/")[0]


# ---------------------------------------------------------------------------------- import circles
def test_no_import_circle_among_the_package_modules():
    circles = layout.import_circles(layout.import_graph(PACKAGE))
    assert circles == [], "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_a_circle_hidden_behind_a_lazy_import_is_found(tmp_path):
    pkg = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/io/__init__.py": '"""docstring only"""\n',
            "pkg/io/volumes.py": "def read():\n    from .dicom_seg import seg\n    return seg\n",
            "pkg/io/dicom_seg.py": "from . import volumes\n\nseg = 1\n",
            "pkg/flat.py": "from .io import volumes\n",
        },
    )
    graph = layout.import_graph(pkg)
    assert graph["pkg.flat"] == {"pkg.io.volumes"}  # `from .io import volumes` names the module
    assert layout.import_circles(graph) == [["pkg.io.dicom_seg", "pkg.io.volumes"]]


# -------------------------------------------------------------------------------- no Qt in the core
def gui_imports(package_dir: Path, launchers=VIEWER_LAUNCHERS) -> list[str]:
    """``file:line module`` of every import of Qt or napari outside the package's ``_widgets/``
    (a bare ``import napari`` in a viewer launcher excepted)."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).with_suffix("").parts
        if "_widgets" in parts:
            continue
        launcher = parts[0] in launchers
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                if launcher and isinstance(node, ast.Import) and name == "napari":
                    continue
                if name.split(".")[0] in GUI_MODULES:
                    found.append(f"{path.relative_to(package_dir.parent)}:{node.lineno} {name}")
    return found


def test_no_module_outside_the_widgets_imports_qt_or_napari():
    assert gui_imports(PACKAGE) == []


def test_a_lazy_qt_import_in_the_core_is_found(tmp_path):
    pkg = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/core.py": "def show():\n    from qtpy.QtWidgets import QLabel\n    import napari.layers\n",
            "pkg/_widgets/dock.py": "from qtpy.QtWidgets import QWidget\n",
            "pkg/cli/review.py": "def review():\n    import napari\n    from qtpy import QtCore\n",
        },
    )
    assert gui_imports(pkg) == [
        "pkg/cli/review.py:3 qtpy",
        "pkg/core.py:2 qtpy.QtWidgets",
        "pkg/core.py:3 napari.layers",
    ]


# ------------------------------------------------------------------ the dock's private names stay in
def dock_private_names(dock: Path, class_name: str = "CascadeWidget") -> set[str]:
    """The ``_names`` the dock class defines: its methods and what it assigns on ``self``."""
    names = set()
    for node in ast.walk(ast.parse(dock.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for n in ast.walk(node):
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef):
                    names.add(n.name)
                elif (
                    isinstance(n, ast.Attribute)
                    and isinstance(n.ctx, ast.Store)
                    and isinstance(n.value, ast.Name)
                    and n.value.id == "self"
                ):
                    names.add(n.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _own_private_names(tree) -> set[str]:
    """Names that other classes assign on ``self`` (a pool's ``_closed`` is not the dock's)."""
    return {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and isinstance(n.ctx, ast.Store)
        and isinstance(n.value, ast.Name)
        and n.value.id == "self"
    }


def private_reaches(dock: Path, files, others_define: set[str]) -> list[str]:
    """``file:line receiver._name`` wherever a file reaches a private name of the dock.

    A receiver named like the dock (``cascade_widget``, ``dock``) is checked for every private
    name; any other receiver (not ``self``) for the dock's names that no other class defines."""
    private = dock_private_names(dock)
    found = []
    for path in files:
        text = path.read_text()
        own = others_define | _own_private_names(ast.parse(text))
        for node in ast.walk(ast.parse(text)):
            if not (isinstance(node, ast.Attribute) and node.attr in private):
                continue
            receiver = ast.unparse(node.value)
            if receiver in ("self", "cls"):
                continue
            dock_like = re.search(r"(cascade_widget|dock)$", receiver) is not None
            if dock_like or node.attr not in own:
                found.append(f"{path.name}:{node.lineno} {receiver}.{node.attr}")
    return found


def _outside_the_dock():
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py")]
    files += [*(ROOT / "scripts").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    return [p for p in sorted(files) if p != DOCK]


def _defined_by_other_package_classes(dock: Path) -> set[str]:
    names = set()
    for path in PACKAGE.rglob("*.py"):
        if path != dock:
            names |= _own_private_names(ast.parse(path.read_text()))
    return names


def test_nothing_outside_the_dock_touches_its_private_names():
    if not DOCK.exists():
        pytest.skip("no dock module")
    reaches = private_reaches(DOCK, _outside_the_dock(), _defined_by_other_package_classes(DOCK))
    assert reaches == []


def test_a_reach_into_the_dock_is_found(tmp_path):
    dock = _write(
        tmp_path,
        {
            "pkg/dock.py": (
                "class CascadeWidget:\n    def __init__(self):\n        self._worker = None\n"
                "        self._closed = False\n\n    def _refresh_layers(self):\n        pass\n"
            )
        },
    ).joinpath("dock.py")
    user = tmp_path / "user.py"
    user.write_text(
        "class Pool:\n    def __init__(self):\n        self._closed = True\n\n"
        "def use(cw, pool, wl):\n    cw._worker = 1\n    wl.cascade_widget._refresh_layers()\n"
        "    return pool._closed, wl._closed, cw.busy\n"
    )
    found = private_reaches(dock, [user], set())
    assert found == ["user.py:6 cw._worker", "user.py:7 wl.cascade_widget._refresh_layers"]
