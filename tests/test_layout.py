"""The README's module table is the import order: a module imports only modules listed below it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def table_order() -> list[str]:
    """Module names in the README's table, top first (`job/data/` stands for the whole package)."""
    rows = re.findall(r"^\| `([^`]+)`", (ROOT / "README.md").read_text(), flags=re.M)
    names = [r.removesuffix(".py").rstrip("/").replace("/", ".") for r in rows if r.startswith("job/")]
    return [n for n in names if n != "job.__main__"]


def owner(module: str, order: list[str]) -> str | None:
    return next((n for n in order if module == n or module.startswith(n + ".")), None)


def imports_of(path: Path) -> set[str]:
    """Every job module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | ({f"{node.module}.{a.name}" for a in node.names} if node.module == "job" else set())
    return {m for m in found if m.startswith("job.")}


def test_the_table_lists_every_module_once():
    order = table_order()
    assert len(order) == len(set(order))
    for path in (ROOT / "job").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if path.name != "__init__.py" and module != "job.__main__":
            assert owner(module, order), f"{module} is not in the README's module table"


def test_imports_flow_down_the_table():
    order = table_order()
    upward = []
    for path in (ROOT / "job").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        me = owner(module, order)
        if me is None:
            continue
        for imported in imports_of(path):
            them = owner(imported, order)
            if them and them != me and order.index(them) < order.index(me):
                upward.append(f"{module} imports {imported}")
    assert not upward, upward


def test_the_installed_package_holds_every_module(tmp_path):
    """The image installs the project non-editable (`pip install /src`); the venv here is editable and would
    hide a subpackage the build leaves out. Build the wheel from a copy and compare its modules with the tree."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"
    shutil.copytree(ROOT / "job", src / "job", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("job/") and n.endswith(".py")}
    tree = {p.relative_to(src).as_posix() for p in (src / "job").rglob("*.py")}
    assert shipped == tree, f"missing from the wheel: {sorted(tree - shipped)}"
