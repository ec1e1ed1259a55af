"""Protobuf ↔ monitor types, and MonitorError codes → gRPC status codes.

Validation of request fields happens here, once, with messages that name the field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from .. import __version__
from ..errors import InvalidInputError, MonitorError
from ..model import ReliabilityModel
from ..proto import monitor_pb2 as pb
from ..scope import ScopeRules
from ..types import ImageMeta, ScoredImage

__all__ = [
    "ImageInput",
    "MAX_ID_CHARS",
    "MAX_METADATA_ENTRIES",
    "MAX_METADATA_KEY_CHARS",
    "MAX_METADATA_VALUE_CHARS",
    "MAX_NAME_CHARS",
    "ModelDescription",
    "check_outcome_request",
    "check_score_request",
    "error_response",
    "log_id",
    "log_metadata",
    "model_info",
    "outcome_failure",
    "request_to_input",
    "scored_to_response",
    "status_code",
]

_FORMATS = {
    pb.IMAGE_FORMAT_UNSPECIFIED: None,
    pb.IMAGE_FORMAT_DICOM: "dicom",
    pb.IMAGE_FORMAT_PNG: "png",
    pb.IMAGE_FORMAT_JPEG: "jpeg",
    pb.IMAGE_FORMAT_WEBP: "webp",
    pb.IMAGE_FORMAT_TIFF: "tiff",
}
_DTYPES = {
    pb.DTYPE_UINT8: np.dtype("u1"),
    pb.DTYPE_UINT16: np.dtype("<u2"),
    pb.DTYPE_INT16: np.dtype("<i2"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
}

# Bounds of the free-text fields (documented in the .proto). Request ids are remembered for
# ReportOutcome (outcome_cache_size of them) and every field may reach the log, so each is bounded:
# 40 requests with 4 MiB ids once added 272 MB to the server for good.
MAX_ID_CHARS = 256
MAX_NAME_CHARS = 256
MAX_METADATA_ENTRIES = 32
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 256
# Line breaks and other control characters would forge log lines in text logs.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Metadata keys whose values are never logged: DICOM patient and study attributes (PatientName,
# PatientID, PatientBirthDate, StudyInstanceUID, AccessionNumber, ReferringPhysicianName...).
_IDENTIFYING = ("patient", "study", "accession", "physician", "birth", "mrn")
_LOGGED_ID_CHARS = 80

_STATUS = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "internal": grpc.StatusCode.INTERNAL,
}


def status_code(exc: MonitorError) -> grpc.StatusCode:
    """The gRPC status code of a :class:`MonitorError` (its transport-neutral ``code``)."""
    return _STATUS.get(exc.code, grpc.StatusCode.INTERNAL)


def _check_text(value: str, field: str, limit: int, where: str) -> None:
    if len(value) > limit:
        raise InvalidInputError(f"{where}{field} has {len(value)} characters, more than the limit of {limit}")
    bad = _CONTROL.search(value)
    if bad:
        raise InvalidInputError(
            f"{where}{field} contains the control character {bad.group()!r} at position {bad.start()}"
        )


def check_score_request(request: pb.ScoreRequest) -> None:
    """Bound the free-text fields of a ScoreRequest: ``request_id``, ``encoded.name``, ``metadata``.

    Raises
    ------
    InvalidInputError
        A field is longer than its limit (``MAX_*``) or holds a control character; the
        message names the field and never repeats the offending value.
    """
    _check_text(request.request_id, "request_id", MAX_ID_CHARS, "")
    where = f"request {request.request_id}: " if request.request_id else ""
    if request.WhichOneof("image") == "encoded":
        _check_text(request.encoded.name, "encoded.name", MAX_NAME_CHARS, where)
    if len(request.metadata) > MAX_METADATA_ENTRIES:
        raise InvalidInputError(
            f"{where}metadata has {len(request.metadata)} entries, more than the limit of "
            f"{MAX_METADATA_ENTRIES}"
        )
    for key, value in request.metadata.items():
        _check_text(key, "a metadata key", MAX_METADATA_KEY_CHARS, where)
        _check_text(value, f"metadata[{key!r}]", MAX_METADATA_VALUE_CHARS, where)


def check_outcome_request(request: pb.OutcomeRequest) -> None:
    """Bound ``request_id`` of an OutcomeRequest (see :func:`check_score_request`)."""
    _check_text(request.request_id, "request_id", MAX_ID_CHARS, "outcome: ")


def log_id(request_id: str) -> str:
    """A request id as it may go into a log line: short, with control characters escaped.

    Valid ids come back unchanged; this guards the log lines of requests rejected for their id.
    """
    if len(request_id) <= MAX_ID_CHARS and not _CONTROL.search(request_id):
        return request_id
    shown = _escape(request_id[:_LOGGED_ID_CHARS])
    return f"{shown}... ({len(request_id)} characters)" if len(request_id) > _LOGGED_ID_CHARS else shown


def log_metadata(metadata: Any) -> dict[str, str]:
    """Request metadata as it may be logged: patient and study fields redacted, the rest bounded.

    At most ``MAX_METADATA_ENTRIES`` entries, keys and values cut to their limits with
    control characters escaped; the values of keys naming DICOM patient or study
    attributes (see ``_IDENTIFYING``) are replaced by ``[redacted]``.
    """
    out: dict[str, str] = {}
    for i, (key, value) in enumerate(sorted(metadata.items())):
        if i == MAX_METADATA_ENTRIES:
            out["..."] = f"{len(metadata) - i} more entries not logged"
            break
        k = _escape(key[:MAX_METADATA_KEY_CHARS])
        folded = re.sub(r"[^a-z]", "", key.lower())
        if any(word in folded for word in _IDENTIFYING):
            out[k] = "[redacted]"
        else:
            out[k] = _escape(value[:MAX_METADATA_VALUE_CHARS])
    return out


def _escape(text: str) -> str:
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


@dataclass(frozen=True)
class ImageInput:
    """One request's image, checked and ready for the engine: encoded bytes or a pixel array."""

    name: str
    size_bytes: int
    data: bytes | None = None
    kind: str | None = None
    array: np.ndarray | None = None


def request_to_input(request: pb.ScoreRequest, request_id: str) -> ImageInput:
    """Unpack the image of a ScoreRequest (sizes are checked later by the engine, from the header).

    Raises
    ------
    InvalidInputError
        No image, an unknown enum value, or an array whose shape, dtype and byte count disagree.
    """
    which = request.WhichOneof("image")
    rid = request_id
    if which == "encoded":
        enc = request.encoded
        if enc.format not in _FORMATS:
            raise InvalidInputError(f"request {rid}: encoded.format {enc.format} is not a known ImageFormat")
        name = f"request {rid} ({enc.name})" if enc.name else f"request {rid}"
        return ImageInput(name=name, size_bytes=len(enc.data), data=enc.data, kind=_FORMATS[enc.format])
    if which == "array":
        return ImageInput(name=f"request {rid}", size_bytes=len(request.array.data),
                          array=_array(request.array, rid))  # fmt: skip
    raise InvalidInputError(f"request {rid}: no image (set either `encoded` or `array`)")


def _array(msg: pb.PixelArray, rid: str) -> np.ndarray:
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        raise InvalidInputError(
            f"request {rid}: array.dtype {pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else msg.dtype}"
            f" is not supported (expected one of {', '.join(pb.DType.Name(k) for k in _DTYPES)})"
        )
    shape = tuple(int(s) for s in msg.shape)
    if len(shape) not in (2, 3) or min(shape, default=0) < 1:
        raise InvalidInputError(
            f"request {rid}: array.shape {list(shape)} must be (rows, columns) or (rows, columns, channels), "
            "all positive"
        )
    expected = math.prod(shape) * dtype.itemsize
    if len(msg.data) != expected:
        raise InvalidInputError(
            f"request {rid}: array.data holds {len(msg.data)} bytes but shape {list(shape)} of "
            f"{pb.DType.Name(msg.dtype)} needs {expected}"
        )
    return np.frombuffer(msg.data, dtype=dtype).reshape(shape)


@dataclass(frozen=True)
class ModelDescription:
    """The identifiers every ScoreResponse carries (computed once when the model is loaded)."""

    model_id: str
    spec_version: str
    model_version: str
    server_version: str
    threshold: float | None

    @classmethod
    def of(cls, model: ReliabilityModel) -> ModelDescription:
        threshold = (model.card.get("fit_data") or {}).get("threshold")
        return cls(
            model_id=model.model_id,
            spec_version=str(model.profiler.spec()["spec_version"]),
            model_version=str((model.card.get("versions") or {}).get("cxr-spectral-monitor", "")),
            server_version=__version__,
            threshold=None if threshold is None else float(threshold),
        )


def _meta(meta: ImageMeta) -> pb.ImageMetadata:
    d = {k: v for k, v in meta.to_dict().items() if v is not None}
    return pb.ImageMetadata(**d)


def scored_to_response(
    scored: ScoredImage, request_id: str, model: ModelDescription, total_seconds: float
) -> pb.ScoreResponse:
    r = scored.result
    t = scored.timings
    return pb.ScoreResponse(
        request_id=request_id,
        cluster=r.cluster,
        memberships=r.memberships,
        failure_probability=r.failure_probability,
        failure_interval=pb.Interval(lower=r.failure_interval[0], upper=r.failure_interval[1]),
        cluster_failure_probability=r.cluster_failure_probability,
        reliability=r.reliability,
        novelty=r.novelty,
        is_novel=r.is_novel,
        log_likelihood=r.log_likelihood,
        in_blind_spot=r.in_blind_spot,
        top_features=[pb.FeatureDeviation(name=n, z=z) for n, z in r.top_features],
        method=r.method,
        model_id=model.model_id,
        model_version=model.model_version,
        server_version=model.server_version,
        spec_version=model.spec_version,
        timings=pb.Timings(
            decode_seconds=t["decode"],
            profile_seconds=t["profile"],
            score_seconds=t["score"],
            total_seconds=total_seconds,
        ),  # fmt: skip
        image=_meta(scored.meta),
        trusted=r.trusted,
        out_of_scope=r.out_of_scope,
        scope_reasons=list(r.scope_reasons),
        scope_field=r.scope_field,
    )


def error_response(request_id: str, code: grpc.StatusCode, message: str) -> pb.ScoreResponse:
    """A failed ScoreStream item: only ``request_id`` and ``error`` are set."""
    return pb.ScoreResponse(
        request_id=request_id, error=pb.Status(code=code.value[0], code_name=code.name, message=message)
    )


def outcome_failure(
    request: pb.OutcomeRequest, classifier_score: float | None, threshold: float | None
) -> bool:
    """Whether the classifier was wrong, from ``failure`` or from ``labelled`` (label, score).

    Raises
    ------
    InvalidInputError
        No outcome, or a label other than 0/1, or a score outside [0, 1].
    MonitorError (failed_precondition)
        ``labelled`` without a score anywhere, or the model has no decision threshold.
    """
    rid = request.request_id
    which = request.WhichOneof("outcome")
    if which == "failure":
        return bool(request.failure)
    if which != "labelled":
        raise InvalidInputError(f"outcome for request {rid}: set either `failure` or `labelled`")
    lab = request.labelled
    if lab.label not in (0, 1):
        raise InvalidInputError(f"outcome for request {rid}: labelled.label must be 0 or 1, got {lab.label}")
    score = lab.score if lab.HasField("score") else classifier_score
    if score is None:
        raise _PreconditionError(
            f"outcome for request {rid}: labelled.score is missing and the Score request carried no "
            "classifier_score"
        )
    if not 0.0 <= score <= 1.0:
        raise InvalidInputError(f"outcome for request {rid}: score must be in [0, 1], got {score}")
    if threshold is None:
        raise _PreconditionError(
            f"outcome for request {rid}: the model card has no decision threshold "
            "(fit_data.threshold), so a label and score cannot be turned into a failure; send `failure`"
        )
    return (score >= threshold) != bool(lab.label)


class _PreconditionError(MonitorError):
    code = "failed_precondition"


def model_info(
    model: ReliabilityModel,
    description: ModelDescription,
    tallies: list[tuple[int, int, float]],
    window_images: int,
    window_seconds: float,
    scope: ScopeRules | None = None,
) -> pb.ModelInfo:
    """The model card as a ModelInfo message, with the outcomes reported so far per cluster.

    ``scope`` is the scope the server applies (default: the model's).
    """
    applied = (scope if scope is not None else model.scope).to_json()
    rates = model.rates.to_json()
    spec = model.profiler.spec()
    th = model.drift_thresholds
    fit = model.card.get("fit_data") or {}
    clusters = []
    for row, share, (n_out, n_fail, pred) in zip(
        rates["clusters"], model.reference_mix, tallies, strict=True
    ):
        clusters.append(
            pb.ClusterInfo(
                cluster=row["cluster"], n_images=row["n_images"], n_failures=row["n_failures"],
                rate=row["rate"], interval=pb.Interval(lower=row["lower"], upper=row["upper"]),
                lift=row["lift"], fisher_q=row["fisher_q"], blind_spot=row["blind_spot"],
                reference_share=float(share), outcomes_reported=n_out, failures_reported=n_fail,
                predicted_failures_reported=pred,
            )
        )  # fmt: skip
    n_images = int(sum(r["n_images"] for r in rates["clusters"]))
    info = pb.ModelInfo(
        model_id=description.model_id,
        spec_version=description.spec_version,
        model_version=description.model_version,
        server_version=description.server_version,
        task=str(model.card.get("task", "")),
        calibrated=model.calibrator is not None,
        clusters=clusters,
        global_failure_rate=rates["global_rate"],
        chi2_p=rates["chi2_p"],
        cramers_v=rates["cramers_v"],
        reference=pb.ReferenceStats(
            n_images=n_images,
            failure_rate=float(fit.get("failure_rate", rates["global_rate"])),
            failure_probability=model.reference_failure_probability,
            novelty_rate=model.reference_novelty_rate,
            novelty_quantile=model.clusterer.novelty_quantile,
        ),
        drift_thresholds=pb.DriftThresholds(
            psi_min=th.psi_min,
            chi2_alpha=th.chi2_alpha,
            novelty_rate_min=th.novelty_rate_min,
            novelty_alpha=th.novelty_alpha,
            min_images=int(th.min_images),
            out_of_scope_rate_min=th.out_of_scope_rate_min,
            feature_alpha=th.feature_alpha,
            feature_shift_min=th.feature_shift_min,
        ),  # fmt: skip
        feature_names=list(model.feature_names),
        working_size=spec["working_size"],
        n_bands=spec["n_bands"],
        versions={str(k): str(v) for k, v in (model.card.get("versions") or {}).items()},
        window_images=window_images,
        window_seconds=window_seconds,
        card_json=json.dumps(model.card, sort_keys=True, default=_json_default),
        scope=pb.Scope(**{k: v or [] for k, v in applied.items()}),
    )
    if description.threshold is not None:
        info.threshold = description.threshold
    return info


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
