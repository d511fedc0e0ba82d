"""The CLI's fixed choices come from the library's tables: every row of a table is accepted by the
parser and listed in the help, an unknown value is refused by argparse (exit 2, one usage line, no
traceback), a row added to a table appears without a CLI edit, and `medxray --help` stays light
(no torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medxray.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
SCORE = ["score-dicom", "in", "--checkpoint", "c.pt", "--out", "o"]


def _tables():
    from medxray import cam, hardware, inference
    from medxray.data import DATASETS
    from medxray.models.variants import VARIANTS
    from medxray.scoring import config as score_config
    from medxray.scoring import gate

    # (argv before the option, option, namespace attribute, the table's keys)
    return [
        (["evaluate", "--checkpoint", "c.pt"], "--cam-method", "cam_method", list(cam.MAP_METHODS)),
        (["evaluate", "--checkpoint", "c.pt"], "--precision", "precision", list(hardware.PRECISIONS)),
        (["finetune"], "--precision", "precision", list(hardware.PRECISIONS)),
        (["finetune"], "--model", "model", list(VARIANTS)),
        (["app"], "--backend", "backend", list(inference.BACKENDS)),
        (SCORE, "--backend", "backend", list(inference.BACKENDS)),
        (SCORE, "--precision", "precision", list(inference.PRECISIONS)),
        (SCORE, "--cam-method", "cam_method", list(score_config.CAM_METHODS)),
        (SCORE, "--cams", "cams", list(score_config.CAM_MODES)),
        (SCORE, "--ood-policy", "ood_policy", list(gate.OOD_POLICIES)),
        (["data", "prepare", "--data-root", "r"], "--dataset", "dataset", list(DATASETS)),
        (["data", "verify"], "--dataset", "dataset", list(DATASETS)),
    ]


def _ids():
    return [f"{argv[0]}{'-' + argv[1] if argv[0] == 'data' else ''} {flag}" for argv, flag, _, _ in _tables()]


@pytest.mark.parametrize("case", range(len(_tables())), ids=_ids())
def test_every_table_row_is_accepted_and_an_unknown_one_refused(case, capsys):
    argv, flag, dest, keys = _tables()[case]
    assert len(keys) >= 2
    parser = build_parser()
    for key in keys:
        assert getattr(parser.parse_args([*argv, flag, key]), dest) == key
    with pytest.raises(SystemExit) as info:
        main([*argv, flag, "no-such-row"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    quoted = ", ".join(repr(k) for k in keys)
    assert f"argument {flag}: invalid choice: 'no-such-row' (choose from {quoted})" in err, err
    assert err.strip().splitlines()[-1].startswith("medxray ")


def test_the_help_lists_every_row(capsys):
    from medxray import cam, inference

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    evaluate_help = "".join(sub["evaluate"].format_help().split())  # argparse wraps at hyphens too
    assert "checkpoint:" + ",".join(cam.MAP_METHODS) + "(default" in evaluate_help
    score_help = sub["score-dicom"].format_help()
    assert "--precision {" + ",".join(inference.PRECISIONS) + "}" in score_help
    assert "--backend {" + ",".join(inference.BACKENDS) + "}" in score_help


def test_a_row_added_to_a_table_appears_without_a_cli_edit(monkeypatch, capsys):
    from medxray import backends, cam, precision
    from medxray.models import variants

    # each table is patched where it is defined (medxray.cam, .inference and .hardware re-export them)
    monkeypatch.setitem(cam.MAP_METHODS, "gradcam-test", cam.MapMethod("gradcam", ("denseblock1",), "test row"))
    monkeypatch.setattr(backends, "BACKENDS", (*backends.BACKENDS, "testvino"))
    monkeypatch.setattr(precision, "PRECISIONS", (*precision.PRECISIONS, "fp8"))
    monkeypatch.setitem(variants.VARIANTS, "densenet_test", variants.VARIANTS["densenet_40_k12"])
    parser = build_parser()
    ns = parser.parse_args(["evaluate", "--checkpoint", "c.pt", "--cam-method", "gradcam-test", "--precision", "fp8"])
    assert (ns.cam_method, ns.precision) == ("gradcam-test", "fp8")
    assert parser.parse_args([*SCORE, "--backend", "testvino"]).backend == "testvino"
    assert parser.parse_args(["finetune", "--model", "densenet_test"]).model == "densenet_test"
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "layercam,gradcam-test(default" in "".join(capsys.readouterr().out.split())


def test_help_and_parsing_without_table_options_do_not_import_torch():
    code = (
        "import sys\n"
        "from medxray.cli import build_parser, main\n"
        f"build_parser().parse_args({SCORE!r})\n"
        "build_parser().parse_args(['finetune', '--epochs', '1'])\n"
        "try:\n    main(['--help'])\n"
        "except SystemExit as e:\n    assert e.code == 0\n"
        "print(sorted(m for m in ('torch', 'monai', 'streamlit', 'numpy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _help_argvs() -> list[list[str]]:
    """``[cmd, "--help"]`` for every subcommand of the real parser (and every ``data`` action)."""
    import argparse

    def subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        act = next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
        return dict(act.choices) if act else {}

    out = []
    for name, p in subparsers(build_parser()).items():
        out.append([name, "--help"])
        out += [[name, inner, "--help"] for inner in subparsers(p)]
    return out


def test_every_subcommands_help_lists_its_tables_without_torch_monai_streamlit_or_numpy():
    """Each `medxray <cmd> --help` formats its choices from the library tables: those modules must stay
    light (none of them imports numpy either). One fresh process; after each help the heavy modules
    loaded so far are recorded, so the first command that pulls one in is named."""
    argvs = _help_argvs()
    assert ["score-dicom", "--help"] in argvs and ["data", "prepare", "--help"] in argvs and len(argvs) >= 10
    code = (
        "import contextlib, io, json, sys\n"
        "from medxray.cli import main\n"
        f"argvs = {argvs!r}\n"
        "seen = {}\n"
        "for argv in argvs:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n            main(argv)\n"
        "        except SystemExit as e:\n            assert e.code == 0, (argv, e.code)\n"
        "    assert out.getvalue().startswith('usage: medxray'), argv\n"
        "    seen[' '.join(argv)] = [m for m in ('torch', 'monai', 'streamlit', 'numpy') if m in sys.modules]\n"
        "print(json.dumps(seen))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(seen) == len(argvs)
    assert {cmd: mods for cmd, mods in seen.items() if mods} == {}


def test_each_table_is_read_from_its_torch_free_home_and_re_exported_unchanged():
    from medxray import backends, cam, hardware, inference, mapmethods, precision, scoreoptions
    from medxray.scoring import config as score_config
    from medxray.scoring import gate

    assert cam.MAP_METHODS is mapmethods.MAP_METHODS and cam.MapMethod is mapmethods.MapMethod
    assert cam.DEFAULT_MAP_METHOD == mapmethods.DEFAULT_MAP_METHOD and cam.check_method is mapmethods.check_method
    assert inference.BACKENDS is backends.BACKENDS and inference.PRECISIONS is backends.PRECISIONS
    assert hardware.PRECISIONS is precision.PRECISIONS
    assert score_config.CAM_METHODS is scoreoptions.CAM_METHODS and score_config.CAM_MODES is scoreoptions.CAM_MODES
    assert gate.OOD_POLICIES is scoreoptions.OOD_POLICIES
    assert scoreoptions.CAM_METHODS == ("checkpoint", "gradcam", *mapmethods.MAP_METHODS)


def test_an_unknown_choice_exits_2_with_one_usage_message_in_a_real_process():
    out = subprocess.run(
        [sys.executable, "-m", "medxray.cli", *SCORE, "--backend", "tensorrt"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("usage: medxray score-dicom")
    assert "argument --backend: invalid choice: 'tensorrt' (choose from 'auto', 'torch', 'openvino')" in out.stderr
