"""Save and load a fitted model: JSON + npz + sha256 manifest, never pickle.

Layout of a model directory::

    model.json      card, parameters, cluster statistics, thresholds, versions
    arrays.npz      numeric state (loaded with allow_pickle=False)
    manifest.json   format version and the sha256 of the two files above

Loading verifies the manifest first, then the spec version, so a tampered,
truncated or incompatible model fails with a message that says which.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .clustering import SpectralClusterer
from .drift import DriftThresholds, ReferenceRanks
from .errors import ArtifactError, InvalidInputError
from .model import ReliabilityModel
from .reliability import ClusterCalibrator, ClusterFailureRates
from .scope import ScopeRules
from .spectrum import SPEC_VERSION, SpectralProfiler

__all__ = ["FORMAT_VERSION", "load_model", "save_model"]

FORMAT_VERSION = 2
_FILES = ("model.json", "arrays.npz")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def save_model(model: ReliabilityModel, directory: str | os.PathLike) -> Path:
    """Write ``model`` to ``directory`` (created; existing model files are replaced)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {f"clusterer.{k}": v for k, v in model.clusterer.to_arrays().items()}
    arrays["cluster_feature_mean"] = model.cluster_feature_mean
    arrays["cluster_feature_std"] = model.cluster_feature_std
    arrays["reference_mix"] = model.reference_mix
    if model.fit_profiles is not None:
        arrays["fit_profiles"] = model.fit_profiles
    if model.drift_ranks is not None:
        arrays["drift_rank_table"] = model.drift_ranks.table_
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    npz = buf.getvalue()
    doc = {
        "format_version": FORMAT_VERSION,
        "card": model.card,
        "spectrum": model.profiler.spec(),
        "clusterer": model.clusterer.to_json(),
        "failure_rates": model.rates.to_json(),
        "calibrator": model.calibrator.to_json() if model.calibrator is not None else None,
        "reference": {
            "cluster_mix": [float(v) for v in model.reference_mix],
            "novelty_rate": model.reference_novelty_rate,
            "failure_probability": model.reference_failure_probability,
        },
        "drift_thresholds": model.drift_thresholds.to_dict(),
        "fit_records": model.fit_records,
        "scope": model.scope.to_json(),
    }
    text = json.dumps(doc, indent=2, sort_keys=False, default=_json_default, allow_nan=True).encode()
    payload = {"model.json": text, "arrays.npz": npz}
    for name, data in payload.items():
        tmp = directory / (name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(directory / name)
    manifest = {
        "format_version": FORMAT_VERSION,
        "spec_version": SPEC_VERSION,
        "model_id": model.model_id,
        "files": {name: _sha256(data) for name, data in payload.items()},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def _read_verified(directory: Path) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: model directory not found")
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{directory}: manifest.json is missing; is this a cxr-monitor model?") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{directory}/manifest.json: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ArtifactError(
            f"{directory}: model format version {found!r}, this cxr-monitor reads {FORMAT_VERSION}"
        )
    blobs = {}
    for name in _FILES:
        try:
            data = (directory / name).read_bytes()
        except OSError as exc:
            raise ArtifactError(f"{directory}/{name}: cannot read ({exc.strerror})") from exc
        expected = manifest.get("files", {}).get(name)
        actual = _sha256(data)
        if actual != expected:
            raise ArtifactError(
                f"{directory}/{name}: sha256 {actual[:16]}… does not match the manifest "
                f"({str(expected)[:16]}…): the file was modified or corrupted"
            )
        blobs[name] = data
    if manifest.get("spec_version") != SPEC_VERSION:
        raise ArtifactError(
            f"{directory}: model was fitted with spectral profile spec {manifest.get('spec_version')!r}, "
            f"this cxr-monitor computes spec {SPEC_VERSION!r}; refit the model"
        )
    return manifest, json.loads(blobs["model.json"]), blobs["arrays.npz"]


def load_model(directory: str | os.PathLike) -> ReliabilityModel:
    """Load and verify a model written by :func:`save_model`.

    Raises
    ------
    ArtifactError
        Missing files, checksum mismatch, other format or spec version, bad content.
    """
    directory = Path(directory)
    _, doc, npz = _read_verified(directory)
    try:
        with np.load(io.BytesIO(npz), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        spec = doc["spectrum"]
        try:
            profiler = SpectralProfiler.from_spec(spec)
        except InvalidInputError as exc:
            raise ArtifactError(f"{directory}: {exc}") from None
        clusterer = SpectralClusterer.from_state(
            doc["clusterer"],
            {k.removeprefix("clusterer."): v for k, v in arrays.items() if k.startswith("clusterer.")},
        )
        rates = ClusterFailureRates.from_json(doc["failure_rates"])
        calibrator = ClusterCalibrator.from_json(doc["calibrator"]) if doc.get("calibrator") else None
        ref = doc["reference"]
        model = ReliabilityModel(
            profiler=profiler,
            clusterer=clusterer,
            rates=rates,
            calibrator=calibrator,
            cluster_feature_mean=arrays["cluster_feature_mean"],
            cluster_feature_std=arrays["cluster_feature_std"],
            reference_mix=arrays["reference_mix"],
            reference_novelty_rate=float(ref["novelty_rate"]),
            reference_failure_probability=float(ref["failure_probability"]),
            drift_thresholds=DriftThresholds(**doc["drift_thresholds"]),
            card=doc["card"],
            fit_profiles=arrays.get("fit_profiles"),
            fit_records=doc.get("fit_records"),
            # Models saved before header scopes existed get the built-in chest radiograph lists.
            scope=ScopeRules.from_json(doc.get("scope")),
        )
        # Models saved before the rank-based drift tests rebuild the table from their fit
        # profiles (the same table a fit makes when it keeps all of them); without either the
        # per-feature tests stay Welch tests.
        if "drift_rank_table" in arrays:
            model.drift_ranks = ReferenceRanks.from_table(arrays["drift_rank_table"])
        elif model.fit_profiles is not None and len(model.fit_profiles) >= 2:
            model.drift_ranks = ReferenceRanks().fit(model.clusterer.standardise(model.fit_profiles))
        return model
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, np.linalg.LinAlgError) as exc:
        raise ArtifactError(f"{directory}: model content is invalid ({type(exc).__name__}: {exc})") from exc
