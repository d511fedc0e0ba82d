"""Atomic output and YAML mapping files: the shared I/O every writer and config reader uses."""

from __future__ import annotations

import pytest

from medxray.errors import ConfigError, DataError
from medxray.fileio import atomic_output, atomic_write_text, load_yaml_mapping


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "results.csv"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_output(target, "w", encoding="utf-8") as fh:
            fh.write("half a new fi")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"


def test_atomic_output_refuses_append_modes(tmp_path):
    with pytest.raises(ValueError):
        with atomic_output(tmp_path / "x", "ab"):
            pass


@pytest.mark.parametrize(
    "content,needle",
    [
        ("a: [1, 2\n", "not valid YAML"),
        ("- just\n- a list\n", "must hold a mapping"),
        (b"\xff\xfe\x00bad", "not a text file"),
    ],
)
def test_bad_yaml_files_give_one_clear_error(tmp_path, content, needle):
    p = tmp_path / "run.yaml"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=needle):
        load_yaml_mapping(p)
    with pytest.raises(DataError, match=f"{needle}.*restore it"):
        load_yaml_mapping(p, what="manifest", error=DataError, hint="; restore it")


def test_missing_and_empty_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml_mapping(tmp_path / "absent.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml_mapping(tmp_path / "empty.yaml") == {}
    (tmp_path / "ok.yaml").write_text("epochs: 3\nlr: 0.001\n")
    assert load_yaml_mapping(tmp_path / "ok.yaml") == {"epochs": 3, "lr": 0.001}
