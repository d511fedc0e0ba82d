"""The package's import graph: no circles, no private names imported across modules, and the "must not
import" rules of the module docstrings held as data (FORBIDDEN, ONLY).

Every ``import`` / ``from ... import`` in ``medxray/`` counts, at module level or inside a function (a
lazy import that closes a circle is still a circle: it only moves the failure to run time). Importing
``medxray.a.b`` also runs ``medxray/a/__init__.py``; that implicit parent edge is not counted, or every
package whose ``__init__`` re-exports a submodule would be a "circle".
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "medxray"


def module_files() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


@lru_cache(maxsize=1)
def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """(edges {module: {imported medxray modules}}, [(module, imported module, private name)])."""
    mods = module_files()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private: list[tuple[str, str, str]] = []
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    targets.append(full if full in mods else base)
                    if a.name.startswith("_") and not a.name.startswith("__") and base.startswith("medxray"):
                        private.append((mod, base, a.name))
            for t in targets:
                if t.startswith("medxray"):
                    r = _resolve(t, mods)
                    if r and r != mod:
                        edges[mod].add(r)
    return edges, private


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def depth(edges: dict[str, set[str]]) -> int:
    """Longest chain of imports (number of edges) in an acyclic graph."""
    memo: dict[str, int] = {}

    def d(v: str) -> int:
        if v not in memo:
            memo[v] = 0
            memo[v] = max((1 + d(w) for w in edges.get(v, ())), default=0)
        return memo[v]

    return max(d(v) for v in edges)


def test_cycle_finder_finds_a_planted_circle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(edges) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_in_medxray():
    edges, _ = import_graph()
    assert len(edges) > 20
    cycles = find_cycles(edges)
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_names():
    _, private = import_graph()
    assert not private, "private names imported across modules: " + ", ".join(
        f"{m} imports {b}.{n}" for m, b, n in private
    )


@lru_cache(maxsize=1)
def all_imports() -> dict[str, set[str]]:
    """{module: every dotted name it imports}, medxray targets resolved to modules, others as written.

    Imports inside functions count: a rule "must not import torch" holds only if torch is never imported.
    """
    mods = module_files()
    out: dict[str, set[str]] = {m: set() for m in mods}
    edges, _ = import_graph()
    for mod, path in mods.items():
        out[mod] |= edges[mod]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out[mod] |= {a.name for a in node.names if not a.name.startswith("medxray")}
            elif (
                isinstance(node, ast.ImportFrom)
                and not node.level
                and node.module
                and not node.module.startswith("medxray")
            ):
                out[mod].add(node.module)
    return out


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# The "must not import" rules that module docstrings state, as data: (module or package, forbidden
# prefixes). A package entry covers every module under it. Each rule says why in a few words.
FORBIDDEN: list[tuple[str, tuple[str, ...], str]] = [
    ("medxray.limits", ("medxray.",), "decode workers import it; only medxray.errors (checked below)"),
    ("medxray.fileio", ("medxray.",), "leaf: only medxray.errors (checked below)"),
    ("medxray.display", ("medxray.", "torch", "monai"), "decode workers import it; numpy and PIL only"),
    ("medxray.overlay", ("torch", "monai"), "decode workers draw overlays with it: torch-free (checked below)"),
    ("medxray.training.distributed", ("medxray.",), "every training module builds on it"),
    ("medxray.evaluation.result", ("medxray.",), "shared by the job and the report"),
    (
        "medxray.evaluation.report",
        ("medxray.evaluation.run", "medxray.training", "medxray.models", "medxray.data"),
        "renders numbers it is given",
    ),
    ("medxray.evaluation.compare", ("torch", "medxray.training"), "checkpoints go through evaluation.run"),
    (
        "medxray.evaluation.metrics",
        ("torch", "medxray.models", "medxray.data", "medxray.training", "medxray.evaluation."),
        "pure NumPy / scikit-learn",
    ),
    (
        "medxray.evaluation.assess",
        (
            "torch",
            "medxray.models",
            "medxray.training",
            "medxray.evaluation.run",
            "medxray.evaluation.external",
            "medxray.evaluation.compare",
        ),
        "pure assessment",
    ),
    (
        "medxray.evaluation.localisation",
        ("medxray.training", "medxray.evaluation.run", "medxray.evaluation.report"),
        "localisation metrics only",
    ),
    ("medxray.evaluation.run", ("medxray.training", "medxray.train"), "shared helpers come from hardware/fileio/data"),
    (
        "medxray.evaluation.stages",
        ("medxray.training", "medxray.train", "medxray.evaluation.run"),
        "the stages evaluate() runs in order",
    ),
    (
        "medxray.evaluation.score",
        ("medxray.training", "medxray.train", "medxray.evaluation.run", "medxray.evaluation.stages"),
        "one scoring pass; promote uses it too",
    ),
    (
        "medxray.evaluation.external",
        ("torch", "medxray.models", "medxray.training", "medxray.evaluation.run"),
        "scores predictions files without a model",
    ),
    (
        "medxray.training.config",
        ("medxray.training.loop", "medxray.checkpoint", "medxray.models", "medxray.evaluation"),
        "the CLI reads configs before anything heavy",
    ),
    (
        "medxray.training.loop",
        (
            "medxray.cli",
            "medxray.evaluation.run",
            "medxray.evaluation.report",
            "medxray.evaluation.compare",
            "medxray.evaluation.external",
        ),
        "metrics only",
    ),
    ("medxray.training.state", ("medxray.training.loop", "medxray.models", "medxray.evaluation"), "checkpoint state"),
    (
        "medxray.training.data",
        ("medxray.training.loop", "medxray.models", "medxray.checkpoint", "medxray.evaluation"),
        "prepares datasets for one run",
    ),
    (
        "medxray.training.steps",
        ("medxray.training.loop", "medxray.checkpoint", "medxray.evaluation"),
        "shared with bench/train_step.py",
    ),
    (
        "medxray.cli",
        ("torch", "monai", "streamlit", "pandas"),
        "thin entry points: handlers call the library, which imports these (`medxray --help` stays fast)",
    ),
    ("medxray.cli.common", ("medxray.cli.",), "every command module imports it; it imports none of them"),
    ("medxray.pacs.scp", ("torch", "medxray.scoring.engine"), "the listener stays light"),
    ("medxray.pacs.config", ("pynetdicom", "torch", "medxray.scoring.engine"), "loading a config is cheap"),
    ("medxray.pacs.spool", ("pynetdicom", "torch", "medxray.scoring.engine"), "file handling only"),
    ("medxray.pacs.results", ("pynetdicom",), "builds objects, sends nothing"),
    ("medxray.pacs.queuer", ("pynetdicom", "torch"), "a thread over results; the engine runs in the main loop"),
    ("medxray.scoring.warm", ("torch",), "holds what a run built; the checkpoint and model come from their modules"),
    ("medxray.pacs.sender", ("torch", "medxray.scoring.engine"), "the sender stays light"),
    ("medxray.pacs.pull", ("pynetdicom",), "goes through the sender"),
    (
        "medxray.review.viewing",
        ("streamlit", "medxray.review.worklist", "medxray.review.model_card"),
        "only review.ui imports streamlit",
    ),
    (
        "medxray.review.model_card",
        ("streamlit", "torch", "medxray.review.worklist"),
        "only review.ui imports streamlit; of review.study only the shared value formatter",
    ),
    (
        "medxray.review.worklist",
        ("streamlit", "medxray.review.study", "medxray.review.model_card"),
        "only review.ui imports streamlit",
    ),
    (
        "medxray.review.study",
        ("streamlit", "medxray.review.worklist", "medxray.review.model_card"),
        "only review.ui imports streamlit",
    ),
    (
        "medxray.review.settings",
        ("streamlit", "torch", "medxray.review.study", "medxray.review.worklist", "medxray.review.model_card"),
        "`medxray app` imports it before anything heavy",
    ),
    ("medxray.review.store", ("streamlit", "pandas", "torch", "medxray.review."), "usable from scripts alone"),
    (
        "medxray.ood",
        ("medxray.training", "medxray.evaluation", "medxray.inference", "medxray.scoring", "medxray.cli"),
        "they import it",
    ),
    (
        "medxray.quantize",
        ("medxray.inference", "medxray.backends", "medxray.scoring", "medxray.review", "medxray.cli"),
        "the OpenVINO backend imports it",
    ),
    (
        "medxray.backends",
        ("medxray.inference", "medxray.scoring", "medxray.review", "medxray.cli", "medxray.cam"),
        "the Predictor holds a backend; maps and orchestration stay in inference",
    ),
    (
        "medxray.dicom",
        ("medxray.scoring", "medxray.inference", "medxray.review", "medxray.pacs", "torch"),
        "file-level DICOM; the scorer, app and node import it",
    ),
    ("medxray.dicom.reduce", ("medxray.dicom.reader", "monai"), "the reader imports it"),
    ("medxray.dicom.sc", ("medxray.dicom.reader",), "writers do not read"),
    ("medxray.dicom.sr", ("medxray.dicom.reader",), "writers do not read"),
    (
        "medxray.dicom.source",
        ("medxray.dicom.reader", "medxray.dicom.voi", "medxray.dicom.sr", "medxray.dicom.sc"),
        "sniffing and parsing only",
    ),
    ("medxray.dicom.codestream", ("medxray", "pydicom"), "pure byte parsing"),
    ("medxray.dicom.voi", ("medxray.dicom.reader",), "the reader imports it"),
    ("medxray.dicom.bits", ("medxray.dicom.reader", "medxray.dicom.voi", "pydicom"), "the reader imports it"),
    ("medxray.dicom.header", ("medxray.dicom.reader", "medxray.dicom.voi", "pydicom"), "duck-typed data sets"),
    ("medxray.modelinput", ("torch", "monai"), "the input contract runs in the torch-free decode workers"),
    ("medxray.mapmethods", ("torch", "numpy"), "the CLI lists the map-method table without torch"),
    ("medxray.precision", ("medxray.", "torch"), "the CLI lists the precision table without torch"),
    ("medxray.lazyexports", ("medxray.", "torch"), "the packages' lazy __init__ files import it"),
    ("medxray.models.variants", ("torch", "numpy"), "the CLI lists the variant table without torch"),
    ("medxray.scoreoptions", ("torch", "numpy", "medxray.scoring"), "the CLI lists score-dicom's choices fast"),
    ("medxray.checkpoint_meta", ("torch",), "typed metadata, readable without torch"),
    ("medxray.scoring.messages", ("torch",), "the torch-free decode workers build these messages"),
    (
        "medxray.scoring.workers",
        ("torch", "monai", "medxray.scoring.engine", "medxray.scoring.run", "medxray.scoring.journal"),
        "spawned decode workers stay light; the engine imports them",
    ),
]

# Modules that may import nothing of medxray but the listed modules (and their own package, where named).
ONLY: list[tuple[str, tuple[str, ...]]] = [
    ("medxray.limits", ("medxray.errors",)),
    ("medxray.fileio", ("medxray.errors",)),
    ("medxray.overlay", ("medxray.display", "medxray.fileio")),
    ("medxray.modelinput", ("medxray.errors",)),
    ("medxray.checkpoint_meta", ("medxray.errors",)),
    ("medxray.mapmethods", ("medxray.errors",)),
    ("medxray.models.variants", ("medxray.errors",)),
    ("medxray.scoreoptions", ("medxray.mapmethods",)),
    ("medxray.scoring.messages", ()),
    ("medxray.dicom.reader", ("medxray.dicom", "medxray.errors", "medxray.limits", "medxray.display")),
    ("medxray.dicom.bits", ("medxray.dicom.codes",)),
    ("medxray.dicom.header", ("medxray.dicom.codes",)),
    (
        "medxray.dicom.source",
        (
            "medxray.dicom.codes",
            "medxray.dicom.header",
            "medxray.dicom.codestream",
            "medxray.dicom.inflate",
            "medxray.errors",
            "medxray.limits",
        ),
    ),
    ("medxray.dicom.inflate", ("medxray.dicom.codes",)),
]


def rule_violations(imports: dict[str, set[str]]) -> list[str]:
    bad = []
    for scope, forbidden, why in FORBIDDEN:
        for mod, names in imports.items():
            if not _matches(mod, scope):
                continue
            for name in sorted(names):
                for f in forbidden:
                    hit = name.startswith(f) if f.endswith(".") else _matches(name, f)
                    if hit and not _matches(name, mod) and not (f.endswith(".") and name == "medxray.errors"):
                        bad.append(f"{mod} imports {name} (rule: no {f.rstrip('.')}; {why})")
    for scope, allowed in ONLY:
        for name in sorted(imports.get(scope, ())):
            if name.startswith("medxray") and not any(_matches(name, a) for a in allowed):
                bad.append(f"{scope} imports {name} (may import only {', '.join(allowed)} of medxray)")
    return bad


def test_rule_checker_catches_a_planted_violation():
    planted = {
        "medxray.pacs.scp": {"torch", "medxray.errors"},
        "medxray.dicom.bits": {"medxray.dicom.voi"},
        "medxray.limits": {"medxray.errors"},
    }
    bad = rule_violations(planted)
    assert any("medxray.pacs.scp imports torch" in b for b in bad)
    assert any("medxray.dicom.bits imports medxray.dicom.voi" in b for b in bad)
    assert not any(b.startswith("medxray.limits") for b in bad)


def test_every_rule_names_a_module_that_exists():
    mods = module_files()
    for scope, _, _ in FORBIDDEN:
        assert scope in mods, f"import rule for {scope}, which does not exist: update FORBIDDEN"
    for scope, _ in ONLY:
        assert scope in mods, f"import rule for {scope}, which does not exist: update ONLY"


def test_import_rules_hold():
    bad = rule_violations(all_imports())
    assert not bad, "import rules broken:\n" + "\n".join(bad)


if __name__ == "__main__":  # python tests/test_import_graph.py: print the graph's depth and any circles
    e, p = import_graph()
    print("modules", len(e), "cycles", find_cycles(e), "private", p)
    if not find_cycles(e):
        print("depth", depth(e))
