"""Best-epoch selection and early stopping (``medxray.training.state.BestTracking``) without a model,
the validation result's selection score, and one short run showing the loop resumes the count."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from test_train import SMALL, fake_splits

from medxray.checkpoint import load_checkpoint
from medxray.training.config import TrainConfig
from medxray.training.loop import ValidationResult, finetune
from medxray.training.state import BestTracking


def _run(best: BestTracking, scores: list[float], first_epoch: int = 1) -> list[BestTracking]:
    """The state after each epoch, epochs numbered from ``first_epoch``."""
    out = []
    for epoch, s in enumerate(scores, start=first_epoch):
        best = best.update(epoch, s, auroc=s)
        out.append(best)
    return out


def test_patience_counts_epochs_without_improvement_and_an_improvement_resets_it():
    states = _run(BestTracking.start(2), [0.5, 0.6, 0.58, 0.7, 0.69, 0.65, 0.64])
    assert [s.bad_epochs for s in states] == [0, 0, 1, 0, 1, 2, 3]
    assert [s.improved for s in states] == [True, True, False, True, False, False, False]
    assert [s.should_stop for s in states] == [False, False, False, False, False, True, True]
    assert states[-1].best_epoch == 4 and states[-1].best_score == 0.7 and states[-1].best_auroc == 0.7


def test_an_equal_score_is_not_an_improvement():
    states = _run(BestTracking.start(1), [0.8, 0.8])
    assert states[1].best_epoch == 1 and states[1].bad_epochs == 1 and states[1].should_stop


def test_patience_zero_never_stops():
    states = _run(BestTracking.start(0), [0.9] + [0.1] * 20)
    assert states[-1].bad_epochs == 20 and not any(s.should_stop for s in states)


def test_min_delta_compares_with_the_best_not_with_the_last_epoch():
    """A score creeping up by 0.004 an epoch never beats the best by more than 0.01 in one step
    when compared with the last epoch, but does after three epochs when compared with the best."""
    states = _run(BestTracking.start(5, min_delta=0.01), [0.5, 0.504, 0.508, 0.512, 0.516])
    assert [s.improved for s in states] == [True, False, False, True, False]
    assert states[3].best_epoch == 4 and states[3].best_score == pytest.approx(0.512)
    assert states[-1].bad_epochs == 1
    # exactly min_delta more is not enough (strictly more is needed)
    b = BestTracking.start(1, min_delta=0.25).update(1, 0.5)
    assert not b.update(2, 0.75).improved and b.update(2, 0.7501).improved


def test_mode_min_tracks_the_lowest_score():
    start = BestTracking.start(2, mode="min")
    assert start.best_score == math.inf
    states = _run(start, [1.0, 0.9, 0.95, 0.9, 0.8])
    assert [s.improved for s in states] == [True, True, False, False, True]
    assert states[-1].best_epoch == 5 and states[-1].best_score == 0.8
    assert states[3].should_stop and not states[-1].should_stop
    with_delta = _run(BestTracking.start(2, mode="min", min_delta=0.15), [1.0, 0.9, 0.8])
    assert [s.best_epoch for s in with_delta] == [1, 1, 3]


def test_a_nan_score_never_improves_and_counts_as_a_bad_epoch():
    for mode in ("max", "min"):
        states = _run(BestTracking.start(3, mode=mode), [math.nan, math.nan, 0.3])
        assert [s.improved for s in states] == [False, False, True], mode
        assert [s.bad_epochs for s in states] == [1, 2, 0], mode
        assert states[-1].best_epoch == 3, mode


def test_update_is_pure():
    a = BestTracking.start(2)
    b = a.update(1, 0.7)
    assert a == BestTracking.start(2) and a.best_epoch == 0 and b.best_epoch == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.bad_epochs = 5  # type: ignore[misc]


def test_resume_continues_the_count_exactly():
    scores = [0.6, 0.7, 0.65, 0.66, 0.64, 0.8, 0.7]
    straight = _run(BestTracking.start(3), scores)
    half = _run(BestTracking.start(3), scores[:4])[-1]
    # the state as the loop stores it in last.pt (torch.save, weights_only load)
    saved = half.to_state()
    assert set(saved) == {"best_score", "best_epoch", "best_auroc", "bad_epochs"}
    resumed = BestTracking.from_state(saved, 3)
    assert resumed == dataclasses.replace(half, improved=False)
    assert _run(resumed, scores[4:], first_epoch=5) == straight[4:]
    # a resumed run may change the patience (an overridable option): the kept count meets the new one
    assert BestTracking.from_state(saved, 2).should_stop and not resumed.should_stop
    # a training state without these keys (older runs) starts from scratch
    assert BestTracking.from_state({}, 3) == BestTracking.start(3)
    assert BestTracking.from_state({}, 3, mode="min").best_score == math.inf


def test_invalid_rules_are_refused():
    with pytest.raises(ValueError, match="mode"):
        BestTracking.start(1, mode="maximum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_delta"):
        BestTracking.start(1, min_delta=-0.1)
    with pytest.raises(ValueError, match="patience"):
        BestTracking.start(-1)


def _val(aurocs: tuple[float, ...], loss: float) -> ValidationResult:
    finite = [a for a in aurocs if math.isfinite(a)]
    mean = float(np.mean(finite)) if finite else math.nan
    return ValidationResult(loss=loss, aurocs=aurocs, mean_auroc=mean, predictions={})


def test_validation_selects_by_mean_auroc_and_falls_back_to_the_negated_loss():
    v = _val((0.8, math.nan, 0.6), loss=0.4)
    assert v.selected_by == "val_mean_auroc" and v.score == pytest.approx(0.7)
    w = _val((math.nan, math.nan), loss=0.4)
    assert w.selected_by == "val_loss" and w.score == -0.4
    # a lower loss is the better epoch when no AUROC is defined
    b = BestTracking.start(1).update(1, w.score)
    assert b.update(2, _val((math.nan,), loss=0.3).score).improved
    assert not b.update(2, _val((math.nan,), loss=0.5).score).improved


def test_a_resumed_run_keeps_its_bad_epoch_count(tmp_path):
    """A constant validation score (no known labels) makes every epoch after the first a bad one.
    Two epochs, then resumed to six with patience 2: epoch 3 is the second bad epoch in a row, so
    the run stops there; a count restarted at resume would have run to epoch 4."""
    run = tmp_path / "r"

    def splits():
        s = fake_splits()
        s.val.mask[:] = 0
        return s

    first = finetune(
        TrainConfig(**SMALL, epochs=2, early_stopping_patience=5, max_steps_per_epoch=1, out=str(run)), splits=splits()
    )
    assert first.epochs_completed == 2 and first.stopped_reason == "completed"
    st = load_checkpoint(run / "last.pt").extra["training_state"]
    assert (st["best_epoch"], st["bad_epochs"]) == (1, 1) and st["best_score"] == 0.0  # -val loss, no label known
    assert math.isnan(st["best_auroc"])
    resumed = finetune(
        TrainConfig(resume=str(run), epochs=6, early_stopping_patience=2, progress=False), splits=splits()
    )
    assert resumed.epochs_completed == 3 and resumed.best_epoch == 1
    assert resumed.stopped_reason == "early stopping: no better val mean AUROC for 2 epochs"
    assert [r["best"] for r in resumed.history] == [True, False, False]
    st = load_checkpoint(run / "last.pt").extra["training_state"]
    assert st["bad_epochs"] == 2 and st["stopped"] == resumed.stopped_reason
    assert load_checkpoint(run / "best.pt").metadata["epoch"] == 1
