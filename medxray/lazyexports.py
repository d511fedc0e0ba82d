"""Lazy package exports (PEP 562 module ``__getattr__``): a package re-exports names of its heavy
submodules without importing them until first used.

So ``import medxray.models.variants`` (a torch-free table the CLI lists) does not import torch through
``medxray/models/__init__.py``, while ``from medxray.models import create_model`` keeps working.
A package using it also imports the same names under ``typing.TYPE_CHECKING`` for type checkers.

Imports nothing of medxray (tests/test_import_graph.py).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the package named ``package`` (pass ``__name__``).

    ``exports`` maps an exported name to the submodule that defines it (relative to the package,
    e.g. ``{"create_model": "registry"}``). The first access imports that submodule and caches the
    value in the package's namespace; an unknown name raises AttributeError as for any module.
    """
    table = dict(exports)

    def __getattr__(name: str) -> Any:
        submodule = table.get(name)
        if submodule is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f"{package}.{submodule}")
        value = getattr(module, name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(table))

    return __getattr__, __dir__
