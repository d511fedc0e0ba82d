"""The DICOM node's configuration (``medxray serve-dicom --config node.yaml``) and its checks.

Holds :class:`NodeConfig`, :class:`Destination` and :func:`load_node_config`. Every mistake a
user can make in the file (unknown key, missing checkpoint, bad AE title, a destination that
does not resolve) is one :class:`medxray.errors.ConfigError` naming the key and the fix.
Must not import pynetdicom, torch or the scoring engine (loading a config is cheap).
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from medxray.errors import ConfigError
from medxray.fileio import load_yaml_mapping

# PS3.5 6.2: an AE title is 1-16 characters of the default repertoire, no backslash or control
# characters; leading/trailing spaces are not significant.
_AE_RE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")

# ScoreConfig options a node may set under ``scoring:`` (input/out/checkpoint/sr are the node's).
SCORING_KEYS = ("workers", "batch_size", "cams", "cam_method", "device", "backend", "precision", "threads",
                "allowed_modalities", "max_pixels", "overlay_max_side")


def check_ae_title(value: Any, key: str) -> str:
    """A valid AE title (stripped), or ConfigError naming ``key``."""
    s = str(value or "").strip()
    if not _AE_RE.fullmatch(s):
        raise ConfigError(f"{key}: {value!r} is not a valid AE title (1-16 printable ASCII characters, "
                          "no backslash)")
    return s


@dataclass
class Destination:
    """Where results are C-STOREd (a PACS, e.g. Orthanc)."""

    ae_title: str
    host: str
    port: int

    def describe(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass
class NodeConfig:
    """Everything ``serve-dicom`` depends on; ``pipelines/node.yaml`` is a commented example.

    ``work_dir`` holds ``incoming/`` (received, series still open), ``inbox/`` (complete series:
    the engine's input), ``scored/`` (the engine's results.csv, CAMs), ``outbox/`` (result
    objects waiting to be sent) and the node's ledgers. Everything there survives a restart.
    """

    ae_title: str
    port: int
    checkpoint: str
    work_dir: str
    destination: Destination
    allowed_calling_aes: list[str]
    host: str = "0.0.0.0"
    idle_seconds: float = 10.0  # a series is scored once nothing arrived for it for this long
    deidentified_sr: bool = False  # True: SR/SC carry an empty patient module (research copies)
    secondary_capture: bool = True  # CAM overlay SC of the top positive findings
    sc_max_findings: int = 3
    retry_initial_s: float = 2.0  # sender back-off: 2, 4, 8 ... seconds
    retry_max_s: float = 300.0
    scoring: dict[str, Any] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        return Path(self.work_dir)


def _dest(raw: Any) -> Destination:
    if not isinstance(raw, dict):
        raise ConfigError("destination: give a mapping with ae_title, host and port of the PACS that receives "
                          "results (e.g. {ae_title: ORTHANC, host: 127.0.0.1, port: 4242})")
    unknown = sorted(set(raw) - {"ae_title", "host", "port"})
    if unknown:
        raise ConfigError(f"destination: unknown key(s) {', '.join(unknown)}; valid: ae_title, host, port")
    ae = check_ae_title(raw.get("ae_title"), "destination.ae_title")
    host = str(raw.get("host") or "").strip()
    port = _port(raw.get("port"), "destination.port")
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise ConfigError(f"destination.host: unknown destination host {host!r} (it does not resolve); "
                          "give the PACS's IP address or a resolvable name") from None
    return Destination(ae, host, port)


def _port(value: Any, key: str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{key}: {port} is outside 1-65535")
    return port


def node_config_from_mapping(data: dict[str, Any], base: Path | None = None) -> NodeConfig:
    """Validate a mapping (e.g. parsed YAML) into a :class:`NodeConfig`; relative paths are taken
    relative to ``base`` (the config file's folder)."""
    known = {f.name for f in fields(NodeConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown node option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    missing = [k for k in ("ae_title", "port", "checkpoint", "work_dir", "destination", "allowed_calling_aes")
               if data.get(k) in (None, "")]
    if missing:
        raise ConfigError(f"node config needs {', '.join(missing)}; see pipelines/node.yaml for an example")
    d = dict(data)

    def rel(p: Any) -> str:
        p = Path(os.path.expanduser(str(p)))
        return str(p if p.is_absolute() or base is None else base / p)

    d["ae_title"] = check_ae_title(d["ae_title"], "ae_title")
    d["port"] = _port(d["port"], "port")
    d["checkpoint"], d["work_dir"] = rel(d["checkpoint"]), rel(d["work_dir"])
    if not Path(d["checkpoint"]).is_file():
        raise ConfigError(f"checkpoint: {d['checkpoint']} does not exist (check the path)")
    d["destination"] = _dest(d["destination"])
    callers = d["allowed_calling_aes"]
    if isinstance(callers, str) or not isinstance(callers, Sequence) or not callers:
        raise ConfigError("allowed_calling_aes: give a non-empty list of the AE titles allowed to send "
                          "(associations from any other AE are rejected)")
    d["allowed_calling_aes"] = [check_ae_title(a, "allowed_calling_aes") for a in callers]
    for key in ("idle_seconds", "retry_initial_s", "retry_max_s"):
        if key in d:
            try:
                d[key] = float(d[key])
            except (TypeError, ValueError):
                raise ConfigError(f"{key}: {d[key]!r} is not a number of seconds") from None
            if d[key] < 0 or (key != "idle_seconds" and d[key] <= 0):
                raise ConfigError(f"{key} must be positive, got {d[key]}")
    scoring = d.get("scoring") or {}
    if not isinstance(scoring, dict):
        raise ConfigError("scoring: give a mapping of scoring options (e.g. {batch_size: 16})")
    bad = sorted(set(scoring) - set(SCORING_KEYS))
    if bad:
        raise ConfigError(f"scoring: option(s) {', '.join(bad)} cannot be set for the node; "
                          f"valid: {', '.join(SCORING_KEYS)}")
    d["scoring"] = dict(scoring)
    return NodeConfig(**d)


def load_node_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> NodeConfig:
    """Read and validate ``node.yaml`` (ConfigError for any problem, naming the key)."""
    path = Path(path)
    data = load_yaml_mapping(path)
    data.update(overrides or {})
    return node_config_from_mapping(data, base=path.resolve().parent)
