"""A real Orthanc PACS for the tests, on loopback, with a temporary storage folder and free ports.

Debian's ``orthanc`` package (``/usr/sbin/Orthanc``; the Makefile installs it) is started with a
JSON config this module writes: 127.0.0.1 only (``RemoteAccessAllowed`` false), no
authentication (loopback only), no plugins, one ``DicomModalities`` entry for the medxray node.
``OrthancServer.stop()`` kills the whole process group, so no process is left behind.
Also here: free-port helper, dcmtk ``storescu`` wrapper and the ``dciodvfy`` validator check.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
ORTHANC_AET = "ORTHANC"


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_config(storage: Path, http_port: int, dicom_port: int, node_aet: str, node_port: int) -> dict:
    """The Orthanc configuration used by the tests (also quoted in the README)."""
    return {
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
        "DicomModalities": {"medxray": [node_aet, "127.0.0.1", node_port]} if node_port else {},
        "UnknownSopClassAccepted": False,
        "SaveJobs": False,
        "HttpThreadsCount": 4,
        "DicomThreadsCount": 2,
        "ConcurrentJobs": 1,
        "DeidentifyLogs": True,
    }


class OrthancServer:
    """Start/stop one Orthanc with fixed ports (so it can be started late: "destination down, then up")."""

    def __init__(self, root: Path, node_aet: str = "MEDXRAY", node_port: int = 0,
                 http_port: int | None = None, dicom_port: int | None = None) -> None:
        self.root = Path(root)
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        self.node_aet, self.node_port = node_aet, node_port
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0) -> "OrthancServer":
        storage = self.root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "orthanc.json"
        cfg.write_text(json.dumps(orthanc_config(storage, self.http_port, self.dicom_port, self.node_aet,
                                                 self.node_port), indent=2))
        log = open(self.root / "orthanc.log", "ab")
        self.proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
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


def storescu(port: int, files: list[Path], calling_aet: str = "STORESCU", called_aet: str = "MEDXRAY",
             timeout: float = 60) -> subprocess.CompletedProcess:
    """dcmtk's storescu: send ``files`` to 127.0.0.1:``port`` in one association."""
    cmd = ["storescu", "-aet", calling_aet, "-aec", called_aet, "-nh", "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dicom3tools' standard validator prints for one object."""
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    lines = (r.stdout + r.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")]


def dciodvfy_warnings(path: Path) -> list[str]:
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Warning")]
