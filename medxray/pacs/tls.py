"""DICOM TLS for the node: mutual authentication by X.509 certificates (PS3.15 Annex B).

Holds :class:`TlsConfig` (what ``node.yaml`` gives under ``tls:`` and ``destination.tls:``),
:func:`tls_config_from_mapping` (its checks) and the two :class:`ssl.SSLContext` builders:
:func:`server_context` for the node's SCP and :func:`client_context` for its C-STORE SCU.

Both follow the BCP 195 secure transport connection profile of PS3.15 B.9 (RFC 9325 / BCP 195):
TLS 1.2 or 1.3 only, forward-secret ECDHE key exchange with AEAD ciphers (AES-GCM,
ChaCha20-Poly1305), no compression, no renegotiation. Both sides present a certificate and
verify the peer's against the configured CA bundle (``ca_certificates``), so a peer without a
certificate or with one from another CA fails the handshake. ``peer_subject`` (optional) is a
regular expression that the peer certificate's subject Common Name or one of its DNS / IP
subject alternative names must match in full (:func:`peer_matches`); the SCP checks it when
the A-ASSOCIATE-RQ arrives, the SCU right after the handshake.
Must not import pynetdicom, torch or the scoring engine.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from medxray.errors import ConfigError

TLS_KEYS = ("certificate", "private_key", "ca_certificates", "peer_subject")

# TLS 1.2 suites of the BCP 195 profile (RFC 9325 4.2): ECDHE + AEAD only. TLS 1.3 suites are all AEAD.
BCP195_TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)


@dataclass(frozen=True)
class TlsConfig:
    """Paths (PEM) of this side's certificate chain and private key, the CA bundle peers must
    chain to, and an optional full-match regular expression for the peer's subject CN / SAN."""

    certificate: str
    private_key: str
    ca_certificates: str
    peer_subject: str | None = None


def tls_config_from_mapping(raw: Any, key: str, rel: Callable[[Any], str]) -> TlsConfig | None:
    """Validate a ``tls:`` mapping (None/absent: no TLS). Raises ConfigError naming ``key``.

    ``rel`` turns a configured path into an absolute one (relative to the config file).
    The files are loaded into a throw-away context here, so a wrong path, a key that does not
    belong to the certificate or a PEM that is not one fails at start, not at the first peer.
    """
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: give a mapping with certificate, private_key and ca_certificates (PEM files)")
    unknown = sorted(set(raw) - set(TLS_KEYS))
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(TLS_KEYS)}")
    missing = [k for k in ("certificate", "private_key", "ca_certificates") if not raw.get(k)]
    if missing:
        raise ConfigError(f"{key}: needs {', '.join(missing)} (PEM files; see README 'Security of the DICOM node')")
    paths = {k: rel(raw[k]) for k in ("certificate", "private_key", "ca_certificates")}
    for k, p in paths.items():
        if not Path(p).is_file():
            raise ConfigError(f"{key}.{k}: {p} does not exist (check the path)")
    subject = raw.get("peer_subject")
    if subject is not None:
        subject = str(subject)
        try:
            re.compile(subject)
        except re.error as exc:
            raise ConfigError(f"{key}.peer_subject: {subject!r} is not a valid regular expression ({exc})") from None
    cfg = TlsConfig(paths["certificate"], paths["private_key"], paths["ca_certificates"], subject)
    _base_context(cfg, ssl.PROTOCOL_TLS_SERVER, key)  # fail now on unreadable / mismatched PEM files
    return cfg


def _base_context(cfg: TlsConfig, protocol: int, key: str = "tls") -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(cfg.certificate, cfg.private_key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{key}: cannot use certificate {cfg.certificate} with key {cfg.private_key} "
            f"({getattr(exc, 'reason', None) or exc}); give a PEM certificate and its own private "
            "key (unencrypted)"
        ) from None
    try:
        ctx.load_verify_locations(cafile=cfg.ca_certificates)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{key}.ca_certificates: cannot read {cfg.ca_certificates} as PEM CA certificates "
            f"({getattr(exc, 'reason', None) or exc})"
        ) from None
    return ctx


def server_context(cfg: TlsConfig) -> ssl.SSLContext:
    """The SCP's context: TLS >= 1.2, BCP 195 ciphers, client certificate required (mutual auth)."""
    return _base_context(cfg, ssl.PROTOCOL_TLS_SERVER)


def client_context(cfg: TlsConfig) -> ssl.SSLContext:
    """The SCU's context: TLS >= 1.2, BCP 195 ciphers, presents our certificate, verifies the
    server's against ``ca_certificates``. Host names are not checked by OpenSSL here (PACS
    certificates rarely name the address the node uses); ``peer_subject`` is the name check."""
    ctx = _base_context(cfg, ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_names(cert: dict[str, Any] | None) -> list[str]:
    """Subject Common Names and DNS / IP subject alternative names of a peer certificate
    (``SSLSocket.getpeercert()``'s dictionary)."""
    if not cert:
        return []
    names = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    names += [v for k, v in cert.get("subjectAltName", ()) if k in ("DNS", "IP Address")]
    return names


def peer_matches(cert: dict[str, Any] | None, pattern: str | None) -> bool:
    """True when ``pattern`` is None or fully matches one of :func:`peer_names` of ``cert``."""
    if pattern is None:
        return True
    rx = re.compile(pattern)
    return any(rx.fullmatch(n) for n in peer_names(cert))


def describe_peer(cert: dict[str, Any] | None) -> str:
    names = peer_names(cert)
    return ", ".join(names[:4]) if names else "no certificate"
