"""The DICOM node's configuration (``medxray serve-dicom --config node.yaml``) and its checks.

Holds :class:`NodeConfig`, :class:`Destination`, :class:`CallerRule` and :func:`load_node_config`.
Every mistake a user can make in the file (unknown key, missing checkpoint, bad AE title, a
destination that does not resolve, a non-loopback listener without TLS, a bound out of range)
is one :class:`medxray.errors.ConfigError` naming the key and the fix.

Security defaults (issue 19): the node listens on 127.0.0.1; listening on any other address
without ``tls:`` needs ``insecure_plaintext: true``. ``allowed_calling_aes`` entries tie a
calling AE title to the hosts / networks it may call from; a plain AE title (the old list form)
means *from this machine only* (127.0.0.0/8, ::1). Resource bounds (PS3.8 D.3.3.2 maximum
length, per C-STORE data set size, concurrent associations, ACSE / DIMSE / network timeouts)
have finite defaults (:data:`BOUND_DEFAULTS`).
Must not import pynetdicom, torch or the scoring engine (loading a config is cheap).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence, Union

from medxray.errors import ConfigError
from medxray.fileio import load_yaml_mapping
from medxray.pacs.tls import TlsConfig, tls_config_from_mapping

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
LOOPBACK_NETWORKS: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

# name: (default, smallest, largest). Sizes in bytes, times in seconds.
BOUND_DEFAULTS: dict[str, tuple[float, float, float]] = {
    "max_pdu_size": (65536, 4096, 16 * 2**20),  # PS3.8 D.3.3.2 maximum length we accept per P-DATA-TF
    "max_dataset_bytes": (256 * 2**20, 2**20, 2**34),  # one C-STORE data set, written to disk as it arrives
    "max_associations": (4, 1, 256),  # concurrent associations (more: A-ASSOCIATE-RJ)
    "acse_timeout": (30.0, 1.0, 3600.0),  # connect -> A-ASSOCIATE-RQ, and association replies
    "dimse_timeout": (60.0, 1.0, 3600.0),  # waiting for a DIMSE message
    "network_timeout": (60.0, 1.0, 3600.0),  # no data on an association / one PDU takes longer
}

# PS3.5 6.2: an AE title is 1-16 characters of the default repertoire, no backslash or control
# characters; leading/trailing spaces are not significant.
_AE_RE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")

# ScoreConfig options a node may set under ``scoring:`` (input/out/checkpoint/sr are the node's).
SCORING_KEYS = (
    "workers",
    "batch_size",
    "cams",
    "cam_method",
    "device",
    "backend",
    "precision",
    "threads",
    "allowed_modalities",
    "max_pixels",
    "overlay_max_side",
)


def check_ae_title(value: Any, key: str) -> str:
    """A valid AE title (stripped), or ConfigError naming ``key``."""
    s = str(value or "").strip()
    if not _AE_RE.fullmatch(s):
        raise ConfigError(f"{key}: {value!r} is not a valid AE title (1-16 printable ASCII characters, no backslash)")
    return s


@dataclass(frozen=True)
class Destination:
    """Where results are C-STOREd (a PACS, e.g. Orthanc); ``tls``: DICOM TLS to it (None: plain TCP)."""

    ae_title: str
    host: str
    port: int
    tls: TlsConfig | None = None
    # C-STORE associations used at once (1-8): a PACS answers each object only once it is stored
    # (written and synced), so two send lanes keep the link busy while the PACS writes
    associations: int = 2

    def describe(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls else "")


MAX_ASSOCIATIONS = 8  # a bound on the connections the node opens to its destination at once


@dataclass(frozen=True)
class CallerRule:
    """One ``allowed_calling_aes`` entry: a calling AE title and the networks it may call from."""

    ae_title: str
    networks: tuple[Network, ...] = LOOPBACK_NETWORKS

    def allows(self, ae_title: str, address: str) -> bool:
        """True when ``ae_title`` is this rule's and ``address`` (the peer's IP) is in its networks."""
        if ae_title.strip() != self.ae_title:
            return False
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == n.version and ip in n for n in self.networks)

    def describe(self) -> str:
        return f"{self.ae_title} from {', '.join(str(n) for n in self.networks)}"


def is_loopback_host(host: str) -> bool:
    """True for a literal loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip()).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
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
    allowed_calling_aes: list[CallerRule]
    host: str = "127.0.0.1"  # loopback by default; anything else needs tls (or insecure_plaintext)
    tls: TlsConfig | None = None  # DICOM TLS for the listener (mutual authentication)
    insecure_plaintext: bool = False  # True: allow a non-loopback listener without TLS (warned at every start)
    max_pdu_size: int = int(BOUND_DEFAULTS["max_pdu_size"][0])
    max_dataset_bytes: int = int(BOUND_DEFAULTS["max_dataset_bytes"][0])
    max_associations: int = int(BOUND_DEFAULTS["max_associations"][0])
    acse_timeout: float = BOUND_DEFAULTS["acse_timeout"][0]
    dimse_timeout: float = BOUND_DEFAULTS["dimse_timeout"][0]
    network_timeout: float = BOUND_DEFAULTS["network_timeout"][0]
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


def _dest(raw: Any, rel: Any = str) -> Destination:
    if not isinstance(raw, dict):
        raise ConfigError(
            "destination: give a mapping with ae_title, host and port of the PACS that receives "
            "results (e.g. {ae_title: ORTHANC, host: 127.0.0.1, port: 4242})"
        )
    unknown = sorted(set(raw) - {"ae_title", "host", "port", "tls", "associations"})
    if unknown:
        raise ConfigError(
            f"destination: unknown key(s) {', '.join(unknown)}; valid: ae_title, host, port, tls, associations"
        )
    lanes = _count(raw.get("associations", Destination.associations), "destination.associations", 1, MAX_ASSOCIATIONS)
    ae = check_ae_title(raw.get("ae_title"), "destination.ae_title")
    host = str(raw.get("host") or "").strip()
    port = _port(raw.get("port"), "destination.port")
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise ConfigError(
            f"destination.host: unknown destination host {host!r} (it does not resolve); "
            "give the PACS's IP address or a resolvable name"
        ) from None
    return Destination(ae, host, port, tls_config_from_mapping(raw.get("tls"), "destination.tls", rel), lanes)


def _networks(raw: Any, key: str) -> tuple[Network, ...]:
    """IP addresses, CIDR networks or host names (resolved now) -> networks."""
    if isinstance(raw, str) or not isinstance(raw, Sequence) or not raw:
        raise ConfigError(f"{key}: give a non-empty list of IP addresses, CIDR networks (10.1.2.0/24) or host names")
    out: list[Network] = []
    for item in raw:
        s = str(item).strip()
        try:
            out.append(ipaddress.ip_network(s, strict=False))
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(s, None, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise ConfigError(
                f"{key}: {s!r} is neither an IP address, a CIDR network nor a host name that resolves"
            ) from None
        out.extend(ipaddress.ip_network(i[4][0].split("%", 1)[0]) for i in infos)
    return tuple(dict.fromkeys(out))


def _callers(raw: Any) -> list[CallerRule]:
    if isinstance(raw, str) or not isinstance(raw, Sequence) or not raw:
        raise ConfigError(
            "allowed_calling_aes: give a non-empty list of the AE titles allowed to send "
            "(associations from any other AE are rejected), each either a title (from this "
            "machine only) or {ae_title: X, hosts: [10.1.2.0/24, pacs.example.org]}"
        )
    rules = []
    for i, item in enumerate(raw):
        key = f"allowed_calling_aes[{i}]"
        if isinstance(item, dict):
            unknown = sorted(set(item) - {"ae_title", "hosts"})
            if unknown:
                raise ConfigError(f"{key}: unknown key(s) {', '.join(unknown)}; valid: ae_title, hosts")
            rules.append(
                CallerRule(
                    check_ae_title(item.get("ae_title"), f"{key}.ae_title"),
                    _networks(item.get("hosts"), f"{key}.hosts"),
                )
            )
        else:
            rules.append(CallerRule(check_ae_title(item, "allowed_calling_aes")))
    return rules


def _bound(d: dict[str, Any], key: str) -> None:
    default, lo, hi = BOUND_DEFAULTS[key]
    if key not in d:
        return
    try:
        value = float(d[key])
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {d[key]!r} is not a number") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{key}: {d[key]!r} is outside {lo:g}-{hi:g} (default {default:g})")
    d[key] = value if key.endswith("timeout") else int(value)


def _count(value: Any, key: str, lo: int, hi: int | None) -> int:
    """``value`` when it is a whole number from ``lo`` to ``hi`` (None: no upper end), else
    ConfigError naming ``key``; no float, string or true/false is taken for one."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        span = f"from {lo} to {hi}" if hi is not None else f"of {lo} or more"
        raise ConfigError(f"{key}: {value!r} is not a whole number {span}")
    return value


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
    missing = [
        k
        for k in ("ae_title", "port", "checkpoint", "work_dir", "destination", "allowed_calling_aes")
        if data.get(k) in (None, "")
    ]
    if missing:
        raise ConfigError(f"node config needs {', '.join(missing)}; see pipelines/node.yaml for an example")
    d = dict(data)

    def rel(p: Any) -> str:
        p = Path(os.path.expanduser(str(p)))
        return str(p if p.is_absolute() or base is None else base / p)

    d["ae_title"] = check_ae_title(d["ae_title"], "ae_title")
    d["port"] = _port(d["port"], "port")
    d["checkpoint"], d["work_dir"] = rel(d["checkpoint"]), rel(d["work_dir"])
    ckpt = Path(d["checkpoint"])
    if not ckpt.exists():
        raise ConfigError(f"checkpoint: {ckpt} does not exist (check the path)")
    if not ckpt.is_file() and not (ckpt / "CURRENT").is_file():
        raise ConfigError(
            f"checkpoint: {ckpt} is a folder but not a model registry with a current version "
            "(give a checkpoint file, or promote a version with `medxray site promote`)"
        )
    d["destination"] = _dest(d["destination"], rel)
    d["allowed_calling_aes"] = _callers(d["allowed_calling_aes"])
    d["tls"] = tls_config_from_mapping(d.get("tls"), "tls", rel)
    d["host"] = str(d.get("host", "127.0.0.1") or "").strip()
    if not isinstance(d.get("insecure_plaintext", False), bool):
        raise ConfigError("insecure_plaintext: give true or false")
    if d["tls"] is None and not is_loopback_host(d["host"]) and not d.get("insecure_plaintext", False):
        raise ConfigError(
            f"host: listening on {d['host'] or 'every address'} without TLS would let anyone on the "
            "network send as an allowed AE title; add a tls: section (certificate, private_key, "
            "ca_certificates; see README 'Security of the DICOM node'), listen on 127.0.0.1, or set "
            "insecure_plaintext: true to accept the risk"
        )
    for key in BOUND_DEFAULTS:
        _bound(d, key)
    if "sc_max_findings" in d:
        _count(d["sc_max_findings"], "sc_max_findings (Secondary Captures per image)", 0, None)
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
        raise ConfigError(
            f"scoring: option(s) {', '.join(bad)} cannot be set for the node; valid: {', '.join(SCORING_KEYS)}"
        )
    d["scoring"] = dict(scoring)
    return NodeConfig(**d)


def load_node_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> NodeConfig:
    """Read and validate ``node.yaml`` (ConfigError for any problem, naming the key)."""
    path = Path(path)
    data = load_yaml_mapping(path)
    data.update(overrides or {})
    return node_config_from_mapping(data, base=path.resolve().parent)
