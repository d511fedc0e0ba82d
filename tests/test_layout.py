"""The README's Layout section names every module under medxray/ (issue 11 item 9).

Regenerate its ``medxray/`` part with ``python -m medxray.layout`` (from the modules' docstrings)
when this fails.
"""

from __future__ import annotations

import re
from pathlib import Path

from medxray.layout import PACKAGE, layout_lines, modules, subpackages

REPO = Path(__file__).resolve().parents[1]


def readme_layout_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Layout") :]
    section = section[: section.find("\n## ", 1)] if "\n## " in section[1:] else section
    return section[section.index("```") + 3 : section.index("```", section.index("```") + 3)]


def package_chunk(block: str, name: str) -> str:
    """The lines of ``name/`` up to the next line that starts another entry at the same indent."""
    lines = block.splitlines()
    start = next((i for i, ln in enumerate(lines) if re.match(rf"\s*{re.escape(name)}/(\s|$)", ln)), None)
    assert start is not None, f"README Layout has no line for {name}/; run `python -m medxray.layout`"
    indent = len(lines[start]) - len(lines[start].lstrip())
    out = [lines[start]]
    for ln in lines[start + 1 :]:
        if ln.strip() and len(ln) - len(ln.lstrip()) <= indent:
            break
        out.append(ln)
    return "\n".join(out)


def test_readme_layout_names_every_module():
    block = readme_layout_block()
    missing = [f"{name}.py" for name in modules(PACKAGE) if not re.search(rf"\b{re.escape(name)}\.py\b", block)]
    for sub in subpackages(PACKAGE):
        chunk = package_chunk(block, sub.name)
        missing += [f"{sub.name}/{m}.py" for m in modules(sub) if not re.search(rf"\b{re.escape(m)}\b", chunk)]
    assert not missing, (
        f"README's Layout section misses {', '.join(missing)}; regenerate its medxray/ part with "
        f"`python -m medxray.layout`"
    )


def test_generator_output_passes_its_own_check(tmp_path):
    """What `python -m medxray.layout` prints satisfies the check above (so regenerating fixes it)."""
    block = "\n".join(layout_lines())
    for sub in subpackages(PACKAGE):
        chunk = package_chunk(block, sub.name)
        assert all(re.search(rf"\b{re.escape(m)}\b", chunk) for m in modules(sub)), sub.name
    assert all(f"{m}.py" in block for m in modules(PACKAGE))
    # and a new module is noticed: a fake package with one more module than the README names
    pkg = tmp_path / "medxray"
    (pkg / "evaluation").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""x."""\n')
    (pkg / "evaluation" / "__init__.py").write_text('"""y."""\n')
    (pkg / "evaluation" / "brand_new.py").write_text('"""z."""\n')
    assert "brand_new" not in package_chunk(readme_layout_block(), "evaluation")
    assert "brand_new" in package_chunk("\n".join(layout_lines(pkg)), "evaluation")
