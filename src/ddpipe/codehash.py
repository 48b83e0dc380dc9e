"""The code part of every cache key, derived from the import graph instead of listed by hand.

A stage's outputs depend on the module that defines its functions and on every ddpipe module that module
imports, directly or through other modules. :meth:`Tree.closure` finds those modules by reading their source:
every ``import ddpipe...`` and ``from ddpipe... import ...`` statement (relative ones too), wherever it
stands, also inside a function. ``from ddpipe.x import name`` counts the module ``ddpipe.x.name`` when it is
one, else ``ddpipe.x`` (a package's ``__init__.py`` counts when something is imported from the package by
name, not merely because a module inside it is imported). :func:`code_hash` hashes the closure's files
(paths relative to the package, and bytes), so an edit to any module a stage reaches changes that stage's
key and an edit anywhere else does not.

The installed package's files are read once, when this module is first imported, so the keys of a process
describe the code it loaded even if the files change while it runs. Third-party code is not hashed: its
versions are pinned in ``constraints.txt``.
"""

from __future__ import annotations

import ast
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Callable

import ddpipe

PACKAGE = "ddpipe"


class Tree:
    """The source files of a ddpipe package folder (``root``), read once: relative path -> bytes."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.files = {p.relative_to(self.root).as_posix(): p.read_bytes()
                      for p in sorted(self.root.rglob("*.py")) if "__pycache__" not in p.parts}
        self._imports: dict[str, set[str]] = {}  # module -> the modules it imports (each file parsed once)

    def path(self, name: str) -> str | None:
        """The file of module ``name`` (``ddpipe.methods.rded`` -> ``methods/rded.py``), or None if it has none."""
        parts = name.split(".")
        if parts[0] != PACKAGE:
            return None
        base = "/".join(parts[1:])
        for rel in ((f"{base}.py",) if base else ()) + (f"{base}/__init__.py".lstrip("/"),):
            if rel in self.files:
                return rel
        return None

    def imports_of(self, name: str) -> set[str]:
        """The ddpipe modules that module ``name``'s source imports (anywhere in the file)."""
        if name not in self._imports:
            self._imports[name] = self._parse_imports(name)
        return self._imports[name]

    def _parse_imports(self, name: str) -> set[str]:
        rel = self.path(name)
        is_package = rel.endswith("__init__.py")
        found: set[str | None] = set()
        for node in ast.walk(ast.parse(self.files[rel], filename=rel)):
            if isinstance(node, ast.Import):
                found.update(self._existing(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package, up level - 1 packages
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = package[: len(package) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if self.path(sub) else self._existing(base))
        found.discard(None)
        return found

    def _existing(self, name: str) -> str | None:
        """``name`` or its nearest enclosing ddpipe module that has a source file (None outside ddpipe)."""
        parts = name.split(".")
        while parts:
            if self.path(".".join(parts)):
                return ".".join(parts)
            parts.pop()
        return None

    def closure(self, modules) -> list[str]:
        """``modules`` and every ddpipe module they import, transitively; sorted."""
        seen: set[str] = set()
        todo = [m for m in modules if self.path(m)]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += sorted(self.imports_of(m) - seen)
        return sorted(seen)

    def hash(self, modules=None) -> str:
        """Hash of the source files (relative path and bytes of each) of ``modules``' closure, or of every file."""
        rels = self.files if modules is None else [self.path(m) for m in self.closure(modules)]
        h = hashlib.sha256()
        for rel in sorted(rels):
            h.update(rel.encode() + b"\0" + self.files[rel])
        return h.hexdigest()[:16]


INSTALLED = Tree(Path(ddpipe.__file__).resolve().parent)


@lru_cache(maxsize=None)
def _installed_hash(modules: tuple[str, ...]) -> str:
    return INSTALLED.hash(modules)


def module_of(fn: Callable) -> str:
    """The module that defines ``fn`` (a function, a lambda, a class or a ``functools.partial``)."""
    return getattr(fn, "func", fn).__module__


def code_hash(*functions: Callable) -> str:
    """The code part of a cache key: the package version and the hash of the modules defining ``functions``,
    with everything they import (the installed package as this process loaded it)."""
    modules = tuple(sorted({module_of(f) for f in functions}))
    return f"{ddpipe.__version__}+{_installed_hash(modules)}"


CODE_VERSION = f"{ddpipe.__version__}+{INSTALLED.hash()}"  # every file of the package (report.json)


def shared_key(payload: dict, code: Callable) -> str:
    """The key of a shared output: a hash of ``payload`` (everything the output depends on, JSON-able) and of the
    code of ``code``'s module with everything it imports (:func:`code_hash`)."""
    data = json.dumps({**payload, "code": code_hash(code)}, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:32]
