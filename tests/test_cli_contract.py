"""The public CLI is a contract: every command, flag, default, choice and help text stays as recorded
in tests/data/cli_contract.json unless a change is meant (then regenerate the file and review its diff:
``python tests/test_cli_contract.py --update``).

The record is argparse's own data (option strings, dest, nargs, default, type, choices, metavar,
required, help as written), not its rendered ``--help``, so it does not depend on the terminal width
or on the Python version's help layout. Choices read from a library table are recorded by the table's
name, so a row added to a table changes nothing here. Also checks the CLI's entry points: the console
script ``medxray.cli:main`` and ``python -m medxray`` / ``python -m medxray.cli``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = REPO / "tests" / "data" / "cli_contract.json"


def _value(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_value(x) for x in v]
    if isinstance(v, argparse.ArgumentParser):
        return f"<parser {v.prog}>"
    if isinstance(v, type) or callable(v):
        return f"<{getattr(v, '__name__', type(v).__name__)}>"
    return repr(v)


def _choices(c):
    if c is None or isinstance(c, (list, tuple, dict)):
        return _value(list(c)) if c is not None else None
    return repr(c)  # a table read on use: its name


def _help(a: argparse.Action) -> str | None:
    # Python 3.10-3.12 append this to every BooleanOptionalAction's help; 3.13 does not
    if isinstance(a, argparse.BooleanOptionalAction) and a.help:
        return a.help.removesuffix(" (default: %(default)s)")
    return a.help


def contract() -> dict[str, dict]:
    """{command path: the parser's prog, description, epilog and every action's argparse fields}."""
    from medxray.cli import build_parser

    out: dict[str, dict] = {}

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        actions = []
        for a in parser._actions:
            row = {
                "kind": type(a).__name__,
                "option_strings": list(a.option_strings),
                "dest": a.dest,
                "nargs": _value(a.nargs),
                "const": _value(a.const),
                "default": _value(a.default),
                "type": _value(a.type),
                "choices": None if isinstance(a, argparse._SubParsersAction) else _choices(a.choices),
                "required": a.required,
                "help": _help(a),
                "metavar": _value(a.metavar),
            }
            if isinstance(a, argparse._SubParsersAction):
                row["commands"] = list(a.choices)
            actions.append(row)
        defaults = {k: _value(v) for k, v in sorted(parser._defaults.items())}
        out[path] = {
            "prog": parser.prog,
            "description": parser.description,
            "epilog": parser.epilog,
            "argument_default": _value(parser.argument_default),
            "defaults": defaults,
            "actions": actions,
        }
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    walk(sub, f"{path} {name}")

    walk(build_parser(), "medxray")
    return out


def test_cli_matches_the_recorded_contract():
    recorded = json.loads(SNAPSHOT.read_text())
    now = contract()
    assert sorted(now) == sorted(recorded), "commands added or removed"
    for path in recorded:
        assert now[path] == recorded[path], (
            f"`{path}` changed; if meant, run python tests/test_cli_contract.py --update and review the diff"
        )


def test_the_contract_sees_a_changed_help_text(monkeypatch):
    from medxray import cli

    real = cli.build_parser

    def changed():
        parser = real()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        next(a for a in sub.choices["demo"]._actions if a.dest == "seed").default = 1
        return parser

    monkeypatch.setattr(cli, "build_parser", changed)
    assert contract()["medxray demo"] != json.loads(SNAPSHOT.read_text())["medxray demo"]


def test_entry_points_run_the_same_cli():
    script = [sys.executable, "-c", "import sys; from medxray.cli import main; sys.exit(main())"]
    outs = []
    for argv in (script, [sys.executable, "-m", "medxray"], [sys.executable, "-m", "medxray.cli"]):
        r = subprocess.run([*argv, "--version"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
        r = subprocess.run([*argv, "no-such-command"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "invalid choice: 'no-such-command'" in r.stderr and "Traceback" not in r.stderr
    assert outs[0].startswith("medxray ") and len(set(outs)) == 1
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'medxray = "medxray.cli:main"' in pyproject


if __name__ == "__main__":  # python tests/test_cli_contract.py --update: record the CLI as it is now
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_cli_contract.py --update")
    SNAPSHOT.write_text(json.dumps(contract(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT.relative_to(REPO)}")
