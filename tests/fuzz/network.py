"""Network fuzzing of the DICOM node (issue 19): malformed associations and PDUs against a running
``medxray serve-dicom``, for a time budget.

    python tests/fuzz/network.py [--seconds 120] [--workdir /tmp/medxray-fuzz]   (also: run.py)

The node is the real one (a separate process on a free loopback port, plain TCP, short timeouts,
a placeholder checkpoint and ``idle_seconds`` 3600 so nothing is scored: the network path is what
is exercised). Seeds are real sessions recorded through a loopback proxy between pynetdicom's SCU
and the node: A-ASSOCIATE-RQ, C-ECHO, a C-STORE of a 64x64 crop of RG1, A-RELEASE-RQ. Each
execution takes one session, mutates it (bit flips, byte runs, PDU length fields set to 0 / small /
huge, truncation, dropped / duplicated / reordered / spliced PDUs, random PDU types), sends it on a
new connection and reads whatever comes back. This is mutation fuzzing without coverage feedback
(the target is another process).

An **escape** is: the node process exits; it stops answering a C-ECHO (checked every 2 s and at
the end); its RSS grows by more than ``--rss-bound-mb`` over its RSS after start; its thread count
does not come back down (a leaked association) after the timeouts; or its log shows an exception that
escaped a thread, other than pynetdicom's own state-machine race (``InvalidEventError`` in Sta13:
a primitive arriving after the transport closed; the association ends, its DUL thread exits; counted
and reported as ``upstream_races``; cf. pynetdicom issue #721). The session sent last before an escape
is kept under ``<workdir>/network-escapes/``. Exit status 1 when anything escaped.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests"))

from pacs_fixtures import free_port, rss_kib  # noqa: E402

PDU_TYPES = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)


def split_pdus(stream: bytes) -> list[bytes]:
    """Cut a byte stream at PDU boundaries (type, reserved, 4-byte big-endian length)."""
    out, i = [], 0
    while i + 6 <= len(stream):
        n = struct.unpack(">L", stream[i + 2 : i + 6])[0]
        out.append(stream[i : i + 6 + n])
        i += 6 + n
    return out


def record_sessions(node_port: int, calling_aet: str) -> list[list[bytes]]:
    """Client->node PDUs of a C-ECHO session and a C-STORE session, recorded through a proxy."""
    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file
    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

    ds = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    crop = np.ascontiguousarray(ds.pixel_array[900:964, 900:964])
    ds.Rows, ds.Columns, ds.PixelData = 64, 64, crop.tobytes()
    ds.PatientName, ds.PatientID = "Fuzz^Seed", "FUZZ0001"

    def via_proxy(action) -> list[bytes]:
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        recorded = bytearray()

        def pump() -> None:
            client, _ = lsock.accept()
            upstream = socket.create_connection(("127.0.0.1", node_port))
            peers = {client: upstream, upstream: client}
            try:
                while True:
                    ready, _, _ = select.select(list(peers), [], [], 10)
                    if not ready:
                        return
                    for s in ready:
                        data = s.recv(65536)
                        if not data:
                            return
                        if s is client:
                            recorded.extend(data)
                        peers[s].sendall(data)
            except OSError:
                return
            finally:
                client.close()
                upstream.close()

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        action(lsock.getsockname()[1])
        t.join(timeout=15)
        lsock.close()
        return split_pdus(bytes(recorded))

    def echo(port: int) -> None:
        ae = AE(ae_title=calling_aet)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDXRAY")
        assert assoc.is_established, "the node refused the seed association"
        assoc.send_c_echo()
        assoc.release()

    def store(port: int) -> None:
        ae = AE(ae_title=calling_aet)
        ae.add_requested_context(ComputedRadiographyImageStorage, str(ds.file_meta.TransferSyntaxUID))
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDXRAY")
        assert assoc.is_established, "the node refused the seed association"
        assoc.send_c_store(ds)
        assoc.send_c_echo()
        assoc.release()

    return [via_proxy(echo), via_proxy(store)]


def mutate(session: list[bytes], rng: random.Random, pool: list[bytes]) -> list[bytes]:
    """1-4 random mutations of a list of PDUs (never the seeds themselves)."""
    pdus = [bytearray(p) for p in session]
    for _ in range(rng.randint(1, 4)):
        if not pdus:
            pdus.append(bytearray(rng.choice(pool)))
        k = rng.randrange(len(pdus))
        p = pdus[k]
        op = rng.randrange(11)
        if op == 0 and p:  # bit flips
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(p))
                p[i] ^= 1 << rng.randrange(8)
        elif op == 1 and p:  # a run of random or boundary bytes
            i = rng.randrange(len(p))
            run = bytes(rng.choice((0x00, 0xFF, 0x7F, 0x80, rng.randrange(256))) for _ in range(rng.randint(1, 16)))
            p[i : i + len(run)] = run
        elif op == 2 and len(p) >= 6:  # the PDU length field: 0, small, off by a few, huge
            n = struct.unpack(">L", p[2:6])[0]
            p[2:6] = struct.pack(">L", rng.choice((0, 1, 4, max(0, n - 3), n + 3, 2**16 + 1, 2**31, 2**32 - 1)))
        elif op == 3:  # truncate
            del p[rng.randrange(len(p) + 1) :]
        elif op == 4 and len(pdus) > 1:  # drop a PDU
            del pdus[k]
        elif op == 5:  # duplicate a PDU
            pdus.insert(k, bytearray(p))
        elif op == 6 and len(pdus) > 1:  # swap two PDUs
            j = rng.randrange(len(pdus))
            pdus[k], pdus[j] = pdus[j], pdus[k]
        elif op == 7 and p:  # another PDU type
            p[0] = rng.choice(PDU_TYPES + (0x00, 0x08, 0xFF))
        elif op == 8:  # splice: a PDU from another session
            pdus.insert(k, bytearray(rng.choice(pool)))
        elif op == 9 and len(p) > 12:  # an inner item / PDV length field
            i = rng.randrange(6, len(p) - 4)
            p[i : i + 4] = struct.pack(">L", rng.choice((0, 1, 2**16, 2**31, 2**32 - 1)))
        else:  # garbage appended
            p.extend(rng.randbytes(rng.randint(1, 64)))
    return [bytes(p) for p in pdus]


def send_session(port: int, pdus: list[bytes], timeout: float = 0.2) -> None:
    """Send the PDUs back to back on a new connection, read what comes back for ``timeout`` s, close."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(b"".join(pdus))
            s.settimeout(timeout)
            while s.recv(65536):
                pass
        except OSError:  # includes the read timeout and resets by the node
            pass


def echo_ok(port: int, calling_aet: str, timeout: float = 15.0) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDXRAY")
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0
    finally:
        assoc.release()


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def start_node(workdir: Path, port: int) -> tuple[subprocess.Popen, Path]:
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = workdir / "placeholder.pt"  # never loaded: nothing is scored within the budget
    ckpt.write_bytes(b"not a checkpoint")
    cfg = {
        "ae_title": "MEDXRAY",
        "host": "127.0.0.1",
        "port": port,
        "allowed_calling_aes": ["FUZZER"],
        "destination": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": free_port()},
        "checkpoint": str(ckpt),
        "work_dir": str(workdir / "node-work"),
        "idle_seconds": 3600,
        "max_associations": 16,
        "acse_timeout": 2,
        "dimse_timeout": 5,
        "network_timeout": 2,
    }
    (workdir / "node.yaml").write_text(yaml.safe_dump(cfg))
    log = workdir / "network-node.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "medxray.cli", "serve-dicom", "--config", str(workdir / "node.yaml")],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(workdir)},
            start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve-dicom exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, log
        except OSError:
            time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit("serve-dicom did not start listening")


def fuzz(seconds: float, workdir: Path, rss_bound_mb: float = 300.0, seed: int | None = None) -> dict:
    """Run the network fuzzer; returns {executions, escapes, rss_growth_mb, echo_after}."""
    port = free_port()
    proc, log = start_node(workdir, port)
    rng = random.Random(seed if seed is not None else time.time_ns())
    escapes: list[str] = []
    kept = workdir / "network-escapes"
    execs = 0
    try:
        sessions = record_sessions(port, "FUZZER")
        pool = [p for s in sessions for p in s]
        assert echo_ok(port, "FUZZER"), "the node does not answer a C-ECHO before fuzzing"
        base = rss_kib(proc.pid)["VmRSS"]
        base_threads = threads(proc.pid)
        peak = base
        t_end = time.monotonic() + seconds
        next_check = time.monotonic() + 2
        last: list[bytes] = []
        while time.monotonic() < t_end and not escapes:
            last = mutate(rng.choice(sessions), rng, pool)
            try:
                send_session(port, last)
            except OSError:
                pass  # e.g. the connection cap: the health check decides
            execs += 1
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 2
                if proc.poll() is not None:
                    escapes.append(f"the node exited with {proc.returncode}")
                    break
                peak = max(peak, rss_kib(proc.pid)["VmRSS"])
                if (peak - base) / 1024 > rss_bound_mb:
                    escapes.append(f"RSS grew by {(peak - base) / 1024:.0f} MiB")
                if not echo_ok(port, "FUZZER"):
                    escapes.append("no C-ECHO answer")
        time.sleep(6)  # acse/network timeouts are 2 s: every association of the fuzzer has ended by now
        n_threads = threads(proc.pid) if proc.poll() is None else 0
        if n_threads > base_threads + 4:
            escapes.append(f"{n_threads} threads after the budget ({base_threads} before): leaked associations")
        echo_after = proc.poll() is None and echo_ok(port, "FUZZER")
        if not echo_after and not escapes:
            escapes.append("no C-ECHO answer after the budget")
        if proc.poll() is None:
            peak = max(peak, rss_kib(proc.pid)["VmRSS"])
        text = log.read_text(errors="replace")
        escaped = text.count("Exception in thread ")
        races = len(re.findall(r"InvalidEventError: Invalid event 'Evt\d+' for the current state 'Sta13'", text))
        if escaped > races:
            escapes.append(f"{escaped - races} exception(s) escaped a node thread (see the log)")
        if escapes:
            kept.mkdir(parents=True, exist_ok=True)
            (kept / f"session-{int(time.time())}.bin").write_bytes(b"".join(last))
        return {
            "executions": execs,
            "escapes": escapes,
            "rss_growth_mb": (peak - base) / 1024,
            "echo_after": echo_after,
            "threads": (base_threads, n_threads),
            "upstream_races": races,
            "log": str(log),
        }
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "medxray-fuzz")
    ap.add_argument("--rss-bound-mb", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    r = fuzz(args.seconds, args.workdir / "network", args.rss_bound_mb, args.seed)
    print(
        f"   network: {r['executions']} sessions, {len(r['escapes'])} escapes {r['escapes']}, node RSS growth "
        f"{r['rss_growth_mb']:.1f} MiB, threads {r['threads'][0]} -> {r['threads'][1]}, pynetdicom Sta13 races "
        f"{r['upstream_races']}, C-ECHO after: {r['echo_after']}, log {r['log']}",
        flush=True,
    )
    return 1 if r["escapes"] else 0


if __name__ == "__main__":
    sys.exit(main())
