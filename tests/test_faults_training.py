"""Issue 10 item 7: a truncated ``last.pt`` is no dead end. Every epoch's ``last.pt`` is written
atomically and the one it replaces is kept as ``last.prev.pt``; ``--resume`` verifies what it
loads and falls back to the previous epoch, saying so."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from test_train import SMALL, fake_splits

from medxray.checkpoint import load_checkpoint, save_checkpoint
from medxray.errors import CheckpointError
from medxray.training.config import TrainConfig, save_config
from medxray.training.loop import finetune
from medxray.training.state import prepare_resume, save_training_checkpoint

TRAIN_ITEMS = 32  # fake_splits' training set: items fetched per epoch


def _epoch(path) -> int:
    return load_checkpoint(path).extra["training_state"]["epoch"]


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.slow
def test_truncated_last_pt_resumes_from_the_previous_epoch(tmp_path, caplog):
    run = tmp_path / "b"
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies in epoch 3
        finetune(TrainConfig(**SMALL, epochs=3, out=str(run)), splits=fake_splits(crash_after=2 * TRAIN_ITEMS + 5))
    assert _epoch(run / "last.pt") == 2 and _epoch(run / "last.prev.pt") == 1
    _truncate(run / "last.pt")  # e.g. a full disk or a copy cut short

    with caplog.at_level(logging.WARNING, logger="medxray"):
        resumed = finetune(TrainConfig(resume=str(run), progress=False), splits=fake_splits())
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "last.pt" in said and "resuming from last.prev.pt" in said, said
    assert resumed.epochs_completed == 3
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    # the good previous state was not overwritten by the bad file: it is now epoch 2, then 3
    assert _epoch(run / "last.pt") == 3 and _epoch(run / "last.prev.pt") == 2


# ---- the same without training: run directories written by the rotation itself ------------------

META = {"architecture": SMALL["model"], "label_names": ["A", "B", "C"], "preprocessing": {}}


def _run_dir(tmp_path: Path, epochs: int) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    save_config(TrainConfig(**SMALL, epochs=5, out=str(run)), run / "config.yaml")
    for e in range(1, epochs + 1):
        save_training_checkpoint(run, {"w": torch.full((4,), float(e))}, META, {"epoch": e})
    return run


def test_rotation_keeps_the_previous_epoch_unless_told_the_current_is_bad(tmp_path):
    run = _run_dir(tmp_path, 3)
    assert _epoch(run / "last.pt") == 3 and _epoch(run / "last.prev.pt") == 2
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "last.prev.pt", "last.pt"], "no temp file left"
    save_training_checkpoint(run, {"w": torch.zeros(4)}, META, {"epoch": 4}, keep_previous=False)
    assert _epoch(run / "last.pt") == 4 and _epoch(run / "last.prev.pt") == 2


def test_killed_between_the_renames_resumes_from_last_prev(tmp_path, caplog):
    run = _run_dir(tmp_path, 2)
    (run / "last.pt").unlink()  # the moment after last.pt became last.prev.pt
    with caplog.at_level(logging.WARNING, logger="medxray"):
        _, state = prepare_resume(TrainConfig(resume=str(run)))
    assert state["epoch"] == 1 and state["resumed_from"] == "last.prev.pt"
    assert "last.pt is missing" in caplog.text
    assert torch.equal(state["model_state"]["w"], torch.full((4,), 1.0))


def test_a_file_that_loads_but_holds_no_state_is_not_trusted_either(tmp_path):
    run = _run_dir(tmp_path, 2)
    save_checkpoint(run / "last.pt", {"w": torch.zeros(4)}, META)  # e.g. best.pt copied over last.pt
    _, state = prepare_resume(TrainConfig(resume=str(run)))
    assert state["epoch"] == 1 and state["resumed_from"] == "last.prev.pt"


def test_both_states_unusable_is_one_clear_error(tmp_path):
    run = _run_dir(tmp_path, 2)
    _truncate(run / "last.pt")
    _truncate(run / "last.prev.pt", 0.1)
    with pytest.raises(CheckpointError) as info:
        prepare_resume(TrainConfig(resume=str(run)))
    msg = str(info.value)
    assert "last.pt" in msg and "last.prev.pt" in msg and "truncated" in msg and "\n" not in msg, msg
