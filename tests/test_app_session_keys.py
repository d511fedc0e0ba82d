"""The app's session-state keys: all built by medxray.review.session_keys, none typed by hand, none shared.

Streamlit keeps each widget's value under its key: a misspelt key silently loses a value (a
reviewer's verdict), and two equal keys share one. The source check below reads the app's code
(AST, no Streamlit run) and refuses a key written as a string literal, an f-string or a
concatenation wherever a key is used: ``key=`` arguments, ``st.session_state[...]``,
``st.session_state.get / pop / setdefault (...)`` and ``... in st.session_state``.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest

from medxray.review.session_keys import AppKeys, StudyKeys, WorklistKeys

ROOT = Path(__file__).resolve().parents[1]
# app/app_pages/monitoring.py belongs to the site-monitoring page's own owner; its one key is
# listed in the report for moving onto AppKeys.
APP_SOURCES = [
    ROOT / "medxray" / "review" / "ui.py",
    ROOT / "medxray" / "review" / "ui_study.py",
    ROOT / "app" / "medxray_app.py",
    ROOT / "app" / "app_pages" / "study.py",
    ROOT / "app" / "app_pages" / "worklist.py",
    ROOT / "app" / "app_pages" / "model_card.py",
]
STATE_METHODS = {"get", "pop", "setdefault"}


def _is_session_state(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "session_state") or (
        isinstance(node, ast.Name) and node.id == "session_state"
    )


def _hand_built(node: ast.AST) -> bool:
    """A key written in place: a str literal, an f-string, a concatenation or a str.format call."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, (ast.JoinedStr, ast.BinOp)):
        return True
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"


def hand_built_keys(source: str) -> list[tuple[int, str]]:
    """(line, text) of every key written by hand in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        candidates: list[ast.AST] = []
        if isinstance(node, ast.Call):
            candidates += [kw.value for kw in node.keywords if kw.arg == "key"]
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in STATE_METHODS and _is_session_state(f.value) and node.args:
                candidates.append(node.args[0])
        elif isinstance(node, ast.Subscript) and _is_session_state(node.value):
            candidates.append(node.slice)
        elif isinstance(node, ast.Compare) and any(_is_session_state(c) for c in node.comparators):
            candidates.append(node.left)
        found += [(c.lineno, ast.unparse(c)) for c in candidates if _hand_built(c)]
    return found


def test_the_source_check_finds_hand_built_keys():
    bad = """
st.radio("x", key=f"verdict_{suffix}_{n}")
st.session_state["study_row"] = 1
v = st.session_state.get("verdict_" + suffix)
st.session_state.setdefault("wl_order", {})
if "reviewer_name" not in st.session_state:
    pass
st.slider("t", key="thr_{}".format(n))
"""
    assert [line for line, _ in hand_built_keys(bad)] == [2, 3, 4, 5, 6, 8]
    good = """
st.radio("x", key=keys.verdict(n))
st.session_state[AppKeys.STUDY_ROW] = 1
v = st.session_state.get(keys.note, "")
if AppKeys.REVIEWER_NAME not in st.session_state:
    st.session_state[key] = 2
"""
    assert hand_built_keys(good) == []


@pytest.mark.parametrize("path", APP_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_app_key_comes_from_the_key_objects(path):
    assert hand_built_keys(path.read_text(encoding="utf-8")) == [], f"keys typed by hand in {path.name}"


def test_the_study_page_uses_the_key_objects():
    # not vacuous: the Study page's widgets really are keyed through them
    study_widgets = (ROOT / "medxray" / "review" / "ui_study.py").read_text(encoding="utf-8")
    for used in ("StudyKeys.for_sha256", "keys.verdict(", "keys.current_finding", "keys.note", "AppKeys.STUDY_ROW"):
        assert used in study_widgets


FINDINGS = ["Mass", "Pleural_Thickening", "reset", "a_b", "a", "b_c", "0123456789abcdef", "", "Mass_", "x y"]


def test_keys_of_two_studies_never_collide():
    a = StudyKeys.for_sha256(hashlib.sha256(b"first image").hexdigest())
    b = StudyKeys.for_sha256(hashlib.sha256(b"second image").hexdigest())
    ka, kb = a.all(FINDINGS), b.all(FINDINGS)
    assert len(set(ka)) == len(ka) and len(set(kb)) == len(kb)  # within a study: one key per widget
    assert not set(ka) & set(kb)
    # study ids that are prefixes of one another, plus finding names with underscores and hex
    c, d = StudyKeys("aaaaaaaaaaaaaaaa"), StudyKeys("aaaaaaaaaaaaaaab")
    assert not set(c.all(FINDINGS)) & set(d.all(FINDINGS))


def test_no_key_family_reaches_a_fixed_key():
    fixed = AppKeys.fixed()
    assert len(set(fixed.values())) == len(fixed), "two AppKeys constants share a value"
    study = StudyKeys.for_sha256(hashlib.sha256(b"x").hexdigest())
    wl = WorklistKeys.for_folder("/out/night-1", ["error", "ok"])
    families = study.all(FINDINGS) + wl.all() + [AppKeys.threshold(n) for n in FINDINGS]
    families += [AppKeys.export_history(k) for k in (AppKeys.EXPORT_SIDEBAR, AppKeys.EXPORT_WORKLIST)]
    assert not set(families) & set(fixed.values())
    assert len(set(families)) == len(families)
    # the threshold reset button is out of reach of a finding called "reset"
    assert AppKeys.threshold("reset") != AppKeys.THRESHOLDS_RESET
    for key in fixed.values():  # a fixed key never starts with a per-finding prefix
        assert not key.startswith(AppKeys.THRESHOLD_PREFIX)


def test_key_strings_are_the_ones_the_app_has_always_used():
    sha = hashlib.sha256(b"image").hexdigest()
    k = StudyKeys.for_sha256(sha)
    assert k.verdict("Mass") == f"verdict_{sha[:16]}_Mass"
    assert (k.current_finding, k.note, k.preset) == (
        f"cam_finding_{sha[:16]}",
        f"note_{sha[:16]}",
        f"preset_{sha[:16]}",
    )
    assert AppKeys.threshold("Mass") == "thr_Mass" and AppKeys.STUDY_ROW == "study_row"
    statuses = ["error", "ok"]
    fk = hashlib.sha1(f"/out|{statuses}".encode()).hexdigest()[:10]
    assert WorklistKeys.for_folder(Path("/out"), statuses).status == f"wl_status_{fk}"


@pytest.mark.parametrize("bad", ["", "abc", "ABCDEF0123456789", "g" * 16, "0123456789abcdef0"])
def test_a_study_id_is_16_lowercase_hex_digits(bad):
    with pytest.raises(ValueError, match="16 lowercase hex digits"):
        StudyKeys(bad)


def test_key_objects_are_frozen_and_equal_by_value():
    sha = hashlib.sha256(b"y").hexdigest()
    a, b = StudyKeys.for_sha256(sha), StudyKeys.for_sha256(sha.upper())
    assert a == b and hash(a) == hash(b)  # usable as st.button args and cache keys
    with pytest.raises(AttributeError):
        a.study_id = "0" * 16  # type: ignore[misc]
    assert len({StudyKeys.for_sha256(hashlib.sha256(bytes([i])).hexdigest()) for i in range(50)}) == 50


def test_the_key_module_is_plain_python():
    # unit-testable without Streamlit, importable by anything in medxray.review without a circle
    tree = ast.parse((ROOT / "medxray" / "review" / "session_keys.py").read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "dataclasses", "hashlib", "typing"}, imported
