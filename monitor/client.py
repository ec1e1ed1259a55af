"""Python client of the sidecar.

Examples
--------
>>> from monitor.client import ReliabilityClient
>>> with ReliabilityClient("localhost:50051") as client:  # doctest: +SKIP
...     r = client.score_file("chest.dcm", classifier_score=0.83)
...     print(r.cluster, r.reliability, r.request_id)
...     client.report_outcome(r.request_id, failure=False)

Every method raises :class:`grpc.RpcError` on a failed call (``err.code()`` is the
status, ``err.details()`` the server's message). Responses are the protobuf
messages of ``protos/cxr_monitor/v1/monitor.proto``; :func:`to_dict` turns one into
plain Python.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .defaults import DEFAULT_ADDRESS, DEFAULT_MAX_MESSAGE_BYTES
from .proto import monitor_pb2 as pb
from .proto import monitor_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_ADDRESS",
    "ReliabilityClient",
    "array_request",
    "bytes_request",
    "file_request",
    "read_token_file",
    "to_dict",
]


_FORMATS = {
    None: pb.IMAGE_FORMAT_UNSPECIFIED,
    "dicom": pb.IMAGE_FORMAT_DICOM,
    "dcm": pb.IMAGE_FORMAT_DICOM,
    "png": pb.IMAGE_FORMAT_PNG,
    "jpeg": pb.IMAGE_FORMAT_JPEG,
    "jpg": pb.IMAGE_FORMAT_JPEG,
    "webp": pb.IMAGE_FORMAT_WEBP,
    "tiff": pb.IMAGE_FORMAT_TIFF,
    "tif": pb.IMAGE_FORMAT_TIFF,
}
_DTYPES = {
    "|u1": pb.DTYPE_UINT8,
    "<u2": pb.DTYPE_UINT16,
    "<i2": pb.DTYPE_INT16,
    "<i4": pb.DTYPE_INT32,
    "<f4": pb.DTYPE_FLOAT32,
    "<f8": pb.DTYPE_FLOAT64,
}


def _common(
    request: pb.ScoreRequest,
    request_id: str | None,
    classifier_score: float | None,
    metadata: Mapping[str, str] | None,
) -> pb.ScoreRequest:
    if request_id:
        request.request_id = request_id
    if classifier_score is not None:
        request.classifier_score = float(classifier_score)
    if metadata:
        request.metadata.update({str(k): str(v) for k, v in metadata.items()})
    return request


def bytes_request(
    data: bytes,
    *,
    format: str | None = None,
    name: str = "",
    request_id: str | None = None,
    classifier_score: float | None = None,
    metadata: Mapping[str, str] | None = None,
) -> pb.ScoreRequest:
    """A ScoreRequest for an encoded image; ``format`` None lets the server sniff it."""
    key = format.lower() if format else None
    if key not in _FORMATS:
        raise ValueError(f"format must be one of dicom, png, jpeg, webp, tiff or None, got {format!r}")
    enc = pb.EncodedImage(data=bytes(data), format=_FORMATS[key], name=name)
    return _common(pb.ScoreRequest(encoded=enc), request_id, classifier_score, metadata)


def file_request(path: str | os.PathLike, **kwargs: Any) -> pb.ScoreRequest:
    """A ScoreRequest for an image file (format sniffed by the server); see :func:`bytes_request`."""
    p = Path(path)
    return bytes_request(p.read_bytes(), name=kwargs.pop("name", p.name), **kwargs)


def array_request(
    array: Any,
    *,
    request_id: str | None = None,
    classifier_score: float | None = None,
    metadata: Mapping[str, str] | None = None,
) -> pb.ScoreRequest:
    """A ScoreRequest for raw pixels: uint8, uint16, int16, int32, float32 or float64, 2-D or 3-D."""
    arr = np.asarray(array)
    little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    code = _DTYPES.get(little.dtype.str)
    if code is None:
        raise ValueError(
            f"array dtype {arr.dtype} is not supported (uint8, uint16, int16, int32, float32, float64)"
        )
    msg = pb.PixelArray(shape=list(arr.shape), dtype=code, data=np.ascontiguousarray(little).tobytes())
    return _common(pb.ScoreRequest(array=msg), request_id, classifier_score, metadata)


def to_dict(message: Any) -> dict[str, Any]:
    """A response as plain Python (field names as in the .proto, default values included)."""
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


Pem = str | os.PathLike | bytes


def _pem(value: Pem | None, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {value} ({exc.strerror or exc})") from exc


def read_token_file(path: str | os.PathLike) -> str:
    """The bearer token in a file (surrounding whitespace and the final newline dropped)."""
    try:
        token = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"token file {path}: cannot read an ASCII token ({exc})") from exc
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


class ReliabilityClient:
    """Talk to a ``cxr-monitor serve`` sidecar, in plaintext or over TLS, with an optional token.

    Parameters
    ----------
    address : str
        ``host:port``.
    timeout : float, optional
        Default deadline of each call, in seconds (None: no deadline).
    max_message_bytes : int
        Largest message sent or received (match the server's setting).
    tls : bool
        Use TLS, trusting the system's CA certificates (implied by ``tls_ca``, ``tls_cert``).
    tls_ca : path or bytes, optional
        PEM CA certificate(s) that signed the server's certificate.
    tls_cert, tls_key : path or bytes, optional
        The client's PEM certificate chain and key, for servers that require mutual TLS.
    token : str, optional
        Sent as ``authorization: Bearer <token>`` with every call (see :func:`read_token_file`).
        Over plaintext it travels in the clear: use TLS beyond a trusted network.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: bool = False,
        tls_ca: Pem | None = None,
        tls_cert: Pem | None = None,
        tls_key: Pem | None = None,
        token: str | None = None,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        self.address = address
        self.timeout = timeout
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if tls or tls_ca is not None or tls_cert is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(tls_ca, "tls_ca"),
                private_key=_pem(tls_key, "tls_key"),
                certificate_chain=_pem(tls_cert, "tls_cert"),
            )
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._stub = pb_grpc.ReliabilityMonitorStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> ReliabilityClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _t(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def score(self, request: pb.ScoreRequest, *, timeout: float | None = None) -> pb.ScoreResponse:
        """Send a prepared ScoreRequest (see :func:`file_request`, :func:`bytes_request`, :func:`array_request`)."""
        return self._stub.Score(request, timeout=self._t(timeout), metadata=self._metadata)

    def score_file(
        self, path: str | os.PathLike, *, timeout: float | None = None, **kwargs: Any
    ) -> pb.ScoreResponse:
        """Score an image file; keyword arguments as :func:`bytes_request` (request_id, classifier_score...)."""
        return self.score(file_request(path, **kwargs), timeout=timeout)

    def score_bytes(self, data: bytes, *, timeout: float | None = None, **kwargs: Any) -> pb.ScoreResponse:
        """Score an encoded image held in memory; keyword arguments as :func:`bytes_request`."""
        return self.score(bytes_request(data, **kwargs), timeout=timeout)

    def score_array(self, array: Any, *, timeout: float | None = None, **kwargs: Any) -> pb.ScoreResponse:
        """Score raw pixels; keyword arguments as :func:`array_request`."""
        return self.score(array_request(array, **kwargs), timeout=timeout)

    def score_stream(
        self, requests: Iterable[pb.ScoreRequest | str | os.PathLike], *, timeout: float | None = None
    ) -> Iterator[pb.ScoreResponse]:
        """Score many images over one stream; responses come in request order.

        Items may be ScoreRequests or file paths. A failed item yields a response
        whose ``error`` is set (check ``response.HasField("error")``); the stream goes on.
        """

        def gen() -> Iterator[pb.ScoreRequest]:
            for item in requests:
                yield item if isinstance(item, pb.ScoreRequest) else file_request(item)

        return self._stub.ScoreStream(gen(), timeout=self._t(timeout), metadata=self._metadata)

    def report_outcome(
        self,
        request_id: str,
        *,
        failure: bool | None = None,
        label: int | None = None,
        score: float | None = None,
        timeout: float | None = None,
    ) -> pb.OutcomeResponse:
        """Report the ground truth of an earlier request: ``failure`` or ``label`` (+ optional ``score``)."""
        req = pb.OutcomeRequest(request_id=request_id)
        if failure is not None and label is not None:
            raise ValueError("give either failure or label, not both")
        if failure is not None:
            req.failure = bool(failure)
        elif label is not None:
            req.labelled.label = int(label)
            if score is not None:
                req.labelled.score = float(score)
        else:
            raise ValueError("give failure=True/False or label=0/1")
        return self._stub.ReportOutcome(req, timeout=self._t(timeout), metadata=self._metadata)

    def model_info(self, *, timeout: float | None = None) -> pb.ModelInfo:
        return self._stub.GetModelInfo(
            pb.ModelInfoRequest(), timeout=self._t(timeout), metadata=self._metadata
        )

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """The health status name: ``SERVING``, ``NOT_SERVING``, ``SERVICE_UNKNOWN`` or ``UNKNOWN``."""
        resp = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
