"""Packages that re-export their torch-using parts lazily (medxray.lazyexports): importing the package
loads no torch, the first use of a re-exported name does, and the name is the defining module's object."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("package", "name", "defined_in"),
    [
        ("medxray.models", "create_model", "medxray.models.registry"),
        ("medxray.data", "DatasetSplits", "medxray.data.core"),
        ("medxray.backends", "TorchBackend", "medxray.backends.eager"),
    ],
)
def test_a_lazy_package_imports_torch_only_when_a_heavy_name_is_used(package, name, defined_in):
    code = (
        "import importlib, sys\n"
        f"pkg = importlib.import_module({package!r})\n"
        "before = 'torch' in sys.modules\n"
        f"assert {name!r} in dir(pkg) and {name!r} in pkg.__all__\n"
        "assert 'torch' not in sys.modules  # dir() loads nothing\n"
        f"value = getattr(pkg, {name!r})\n"
        f"assert value is getattr(importlib.import_module({defined_in!r}), {name!r})\n"
        f"assert vars(pkg)[{name!r}] is value  # cached in the package after first use\n"
        "assert not hasattr(pkg, 'no_such_name')\n"
        "print(before, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]


def test_an_unknown_name_is_an_attribute_error_naming_the_package():
    import medxray.models

    with pytest.raises(AttributeError, match="module 'medxray.models' has no attribute 'no_such_name'"):
        medxray.models.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        from medxray.models import no_such_name  # noqa: F401
