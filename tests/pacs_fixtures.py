"""A real Orthanc PACS for the tests, on loopback, with a temporary storage folder and free ports.

Debian's ``orthanc`` package (``/usr/sbin/Orthanc``; the Makefile installs it) is started with a
JSON config this module writes: 127.0.0.1 only (``RemoteAccessAllowed`` false), no
authentication (loopback only), no plugins, one ``DicomModalities`` entry for the medxray node.
``OrthancServer.stop()`` kills the whole process group, so no process is left behind.
Also here: free-port helper, dcmtk ``storescu`` / ``echoscu`` wrappers and the ``dciodvfy``
validator check. dcmtk's tools are resolved ONCE by path (:func:`dcmtk_tool`): with the venv
activated, ``storescu`` / ``findscu`` / ``echoscu`` on PATH are pynetdicom's console scripts,
which take other options. Orthanc can be started with DICOM TLS (``tls=``: its
``DicomTls*`` settings, quoted in the README).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
ORTHANC_AET = "ORTHANC"


def dcmtk_tool(name: str) -> str:
    """The path of dcmtk's ``name`` (storescu, echoscu, findscu): /usr/bin first, then PATH
    entries outside any virtual environment; each candidate must say "dcmtk" in ``--version``.
    Returns "" when dcmtk is not installed (tests skip)."""
    candidates = [f"/usr/bin/{name}", f"/usr/local/bin/{name}"]
    candidates += [os.path.join(d, name) for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    for c in dict.fromkeys(candidates):
        if not (os.path.isfile(c) and os.access(c, os.X_OK)):
            continue
        try:
            r = subprocess.run([c, "--version"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (r.stdout + r.stderr).lower():
            return c
    return ""


STORESCU = dcmtk_tool("storescu")
ECHOSCU = dcmtk_tool("echoscu")


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_config(
    storage: Path, http_port: int, dicom_port: int, node_aet: str, node_port: int, tls: dict | None = None
) -> dict:
    """The Orthanc configuration used by the tests (also quoted in the README).

    ``tls``: {certificate, private_key, trusted}: DICOM TLS on Orthanc's SCP and towards the
    node, peers must present a certificate that chains to ``trusted``."""
    tls_cfg = (
        {}
        if not tls
        else {
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(tls["certificate"]),
            "DicomTlsPrivateKey": str(tls["private_key"]),
            "DicomTlsTrustedCertificates": str(tls["trusted"]),
            "DicomTlsRemoteCertificateRequired": True,
        }
    )
    node = [node_aet, "127.0.0.1", node_port]
    modality = {"AET": node_aet, "Host": "127.0.0.1", "Port": node_port, "UseDicomTls": True} if tls else node
    return {
        **tls_cfg,
        "Name": "medxray-test-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "StorageCompression": False,
        "Plugins": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,  # 127.0.0.1 only
        "AuthenticationEnabled": False,  # acceptable on loopback only
        "SslEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": ORTHANC_AET,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomModalities": {"medxray": modality} if node_port else {},
        "UnknownSopClassAccepted": False,
        "SaveJobs": False,
        "HttpThreadsCount": 4,
        "DicomThreadsCount": 2,
        "ConcurrentJobs": 1,
        "DeidentifyLogs": True,
    }


class OrthancServer:
    """Start/stop one Orthanc with fixed ports (so it can be started late: "destination down, then up")."""

    def __init__(
        self,
        root: Path,
        node_aet: str = "MEDXRAY",
        node_port: int = 0,
        http_port: int | None = None,
        dicom_port: int | None = None,
        tls: dict | None = None,
    ) -> None:
        self.root = Path(root)
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        self.node_aet, self.node_port, self.tls = node_aet, node_port, tls
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0) -> "OrthancServer":
        storage = self.root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "orthanc.json"
        cfg.write_text(
            json.dumps(
                orthanc_config(storage, self.http_port, self.dicom_port, self.node_aet, self.node_port, self.tls),
                indent=2,
            )
        )
        log = open(self.root / "orthanc.log", "ab")
        self.proc = subprocess.Popen(
            [ORTHANC, str(cfg)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {self.root / 'orthanc.log'}")
            try:
                self.get("/system")
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("Orthanc did not answer /system in time")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        self.proc = None

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, data: bytes):
        req = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def instances_tags(self) -> list[dict]:
        """Simplified tags of every instance Orthanc holds."""
        return [self.get(f"/instances/{i}/simplified-tags") for i in self.get("/instances")]

    def __enter__(self) -> "OrthancServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def tls_args(tls: dict | None) -> list[str]:
    """dcmtk TLS options for ``tls`` = {private_key, certificate, ca} ({ca} only: no client certificate)."""
    if not tls:
        return []
    if tls.get("certificate"):
        args = ["+tls", str(tls["private_key"]), str(tls["certificate"])]
    else:
        args = ["+tla"]  # TLS without presenting a certificate
    return [*args, "+cf", str(tls["ca"])]


def storescu(
    port: int,
    files: list[Path],
    calling_aet: str = "STORESCU",
    called_aet: str = "MEDXRAY",
    timeout: float = 60,
    tls: dict | None = None,
    extra: list[str] | None = None,
    host: str = "127.0.0.1",
) -> subprocess.CompletedProcess:
    """dcmtk's storescu (resolved by path, never pynetdicom's): send ``files`` to ``host``:``port`` in
    one association; ``tls``: see :func:`tls_args`."""
    cmd = [
        STORESCU,
        "-aet",
        calling_aet,
        "-aec",
        called_aet,
        "-nh",
        *tls_args(tls),
        *(extra or []),
        host,
        str(port),
        *map(str, files),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def echoscu(
    port: int, calling_aet: str = "STORESCU", called_aet: str = "MEDXRAY", timeout: float = 60, tls: dict | None = None
) -> subprocess.CompletedProcess:
    """dcmtk's echoscu: one C-ECHO to 127.0.0.1:``port``."""
    cmd = [ECHOSCU, "-aet", calling_aet, "-aec", called_aet, *tls_args(tls), "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dicom3tools' standard validator prints for one object."""
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    lines = (r.stdout + r.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")]


def dciodvfy_warnings(path: Path) -> list[str]:
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Warning")]


class Node:
    """``medxray serve-dicom`` as a child process in its own process group."""

    def __init__(self, config: Path, port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.config, self.port, self.log = config, port, log
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "Node":
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "medxray.cli", "-v", "serve-dicom", "--config", str(self.config)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError("serve-dicom did not start listening:\n" + self.log.read_text()[-3000:])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        if sig != signal.SIGKILL:
            try:  # engine workers of a cleanly stopped node must be gone too
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = None


def wait_for(cond, timeout: float, what: str, log: Path | None = None, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{log.read_text()[-3000:]}" if log else ""))


def csv_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def make_pki(folder: Path) -> dict[str, Path]:
    """A test PKI made with the ``openssl`` CLI (the commands the README shows): a CA, and under it
    ``node`` (the medxray node), ``client`` (a modality / storescu), ``orthanc`` and ``rogue`` (a
    valid certificate whose name no ``peer_subject`` allows); plus a second CA ``other`` and an
    ``outsider`` certificate signed by it. RSA 2048, SHA-256, 2 days. Returns the paths by name:
    ``ca``, ``other_ca``, ``<name>.crt`` / ``<name>.key``."""
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        r = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=folder, timeout=120)
        assert r.returncode == 0, r.stderr

    def ca(name: str) -> None:
        run(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-sha256",
            "-days",
            "2",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.crt",
            "-subj",
            f"/O=medxray tests/CN={name} CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        )

    def leaf(name: str, issuer: str) -> None:
        (folder / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,"
            "keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
            f"subjectAltName=DNS:{name}.medxray.test,IP:127.0.0.1\n"
        )
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-sha256",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/O=medxray tests/CN={name}.medxray.test",
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            f"{issuer}.crt",
            "-CAkey",
            f"{issuer}.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-sha256",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.crt",
        )

    ca("ca")
    ca("other_ca")
    for name in ("node", "client", "orthanc", "rogue"):
        leaf(name, "ca")
    leaf("outsider", "other_ca")
    out = {"ca": folder / "ca.crt", "other_ca": folder / "other_ca.crt"}
    for name in ("node", "client", "orthanc", "rogue", "outsider"):
        out[f"{name}.crt"], out[f"{name}.key"] = folder / f"{name}.crt", folder / f"{name}.key"
    return out


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM and the RSS parts RssAnon / RssFile / RssShmem (KiB) of a process, /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[k] = int(v.split()[0])
    return out
