"""Names of a package that load on first use (PEP 562): a package lists `{name: ".module"}` and gets back the module
`__getattr__` and `__dir__` that import each name's module when the name is first read, so that importing the package
imports none of them (a tool that needs neither torch nor diffusers starts in a fraction of a second)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_names(package: str, exports: dict[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """(`__getattr__`, `__dir__`) for the package named `package` whose globals are `namespace`: `exports` maps each
    lazily loaded name to the module (relative to the package) that defines it."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        namespace[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
