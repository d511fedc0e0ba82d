"""A promotion or rollback reaches the long-lived users of a model registry without a restart.

The DICOM node scores each batch through ``pacs.results.score_inbox`` into one results folder; the app
builds its model state at every script run. Both are given the registry folder, not a file: the
node's next batch and the app's next study use the version that is current then, and every results
row names the model version it came from.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import make_test_checkpoint
from site_sim import write_dicom

from medxray.errors import CheckpointError
from medxray.site import registry as reg


def _dicoms(folder: Path, n: int, seed: int) -> None:
    from pydicom.uid import generate_uid

    for i in range(n):
        write_dicom(
            folder / f"s{seed}_{i}.dcm",
            np.random.default_rng(seed * 100 + i).random((64, 64)).astype(np.float32),
            patient_id=f"MRN{seed}{i}",
            study=generate_uid(),
            series=generate_uid(),
            sop=generate_uid(),
        )


@pytest.fixture
def two_versions(tmp_path):
    r = tmp_path / "registry"
    versions = [
        reg.register(r, make_test_checkpoint(tmp_path / f"{v}.pt", model_version=v, seed=k))
        for k, v in enumerate(("site-v1", "site-v2"))
    ]
    reg.set_current(r, versions[0])
    return r, versions


@pytest.mark.slow
def test_node_batches_follow_the_registry_into_one_results_folder(tmp_path, two_versions):
    from medxray.pacs.results import ResultPolicy, score_inbox
    from medxray.pacs.spool import Spool

    r, versions = two_versions
    spool = Spool(tmp_path / "work")
    policy = ResultPolicy(secondary_capture=False, scoring={"workers": 1, "backend": "torch"})
    _dicoms(spool.inbox, 2, seed=1)
    score_inbox(spool, str(r), policy)
    reg.set_current(r, versions[1])  # promoted while the node runs
    _dicoms(spool.inbox, 2, seed=2)
    score_inbox(spool, str(r), policy)  # the next batch: same folder, no refusal, the new version

    rows = list(csv.DictReader(open(spool.scored / "results.csv")))
    by_batch = {row["path"][:2]: row["model_version"] for row in rows}
    assert len(rows) == 4 and all(row["status"] == "ok" for row in rows)
    assert by_batch == {"s1": "site-v1", "s2": "site-v2"}
    # a rollback is picked up the same way
    reg.set_current(r, versions[0])
    _dicoms(spool.inbox, 1, seed=3)
    score_inbox(spool, str(r), policy)
    rows = list(csv.DictReader(open(spool.scored / "results.csv")))
    assert [row["model_version"] for row in rows if row["path"].startswith("s3")] == ["site-v1"]


def test_a_folder_that_is_not_a_registry_is_refused(tmp_path):
    from medxray.scoring.run import follows_registry

    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="not a model registry"):
        follows_registry(tmp_path / "plain")
    assert follows_registry(tmp_path / "missing.pt") is None


@pytest.mark.slow
def test_app_model_state_follows_the_registry(tmp_path, two_versions):
    from medxray.review.settings import AppSettings, check_app_settings
    from medxray.review.ui import model_state

    r, versions = two_versions
    cfg = AppSettings(checkpoint=r, backend="torch")
    check_app_settings(cfg)  # a registry is a valid --checkpoint
    first = model_state(cfg)
    assert first.error is None and first.predictor.meta.model_version == "site-v1"
    reg.set_current(r, versions[1])
    second = model_state(cfg)  # the next script run (the next study): the promoted version
    assert second.error is None and second.predictor.meta.model_version == "site-v2"
    assert second.fingerprint != first.fingerprint
