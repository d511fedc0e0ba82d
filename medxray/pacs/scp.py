"""The node's C-STORE / C-ECHO SCP, built on pynetdicom.

Holds :func:`start_scp`, the association checks and the C-STORE handler. Associations are
accepted only when addressed to the node's AE title and when the calling AE title calls from a
host its ``allowed_calling_aes`` rule allows (others: A-ASSOCIATE-RJ "calling AE title not
recognised", PS3.8 7.1.1.9); with ``tls:`` only after a mutual TLS handshake (PS3.15 B.9,
:mod:`medxray.pacs.tls`) and, with ``peer_subject``, when the peer certificate's name matches.
Every storage SOP class and every transfer syntax pynetdicom knows is accepted; the dataset is
written as received (no re-encoding) into the spool. Objects without pixel data (SR,
presentation states, key object selections ...) are accepted at the DICOM level (status
0x0000) and recorded as ``skipped`` with a reason, never scored; so are medxray's own result
objects, so a loop through a PACS cannot re-score them.

Resource bounds (each a node config key, README "Security of the DICOM node"):

* ``max_pdu_size``: the maximum length we announce (PS3.8 D.3.3.2) and enforce: a P-DATA-TF
  PDU declaring more (or any other PDU over 1 MiB) closes the connection before it is read;
  a PDU must arrive within ``network_timeout`` (a peer dripping bytes cannot hold a slot).
* ``max_dataset_bytes``: the C-STORE data set goes to disk as it arrives (pynetdicom's
  ``STORE_RECV_CHUNKED_DATASET``); past the limit nothing more is written, the partial file is
  emptied, and when the peer's message ends it is answered 0xA700 (Refused: Out of Resources,
  PS3.4 B.2.3) and the file removed. (pynetdicom cannot answer before the message ends; the
  rest of an over-limit message is read and discarded, so memory and disk stay bounded.)
* Images whose Rows x Columns exceed the reader's pixel limit (:func:`medxray.limits.pixel_limit`)
  are refused at receipt (0xA700), read from the header only; a Deflated body is inflated for that
  under the reader's ceiling (a deflate bomb: ``too_large``, 0xA700), never whole.
* ``max_associations`` (more: A-ASSOCIATE-RJ local-limit-exceeded) and at most twice that many
  open TCP/TLS connections; ``acse_timeout``, ``dimse_timeout``, ``network_timeout``.

Every refusal is a ``refused`` row in ``node.csv`` (no patient data) and a log line.
Must not import torch or the scoring engine.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from medxray.dicom.sr import MANUFACTURER
from medxray.errors import ConfigError, DicomError
from medxray.limits import pixel_limit
from medxray.pacs.config import NodeConfig, is_loopback_host
from medxray.pacs.spool import Spool, path_name
from medxray.pacs.tls import describe_peer, peer_matches, server_context

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # PS3.4 Table B.2-1
STATUS_CANNOT_UNDERSTAND = 0xC000
CONTROL_PDU_MAX = 2**20  # A-ASSOCIATE / A-RELEASE / A-ABORT PDUs are small; 1 MiB is generous
HEADER_DEFER_BYTES = 4096  # header values longer than this stay on disk while we read the header

_chunked_lock = threading.Lock()
_chunked_users = 0  # running node servers that need pynetdicom's STORE_RECV_CHUNKED_DATASET


def _use_chunked_receive(on: bool) -> None:
    """Reference-counted switch of pynetdicom's module-global ``STORE_RECV_CHUNKED_DATASET``."""
    global _chunked_users
    from pynetdicom import _config

    with _chunked_lock:
        _chunked_users = max(0, _chunked_users + (1 if on else -1))
        _config.STORE_RECV_CHUNKED_DATASET = _chunked_users > 0


def skip_reason(ds: Any) -> str | None:
    """Why a received object is not scored (None = it is an image the engine should see)."""
    from pydicom.uid import UID

    sop_class = UID(str(ds.get("SOPClassUID", "")))
    name = sop_class.name if sop_class else "no SOP Class UID"
    if str(ds.get("Manufacturer", "")) == MANUFACTURER:
        return f"medxray_output: a {name} produced by medxray (results are never re-scored)"
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return f"not_an_image: {name} carries no pixel data"
    return None


class BoundedFile:
    """Stands in for pynetdicom's temporary data set file: writes at most ``limit`` bytes.

    Past the limit the file is truncated to nothing, :attr:`overflowed` is set and further
    writes are discarded (so the disk and memory a peer can make us spend are bounded).
    Offers what pynetdicom uses: ``write``, ``file.flush``, ``close``, ``name``.
    """

    def __init__(self, inner: Any, limit: int) -> None:
        self.inner, self.limit = inner, limit
        self.file = inner.file
        self.name = inner.name
        self.written = inner.file.tell()
        self.overflowed = False

    def write(self, data: bytes) -> int:
        if self.overflowed:
            return len(data)
        self.written += len(data)
        if self.written > self.limit:
            self.overflowed = True
            self.inner.file.seek(0)
            self.inner.file.truncate()
            return len(data)
        return self.inner.write(data)

    def close(self) -> None:
        self.inner.close()


def _bound_incoming_dataset(event: Any, limit: int) -> None:
    """EVT_DATA_RECV (before each PDU is decoded): put the C-STORE data set file being written,
    if any, behind a :class:`BoundedFile`. The first PDU's fragment is already bounded by
    ``max_pdu_size``."""
    msg = getattr(event.assoc.dimse, "message", None)
    f = getattr(msg, "_data_set_file", None) if msg is not None else None
    if f is not None and not isinstance(f, BoundedFile):
        msg._data_set_file = BoundedFile(f, limit)


def _remove_partial_dataset(event: Any) -> None:
    """EVT_CONN_CLOSE / EVT_ABORTED: a data set file of a message cut off by the peer is removed."""
    msg = getattr(getattr(event.assoc, "dimse", None), "message", None)
    path = getattr(msg, "_data_set_path", None) if msg is not None else None
    f = getattr(msg, "_data_set_file", None) if msg is not None else None
    if path is None:
        return
    try:
        if f is not None:
            f.close()
        Path(path).unlink(missing_ok=True)
        log.info("removed the partial data set of an interrupted C-STORE from %s", event.assoc.requestor.address)
    except OSError:
        pass


def read_header(path: Path, max_pixels: int | None = None) -> Any:
    """The data set at ``path`` with every value longer than 4 KiB left on disk (pydicom's
    ``defer_size``): enough for UIDs, Rows/Columns and whether pixel data is present. A Deflated
    Explicit VR Little Endian body is inflated under the reader's ceiling
    (:func:`medxray.dicom.source.read_header_bounded`; DicomError ``too_large`` past it), never
    whole: a 1 MB deflate bomb must not become 1 GiB in the node."""
    from medxray.dicom.source import read_header_bounded

    return read_header_bounded(path, max_pixels=max_pixels, defer_size=HEADER_DEFER_BYTES)


def _int(ds: Any, keyword: str, default: int) -> int:
    try:
        v = ds.get(keyword, default)
        return int(v if v not in (None, "") else default)
    except (TypeError, ValueError):
        return default


def too_many_pixels(ds: Any, max_pixels: int) -> str | None:
    """``too_large: ...`` when Rows x Columns exceed ``max_pixels`` (what the reader refuses)."""
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    if rows * cols > max_pixels:
        return (
            f"too_large: the image is {cols}x{rows} = {rows * cols / 1e6:.1f} MP, above the "
            f"{max_pixels / 1e6:.1f} MP pixel limit"
        )
    return None


def make_store_handler(spool: Spool, max_dataset_bytes: int | None = None, max_pixels: int | None = None):
    """The EVT_C_STORE handler: spool the instance (atomically), record why it is skipped, or
    refuse it (0xA700) when over ``max_dataset_bytes`` or the pixel limit.

    Works with the data set pynetdicom wrote to a file (``STORE_RECV_CHUNKED_DATASET``, see
    :func:`start_scp`) and, for tests driving it directly, with a decoded one in memory.
    """

    def refuse(event: Any, reason: str, sop: str = "", study: str = "", series: str = "") -> int:
        peer = f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}"
        log.warning("C-STORE from %s refused (0x%04X): %s", peer, STATUS_OUT_OF_RESOURCES, reason)
        spool.record(
            {
                "path": f"{path_name(study)}/{path_name(series)}/{path_name(sop)}.dcm",
                "status": "refused",
                "reason": reason,
                "sop_instance_uid": sop if len(sop) <= 64 else "",
                "study_instance_uid": study[:64],
                "series_instance_uid": series[:64],
                "sop_class_uid": str(event.request.AffectedSOPClassUID or "")[:64],
            }
        )
        return STATUS_OUT_OF_RESOURCES

    def handle_store(event: Any) -> int:
        req_sop = str(event.request.AffectedSOPInstanceUID or "")
        f = getattr(event.request, "_dataset_file", None)
        if getattr(f, "overflowed", False):
            return refuse(
                event,
                f"too_large: the data set is over the node's max_dataset_bytes ({max_dataset_bytes or f.limit} bytes)",
                req_sop,
            )
        path = getattr(event.request, "_dataset_path", None)
        try:
            ds = read_header(Path(path), max_pixels) if path is not None else event.dataset
        except DicomError as exc:  # a deflated body past the reader's ceiling, or damaged
            code = getattr(exc, "code", "unreadable")
            if code == "too_large":
                return refuse(event, str(exc)[:300], req_sop)
            log.warning("C-STORE from %s: %s", event.assoc.requestor.ae_title, str(exc)[:200])
            return STATUS_CANNOT_UNDERSTAND
        except Exception as exc:  # the peer sent something pydicom cannot parse at all
            log.warning("C-STORE from %s: undecodable dataset (%s)", event.assoc.requestor.ae_title, type(exc).__name__)
            return STATUS_CANNOT_UNDERSTAND
        sop = str(ds.get("SOPInstanceUID", "") or req_sop)
        study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        too_big = too_many_pixels(ds, pixel_limit(max_pixels))
        if too_big is not None:
            return refuse(event, too_big, sop, study, series)
        reason = skip_reason(ds)
        if reason is not None:
            spool.record(
                {
                    "path": f"{path_name(study)}/{path_name(series)}/{path_name(sop)}.dcm",
                    "status": "skipped",
                    "reason": reason,
                    "sop_instance_uid": sop if len(sop) <= 64 else "",
                    "study_instance_uid": study[:64],
                    "series_instance_uid": series[:64],
                    "modality": str(ds.get("Modality", ""))[:16],
                    "sop_class_uid": str(ds.get("SOPClassUID", ""))[:64],
                }
            )
            log.info("skipped %s (%s)", path_name(sop), reason.split(":", 1)[0])
            return STATUS_SUCCESS
        try:
            # the received file is hashed and copied by the spool in chunks, never held in memory
            spool.store(
                Path(path) if path is not None else event.encoded_dataset(include_meta=True), study, series, sop
            )
        except OSError as exc:
            log.error("cannot store an instance: %s", exc.strerror or exc)
            return STATUS_OUT_OF_RESOURCES
        return STATUS_SUCCESS

    return handle_store


def make_association_check(cfg: NodeConfig):
    """The EVT_REQUESTED handler: reject (A-ASSOCIATE-RJ, permanent, "calling AE title not
    recognised") a calling AE title not allowed from the peer's address, or a TLS peer whose
    certificate names do not match ``tls.peer_subject``."""
    rules = list(cfg.allowed_calling_aes)
    subject = cfg.tls.peer_subject if cfg.tls else None

    def check(event: Any) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title or "").strip()
        address = str(assoc.requestor.address)
        why = None
        if not any(r.allows(calling, address) for r in rules):
            why = "calling AE title not allowed from this address"
        elif subject is not None:
            sock = getattr(assoc.dul.socket, "socket", None)
            cert = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
            if not peer_matches(cert, subject):
                why = f"peer certificate ({describe_peer(cert)}) does not match tls.peer_subject"
        if why is None:
            return
        log.warning("association from %r at %s rejected: %s", calling[:16], address, why)
        from pynetdicom import evt

        assoc.acse.send_reject(0x01, 0x01, 0x03)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    return check


class _PduGuard:
    """Replaces an acceptor's ``AssociationSocket.recv``: a PDU longer than the node accepts
    closes the connection before it is read, and one PDU must arrive within ``timeout`` s."""

    def __init__(self, assoc_socket: Any, max_pdu: int, timeout: float) -> None:
        self.sock, self.max_pdu, self.timeout = assoc_socket, max_pdu, timeout
        self.pdu_type = 0

    def __call__(self, nr_bytes: int) -> bytearray:
        if nr_bytes == 6:  # pynetdicom reads the PDU type + length first
            data = self._read(6)
            self.pdu_type = data[0] if data else 0
            return data
        limit = self.max_pdu if self.pdu_type == 0x04 else CONTROL_PDU_MAX
        if nr_bytes > limit:
            log.warning(
                "peer %s sent a PDU of type 0x%02X declaring %d bytes (limit %d): connection closed",
                getattr(self.sock.assoc.requestor, "address", "?"),
                self.pdu_type,
                nr_bytes,
                limit,
            )
            raise ConnectionError(f"PDU length {nr_bytes} over the limit {limit}")
        return self._read(nr_bytes)

    def _read(self, n: int) -> bytearray:
        raw = self.sock.socket
        if raw is None:
            return bytearray()
        deadline = time.monotonic() + self.timeout
        out = bytearray()
        try:
            while len(out) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"a PDU did not arrive within {self.timeout:g} s")
                raw.settimeout(left)
                chunk = raw.recv(min(65536, n - len(out)))
                if not chunk:
                    break
                out += chunk
        finally:
            raw.settimeout(self.timeout)  # sends keep the full network_timeout
        return out


def _server_classes() -> tuple[type, type]:
    """pynetdicom's threaded server and request handler, specialised for the node (built lazily
    so importing this module stays cheap)."""
    from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

    class NodeRequestHandler(RequestHandler):
        def handle(self) -> None:
            """As pynetdicom's, then wait for the association to end in this (the connection's own)
            thread, so the server's connection count covers the association's whole life."""
            from pynetdicom import evt

            assoc = self._create_association()
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            assoc.join()

        def _create_association(self) -> Any:
            assoc = super()._create_association()
            cfg: NodeConfig = self.server.node_cfg  # type: ignore[attr-defined]
            sock = assoc.dul.socket
            sock.recv = _PduGuard(sock, cfg.max_pdu_size, cfg.network_timeout)
            return assoc

    class NodeServer(ThreadedAssociationServer):
        """Defers the TLS handshake to the connection's own thread (pynetdicom does it in the
        accept loop, where one silent peer would stop every other from connecting), with
        ``acse_timeout``; caps open connections at 2 x ``max_associations``."""

        node_cfg: NodeConfig
        _restore_chunked: bool = False

        def get_request(self) -> tuple[socket.socket, Any]:
            client, address = self.socket.accept()
            if self.ssl_context:
                client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
            return client, address

        def verify_request(self, request: Any, client_address: Any) -> bool:
            with self._conn_lock:
                if self._open >= 2 * self.node_cfg.max_associations:
                    log.warning(
                        "connection from %s dropped: %d connections open already", client_address[0], self._open
                    )
                    return False
                self._open += 1
            return True

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                if isinstance(request, ssl.SSLSocket):
                    try:
                        request.settimeout(self.node_cfg.acse_timeout)
                        request.do_handshake()
                    except (OSError, ssl.SSLError) as exc:
                        log.warning(
                            "TLS handshake with %s failed: %s",
                            client_address[0],
                            getattr(exc, "reason", None) or type(exc).__name__,
                        )
                        self.shutdown_request(request)
                        return
                    log.info("TLS peer %s: %s", client_address[0], describe_peer(request.getpeercert()))
                request.settimeout(self.node_cfg.network_timeout)
                super().process_request_thread(request, client_address)
            finally:
                with self._conn_lock:
                    self._open -= 1

        def shutdown(self) -> None:
            super().shutdown()
            self.server_close()
            if self._restore_chunked:
                self._restore_chunked = False
                _use_chunked_receive(False)

    return NodeServer, NodeRequestHandler


def build_scp_ae(cfg: NodeConfig) -> Any:
    """A pynetdicom AE accepting storage (all SOP classes / transfer syntaxes) and verification,
    with the node's bounds (maximum PDU, associations, timeouts)."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=cfg.ae_title)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.require_calling_aet = sorted({r.ae_title for r in cfg.allowed_calling_aes})
    ae.require_called_aet = True
    ae.maximum_pdu_size = cfg.max_pdu_size
    ae.maximum_associations = cfg.max_associations
    ae.acse_timeout = cfg.acse_timeout
    ae.dimse_timeout = cfg.dimse_timeout
    ae.network_timeout = cfg.network_timeout
    return ae


def start_scp(cfg: NodeConfig, spool: Spool) -> Any:
    """Start listening (non-blocking); returns the server (``.shutdown()`` stops it).

    pynetdicom's ``_config.STORE_RECV_CHUNKED_DATASET`` (write C-STORE data sets to a file as
    they arrive instead of memory) is a module global: it is switched on here and back off by
    the server's ``shutdown()`` (reference-counted across node servers). serve-dicom is the only
    SCP in its process, so nothing else sees it; an application embedding the node beside another
    pynetdicom SCP would see that SCP's C-STORE handlers receive files too (``event.dataset`` still works for them).
    Raises ConfigError when the port cannot be bound (in use, or a privileged port).
    """
    from pynetdicom import evt

    if cfg.tls is None and not is_loopback_host(cfg.host):
        log.warning(
            "INSECURE: listening on %s without TLS (insecure_plaintext: true): any host that can reach "
            "this port and names an allowed AE title from an allowed address can send images; add a "
            "tls: section",
            cfg.host or "every address",
        )
    ae = build_scp_ae(cfg)
    max_pixels = cfg.scoring.get("max_pixels")
    handlers = [
        (evt.EVT_C_STORE, make_store_handler(spool, cfg.max_dataset_bytes, max_pixels)),
        (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
        (evt.EVT_REQUESTED, make_association_check(cfg)),
        (evt.EVT_DATA_RECV, lambda event: _bound_incoming_dataset(event, cfg.max_dataset_bytes)),
        (evt.EVT_CONN_CLOSE, _remove_partial_dataset),
        (evt.EVT_ABORTED, _remove_partial_dataset),
    ]
    ssl_context = server_context(cfg.tls) if cfg.tls else None
    server_cls, handler_cls = _server_classes()
    try:
        server = ae.make_server(
            (cfg.host, cfg.port),
            ssl_context=ssl_context,
            evt_handlers=handlers,
            server_class=server_cls,
            request_handler=handler_cls,
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {cfg.port} is already in use on {cfg.host}; stop the other listener "
                "or set another port in the node config"
            ) from None
        raise ConfigError(
            f"cannot listen on {cfg.host}:{cfg.port} ({exc.strerror or exc}); "
            "choose another host/port in the node config"
        ) from None
    server.node_cfg = cfg
    server._conn_lock = threading.Lock()
    server._open = 0
    _use_chunked_receive(True)
    server._restore_chunked = True
    thread = threading.Thread(target=server.serve_forever, name=f"medxray-scp-{cfg.port}", daemon=True)
    thread.start()
    ae._servers.append(server)
    log.info(
        "listening as %s on %s:%d%s (callers: %s); max PDU %d B, max data set %d B, %d associations, "
        "timeouts ACSE %gs / DIMSE %gs / network %gs",
        cfg.ae_title,
        cfg.host,
        cfg.port,
        " with TLS (mutual authentication)" if cfg.tls else "",
        "; ".join(r.describe() for r in cfg.allowed_calling_aes),
        cfg.max_pdu_size,
        cfg.max_dataset_bytes,
        cfg.max_associations,
        cfg.acse_timeout,
        cfg.dimse_timeout,
        cfg.network_timeout,
    )
    return server
