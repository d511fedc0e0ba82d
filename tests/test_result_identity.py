"""No result is lost without a record (issue 19 items 4 and 5).

A result's identity covers the study it belongs to: two studies (different patients) whose
instances share a SOP Instance UID each get their own spooled file, results row and SR / SC, and
``node.csv`` flags the second as ``duplicate_sop_uid``. A re-send with the same Study / Series /
SOP UIDs and a different data set is a new version (its own file, row and result objects, node.csv
``new_version``); an identical re-send is a no-op. The fast tests drive :class:`Spool` and the
writers with the real RG1 chest CR; the slow one runs the real ``serve-dicom`` process, sends with a
pynetdicom SCU and checks what reaches a real Orthanc.
"""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medxray.dicom.sr import result_uid, write_sr
from medxray.pacs.spool import NODE_CSV, Spool, dataset_sha256, is_version_name, sop_name_of

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SHARED_SOP = generate_uid(entropy_srcs=["medxray-test", "shared-sop"])


def rg1_instance(
    tag: str,
    *,
    patient: str,
    study: str | None = None,
    series: str | None = None,
    sop: str = SHARED_SOP,
    crop: tuple[int, int] | None = None,
    flip: bool = False,
) -> bytes:
    """The real RG1 CR (pydicom-data) as a complete DICOM file for a chosen patient and UIDs.

    ``crop`` keeps the top-left (rows, columns) of the image, ``flip`` mirrors it: different pixels.
    """
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    ds.PatientName, ds.PatientID = f"{patient}^Test", f"ID-{patient}"
    ds.PatientBirthDate = "19700101"
    ds.StudyInstanceUID = study or generate_uid(entropy_srcs=["medxray-test", tag, "study"])
    ds.SeriesInstanceUID = series or generate_uid(entropy_srcs=["medxray-test", tag, "series"])
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    if crop is not None or flip:
        arr = ds.pixel_array
        if crop is not None:
            arr = arr[: crop[0], : crop[1]]
        if flip:
            arr = arr[:, ::-1]
        arr = np.ascontiguousarray(arr)
        ds.Rows, ds.Columns = arr.shape
        ds.PixelData = arr.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def uids(data: bytes) -> tuple[str, str, str]:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def node_rows(work: Path) -> list[dict[str, str]]:
    import csv

    path = work / NODE_CSV
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def instances() -> dict[str, bytes]:
    """a: patient A; b: patient B, another study, same SOP UID, mirrored pixels; a2: a's UIDs, cropped."""
    a = rg1_instance("a", patient="Alpha")
    study_a, series_a, _ = uids(a)
    return {
        "a": a,
        "b": rg1_instance("b", patient="Beta", flip=True),
        "a2": rg1_instance("a", patient="Alpha", study=study_a, series=series_a, crop=(1500, 1400)),
    }


# ---- the content hash --------------------------------------------------------------------


def test_content_hash_covers_the_data_set_not_the_file_meta(instances):
    a = instances["a"]
    ds = pydicom.dcmread(io.BytesIO(a))
    ds.file_meta.ImplementationVersionName = "OTHER_SENDER"  # written by whoever wrote the file
    ds.file_meta.SourceApplicationEntityTitle = "ELSEWHERE"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert buf.getvalue() != a
    assert dataset_sha256(buf.getvalue()) == dataset_sha256(a)
    assert dataset_sha256(a) != dataset_sha256(instances["a2"])
    ds.PhotometricInterpretation = "MONOCHROME2"  # same pixels, another picture: a change
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert dataset_sha256(buf.getvalue()) != dataset_sha256(a)


def test_content_hash_of_a_file_equals_that_of_its_bytes(tmp_path, instances):
    p = tmp_path / "a.dcm"
    p.write_bytes(instances["a"])
    assert dataset_sha256(p) == dataset_sha256(instances["a"]) == dataset_sha256(memoryview(instances["a"]))


# ---- the spool ---------------------------------------------------------------------------


def test_two_studies_sharing_a_sop_uid_are_two_files_and_the_second_is_flagged(tmp_path, instances, caplog):
    spool = Spool(tmp_path / "work")
    pa = spool.store(instances["a"], *uids(instances["a"]))
    with caplog.at_level("INFO", logger="medxray.pacs.spool"):
        pb = spool.store(instances["b"], *uids(instances["b"]))
    assert pa != pb and pa.name == pb.name == f"{SHARED_SOP}.dcm"
    assert dataset_sha256(pa) == dataset_sha256(instances["a"]) and dataset_sha256(pb) == dataset_sha256(instances["b"])
    rows = node_rows(spool.work)
    assert [r["status"] for r in rows] == ["duplicate_sop_uid"]
    assert rows[0]["path"] == pb.relative_to(spool.incoming).as_posix()
    assert rows[0]["reason"].startswith("duplicate_sop_uid:")
    assert rows[0]["study_instance_uid"] == uids(instances["b"])[0]
    logged = caplog.text
    assert "duplicate_sop_uid" in logged
    assert "Alpha" not in logged and "Beta" not in logged and "ID-" not in logged  # no PHI in the log
    # a restarted node still knows where the UID was used; a re-send of b is not flagged twice
    spool2 = Spool(tmp_path / "work")
    assert spool2.store(instances["b"], *uids(instances["b"])) == pb
    assert len(node_rows(spool.work)) == 1
    # a third study with the same UID, seen by the restarted node, is flagged too
    c = rg1_instance("c", patient="Gamma")
    pc = spool2.store(c, *uids(c))
    assert [r["path"] for r in node_rows(spool.work)][-1] == pc.relative_to(spool.incoming).as_posix()


def test_identical_resend_is_a_no_op_before_and_after_scoring(tmp_path, instances):
    spool = Spool(tmp_path / "work")
    p = spool.store(instances["a"], *uids(instances["a"]))
    mtime = p.stat().st_mtime_ns
    assert spool.store(instances["a"], *uids(instances["a"])) == p and p.stat().st_mtime_ns == mtime
    assert spool.promote_idle(0.0) == 1
    inbox_file = spool.inbox / p.relative_to(spool.incoming)
    assert spool.store(instances["a"], *uids(instances["a"])) == inbox_file  # nothing written to incoming
    assert not list(spool.incoming.rglob("*.dcm")) and spool.inbox_files() == [p.relative_to(spool.incoming).as_posix()]
    assert node_rows(spool.work) == []


def test_changed_resend_before_scoring_replaces_the_unscored_copy(tmp_path, instances):
    spool = Spool(tmp_path / "work")
    p = spool.store(instances["a"], *uids(instances["a"]))
    p2 = spool.store(instances["a2"], *uids(instances["a2"]))
    assert p2 == p and dataset_sha256(p) == dataset_sha256(instances["a2"])
    assert node_rows(spool.work) == []  # nothing had described the first copy
    spool.promote_idle(0.0)
    assert spool.inbox_files() == [p.relative_to(spool.incoming).as_posix()]


def test_changed_resend_after_promotion_is_a_new_version_beside_the_first(tmp_path, instances):
    spool = Spool(tmp_path / "work")
    spool.store(instances["a"], *uids(instances["a"]))
    spool.promote_idle(0.0)
    first = spool.inbox_files()
    v2 = spool.store(instances["a2"], *uids(instances["a2"]))
    digest = dataset_sha256(instances["a2"])
    assert is_version_name(v2.name) and v2.name == f"{SHARED_SOP}.v{digest[:16]}.dcm"
    assert sop_name_of(v2.name) == SHARED_SOP
    assert spool.store(instances["a2"], *uids(instances["a2"])) == v2  # its identical re-send: no-op
    spool.promote_idle(0.0)
    files = spool.inbox_files()
    assert len(files) == 2 and first[0] in files
    assert dataset_sha256(spool.inbox / first[0]) == dataset_sha256(instances["a"])  # the scored file is untouched
    assert dataset_sha256(spool.inbox / [f for f in files if f != first[0]][0]) == digest
    rows = node_rows(spool.work)
    assert [r["status"] for r in rows] == ["new_version"] and digest in rows[0]["reason"]
    assert spool.content_digest([f for f in files if f != first[0]][0]) == digest
    # pull mode (straight into the inbox) follows the same rule
    c = rg1_instance("a", patient="Alpha", study=uids(instances["a"])[0], series=uids(instances["a"])[1], flip=True)
    v3 = spool.store(c, *uids(c), direct=True)
    assert v3.parent == spool.inbox / Path(first[0]).parent and is_version_name(v3.name)
    assert len(spool.inbox_files()) == 3


def test_promotion_never_overwrites_a_scored_file_left_by_an_older_release(tmp_path, instances):
    """An older release could leave incoming/<s>/<e>/<sop>.dcm beside the scored inbox copy."""
    spool = Spool(tmp_path / "work")
    spool.store(instances["a"], *uids(instances["a"]))
    spool.promote_idle(0.0)
    rel = spool.inbox_files()[0]
    (spool.incoming / rel).parent.mkdir(parents=True)
    (spool.incoming / rel).write_bytes(instances["a2"])
    spool = Spool(tmp_path / "work")  # restart: the series restarts its idle clock
    spool.promote_idle(0.0, now=float("inf"))
    assert dataset_sha256(spool.inbox / rel) == dataset_sha256(instances["a"])
    assert len(spool.inbox_files()) == 2 and [r["status"] for r in node_rows(spool.work)] == ["new_version"]


def test_a_kill_before_the_flag_was_written_is_recovered_at_restart(tmp_path, instances):
    """kill -9 between storing a file and its node.csv row: the restarted node writes the row, once."""
    spool = Spool(tmp_path / "work")
    spool.store(instances["a"], *uids(instances["a"]))
    spool.promote_idle(0.0)
    v2 = spool.store(instances["a2"], *uids(instances["a2"]))
    pb = spool.store(instances["b"], *uids(instances["b"]))
    expected = sorted(
        [
            ("duplicate_sop_uid", pb.relative_to(spool.incoming).as_posix()),
            ("new_version", v2.relative_to(spool.incoming).as_posix()),
        ]
    )
    assert sorted((r["status"], r["path"]) for r in node_rows(spool.work)) == expected
    for name in (NODE_CSV, "node.keys"):  # as if the process died before writing them
        (spool.work / name).unlink()
    Spool(tmp_path / "work")
    assert sorted((r["status"], r["path"]) for r in node_rows(spool.work)) == expected
    Spool(tmp_path / "work")
    assert len(node_rows(spool.work)) == 2


# ---- the result objects' identity --------------------------------------------------------


def test_result_uids_cover_study_series_sop_and_a_new_versions_content(tmp_path, instances):
    def source(data: bytes, **extra) -> dict[str, str]:
        study, series, sop = uids(data)
        return {
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1",
            "sop_instance_uid": sop,
            "study_instance_uid": study,
            "series_instance_uid": series,
            "modality": "CR",
            **extra,
        }

    a, b = source(instances["a"]), source(instances["b"])
    a2 = source(instances["a2"], content_sha256=dataset_sha256(instances["a2"]))
    assert result_uid(a, "v1", "sr") == result_uid(dict(a), "v1", "sr")  # deterministic
    all_uids = [result_uid(s, "v1", k) for s in (a, b, a2) for k in ("sr", "sc:Mass", "sr-series")]
    assert len(set(all_uids)) == len(all_uids)
    assert result_uid(a, "v1", "sr") != result_uid(a, "v2", "sr")
    assert result_uid({**a, "content_sha256": ""}, "v1", "sr") == result_uid(a, "v1", "sr")
    kw = dict(
        label_names=["Mass"], probabilities=[0.7], positives=["Mass"], model_name="m", model_version="v1", thresholds={}
    )
    srs = [pydicom.dcmread(write_sr(tmp_path / f"{i}.dcm", source=s, **kw)) for i, s in enumerate((a, b, a2))]
    assert len({d.SOPInstanceUID for d in srs}) == 3 and len({d.SeriesInstanceUID for d in srs}) == 3
    assert [d.StudyInstanceUID for d in srs] == [
        a["study_instance_uid"],
        b["study_instance_uid"],
        a["study_instance_uid"],
    ]


# ---- the real node -----------------------------------------------------------------------


def send(port: int, datasets: list[bytes], calling_aet: str = "STORESCU") -> list[int]:
    """C-STORE ``datasets`` to the node over one association (pynetdicom SCU); their statuses."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_aet)
    parsed = [pydicom.dcmread(io.BytesIO(d)) for d in datasets]
    for cls in {str(d.SOPClassUID) for d in parsed}:
        ae.add_requested_context(cls, [str(parsed[0].file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDXRAY")
    assert assoc.is_established, "the node refused the association"
    try:
        return [int(assoc.send_c_store(d).Status) for d in parsed]
    finally:
        assoc.release()


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.exists("/usr/sbin/Orthanc"), reason="needs Debian orthanc: run `make system-deps` (make test does)"
)
def test_node_gives_each_study_and_each_version_its_own_result(tmp_path, scoring_checkpoint, instances):
    from pacs_fixtures import OrthancServer, free_port
    from test_pacs import Node, csv_rows, wait_for, write_node_config

    node_port = free_port()
    orthanc = OrthancServer(tmp_path / "orthanc", node_aet="MEDXRAY", node_port=node_port)
    work = tmp_path / "work"
    cfg = write_node_config(tmp_path / "node.yaml", work, scoring_checkpoint, node_port, orthanc.dicom_port)
    node = Node(cfg, node_port, tmp_path / "node.log")
    results = work / "scored" / "results.csv"

    def settled(n_rows: int):
        """n rows scored, all their result objects queued (queued.log) and sent (the outbox empty)."""
        rows = csv_rows(results)
        queued = (work / "queued.log").read_text().splitlines() if (work / "queued.log").exists() else []
        return (
            len(rows) == n_rows
            and all(r["path"] in queued for r in rows)
            and not list(work.glob("incoming/*/*/*.dcm"))
            and not list((work / "outbox").glob("*.dcm"))
        )

    try:
        orthanc.start()
        node.start()
        assert send(node_port, [instances["a"], instances["b"]]) == [0, 0]
        wait_for(lambda: settled(2), 240, "both studies scored and answered", node.log)
        # an identical re-send of a and b, and a changed re-send of a (cropped pixels)
        assert send(node_port, [instances["a"], instances["a2"], instances["b"]]) == [0, 0, 0]
        wait_for(lambda: settled(3), 240, "the new version scored and answered", node.log)
        node.kill(signal.SIGTERM)
        srs = [
            t
            for t in orthanc.instances_tags()
            if t.get("Manufacturer") == "medxray" and t.get("SOPClassUID") == SR_CLASS
        ]
        scs = [
            t
            for t in orthanc.instances_tags()
            if t.get("Manufacturer") == "medxray" and t.get("SOPClassUID") == SC_CLASS
        ]
    finally:
        node.kill()
        orthanc.stop()

    # three rows, each describing the file at its path: a, b (another study, same SOP UID), a's new version
    rows = csv_rows(results)
    assert [r["status"] for r in rows] == ["ok"] * 3, rows
    by_content = {}
    for r in rows:
        f = work / "inbox" / r["path"]
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert (r["study_instance_uid"], r["series_instance_uid"], r["sop_instance_uid"]) == (
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            SHARED_SOP,
        )
        assert (int(r["rows"]), int(r["columns"])) == (ds.Rows, ds.Columns)  # the row describes these pixels
        by_content[dataset_sha256(f)] = r
    assert set(by_content) == {dataset_sha256(instances[k]) for k in ("a", "b", "a2")}
    assert sorted(p.relative_to(work / "inbox").as_posix() for p in (work / "inbox").rglob("*.dcm")) == sorted(
        r["path"] for r in rows
    )  # the spool holds exactly the scored files
    new_version = by_content[dataset_sha256(instances["a2"])]
    assert (int(new_version["rows"]), int(new_version["columns"])) == (1500, 1400)
    assert is_version_name(Path(new_version["path"]).name)

    flags = node_rows(work)
    assert sorted((r["status"], r["path"]) for r in flags) == sorted(
        [
            ("duplicate_sop_uid", by_content[dataset_sha256(instances["b"])]["path"]),
            ("new_version", new_version["path"]),
        ]
    )

    # three SRs in the PACS, one per (study, content), each filed under its own study and patient
    assert len(srs) == 3 and len({t["SOPInstanceUID"] for t in srs}) == 3
    study_a, _, _ = uids(instances["a"])
    study_b, _, _ = uids(instances["b"])
    assert sorted(t["StudyInstanceUID"] for t in srs) == sorted([study_a, study_a, study_b])
    assert {t["PatientID"] for t in srs if t["StudyInstanceUID"] == study_b} == {"ID-Beta"}
    assert {t["PatientID"] for t in srs if t["StudyInstanceUID"] == study_a} == {"ID-Alpha"}
    assert len({t["SOPInstanceUID"] for t in scs}) == len(scs)
    expected_scs = sum(min(3, len([p for p in r["positive_findings"].split(";") if p])) for r in rows)
    assert len(scs) == expected_scs

    log = (tmp_path / "node.log").read_text()
    assert "duplicate_sop_uid" in log and "new_version" in log
    for phi in ("Alpha", "Beta", "ID-", "19700101"):
        assert phi not in log
