"""The package's structure, as docs/design.md ("Layers") states it: checked on the source tree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "sdecor"
KERNELS = ROOT / "sdecor_kernels"
MAX_LINES = 500

# modules allowed to import by name at run time: the extension loader, the optional-dependency
# loader and the command dispatcher
DYNAMIC_IMPORTERS = {"sdecor._ext", "sdecor._optional", "sdecor.cli"}
APPLICATIONS = ("cli", "demo", "train", "bench", "data", "models")


def _python_files() -> list[Path]:
    return sorted(list(PACKAGE.rglob("*.py")) + list(KERNELS.rglob("*.py")))


def _module_name(path: Path) -> str:
    base = PACKAGE.parent if PACKAGE in path.parents else ROOT
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_private(module: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in module.split(".")[-1:])


def _resolve(module: str, path: Path, level: int, name: str | None) -> str:
    """The absolute module of a (possibly relative) import in the file at path."""
    if level == 0:
        return name or ""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    package = package[: len(package) - (level - 1)]
    return ".".join(package + ([name] if name else []))


MODULES = {_module_name(p): p for p in _python_files()}
TREES = {name: ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for name, p in MODULES.items()}


def _own(module: str) -> bool:
    return module.split(".")[0] in ("sdecor", "sdecor_kernels")


def _imported_modules(name: str) -> dict[str, str]:
    """Local name -> absolute module, for `import a.b as c` and `from pkg import module`."""
    out = {}
    path = MODULES[name]
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, path, node.level, node.module)
            for a in node.names:
                full = f"{base}.{a.name}"
                if full in MODULES:
                    out[a.asname or a.name] = full
    return out


def test_design_document_is_in_the_repository():
    assert (ROOT / "docs" / "design.md").is_file()


def test_no_reference_to_documents_outside_the_repository():
    offenders = []
    for path in ROOT.rglob("*"):
        if not path.is_file() or any(p in (".git", ".venv", "build", "__pycache__") for p in path.parts):
            continue
        if path.suffix not in (".py", ".md", ".txt", ".toml", ".cfg", ".cpp", ".h", ".cu", ".cc", ".sh", "") \
                and path.name != "Makefile":
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if path == Path(__file__).resolve():
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if "../shared" in line or re.search(r"(?<![\w/])DESIGN\.md", line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_top_level_is_the_library():
    top = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or
           (p.is_dir() and (p / "__init__.py").exists())}
    assert (PACKAGE / "cli" / "__init__.py").is_file()
    misplaced = sorted(a for a in APPLICATIONS if a != "cli" and a in top)
    assert not misplaced, f"applications at the top of the package: {misplaced}"
    for app in ("demo", "train", "bench", "data", "models"):
        assert any(m == f"sdecor.cli.{app}" or m.startswith(f"sdecor.cli.{app}.") for m in MODULES), app


@pytest.mark.parametrize("name", sorted(MODULES))
def test_file_size(name):
    n = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {n} lines (at most {MAX_LINES})"


def test_imports_point_down():
    for name, tree in TREES.items():
        targets = set(_imported_modules(name).values())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets.add(_resolve(name, MODULES[name], node.level, node.module))
        if name.startswith("sdecor_kernels"):
            assert not any(t == "sdecor" or t.startswith("sdecor.") for t in targets), name
        elif not (name == "sdecor.cli" or name.startswith("sdecor.cli.")) and name != "sdecor.__main__":
            assert not any(t == "sdecor.cli" or t.startswith("sdecor.cli.") for t in targets), name
        if name.startswith("sdecor.ops"):
            assert not any(t == "sdecor.nn" for t in targets), name


def test_no_private_names_of_other_modules():
    offenders = []
    for name, tree in TREES.items():
        path = MODULES[name]
        local = _imported_modules(name)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(name, path, node.level, node.module)
                if not _own(base) or _is_private(base):
                    continue
                for a in node.names:
                    if a.name.startswith("_") and f"{base}.{a.name}" not in MODULES:
                        offenders.append(f"{name}:{node.lineno}: from {base} import {a.name}")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                target = local.get(node.value.id)
                if (target and _own(target) and target != name and not _is_private(target) and node.attr.startswith("_")
                        and not node.attr.startswith("__")):
                    offenders.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr} ({target})")
    assert not offenders, "\n".join(offenders)


def test_dynamic_imports_only_in_the_loaders_and_the_dispatcher():
    offenders = []
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if called in ("import_module", "__import__") and name not in DYNAMIC_IMPORTERS:
                    offenders.append(f"{name}:{node.lineno}")
    assert not offenders, offenders


def _is_autograd_function(cls: ast.ClassDef) -> bool:
    return any((isinstance(b, ast.Attribute) and b.attr == "Function") or
               (isinstance(b, ast.Name) and b.id == "Function") for b in cls.bases)


def test_apply_is_only_defined_by_autograd_functions():
    offenders = []
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and not _is_autograd_function(node):
                if any(isinstance(b, ast.FunctionDef) and b.name == "apply" for b in node.body):
                    offenders.append(f"{name}: class {node.name}")
    assert not offenders, offenders


def test_reference_has_no_backend_hook():
    for node in ast.walk(TREES["sdecor.reference"]):
        if isinstance(node, ast.FunctionDef):
            names = [a.arg for a in node.args.args + node.args.kwonlyargs]
            assert "eigh" not in names, f"sdecor.reference.{node.name} takes eigh="


def test_version_has_its_own_module():
    import sdecor
    from sdecor import _version

    assert sdecor.__version__ == _version.__version__
    assert "__version__ =" not in (PACKAGE / "__init__.py").read_text(encoding="utf-8")
