"""The node's result workers (medxray.pacs.results.new_results_pool): SR and SC objects written in
parallel processes are the objects the node writes itself, refusals and all."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import BrokenExecutor
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

pytest.importorskip("pydicom.data")
from pydicom.data import get_testdata_file  # noqa: E402

from medxray.pacs.results import (  # noqa: E402
    ResultPolicy,
    new_results_pool,
    queue_results,
    result_rows,
    score_inbox,
)
from medxray.pacs.spool import Spool  # noqa: E402


def _inbox_with_rg1(work: Path, n: int) -> None:
    """``n`` RG1 copies in one series of the inbox, plus one whose Study Instance UID is not a UID
    (scored, but no result object can reference it: ``invalid_uid``)."""
    src = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    folder = work / "inbox" / "study" / "series"
    folder.mkdir(parents=True)
    for i in range(n + 1):
        uid = generate_uid(entropy_srcs=["result-workers", str(i)])
        src.SOPInstanceUID = src.file_meta.MediaStorageSOPInstanceUID = uid
        if i == n:
            src.StudyInstanceUID = "1.2.840.not-a-uid"
        src.save_as(folder / f"{uid}.dcm", enforce_file_format=True)


def test_result_workers_write_the_objects_the_node_writes_itself(tmp_path, scoring_checkpoint):
    policy = ResultPolicy(scoring={"workers": 1, "batch_size": 8})
    _inbox_with_rg1(tmp_path / "inline", 3)
    score_inbox(Spool(tmp_path / "inline"), str(scoring_checkpoint), policy)
    shutil.copytree(tmp_path / "inline", tmp_path / "pool")
    shutil.copytree(tmp_path / "inline", tmp_path / "broken")

    inline, parallel = Spool(tmp_path / "inline"), Spool(tmp_path / "pool")
    n_inline = queue_results(inline, policy)
    pool = new_results_pool(2)
    try:
        n_pool = queue_results(parallel, policy, pool)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

    names = sorted(p.name for p in inline.outbox.glob("*.dcm"))
    assert n_pool == n_inline == len(names)
    assert names == sorted(p.name for p in parallel.outbox.glob("*.dcm"))
    kinds = [pydicom.dcmread(inline.outbox / n).Modality for n in names]
    assert kinds.count("SR") == 3 and kinds.count("OT") + kinds.count("SC") >= 1, kinds  # SR per image, SCs
    for name in names:
        a, b = pydicom.dcmread(inline.outbox / name), pydicom.dcmread(parallel.outbox / name)
        assert a.SOPInstanceUID == b.SOPInstanceUID == Path(name).stem
        assert (a.PatientID, a.StudyInstanceUID) == (b.PatientID, b.StudyInstanceUID)
        if "PixelData" in a:
            assert a.PixelData == b.PixelData
    # the unreferenceable source: no object, one no_result line, in both
    for spool in (inline, parallel):
        ledger = (spool.work / "node.csv").read_text()
        assert ledger.count("no_result") == 1 and "invalid_uid" in ledger
        rows = result_rows(spool)
        assert len(rows) == 4 and all(r["path"] in spool.queued for r in rows)
    assert not list((tmp_path / "pool" / "tmp").glob("*.dcm"))  # nothing left behind

    # result workers killed (e.g. by the OOM killer): the node writes the objects itself and keeps going
    dead = new_results_pool(1)
    try:
        with pytest.raises(BrokenExecutor):
            dead.submit(os._exit, 1).result()
        broken = Spool(tmp_path / "broken")
        assert queue_results(broken, policy, dead) == n_inline
    finally:
        dead.shutdown(wait=True, cancel_futures=True)
    assert sorted(p.name for p in broken.outbox.glob("*.dcm")) == names
