"""The DICOM node on a hostile network (issue 19 items 2 and 3): DICOM TLS with mutual
authentication, (AE title, host) allow-list, a non-loopback listener needs TLS, bounded PDUs,
data sets, pixel counts, connections and timeouts.

Real parts only: ``medxray serve-dicom`` as a separate process, certificates made by the
``openssl`` CLI, dcmtk's ``storescu`` / ``echoscu`` (resolved by path, tests/pacs_fixtures.py)
with ``+tls``, Debian's Orthanc with ``DicomTlsEnabled``, raw sockets for the misbehaving peers.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pacs_fixtures import (
    ECHOSCU,
    STORESCU,
    Node,
    OrthancServer,
    csv_rows,
    echoscu,
    free_port,
    make_pki,
    rss_kib,
    storescu,
    wait_for,
)
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

pytestmark = pytest.mark.skipif(
    not (STORESCU and ECHOSCU and os.path.exists("/usr/bin/openssl")),
    reason="needs dcmtk and openssl: run `make system-deps` (make test does)",
)

SCORING = {
    "workers": 1,
    "batch_size": 2,
    "backend": "torch",
    "precision": "fp32",
    "threads": 1,
    "overlay_max_side": 256,
}


def rg1_copy(folder: Path, tag: str, **changes) -> Path:
    """The real RG1 CR with a new SOP Instance UID (and any attribute ``changes``)."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["medxray-security", tag])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for k, v in changes.items():
        setattr(ds, k, v)
    p = folder / f"{tag}.dcm"
    ds.save_as(p, enforce_file_format=True)
    return p


def node_config(path: Path, work: Path, checkpoint: Path, port: int, dest_port: int, **extra) -> Path:
    cfg = {
        "ae_title": "MEDXRAY",
        "host": "127.0.0.1",
        "port": port,
        "allowed_calling_aes": ["STORESCU", {"ae_title": "NETPEER", "hosts": ["10.0.0.0/8"]}],
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


def received(work: Path) -> set[str]:
    """SOP Instance UIDs the node spooled (incoming/ or inbox/)."""
    return {p.stem for d in ("incoming", "inbox") for p in (work / d).glob("*/*/*.dcm")}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def client_tls(pki, name: str = "client") -> dict:
    return {"private_key": pki[f"{name}.key"], "certificate": pki[f"{name}.crt"], "ca": pki["ca"]}


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory, pki, scoring_checkpoint):
    """A node listening with TLS (client certificates required, CA ``ca``, peer names must match
    ``(client|orthanc)``), short timeouts so the silent-peer tests are quick."""
    root = tmp_path_factory.mktemp("tlsnode")
    port = free_port()
    tls = {
        "certificate": str(pki["node.crt"]),
        "private_key": str(pki["node.key"]),
        "ca_certificates": str(pki["ca"]),
        "peer_subject": r"(client|orthanc)\.medxray\.test",
    }
    callers = [
        "STORESCU",
        {"ae_title": "NETPEER", "hosts": ["10.0.0.0/8"]},
        {"ae_title": "LOOPNET", "hosts": ["10.0.0.0/8", "127.0.0.0/30"]},
    ]
    cfg = node_config(
        root / "node.yaml",
        root / "work",
        scoring_checkpoint,
        port,
        free_port(),
        tls=tls,
        allowed_calling_aes=callers,
        acse_timeout=3,
        network_timeout=3,
        max_associations=2,
        idle_seconds=3600,
    )
    node = Node(cfg, port, root / "node.log")
    try:
        node.start()
        yield {"node": node, "port": port, "work": root / "work", "root": root}
    finally:
        node.kill()


@pytest.mark.parametrize("calling", ["STORESCU", "LOOPNET"])
def test_tls_peer_with_a_certificate_from_the_ca_is_accepted(tls_node, pki, calling):
    """STORESCU: a bare AE title (loopback only); LOOPNET: allowed from 127.0.0.0/30 by CIDR."""
    f = rg1_copy(tls_node["root"] / "send", f"tls-ok-{calling}")
    r = storescu(tls_node["port"], [f], calling_aet=calling, tls=client_tls(pki))
    assert r.returncode == 0, r.stdout + r.stderr
    uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
    assert uid in received(tls_node["work"])


@pytest.mark.parametrize("case", ["no certificate", "other CA", "plain TCP", "name not allowed"])
def test_tls_peer_that_cannot_authenticate_is_refused(tls_node, pki, case):
    f = rg1_copy(tls_node["root"] / "send", f"refused-{case}")
    tls = {
        "no certificate": {"ca": pki["ca"]},
        "other CA": client_tls(pki, "outsider"),
        "plain TCP": None,
        "name not allowed": client_tls(pki, "rogue"),
    }[case]
    r = storescu(tls_node["port"], [f], tls=tls, timeout=60)
    assert r.returncode != 0, r.stdout + r.stderr
    uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
    assert uid not in received(tls_node["work"])
    if case == "name not allowed":  # TLS succeeded (same CA); the association is rejected by name
        assert "reject" in (r.stdout + r.stderr).lower()
    ok = echoscu(tls_node["port"], tls=client_tls(pki))
    assert ok.returncode == 0, "the node still answers a C-ECHO afterwards: " + ok.stdout + ok.stderr


def test_allowed_ae_from_a_host_not_allowed_is_rejected(tls_node, pki):
    """NETPEER may call only from 10.0.0.0/8; from 127.0.0.1 it is rejected at A-ASSOCIATE."""
    f = rg1_copy(tls_node["root"] / "send", "wrong-host")
    r = storescu(tls_node["port"], [f], calling_aet="NETPEER", tls=client_tls(pki))
    assert r.returncode != 0 and "reject" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    assert pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID not in received(tls_node["work"])
    assert "not allowed from this address" in tls_node["node"].log.read_text()
    assert echoscu(tls_node["port"], tls=client_tls(pki)).returncode == 0


def test_associations_over_max_associations_are_rejected(tls_node, pki):
    """max_associations = 2: a third concurrent association gets A-ASSOCIATE-RJ; once one is released,
    a new one is accepted."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(pki["client.crt"]), str(pki["client.key"]))
    ae = AE(ae_title="STORESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(Verification)
    held = []
    try:
        for _ in range(2):
            a = ae.associate("127.0.0.1", tls_node["port"], ae_title="MEDXRAY", tls_args=(ctx, None))
            assert a.is_established
            held.append(a)
        third = ae.associate("127.0.0.1", tls_node["port"], ae_title="MEDXRAY", tls_args=(ctx, None))
        assert third.is_rejected and not third.is_established
        held.pop().release()
        time.sleep(1.0)
        again = ae.associate("127.0.0.1", tls_node["port"], ae_title="MEDXRAY", tls_args=(ctx, None))
        assert again.is_established
        assert int(again.send_c_echo().Status) == 0
        again.release()
    finally:
        for a in held:
            a.release()


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer (the node) closed ``sock``, or None if still open after ``seconds``."""
    t0 = time.monotonic()
    sock.settimeout(0.5)
    while time.monotonic() - t0 < seconds:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - t0
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic() - t0
    return None


def test_silent_and_dripping_peers_are_dropped_and_do_not_block_others(tls_node, pki):
    port = tls_node["port"]
    silent = socket.create_connection(("127.0.0.1", port))  # TCP, never starts the TLS handshake
    # while it is connected, an authenticated peer still gets through (the handshake is not done in
    # the accept loop)
    assert echoscu(port, tls=client_tls(pki)).returncode == 0
    took = _closed_within(silent, 20)
    silent.close()
    assert took is not None and took < 10, f"silent peer held for {took}"
    # an authenticated peer that starts an A-ASSOCIATE-RQ and then drips one byte a second
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(pki["client.crt"]), str(pki["client.key"]))
    raw = socket.create_connection(("127.0.0.1", port))
    drip = ctx.wrap_socket(raw)
    drip.sendall(b"\x01\x00" + struct.pack(">L", 200))
    t0 = time.monotonic()
    closed = False
    while time.monotonic() - t0 < 20:
        try:
            drip.sendall(b"\x00")
            time.sleep(1.0)
        except OSError:
            closed = True
            break
        drip.settimeout(0.01)
        try:
            if drip.recv(1) == b"":
                closed = True
                break
        except (socket.timeout, ssl.SSLWantReadError):
            pass
        except OSError:
            closed = True
            break
    drip.close()
    assert closed and time.monotonic() - t0 < 12, "a dripping peer must be dropped after network_timeout (3 s)"
    assert echoscu(port, tls=client_tls(pki)).returncode == 0


def test_non_loopback_listener_needs_tls_or_explicit_insecure_plaintext(tmp_path, scoring_checkpoint, caplog):
    from medxray.errors import ConfigError
    from medxray.pacs import load_node_config
    from medxray.pacs.scp import start_scp
    from medxray.pacs.spool import Spool

    cfg = node_config(tmp_path / "n.yaml", tmp_path / "work", scoring_checkpoint, free_port(), 4242, host="0.0.0.0")
    with pytest.raises(ConfigError, match="insecure_plaintext: true"):
        load_node_config(cfg)
    example = yaml.safe_load((Path(__file__).resolve().parents[1] / "pipelines" / "node.yaml").read_text())
    assert example["host"] == "127.0.0.1"
    node_config(cfg, tmp_path / "work", scoring_checkpoint, free_port(), 4242, host="0.0.0.0", insecure_plaintext=True)
    loaded = load_node_config(cfg)
    for _ in range(2):  # warned at every start
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="medxray.pacs.scp"):
            server = start_scp(loaded, Spool(tmp_path / "work"))
            server.shutdown()
        assert any("INSECURE" in r.getMessage() for r in caplog.records)
    for bad, needle in [
        ({"max_pdu_size": 10}, "max_pdu_size"),
        ({"network_timeout": 0}, "network_timeout"),
        ({"tls": {"certificate": "x.pem"}}, "tls: needs private_key"),
        (
            {"allowed_calling_aes": [{"ae_title": "X", "hosts": ["no-such-host.invalid"]}]},
            "allowed_calling_aes\\[0\\].hosts",
        ),
    ]:
        node_config(cfg, tmp_path / "work", scoring_checkpoint, free_port(), 4242, **bad)
        with pytest.raises(ConfigError, match=needle):
            load_node_config(cfg)


def test_sender_verifies_the_destination_certificate(tmp_path, pki, scoring_checkpoint):
    """The result sender (C-STORE SCU) over TLS to a real TLS SCP (a second node's listener, in this
    process): sent when the destination's certificate chains to the CA and matches peer_subject;
    "destination down" (nothing sent) for a name that does not match or our certificate from another CA."""
    from medxray.pacs import load_node_config
    from medxray.pacs.config import Destination
    from medxray.pacs.scp import start_scp
    from medxray.pacs.sender import SENT, CStoreDestination, DestinationDown
    from medxray.pacs.spool import Spool
    from medxray.pacs.tls import TlsConfig

    port = free_port()
    tls = {"certificate": str(pki["node.crt"]), "private_key": str(pki["node.key"]), "ca_certificates": str(pki["ca"])}
    cfg = load_node_config(
        node_config(
            tmp_path / "dest.yaml",
            tmp_path / "dest",
            scoring_checkpoint,
            port,
            4242,
            tls=tls,
            allowed_calling_aes=["SENDER"],
        )
    )
    server = start_scp(cfg, Spool(tmp_path / "dest"))
    f = rg1_copy(tmp_path / "send", "sender-tls")
    try:

        def attempt(name: str, subject: str | None) -> list:
            mine = TlsConfig(str(pki[f"{name}.crt"]), str(pki[f"{name}.key"]), str(pki["ca"]), subject)
            return list(CStoreDestination(Destination("MEDXRAY", "127.0.0.1", port, mine), "SENDER").send([f]))

        with pytest.raises(DestinationDown, match="does not match destination.tls.peer_subject"):
            attempt("client", r"orthanc\.medxray\.test")
        with pytest.raises(DestinationDown, match="TLS"):
            attempt("outsider", None)
        assert not received(tmp_path / "dest")
        assert [o for _, o, _ in attempt("client", r"node\.medxray\.test")] == [SENT]
        assert pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID in received(tmp_path / "dest")
    finally:
        server.shutdown()


# ---- bounds on a plain loopback node ---------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_node(tmp_path_factory, scoring_checkpoint):
    """A loopback node without TLS; pynetdicom's temporary files go to its own TMPDIR (checked empty)."""
    root = tmp_path_factory.mktemp("plainnode")
    port = free_port()
    (root / "tmp").mkdir()
    cfg = node_config(
        root / "node.yaml", root / "work", scoring_checkpoint, port, free_port(), acse_timeout=3, network_timeout=3
    )
    node = Node(cfg, port, root / "node.log", env={"TMPDIR": str(root / "tmp")})
    try:
        node.start()
        yield {"node": node, "port": port, "work": root / "work", "root": root, "tmp": root / "tmp"}
    finally:
        node.kill()


def refused_rows(work: Path) -> list[dict[str, str]]:
    return [r for r in csv_rows(work / "node.csv") if r["status"] == "refused"]


def test_image_over_the_pixel_limit_is_refused_at_receipt(plain_node):
    """Rows x Columns = 10000 x 8000 = 80 MP (> 60 MP) in the header; only 1000 bytes of pixels sent."""
    f = rg1_copy(plain_node["root"] / "send", "80mp", Rows=10000, Columns=8000)
    ds = pydicom.dcmread(f)
    ds.PixelData = ds.PixelData[:1000]
    ds.save_as(f, enforce_file_format=True)
    r = storescu(plain_node["port"], [f], extra=["-v"])
    out = (r.stdout + r.stderr).lower()
    assert "received store response (refused: outofresources)" in out, out
    assert ds.SOPInstanceUID not in received(plain_node["work"])
    rows = [x for x in refused_rows(plain_node["work"]) if x["sop_instance_uid"] == ds.SOPInstanceUID]
    assert rows and rows[0]["reason"].startswith("too_large: the image is 8000x10000 = 80.0 MP"), rows
    assert "Patient" not in "".join(rows[0].values()) and str(ds.PatientID) not in "".join(rows[0].values())


def test_pdu_longer_than_the_limit_closes_the_connection(plain_node):
    """An A-ASSOCIATE-RQ declaring 2 GiB: the node closes before reading it (memory stays flat)."""
    before = rss_kib(plain_node["node"].proc.pid)["VmRSS"]
    s = socket.create_connection(("127.0.0.1", plain_node["port"]))
    s.sendall(b"\x01\x00" + struct.pack(">L", 2**31) + b"\x00" * 65536)
    took = _closed_within(s, 10)
    s.close()
    assert took is not None, "the connection must be closed"
    assert rss_kib(plain_node["node"].proc.pid)["VmRSS"] - before < 50 * 1024
    assert echoscu(plain_node["port"]).returncode == 0


def warm_up(node_info: dict) -> None:
    """Send one RG1 image and wait until it is scored (idle_seconds 1): the node has loaded its model."""
    node, work = node_info["node"], node_info["work"]
    if csv_rows(work / "scored" / "results.csv"):
        return
    first = rg1_copy(node_info["root"] / "send", "warmup")
    assert storescu(node_info["port"], [first]).returncode == 0
    wait_for(lambda: len(csv_rows(work / "scored" / "results.csv")) >= 1, 240, "the first image scored", node.log)
    # ... and its SR/SC made (they wait in the outbox: the destination is down), so the node is at rest
    wait_for(
        lambda: list((work / "outbox").glob("*.dcm")) and not list((work / "tmp").glob("*")),
        240,
        "the result objects in the outbox",
        node.log,
    )
    time.sleep(5)


def watch_rss(pid: int, done: threading.Event, peak: dict) -> None:
    """Peak VmRSS (``rss``) and, at that moment, its parts (``parts``), sampled every 50 ms."""
    while not done.is_set():
        try:
            now = rss_kib(pid)
        except (OSError, KeyError):
            return
        if now["VmRSS"] > peak.get("rss", 0):
            peak["rss"], peak["parts"] = now["VmRSS"], now
        time.sleep(0.05)


def test_p_data_pdu_over_max_pdu_size_closes_the_association(plain_node):
    """After a real A-ASSOCIATE (recorded from pynetdicom's SCU), a P-DATA-TF PDU declaring 100 MB
    (max_pdu_size is 64 KiB) closes the connection before the node reads it; RSS stays flat."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "medxray_network_fuzz", Path(__file__).resolve().parent / "fuzz" / "network.py"
    )
    network = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(network)
    echo_session = network.record_sessions(plain_node["port"], "STORESCU")[0]
    assert echo_session[0][0] == 0x01 and echo_session[1][0] == 0x04
    before = rss_kib(plain_node["node"].proc.pid)["VmRSS"]
    s = socket.create_connection(("127.0.0.1", plain_node["port"]))
    s.sendall(echo_session[0])  # A-ASSOCIATE-RQ
    s.settimeout(10)
    assert s.recv(65536)[:1] == b"\x02", "A-ASSOCIATE-AC expected"
    s.sendall(b"\x04\x00" + struct.pack(">L", 100_000_000))
    sent, closed = 0, False
    try:
        while sent < 100_000_000:
            s.sendall(bytes(65536))
            sent += 65536
    except OSError:
        closed = True
    if not closed:
        closed = _closed_within(s, 10) is not None
    s.close()
    assert closed and sent < 50_000_000, f"the node read {sent} bytes of an oversized PDU"
    assert rss_kib(plain_node["node"].proc.pid)["VmRSS"] - before < 50 * 1024
    assert "sent a PDU of type 0x04 declaring 100000000 bytes" in plain_node["node"].log.read_text()
    assert echoscu(plain_node["port"]).returncode == 0


def test_c_store_cut_off_mid_data_set_leaves_no_file(plain_node):
    """A peer that sends a C-STORE command and part of its data set, then disconnects: the partial
    data set file pynetdicom was writing is removed, nothing is spooled."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "medxray_network_fuzz", Path(__file__).resolve().parent / "fuzz" / "network.py"
    )
    network = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(network)
    store_session = network.record_sessions(plain_node["port"], "STORESCU")[1]
    before = received(plain_node["work"])
    command = None
    for pdu in store_session[1:]:
        # P-DATA-TF: PDV items of (length, context ID, message control header, fragment); PS3.8 9.3.5
        # Command Field (0000,0100) US 0001H = C-STORE-RQ, implicit VR little endian (PS3.7 E.1)
        if pdu[0] == 0x04 and pdu[11] & 0x01 and b"\x00\x00\x00\x01\x02\x00\x00\x00\x01\x00" in pdu:
            command = pdu
            break
    assert command is not None, "no C-STORE command in the recorded session"
    context_id = command[10]
    fragment = bytes([0x00]) + bytes(20000)  # data set fragment, not the last
    pdata = struct.pack(">L", len(fragment) + 1) + bytes([context_id]) + fragment
    s = socket.create_connection(("127.0.0.1", plain_node["port"]))
    s.settimeout(10)
    s.sendall(store_session[0])
    assert s.recv(65536)[:1] == b"\x02"
    s.sendall(command + b"\x04\x00" + struct.pack(">L", len(pdata)) + pdata)
    time.sleep(1.0)
    s.close()
    wait_for(
        lambda: "removed the partial data set" in plain_node["node"].log.read_text(),
        20,
        "the partial file removed",
        plain_node["node"].log,
    )
    time.sleep(0.5)
    assert not list(plain_node["tmp"].glob("*")), list(plain_node["tmp"].glob("*"))
    assert received(plain_node["work"]) == before


@pytest.mark.slow
def test_1_mb_deflate_bomb_over_the_network_is_refused_with_bounded_memory(plain_node):
    """A 1 MB C-STORE in Deflated Explicit VR Little Endian whose body inflates to 1 GiB (sent as is,
    pynetdicom SCU with chunked sending): refused 0xA700 too_large at receipt, node RSS < +300 MB."""
    from pynetdicom import AE, _config
    from test_dicom_bombs import deflate_bomb

    node, work = plain_node["node"], plain_node["work"]
    warm_up(plain_node)
    bomb = plain_node["root"] / "bomb.dcm"
    bomb.write_bytes(deflate_bomb("pixel_length"))
    assert bomb.stat().st_size < 1.5e6
    ds = pydicom.dcmread(bomb, stop_before_pixels=True)
    base = rss_kib(node.proc.pid)
    peak: dict = {}
    done = threading.Event()
    t = threading.Thread(target=watch_rss, args=(node.proc.pid, done, peak))
    t.start()
    was = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are (no inflating here)
    try:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
        assoc = ae.associate("127.0.0.1", plain_node["port"], ae_title="MEDXRAY")
        assert assoc.is_established
        status = assoc.send_c_store(bomb)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = was
        done.set()
        t.join()
    after = rss_kib(node.proc.pid)
    growth_mb = (max(peak.get("rss", 0), after["VmRSS"]) - base["VmRSS"]) * 1024 / 1e6
    print(
        f"\n1 MB deflate bomb: RSS {base['VmRSS'] / 1024:.0f} MiB before, peak growth {growth_mb:.1f} MB, "
        f"VmHWM growth {(after['VmHWM'] - base['VmHWM']) * 1024 / 1e6:.1f} MB, status 0x{int(status.Status):04X}"
    )
    assert int(status.Status) == 0xA700
    assert growth_mb < 300 and (after["VmHWM"] - base["VmHWM"]) * 1024 / 1e6 < 300
    rows = [x for x in refused_rows(work) if x["sop_instance_uid"] == str(ds.SOPInstanceUID)]
    assert rows and rows[0]["reason"].startswith("too_large"), csv_rows(work / "node.csv")
    assert str(ds.SOPInstanceUID) not in received(work)
    assert not list(plain_node["tmp"].glob("*"))


@pytest.mark.slow
def test_300_mb_cstore_is_refused_with_bounded_memory_and_disk(plain_node):
    """After a first image has loaded the model: a 294 MB C-STORE (3 frames of 7000x7000 16-bit, each
    under the pixel limit; the data set is over max_dataset_bytes = 256 MiB) is answered 0xA700,
    leaves no file behind, and the node's RSS grows by < 300 MB (measured: README)."""
    node, work = plain_node["node"], plain_node["work"]
    warm_up(plain_node)
    base = rss_kib(node.proc.pid)
    big = plain_node["root"] / "big.dcm"
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"), stop_before_pixels=True)
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["medxray-security-300mb"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows = ds.Columns = 7000
    ds.NumberOfFrames = 3
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.add_new(0x7FE00010, "OW", np.full((3, 7000, 7000), 7, np.uint16).tobytes())
    ds.save_as(big, enforce_file_format=True)
    del ds
    assert big.stat().st_size > 290e6
    peak = {"rss": 0}
    done = threading.Event()
    t = threading.Thread(target=watch_rss, args=(node.proc.pid, done, peak))
    t.start()
    try:
        r = storescu(plain_node["port"], [big], timeout=300, extra=["-v"])
    finally:
        done.set()
        t.join()
    big.unlink()
    out = (r.stdout + r.stderr).lower()
    assert "received store response (refused: outofresources)" in out, out
    after = rss_kib(node.proc.pid)
    growth_mb = (max(peak["rss"], after["VmRSS"]) - base["VmRSS"]) * 1024 / 1e6
    hwm_growth_mb = (after["VmHWM"] - base["VmHWM"]) * 1024 / 1e6
    print(f"\nbefore {base}, at the peak {peak.get('parts')}")
    print(
        f"\n300 MB C-STORE: RSS {base['VmRSS'] / 1024:.0f} MiB before, peak growth {growth_mb:.1f} MB, "
        f"VmHWM growth {hwm_growth_mb:.1f} MB; storescu: {[ln for ln in out.splitlines() if 'response' in ln][:2]}"
    )
    assert growth_mb < 300 and hwm_growth_mb < 300
    rows = [x for x in refused_rows(work) if x["reason"].startswith("too_large: the data set is over")]
    assert rows, csv_rows(work / "node.csv")
    assert not list(plain_node["tmp"].glob("*")), "the partial data set file is removed"
    assert not any(p.stat().st_size > 100e6 for p in work.rglob("*") if p.is_file())
    assert echoscu(plain_node["port"]).returncode == 0


# ---- Orthanc over DICOM TLS ------------------------------------------------------------------------


@pytest.mark.slow
def test_orthanc_sends_to_the_node_and_receives_its_results_over_tls(tmp_path, pki, scoring_checkpoint):
    node_port = free_port()
    orthanc = OrthancServer(
        tmp_path / "orthanc",
        node_aet="MEDXRAY",
        node_port=node_port,
        tls={"certificate": pki["orthanc.crt"], "private_key": pki["orthanc.key"], "trusted": pki["ca"]},
    )
    node_tls = {
        "certificate": str(pki["node.crt"]),
        "private_key": str(pki["node.key"]),
        "ca_certificates": str(pki["ca"]),
    }
    work = tmp_path / "work"
    cfg = node_config(
        tmp_path / "node.yaml",
        work,
        scoring_checkpoint,
        node_port,
        orthanc.dicom_port,
        allowed_calling_aes=["ORTHANC"],
        secondary_capture=False,
        tls={**node_tls, "peer_subject": r"orthanc\.medxray\.test"},
        destination={
            "ae_title": "ORTHANC",
            "host": "127.0.0.1",
            "port": orthanc.dicom_port,
            "tls": {**node_tls, "peer_subject": r"orthanc\.medxray\.test"},
        },
    )
    node = Node(cfg, node_port, tmp_path / "node.log")
    with orthanc:
        try:
            node.start()
            f = rg1_copy(tmp_path / "send", "via-orthanc")
            oid = orthanc.post("/instances", f.read_bytes())["ID"]
            job = orthanc.post("/modalities/medxray/store", oid.encode())
            assert int(job.get("FailedInstancesCount", 0)) == 0, job
            src = pydicom.dcmread(f, stop_before_pixels=True)
            wait_for(
                lambda: [t for t in orthanc.instances_tags() if t.get("Manufacturer") == "medxray"],
                240,
                "the SR in Orthanc",
                node.log,
            )
            results = [t for t in orthanc.instances_tags() if t.get("Manufacturer") == "medxray"]
            assert len(results) == 1 and results[0]["StudyInstanceUID"] == src.StudyInstanceUID
            log = node.log.read_text()
            assert "TLS peer 127.0.0.1: orthanc.medxray.test" in log
            assert "(TLS)" in log  # the destination is described as TLS in the node's log
        finally:
            node.kill()


@pytest.mark.slow
def test_network_fuzz_of_the_running_node_finds_nothing(tmp_path):
    """`make fuzz`'s network harness for 15 s: malformed associations and PDUs against the real node:
    it keeps running, answers a C-ECHO, its RSS stays within 300 MB and no thread is left behind."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "medxray_network_fuzz", Path(__file__).resolve().parent / "fuzz" / "network.py"
    )
    network = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(network)
    r = network.fuzz(15, tmp_path, rss_bound_mb=300, seed=19)
    print(f"\nnetwork fuzz: {r}")
    assert r["executions"] >= 20
    assert r["escapes"] == [] and r["echo_after"], r
