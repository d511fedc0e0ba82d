"""The DICOM node and pull mode against a real Orthanc (issue 13): storescu -> serve-dicom -> Orthanc.

Real parts only: Debian's Orthanc (tests/pacs_fixtures.py), dcmtk's storescu, dicom3tools'
dciodvfy, pydicom-data's real RG1 chest CR (copies with new SOP Instance UIDs), the tiny
64-px test checkpoint. ``serve-dicom`` runs as a separate process group (killed in finally).
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml
from pacs_fixtures import STORESCU, Node, OrthancServer, csv_rows, dciodvfy_errors, free_port, storescu, wait_for
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SCORING = {
    "workers": 1,
    "batch_size": 2,
    "backend": "torch",
    "precision": "fp32",
    "threads": 1,
    "overlay_max_side": 256,
}

pytestmark = pytest.mark.skipif(
    not (os.path.exists("/usr/sbin/Orthanc") and STORESCU),
    reason="needs Debian orthanc + dcmtk: run `make system-deps` (make test does)",
)


def rg1_copies(folder: Path, n: int, tag: str) -> list[Path]:
    """``n`` copies of the real RG1 CR, each with a new SOP Instance UID (same patient, study, series)."""
    folder.mkdir(parents=True, exist_ok=True)
    src = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    out = []
    for i in range(n):
        uid = generate_uid(entropy_srcs=["medxray-test", tag, str(i)])
        src.SOPInstanceUID = uid
        src.file_meta.MediaStorageSOPInstanceUID = uid
        p = folder / f"rg1_{i}.dcm"
        src.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def broken_file(folder: Path) -> Path:
    """A valid DICOM header whose pixel data is cut to 1000 bytes: storescu sends it, decoding fails."""
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["medxray-test-broken"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PixelData = ds.PixelData[:1000]
    p = folder / "broken.dcm"
    ds.save_as(p, enforce_file_format=True)
    return p


def write_node_config(path: Path, work: Path, checkpoint: Path, port: int, dest_port: int, **extra) -> Path:
    cfg = {
        "ae_title": "MEDXRAY",
        "host": "127.0.0.1",
        "port": port,
        "allowed_calling_aes": ["STORESCU"],
        "destination": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": dest_port},
        "checkpoint": str(checkpoint),
        "work_dir": str(work),
        "idle_seconds": 1.0,
        "retry_initial_s": 0.5,
        "retry_max_s": 2.0,
        "scoring": dict(SCORING),
        **extra,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def results_by_sop(work: Path) -> dict[str, dict[str, str]]:
    return {r["sop_instance_uid"] or r["path"]: r for r in csv_rows(work / "scored" / "results.csv")}


def orthanc_results(orthanc: OrthancServer) -> list[dict]:
    return [t for t in orthanc.instances_tags() if t.get("Manufacturer") == "medxray"]


@pytest.fixture(scope="module")
def push_run(tmp_path_factory, scoring_checkpoint):
    """Destination DOWN while the node receives and scores, then UP: everything arrives after retry."""
    root = tmp_path_factory.mktemp("push")
    files = rg1_copies(root / "send", 2, "push")
    bad = broken_file(root / "send")
    node_port = free_port()
    orthanc = OrthancServer(root / "orthanc", node_aet="MEDXRAY", node_port=node_port)
    cfg = write_node_config(root / "node.yaml", root / "work", scoring_checkpoint, node_port, orthanc.dicom_port)
    node = Node(cfg, node_port, root / "node.log")
    out = {"root": root, "files": files, "work": root / "work"}
    try:
        node.start()
        out["intruder"] = storescu(node_port, files[:1], calling_aet="INTRUDER")
        sent = storescu(node_port, [*files, bad, Path(get_testdata_file("test-SR.dcm"))])
        assert sent.returncode == 0, sent.stderr
        again = storescu(node_port, files[:1])  # a duplicate send
        assert again.returncode == 0, again.stderr
        work = root / "work"
        wait_for(
            lambda: (
                len(csv_rows(work / "scored" / "results.csv")) == 3
                and not list((work / "tmp").glob("*"))
                and list((work / "outbox").glob("*.dcm"))
            ),
            240,
            "scoring",
            node.log,
        )
        wait_for(lambda: "destination down" in node.log.read_text(), 30, "a failed send attempt", node.log)
        out["queued_while_down"] = len(list((work / "outbox").glob("*.dcm")))
        out["sent_while_down"] = (work / "sent.log").read_text() if (work / "sent.log").exists() else ""
        orthanc.start()
        wait_for(lambda: not list((work / "outbox").glob("*.dcm")), 60, "the outbox to drain", node.log)
        out["orthanc_tags"] = orthanc.instances_tags()
        out["objects"] = {}
        for oid in orthanc.get("/instances"):
            tags = orthanc.get(f"/instances/{oid}/simplified-tags")
            if tags.get("Manufacturer") == "medxray":
                p = root / "from_orthanc" / f"{tags['SOPInstanceUID']}.dcm"
                p.parent.mkdir(exist_ok=True)
                p.write_bytes(orthanc.get(f"/instances/{oid}/file"))
                out["objects"][tags["SOPInstanceUID"]] = p
        node.kill(signal.SIGTERM)
        yield out
    finally:
        node.kill()
        orthanc.stop()


def test_unknown_calling_ae_is_rejected(push_run):
    r = push_run["intruder"]
    assert r.returncode != 0
    assert "reject" in (r.stdout + r.stderr).lower()


def test_push_results_arrive_under_the_source_study_after_destination_comes_up(push_run):
    work, files = push_run["work"], push_run["files"]
    assert push_run["queued_while_down"] >= 2 and push_run["sent_while_down"] == ""
    src = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    rows = results_by_sop(work)
    assert len(rows) == 3, "2 RG1 copies + the broken file, the duplicate send stored once"
    ok = {s.SOPInstanceUID: rows[s.SOPInstanceUID] for s in src}
    assert all(r["status"] == "ok" for r in ok.values())
    errors = [r for r in rows.values() if r["status"] == "error"]
    assert len(errors) == 1 and errors[0]["reason"].split(":")[0] in ("short_pixel_data", "decode_failed", "truncated")
    results = [pydicom.dcmread(p) for p in push_run["objects"].values()]
    srs = [d for d in results if d.SOPClassUID == SR_CLASS]
    scs = [d for d in results if d.SOPClassUID == SC_CLASS]
    assert len(srs) == 2, "exactly one SR per scored image, none for the broken file"
    refs = sorted(
        d.CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
        for d in srs
    )
    assert refs == sorted(ok)
    for d in results:  # filed under the SOURCE study and patient
        assert d.StudyInstanceUID == src[0].StudyInstanceUID
        assert d.PatientID == src[0].PatientID and d.PatientName == src[0].PatientName
        assert d.AccessionNumber == src[0].AccessionNumber and d.StudyDate == src[0].StudyDate
    n_sc = sum(min(3, len([p for p in r["positive_findings"].split(";") if p])) for r in ok.values())
    assert n_sc > 0 and len(scs) == n_sc
    for d in scs:
        assert d.BurnedInAnnotation == "YES" and "NOT FOR CLINICAL USE" in d.SeriesDescription
        assert d.SourceImageSequence[0].ReferencedSOPInstanceUID in ok
        assert d.SeriesInstanceUID not in {s.SeriesInstanceUID for s in src} | {x.SeriesInstanceUID for x in srs}


def test_every_object_in_orthanc_validates_with_dciodvfy(push_run):
    assert push_run["objects"]
    for p in push_run["objects"].values():
        assert dciodvfy_errors(p) == [], p


def test_non_image_objects_are_skipped_never_scored(push_run):
    work = push_run["work"]
    rows = csv_rows(work / "node.csv")
    sr_uid = pydicom.dcmread(get_testdata_file("test-SR.dcm")).SOPInstanceUID
    assert [(r["status"], r["sop_instance_uid"]) for r in rows] == [("skipped", sr_uid)]
    assert rows[0]["reason"].startswith("not_an_image: Comprehensive SR")
    assert sr_uid not in results_by_sop(work)


def test_pull_mode_gives_the_same_results_as_push(push_run, tmp_path, scoring_checkpoint):
    from medxray.pacs import ResultPolicy, score_pacs

    push_rows = results_by_sop(push_run["work"])
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        for f in push_run["files"]:
            assert orthanc.post("/instances", f.read_bytes())["Status"] == "Success"
        policy = ResultPolicy(scoring=dict(SCORING))
        first = score_pacs(orthanc.url, scoring_checkpoint, tmp_path / "work", policy=policy)
        assert (first.downloaded, first.queued_left) == (2, 0)
        pull_rows = results_by_sop(tmp_path / "work")
        probs = lambda r: {k: v for k, v in r.items() if k.startswith("p_")}  # noqa: E731
        for sop, r in pull_rows.items():
            assert r["status"] == "ok" and probs(r) == probs(push_rows[sop])
            assert r["positive_findings"] == push_rows[sop]["positive_findings"]
        got = sorted(t["SOPInstanceUID"] for t in orthanc_results(orthanc))
        assert got == sorted(push_run["objects"]), "pull stores the same result objects as push"
        again = score_pacs(orthanc.url, scoring_checkpoint, tmp_path / "work", policy=policy)
        assert again.downloaded == 0 and again.sent == 0, "resumes from the cursor: nothing twice"
        assert len(orthanc_results(orthanc)) == len(got)


def test_kill_9_during_a_batch_then_restart_loses_and_duplicates_nothing(tmp_path, scoring_checkpoint):
    files = rg1_copies(tmp_path / "send", 8, "kill")
    node_port = free_port()
    work = tmp_path / "work"
    with OrthancServer(tmp_path / "orthanc", node_port=node_port) as orthanc:
        # one image per batch: rows land one at a time, so the kill below falls inside the run
        cfg = write_node_config(
            tmp_path / "node.yaml",
            work,
            scoring_checkpoint,
            node_port,
            orthanc.dicom_port,
            secondary_capture=False,
            scoring={**SCORING, "batch_size": 1},
        )
        node = Node(cfg, node_port, tmp_path / "node.log")
        try:
            node.start()
            assert storescu(node_port, files).returncode == 0
            wait_for(
                lambda: 1 <= len(csv_rows(work / "scored" / "results.csv")), 240, "the first rows", node.log, every=0.02
            )
            node.kill(signal.SIGKILL)  # the whole process group: node and engine workers
            n_before = len(csv_rows(work / "scored" / "results.csv"))
            node.start()
            wait_for(
                lambda: len([t for t in orthanc_results(orthanc)]) == 8 and not list((work / "outbox").glob("*.dcm")),
                240,
                "all results in Orthanc",
                node.log,
            )
            node.kill(signal.SIGTERM)
        finally:
            node.kill()
        rows = csv_rows(work / "scored" / "results.csv")
        assert len(rows) == 8 and len({r["path"] for r in rows}) == 8 and all(r["status"] == "ok" for r in rows)
        sent = (work / "sent.log").read_text().split()
        assert len(sent) == len(set(sent)) == 8, "each SR C-STOREd exactly once"
        srcs = sorted(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files)
        refs = []
        for oid in orthanc.get("/instances"):
            d = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{oid}/file")))
            if d.get("Manufacturer") == "medxray":
                assert d.SOPClassUID == SR_CLASS
                refs.append(
                    d.CurrentRequestedProcedureEvidenceSequence[0]
                    .ReferencedSeriesSequence[0]
                    .ReferencedSOPSequence[0]
                    .ReferencedSOPInstanceUID
                )
        assert sorted(refs) == srcs, "every instance has exactly one result in Orthanc"
        assert 1 <= n_before < 8, f"the kill must land inside the run ({n_before} of 8 rows were done)"


def test_config_errors_are_one_clear_message(tmp_path, scoring_checkpoint):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        cfg = write_node_config(tmp_path / "node.yaml", tmp_path / "work", scoring_checkpoint, port, 4242)
        r = subprocess.run(
            [sys.executable, "-m", "medxray.cli", "serve-dicom", "--config", str(cfg)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert r.returncode == 2 and "already in use" in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        busy.close()
    from medxray.errors import ConfigError
    from medxray.pacs import load_node_config

    cases = {
        "unknown destination host": {"destination": {"ae_title": "PACS", "host": "no-such-pacs.invalid", "port": 104}},
        "unknown node option": {"colour": "blue"},
        "not a valid AE title": {"ae_title": "A" * 17},
        "allowed_calling_aes": {"allowed_calling_aes": []},
    }
    for needle, override in [*cases.items(), ("does not exist", {})]:
        ckpt = tmp_path / "missing.pt" if not override else scoring_checkpoint
        write_node_config(tmp_path / "bad.yaml", tmp_path / "work", ckpt, 11112, 4242, **override)
        with pytest.raises(ConfigError, match=needle):
            load_node_config(tmp_path / "bad.yaml")
