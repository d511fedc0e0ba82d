"""Flags, paths and exit codes agree with the docs (issue 11 items 3 and 5): the checkpoint stores an
absolute data root and evaluates from any folder; `data verify --allow-missing` exists and its
messages name only real flags; the README's exit codes cover what verify returns; finetune checks
its arguments before touching data and leaves no empty --out behind; `data synth` does not silently
replace another phantom."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medxray.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    from medxray.data.synthetic import synthesize

    return synthesize(tmp_path_factory.mktemp("phantom") / "root", n_images=40, seed=0, image_size=64, workers=1)


def test_relative_data_root_is_stored_absolute_and_evaluate_works_from_elsewhere(
    phantom_root, tmp_path, monkeypatch, capsys
):
    from medxray.checkpoint import load_checkpoint

    monkeypatch.chdir(phantom_root.parent)
    rc, _, err = run(
        [
            "finetune",
            "--data-root",
            phantom_root.name,
            "--out",
            tmp_path / "run",
            "--model",
            "densenet_40_k12",
            "--pretrained",
            "none",
            "--epochs",
            "1",
            "--image-size",
            "16",
            "--batch-size",
            "8",
            "--num-workers",
            "0",
            "--precision",
            "fp32",
            "--no-progress",
            "--max-steps-per-epoch",
            "2",
        ],
        capsys,
    )
    assert rc == 0, err
    meta = load_checkpoint(tmp_path / "run" / "best.pt").metadata
    assert meta["config"]["data_root"] == str(phantom_root.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rc, out, err = run(
        [
            "evaluate",
            "--checkpoint",
            tmp_path / "run" / "best.pt",
            "--split",
            "val",
            "--bootstrap",
            "10",
            "--num-workers",
            "0",
            "--no-localisation",
            "--threshold-split",
            "same",
        ],
        capsys,
    )
    assert rc == 0, err
    assert "report:" in out


def _readme_exit_codes() -> set[int]:
    text = (REPO / "README.md").read_text()
    para = text[text.index("Exit codes:") :].split("\n\n")[0]
    return {int(m) for m in re.findall(r"(?<![\w.])(\d{1,3}) (?:success|finished|for anything|interrupted)", para)}


def test_data_verify_allow_missing_and_documented_exit_codes(phantom_root, tmp_path, capsys):
    partial = tmp_path / "partial"
    (partial / "images").mkdir(parents=True)
    pngs = sorted((phantom_root / "images").glob("*.png"))
    for p in pngs[: len(pngs) // 2]:  # a partial download: half of the phantom's images
        (partial / "images" / p.name).symlink_to(p)
    (partial / "MEDXRAY_PHANTOM.json").symlink_to(
        phantom_root / "MEDXRAY_PHANTOM.json"
    )  # its small images are expected
    rc, out, err = run(["data", "verify", "--data-root", partial, "--decode", "3"], capsys)
    documented = _readme_exit_codes()
    assert rc == 1 and rc in documented and {0, 2, 130} <= documented
    assert "pass --allow-missing to `medxray data verify`" in err
    flags = set(re.findall(r"--[a-z][a-z-]+", err))
    for flag in flags:  # every flag the message names exists on the commands it names
        assert any(
            flag in sub.format_help() for sub in _subparsers(["data", "verify"], ["data", "prepare"], ["finetune"])
        ), flag
    rc, out, err = run(["data", "verify", "--data-root", partial, "--decode", "3", "--allow-missing"], capsys)
    assert rc == 0, err
    assert '"missing_note"' in out and "allowed (--allow-missing)" in out
    assert "(--allow-missing;" not in err  # the library's log no longer names a flag the user did not pass
    manifest_readme = (REPO / "data_manifests" / "chestxray14" / "README.md").read_text()
    assert "--allow-missing" in manifest_readme and "verify" in manifest_readme


def _subparsers(*paths):
    parser = build_parser()
    out = []
    for path in paths:
        p = parser
        for name in path:
            action = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
            p = action.choices[name]
        out.append(p)
    return out


def test_finetune_names_a_bad_model_before_touching_data_and_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    with pytest.raises(SystemExit) as info:  # refused by argparse: the choices are the variant table's keys
        run(["finetune", "--model", "densenet999", "--data-root", tmp_path / "no-such-root", "--out", out], capsys)
    err = capsys.readouterr().err
    assert (
        info.value.code == 2 and "densenet999" in err and "data" not in err.split("densenet999")[0].split("error:")[-1]
    )
    assert not out.exists() and not out.parent.exists()
    rc, _, err = run(
        ["finetune", "--pretrained", tmp_path / "nope.pth", "--data-root", tmp_path / "no-such-root", "--out", out],
        capsys,
    )
    assert rc == 2 and "nope.pth" in err and not out.exists()
    # a failure in the data leaves no empty --out either
    empty_root = tmp_path / "empty-root"
    empty_root.mkdir()
    rc, _, err = run(["finetune", "--data-root", empty_root, "--out", out, "--pretrained", "none"], capsys)
    assert rc == 2 and "no images found" in err
    assert not out.exists()


def test_data_synth_refuses_to_replace_another_phantom(tmp_path, capsys):
    root = tmp_path / "ph"
    rc, _, err = run(["data", "synth", "--out", root, "--images", "4", "--workers", "1"], capsys)
    assert rc == 0, err
    before = sorted(p.name for p in (root / "images").glob("*.png"))
    rc, _, err = run(["data", "synth", "--out", root, "--images", "3", "--workers", "1"], capsys)
    assert rc == 2 and "--overwrite" in err
    assert sorted(p.name for p in (root / "images").glob("*.png")) == before
    rc, _, err = run(["data", "synth", "--out", root, "--images", "3", "--workers", "1", "--overwrite"], capsys)
    assert rc == 0 and len(list((root / "images").glob("*.png"))) == 3
