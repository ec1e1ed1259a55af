"""Refit a served model from production traffic: the outcome store → a new model, no image needed.

The store (:mod:`monitor.store`) keeps the spectral profile of every scored request
and the outcomes reported for them. By default the clusters stay fixed and only the
per-cluster failure rates (and blind spots) are re-estimated from the stored rows
with an outcome; ``refit_clusters=True`` refits the clusters too, with the same
hyperparameters as the served model. Rows of every model that profiled with the
same features are pooled (the profile does not depend on the clusters).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import clone

from .errors import InvalidInputError
from .model import ReliabilityModel, library_versions
from .store import read_labelled

__all__ = ["RefitReport", "refit_from_store"]


@dataclass
class RefitReport:
    """What :func:`refit_from_store` did.

    n_rows : stored rows with an outcome that were used
    n_failures : failures among them
    model_ids : the models that scored them (with how many rows each)
    """

    model: ReliabilityModel
    base_model_id: str
    n_rows: int
    n_failures: int
    model_ids: dict[str, int]
    refit_clusters: bool
    first_time: float
    last_time: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model.model_id,
            "base_model_id": self.base_model_id,
            "refit_clusters": self.refit_clusters,
            "n_rows": self.n_rows,
            "n_failures": self.n_failures,
            "failure_rate": self.n_failures / self.n_rows,
            "model_ids": self.model_ids,
            "first_time": self.first_time,
            "last_time": self.last_time,
            "n_clusters": self.model.n_clusters,
            "rates": [float(r) for r in self.model.rates.rate_],
            "counts": [int(n) for n in self.model.rates.counts_],
            "blind_spots": [int(c) for c in np.flatnonzero(self.model.rates.blind_spot_)],
            "seconds": self.seconds,
        }


def refit_from_store(
    model: ReliabilityModel, store: str | os.PathLike, *, refit_clusters: bool = False
) -> RefitReport:
    """A new model whose failure rates (and optionally clusters) come from ``store``.

    Parameters
    ----------
    model : ReliabilityModel
        The served model: its profiler spec selects the usable rows; with clusters
        fixed, its clusterer assigns them; otherwise its hyperparameters are reused.
    store : path
        An outcome store written by ``cxr-monitor serve --store``.
    refit_clusters : bool
        Refit the clusters too. The new model's reference set (drift baseline) is
        then the stored rows; with clusters fixed it stays the original fit set.

    Notes
    -----
    The score calibration (needs true labels, which the store does not keep) is kept
    with clusters fixed and dropped when the clusters are refit.

    Raises
    ------
    StoreError
        The store cannot be read.
    InvalidInputError
        No stored row with an outcome was profiled with this model's features.
    """
    t0 = time.perf_counter()
    data = read_labelled(store, model.feature_names)
    n = data.profiles.shape[0]
    if n == 0:
        raise InvalidInputError(
            f"{store}: no stored request with a reported outcome was profiled with this model's "
            f"{len(model.feature_names)} features (spec {model.profiler.spec()['spec_version']})"
        )
    ids, counts = np.unique(data.model_ids, return_counts=True)
    card = {
        **{k: v for k, v in model.card.items() if k not in ("model_id", "refit")},
        "versions": library_versions(),
        "refit": {
            "from_store": str(Path(store).resolve()),
            "base_model_id": model.model_id,
            "refit_clusters": refit_clusters,
            "n_rows": n,
            "n_failures": int(data.failures.sum()),
            "first_time": data.first_time,
            "last_time": data.last_time,
        },
    }
    if refit_clusters:
        new = ReliabilityModel.fit(
            data.profiles,
            data.failures,
            profiler=model.profiler,
            clusterer=clone(model.clusterer),
            prior_strength=model.rates.prior_strength,
            drift_thresholds=model.drift_thresholds,
            card=card,
            records=[
                {"request_id": r, "model_id": m}
                for r, m in zip(data.request_ids, data.model_ids, strict=True)
            ],
        )
    else:
        hard = model.clusterer.predict_proba(data.profiles).argmax(axis=1)
        rates = clone(model.rates).fit(hard, data.failures)
        reference = model.fit_profiles if model.fit_profiles is not None else data.profiles
        p_reference, _, _ = rates.predict_failure(model.clusterer.predict_proba(reference))
        new = dataclasses.replace(
            model, rates=rates, reference_failure_probability=float(np.mean(p_reference)), card=card
        )
        new.card["model_id"] = new.fingerprint()
    return RefitReport(
        model=new,
        base_model_id=model.model_id,
        n_rows=n,
        n_failures=int(data.failures.sum()),
        model_ids={str(i): int(c) for i, c in zip(ids, counts, strict=True)},
        refit_clusters=refit_clusters,
        first_time=data.first_time,
        last_time=data.last_time,
        seconds=time.perf_counter() - t0,
    )
