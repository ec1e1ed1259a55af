"""The one object the server and the CLI call: load → profile → score, and drift windows."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import imaging
from .artifact import load_model
from .drift import SlidingWindow
from .model import ReliabilityModel
from .spectrum import SpectralProfiler
from .types import DriftReport, ImageMeta, LoadedImage, ScoredImage

__all__ = ["Engine"]


class Engine:
    """Score images with a fitted :class:`~monitor.model.ReliabilityModel`.

    Thread-safe for scoring: the model is read-only and FFT plans are per thread.

    Parameters
    ----------
    model : ReliabilityModel
    max_pixels : int
        Largest image accepted (checked from the header before decoding).
    fft_threads : int
        FFTW threads per transform.
    wisdom_path : path, optional
        FFTW wisdom file, read before the first plan and updated when planning learnt more.
    """

    def __init__(
        self,
        model: ReliabilityModel,
        *,
        max_pixels: int = imaging.DEFAULT_MAX_PIXELS,
        fft_threads: int = 1,
        wisdom_path: str | os.PathLike | None = None,
    ) -> None:
        self.model = model
        self.max_pixels = max_pixels
        self.profiler = SpectralProfiler.from_spec(
            model.profiler.spec(), fft_threads=fft_threads, wisdom_path=wisdom_path
        )

    @classmethod
    def from_directory(cls, directory: str | os.PathLike, **kwargs: Any) -> Engine:
        return cls(load_model(directory), **kwargs)

    def load_path(self, path: str | os.PathLike) -> LoadedImage:
        return imaging.load_image(path, max_pixels=self.max_pixels)

    def load_bytes(self, data: bytes, *, kind: str | None = None, name: str = "<bytes>") -> LoadedImage:
        return imaging.load_bytes(data, kind=kind, name=name, max_pixels=self.max_pixels)

    def load_array(self, array: np.ndarray, *, name: str = "<array>") -> LoadedImage:
        return imaging.from_array(array, name=name, max_pixels=self.max_pixels)

    def score_loaded(
        self, image: LoadedImage, classifier_score: float | None = None, decode_seconds: float = 0.0
    ) -> ScoredImage:
        """Profile and score one decoded image."""
        t0 = time.perf_counter()
        profile = self.profiler.profile_image(image)
        timings = {"decode": decode_seconds, "profile": time.perf_counter() - t0}
        return self.score_profile(profile, image.meta, classifier_score, timings)

    def score_profile(
        self,
        profile: np.ndarray,
        meta: ImageMeta,
        classifier_score: float | None = None,
        timings: dict[str, float] | None = None,
    ) -> ScoredImage:
        """Score a profile computed elsewhere (e.g. in a worker process) with this model's spec.

        Parameters
        ----------
        profile : ndarray of shape (n_features,)
        timings : seconds already spent (``decode``, ``profile``); ``score`` is added.
        """
        t0 = time.perf_counter()
        row = np.asarray(profile, dtype=np.float64)[None, :]
        scores = None if classifier_score is None else np.array([classifier_score], dtype=np.float64)
        result = self.model.score(row, scores)[0]
        z = self.model.standardise(row)[0]
        spent = {"decode": 0.0, "profile": 0.0, **(timings or {})}
        return ScoredImage(
            result=result,
            meta=meta,
            z_profile=z,
            timings={**spent, "score": time.perf_counter() - t0},
        )

    def score_path(self, path: str | os.PathLike, classifier_score: float | None = None) -> ScoredImage:
        t0 = time.perf_counter()
        image = self.load_path(Path(path))
        return self.score_loaded(image, classifier_score, time.perf_counter() - t0)

    def score_bytes(
        self,
        data: bytes,
        *,
        kind: str | None = None,
        name: str = "<bytes>",
        classifier_score: float | None = None,
    ) -> ScoredImage:
        t0 = time.perf_counter()
        image = self.load_bytes(data, kind=kind, name=name)
        return self.score_loaded(image, classifier_score, time.perf_counter() - t0)

    def score_array(
        self, array: np.ndarray, *, name: str = "<array>", classifier_score: float | None = None
    ) -> ScoredImage:
        t0 = time.perf_counter()
        image = self.load_array(array, name=name)
        return self.score_loaded(image, classifier_score, time.perf_counter() - t0)

    def new_window(
        self, max_images: int | None = None, max_age_seconds: float | None = None
    ) -> SlidingWindow:
        """A sliding drift window sized for this model."""
        return SlidingWindow(
            self.model.n_clusters, len(self.model.feature_names), max_images, max_age_seconds
        )

    def window_drift(self, window: SlidingWindow, now: float | None = None) -> DriftReport:
        """Drift report of a sliding window at time ``now`` (monotonic seconds)."""
        return self.model.drift(window.stats(time.monotonic() if now is None else now))

    def batch_drift(self, scored: list[ScoredImage]) -> DriftReport:
        """Drift report of a batch of scored images."""
        window = self.model.new_window()
        for s in scored:
            window.add(s.result.cluster, s.result.is_novel, s.result.cluster_failure_probability, s.z_profile)
        return self.model.drift(window)
