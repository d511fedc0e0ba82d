"""The package layout from the modules' own docstrings: ``python -m medxray.layout`` prints the
``medxray/`` part of the README's Layout section.

Each package line carries the first sentence of its ``__init__`` docstring and the list of its
modules; each top-level module carries the first sentence of its docstring. tests/test_layout.py
fails when a module under ``medxray/`` is missing from the README's Layout section, so the section
is regenerated with this script rather than edited by hand.

Reads source files only (``ast``): must not import any other medxray module.
"""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
WIDTH = 110
INDENT = 16


def first_sentence(path: Path) -> str:
    """The docstring's first sentence (up to the first period followed by a space, or the first line)."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    text = " ".join(doc.split("\n\n")[0].split())
    cut = text.find(". ")
    text = text[: cut + 1] if cut > 0 else text
    return text.rstrip(".:") or "(no docstring)"


def modules(pkg: Path) -> list[str]:
    """Module names of a package (not ``__init__``/``__main__``), sorted."""
    return sorted(p.stem for p in pkg.glob("*.py") if p.stem not in ("__init__", "__main__"))


def subpackages(pkg: Path) -> list[Path]:
    return sorted(d for d in pkg.iterdir() if d.is_dir() and (d / "__init__.py").is_file())


def layout_lines(root: Path = PACKAGE) -> list[str]:
    """The lines of the layout block for the package at ``root`` (default: medxray itself)."""

    def entry(name: str, text: str) -> list[str]:
        head = f"  {name:<{INDENT - 2}}"
        body = textwrap.wrap(text, WIDTH - INDENT) or [""]
        if len(head) >= INDENT:  # a name wider than the column: the description starts on the next line
            return [head.rstrip()] + [" " * INDENT + ln for ln in body]
        return [head + body[0]] + [" " * INDENT + ln for ln in body[1:]]

    lines = [f"{root.name}/".ljust(INDENT) + first_sentence(root / "__init__.py")]
    for name in modules(root):
        lines += entry(f"{name}.py", first_sentence(root / f"{name}.py"))
    for sub in subpackages(root):
        lines += entry(f"{sub.name}/", first_sentence(sub / "__init__.py"))
        lines += [" " * INDENT + ln for ln in textwrap.wrap("modules: " + ", ".join(modules(sub)), WIDTH - INDENT)]
        for nested in subpackages(sub):
            lines += [" " * INDENT + f"{nested.name}/: " + ", ".join(modules(nested))]
    return lines


def main() -> int:
    sys.stdout.write("\n".join(layout_lines()) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
