"""The node's C-STORE / C-ECHO SCP, built on pynetdicom.

Holds :func:`start_scp` and the C-STORE handler. Associations are accepted only from the
configured calling AE titles (others are rejected at A-ASSOCIATE, PS3.8 7.1.1.9) and only when
addressed to the node's AE title. Every storage SOP class and every transfer syntax pynetdicom
knows is accepted; the dataset is written as received (no re-encoding) into the spool.
Objects without pixel data (SR, presentation states, key object selections ...) are accepted
at the DICOM level (status 0x0000) and recorded as ``skipped`` with a reason, never scored; so
are medxray's own result objects, so a loop through a PACS cannot re-score them.
Must not import torch or the scoring engine.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from medxray.dicom.sr import MANUFACTURER
from medxray.errors import ConfigError
from medxray.pacs.config import NodeConfig
from medxray.pacs.spool import Spool, path_name

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # PS3.4 Table B.2-1
STATUS_CANNOT_UNDERSTAND = 0xC000


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


def make_store_handler(spool: Spool):
    """The EVT_C_STORE handler: spool the instance (atomically) or record why it is skipped."""

    def handle_store(event: Any) -> int:
        try:
            ds = event.dataset
        except Exception as exc:  # the peer sent something pydicom cannot parse at all
            log.warning("C-STORE from %s: undecodable dataset (%s)", event.assoc.requestor.ae_title,
                        type(exc).__name__)
            return STATUS_CANNOT_UNDERSTAND
        sop = str(ds.get("SOPInstanceUID", "") or event.request.AffectedSOPInstanceUID or "")
        study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        reason = skip_reason(ds)
        if reason is not None:
            spool.record({
                "path": f"{path_name(study)}/{path_name(series)}/{path_name(sop)}.dcm", "status": "skipped",
                "reason": reason, "sop_instance_uid": sop if len(sop) <= 64 else "", "study_instance_uid": study[:64],
                "series_instance_uid": series[:64], "modality": str(ds.get("Modality", ""))[:16],
                "sop_class_uid": str(ds.get("SOPClassUID", ""))[:64],
            })
            log.info("skipped %s (%s)", path_name(sop), reason.split(":", 1)[0])
            return STATUS_SUCCESS
        try:
            spool.store(event.encoded_dataset(include_meta=True), study, series, sop)
        except OSError as exc:
            log.error("cannot store an instance: %s", exc.strerror or exc)
            return STATUS_OUT_OF_RESOURCES
        return STATUS_SUCCESS

    return handle_store


def build_scp_ae(cfg: NodeConfig) -> Any:
    """A pynetdicom AE accepting storage (all SOP classes / transfer syntaxes) and verification."""
    from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=cfg.ae_title)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.require_calling_aet = list(cfg.allowed_calling_aes)
    ae.require_called_aet = True
    ae.maximum_pdu_size = 0  # unlimited
    return ae


def start_scp(cfg: NodeConfig, spool: Spool) -> Any:
    """Start listening (non-blocking); returns the server (``.shutdown()`` stops it).

    Raises ConfigError when the port cannot be bound (in use, or a privileged port).
    """
    from pynetdicom import evt

    ae = build_scp_ae(cfg)
    handlers = [(evt.EVT_C_STORE, make_store_handler(spool)), (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS)]
    try:
        server = ae.start_server((cfg.host, cfg.port), block=False, evt_handlers=handlers)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {cfg.port} is already in use on {cfg.host}; stop the other listener "
                              "or set another port in the node config") from None
        raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port} ({exc.strerror or exc}); "
                          "choose another host/port in the node config") from None
    log.info("listening as %s on %s:%d (callers: %s)", cfg.ae_title, cfg.host, cfg.port,
             ", ".join(cfg.allowed_calling_aes))
    return server
