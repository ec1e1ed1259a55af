"""The DICOM storage node: a C-STORE / C-ECHO SCP that scores every radiograph routed to it.

A PACS or DICOM router adds the node as one more destination of the route that feeds
the classifier. Each received instance is checked from its header (readable, pixel data
present, a single-frame grayscale image within the size limit), queued, and acknowledged
at once; worker threads score the queue with the same engine as the gRPC API and record
the result through :meth:`RequestHandler.record` under the SOP Instance UID, so the drift
windows, metrics and ``ReportOutcome`` see DICOM traffic like any other, labelled with its
source (the calling AE title when it is allow-listed, else ``other``).

C-STORE statuses (the reason is also the ``result`` label of ``cxr_monitor_dicom_stores_total``):

======  =========================================================================
0x0000  queued for scoring (``queued``)
0xA700  out of resources: the queue is full (``queue_full``), the server is at its in-flight
        count or memory budget, which DICOM and gRPC share (``overloaded``), or the model is
        still loading (``not_ready``); the sender may retry later
0xA900  data set does not match the SOP class: no Pixel Data (``no_pixel_data``)
0xC000  cannot understand: unreadable or truncated (``malformed``), not a single-frame
        grayscale radiograph (``unsupported_image``), larger than ``max_pixels``
        (``too_large``), or an unexpected error (``internal``, logged with a reference)
======  =========================================================================

No pixels and no patient data are stored or logged: an instance's bytes live in the queue
until scored, logs name only the calling AE, the SOP Instance UID and the reason.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)

from .. import imaging
from ..decoding import DecoderCrashedError, DecodeTimeoutError
from ..engine import Engine, encoded_memory_cost
from ..errors import (
    ImageTooLargeError,
    InvalidInputError,
    MissingPixelDataError,
    MonitorError,
    UnsupportedImageError,
)
from ..metrics import DicomMetrics, MonitorMetrics
from ..settings import Settings
from ..types import ScoredImage
from .admission import OverloadedError, Pass
from .handler import RequestHandler

__all__ = ["OTHER_SOURCE", "RADIOGRAPH_STORAGE", "TRANSFER_SYNTAXES", "DicomNode"]

log = logging.getLogger("cxr_monitor.dicom")

#: Storage SOP classes accepted: the radiograph classes and Secondary Capture (digitised films,
#: converted PNG/JPEG exports). Any other abstract syntax is refused at association.
RADIOGRAPH_STORAGE = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

#: Transfer syntaxes accepted: those :mod:`monitor.imaging` decodes (pydicom and its pylibjpeg plugins).
TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

OTHER_SOURCE = "other"
"""Source label of callers that are not on the allow-list (keeps the label set bounded)."""

# Concurrent associations; a router or PACS opens a few, modalities one each.
_MAX_ASSOCIATIONS = 32
# Largest PDU we accept: a J2K radiograph in 16 KiB PDUs costs pynetdicom ~100 Python-level reads.
_MAX_PDU = 1 << 20

_SUCCESS = 0x0000
_OUT_OF_RESOURCES = 0xA700
_DATASET_MISMATCH = 0xA900
_CANNOT_UNDERSTAND = 0xC000
_STATUS = {
    "queued": _SUCCESS,
    "queue_full": _OUT_OF_RESOURCES,
    "overloaded": _OUT_OF_RESOURCES,
    "not_ready": _OUT_OF_RESOURCES,
    "no_pixel_data": _DATASET_MISMATCH,
    "malformed": _CANNOT_UNDERSTAND,
    "unsupported_image": _CANNOT_UNDERSTAND,
    "too_large": _CANNOT_UNDERSTAND,
    "internal": _CANNOT_UNDERSTAND,
}


@dataclass
class _Job:
    uid: str
    data: bytes
    source: str
    admitted: Pass  # its place in the server's in-flight count and memory budget, shared with gRPC
    received: float = field(default_factory=time.monotonic)


class _BindError(MonitorError):
    code = "failed_precondition"


class DicomNode:
    """The storage SCP; :class:`~monitor.server.service.MonitorServer` runs it when ``dicom_port >= 0``.

    Parameters
    ----------
    settings : Settings
        ``host``, ``dicom_port``, ``dicom_ae_title``, ``dicom_allowed_aes``, ``dicom_queue_size``,
        ``dicom_workers``, ``dicom_tls_*``, ``max_pixels``.
    handler : RequestHandler
        Provides the engine and records every scored instance.
    metrics : MonitorMetrics
    dicom_metrics : DicomMetrics

    Attributes
    ----------
    port : int or None
        The bound port once started.
    """

    def __init__(
        self,
        settings: Settings,
        handler: RequestHandler,
        metrics: MonitorMetrics,
        dicom_metrics: DicomMetrics,
    ) -> None:
        self.settings = settings
        self._handler = handler
        self._metrics = metrics
        self._dm = dicom_metrics
        self._callers = settings.dicom_allowed_callers
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=settings.dicom_queue_size)
        self._dm.queue_capacity.set(settings.dicom_queue_size)
        self._dm.queue_images.set_function(self._queue.qsize)
        self._workers: list[threading.Thread] = []
        self._server: Any = None
        self.port: int | None = None
        ae = AE(ae_title=settings.dicom_ae_title)
        for sop_class in RADIOGRAPH_STORAGE:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)
        ae.maximum_associations = _MAX_ASSOCIATIONS
        ae.maximum_pdu_size = _MAX_PDU
        self._ae = ae

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Listen on ``host:dicom_port`` and start the scoring threads."""
        s = self.settings
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        try:
            self._server = self._ae.start_server(
                (s.host, s.dicom_port), block=False, evt_handlers=handlers, ssl_context=self._ssl_context()
            )
        except OSError as exc:
            raise _BindError(
                f"cannot listen on {s.host}:{s.dicom_port} for DICOM ({exc}); is the port in use?"
            ) from exc
        self.port = self._server.server_address[1]
        for i in range(s.dicom_workers):
            t = threading.Thread(target=self._work, name=f"dicom-score-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        log.info(
            "DICOM node listening",
            extra={
                "dicom_port": self.port,
                "ae_title": s.dicom_ae_title,
                "tls": bool(s.dicom_tls_cert),
                "allowed_callers": sorted(self._callers) or "any",
            },
        )

    def _ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if not s.dicom_tls_cert:
            return None
        try:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(s.dicom_tls_cert, s.dicom_tls_key)
            if s.dicom_tls_ca:
                context.load_verify_locations(s.dicom_tls_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInputError(
                f"DICOM TLS: cannot load certificate {s.dicom_tls_cert}, key {s.dicom_tls_key}"
                f"{' or CA ' + s.dicom_tls_ca if s.dicom_tls_ca else ''} ({exc})"
            ) from exc
        return context

    def stop(self, grace: float) -> None:
        """Stop accepting associations, then let the queue drain for up to ``grace`` seconds.

        Instances still queued after that are dropped (counted in the log line): their
        senders were answered success, so a shutdown loses at most ``dicom_queue_size`` scores.
        """
        self._ae.shutdown()  # closes the listening socket and aborts open associations
        self._server = None
        deadline = time.monotonic() + grace
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
        dropped = 0
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.admitted.done()
                dropped += 1
        for _ in self._workers:  # one end marker each; the queue is empty, so this does not wait long
            try:
                self._queue.put(None, timeout=5.0)
            except queue.Full:
                break
        for t in self._workers:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        log.info("DICOM node stopped", extra={"unscored_instances_dropped": dropped})

    # ------------------------------------------------------------------ association
    def _source(self, calling_ae: str) -> str:
        """The bounded metric label of a caller."""
        title = calling_ae.strip()
        return title if title in self._callers else OTHER_SOURCE

    def _on_requested(self, event: evt.Event) -> None:
        """Reject callers that are not allow-listed (by AE title, and address when one is given)."""
        assoc = event.assoc
        request = assoc.requestor.primitive  # requestor.ae_title is only set after negotiation
        calling = request.calling_ae_title.strip()
        called = request.called_ae_title.strip()
        address = assoc.requestor.address
        result = "accepted"
        if called != self.settings.dicom_ae_title:
            result, diagnostic = "rejected_called_ae", 0x07
        elif self._callers and calling not in self._callers:
            result, diagnostic = "rejected_calling_ae", 0x03
        elif self._callers and self._callers[calling] not in (None, address):
            result, diagnostic = "rejected_host", 0x03
        if result == "accepted":
            return  # counted once negotiation succeeds (EVT_ACCEPTED)
        self._dm.associations.labels(result=result).inc()
        log.warning(
            "DICOM association rejected",
            extra={"reason": result, "calling_ae": calling, "called_ae": called, "peer": address},
        )
        # Rejected-permanent by the service user: 0x03 calling / 0x07 called AE title not recognised.
        assoc.acse.send_reject(0x01, 0x01, diagnostic)
        assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        source = self._source(assoc.requestor.ae_title)
        self._dm.associations.labels(result="accepted").inc()
        for cx in assoc.rejected_contexts:
            # 0x03: abstract syntax (SOP class) not supported; 0x04: no transfer syntax supported.
            reason = "abstract_syntax" if cx.result == 0x03 else "transfer_syntax"
            self._dm.contexts_refused.labels(source=source, reason=reason).inc()
            log.info(
                "DICOM presentation context refused",
                extra={"calling_ae": assoc.requestor.ae_title.strip(), "reason": reason,
                       "abstract_syntax": str(cx.abstract_syntax)},
            )  # fmt: skip

    def _on_echo(self, event: evt.Event) -> int:
        self._dm.echoes.labels(source=self._source(event.assoc.requestor.ae_title)).inc()
        return _SUCCESS

    # ------------------------------------------------------------------ C-STORE
    def _on_store(self, event: evt.Event) -> Dataset:
        """Check the header, queue the instance, reply; never waits for scoring or a full queue."""
        t0 = time.perf_counter()
        calling = event.assoc.requestor.ae_title.strip()
        source = self._source(calling)
        uid = str(event.request.AffectedSOPInstanceUID)
        try:
            result, message = self._admit(event, uid, source)
        except Exception:  # never let one instance break the association or the node
            ref = uuid.uuid4().hex[:12]
            log.exception("unexpected error receiving a DICOM instance", extra={"error_ref": ref, "uid": uid})
            result, message = "internal", f"internal error (server log reference {ref})"
        self._dm.stores.labels(source=source, result=result).inc()
        reply = Dataset()
        reply.Status = _STATUS[result]
        if result != "queued":
            reply.ErrorComment = message[:64]  # LO: 64 characters at most
            log.info(
                "DICOM instance refused",
                extra={"calling_ae": calling, "uid": uid, "reason": result, "error": message},
            )
        self._dm.store_ack.observe(time.perf_counter() - t0)
        return reply

    def _admit(self, event: evt.Event, uid: str, source: str) -> tuple[str, str]:
        engine = self._handler.engine
        if engine is None:
            return "not_ready", "model still loading, retry later"
        data = event.encoded_dataset(include_meta=True)
        self._metrics.observe_input(len(data))
        self._handler.trimmer.note(len(data))  # pynetdicom buffered it: large instances fragment the heap
        try:
            meta = imaging.read_dicom_header(data, name=f"instance {uid}", max_pixels=engine.max_pixels)
        except InvalidInputError as exc:
            return _failure_reason(exc), _reason_text(exc, uid)
        # The same admission as a gRPC request (count and memory; a router has no deadline to judge),
        # costed from the header just read (a grey radiograph: one sample per pixel).
        held, decode = encoded_memory_cost(len(data), meta.rows, meta.columns)
        try:
            admitted = self._handler.admission.admit(held, decode, None, f"instance {uid}")
        except OverloadedError as exc:
            self._metrics.observe_shed(exc.reason)
            return "overloaded", f"server overloaded ({exc.reason}), retry later"
        try:
            self._queue.put_nowait(_Job(uid, data, source, admitted))
        except queue.Full:
            admitted.done()
            return "queue_full", f"scoring queue full ({self._queue.maxsize}), retry later"
        return "queued", ""

    # ------------------------------------------------------------------ scoring (worker threads)
    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            self._dm.queue_wait.observe(time.monotonic() - job.received)
            try:
                self._score_and_record(job)
            except MonitorError as exc:
                self._failed(job, _failure_reason(exc), str(exc))
            except Exception:
                ref = uuid.uuid4().hex[:12]
                log.exception(
                    "unexpected error scoring a DICOM instance", extra={"error_ref": ref, "uid": job.uid}
                )
                self._failed(job, "internal", f"internal error (server log reference {ref})")
            del job  # drop the instance's bytes before waiting for the next one

    def _score_and_record(self, job: _Job) -> None:
        # Read the served model once, and count as one of its calls, so that a hot reload lets
        # this instance finish on the model that scores it (as a gRPC call does).
        serving = self._handler.current()
        with serving.calls, job.admitted:
            job.admitted.start()  # waits until its decode fits in the memory budget
            scored = self._score(serving.engine, job.data, job.uid)
            job.admitted.served()
            self._handler.record(job.uid, scored, source=job.source, serving=serving)

    @staticmethod
    def _score(engine: Engine, data: bytes, uid: str) -> ScoredImage:
        """The node's one scoring call: the same engine, and decoder processes, as the gRPC API."""
        return engine.score(data, kind="dicom", name=f"instance {uid}")

    def _failed(self, job: _Job, reason: str, message: str) -> None:
        self._dm.scoring_failures.labels(source=job.source, reason=reason).inc()
        log.info("DICOM instance not scored", extra={"uid": job.uid, "reason": reason, "error": message})


def _reason_text(exc: Exception, uid: str) -> str:
    """The error message without the ``instance <uid>:`` prefix (the sender knows the UID)."""
    text = str(exc)
    prefix = f"instance {uid}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _failure_reason(exc: MonitorError) -> str:
    if isinstance(exc, DecodeTimeoutError):
        return "decode_timeout"
    if isinstance(exc, DecoderCrashedError):
        return "decoder_crashed"
    if isinstance(exc, MissingPixelDataError):
        return "no_pixel_data"
    if isinstance(exc, ImageTooLargeError):
        return "too_large"
    if isinstance(exc, UnsupportedImageError):
        return "unsupported_image"
    if isinstance(exc, InvalidInputError):
        return "malformed"
    return "internal"
