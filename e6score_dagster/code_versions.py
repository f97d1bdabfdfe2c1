"""Code versions derived from source: a digest of a module and the package modules it imports.

A stage's code version must change whenever the code that computes its output changes, and
only then. So it is the digest of the asset's own module plus every `e6score_dagster` module it
imports, transitively (a static walk of the import statements, nothing is executed). Each file
is digested as its syntax tree without docstrings, so comments, formatting and docstrings do
not retrain a model. Modules that only orchestrate (where state lives, when things run, how a
stage is published, what the UI plots) cannot change an output and are left out, so editing
them does not rebuild every stage.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PACKAGE = "e6score_dagster"
PACKAGE_DIR = Path(__file__).resolve().parent
ORCHESTRATION_ONLY = frozenset(
    f"{PACKAGE}.{m}"
    for m in (
        "automation",
        "checks",
        "code_versions",
        "definitions",
        "dump_source",
        "plots",
        "resources",
        "stage",
        "store",
    )
)


def module_file(module: str, root: Path = PACKAGE_DIR) -> Path | None:
    """The file of a package module under `root` (the package folder), or None."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(module: str, tree: ast.Module, root: Path) -> set[str]:
    found: set[str] = set()
    is_package = (module_file(module, root) or Path()).name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if module_file(m, root) is not None}


def _without_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return tree


@cache
def _parse(path: Path, mtime_ns: int) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def code_closure(module: str, root: Path = PACKAGE_DIR) -> dict[str, Path]:
    """`module` and every package module it imports, transitively, minus orchestration."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        path = module_file(name, root)
        if name in seen or path is None or name == PACKAGE:
            continue
        seen[name] = path
        tree = _parse(path, path.stat().st_mtime_ns)
        todo.extend(m for m in _imported_modules(name, tree, root) if m not in ORCHESTRATION_ONLY)
    return seen


def code_version(module: str, root: Path = PACKAGE_DIR) -> str:
    """A short digest of the code `module` runs; what each asset declares as its code_version."""
    h = hashlib.sha256()
    for name, path in sorted(code_closure(module, root).items()):
        tree = _without_docstrings(ast.parse(path.read_text(encoding="utf-8")))
        h.update(f"{name}\n{ast.dump(tree)}\n".encode())
    return h.hexdigest()[:12]
