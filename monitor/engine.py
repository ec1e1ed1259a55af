"""The one object the server and the CLI call: load → profile → score, and drift windows.

:meth:`Engine.score` is the whole per-image path: it takes encoded bytes, a file path,
a pixel array or a decoded image and returns the scored image, decoding in the calling
thread or in decoder processes (:class:`~monitor.decoding.DecodePool`) as configured.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import imaging
from .artifact import load_model
from .decoding import DecodePool
from .defaults import DEFAULT_DECODE_TIMEOUT, DEFAULT_MAX_PIXELS
from .drift import SlidingWindow
from .errors import DeadlineExceededError
from .model import ReliabilityModel
from .scope import ScopeRules
from .spectrum import SpectralProfiler
from .types import DriftReport, ImageMeta, LoadedImage, ScoredImage

__all__ = ["BYTES_PER_PIXEL", "Engine", "Source", "encoded_memory_cost"]

BYTES_PER_PIXEL = 12
"""Peak bytes per pixel of decoding and profiling one image (measured 7-10, see memory_estimate)."""

Source = bytes | bytearray | memoryview | str | os.PathLike | np.ndarray | LoadedImage


class Engine:
    """Score images with a fitted :class:`~monitor.model.ReliabilityModel`.

    Thread-safe for scoring: the model is read-only, FFT plans are per thread and the
    decoder pool hands images to its processes in arrival order.

    Parameters
    ----------
    model : ReliabilityModel
    max_pixels : int
        Largest image accepted (checked from the header before decoding).
    fft_threads : int
        FFTW threads per transform.
    wisdom_path : path, optional
        FFTW wisdom file, read before the first plan and updated when planning learnt more.
    decode_processes : int, default=0
        Processes that decode and profile encoded images (0: in the calling thread). Arrays
        and decoded images are always profiled in the calling thread.
    decode_timeout : float, default=60
        Seconds a decoder process may spend on one image before it is killed and replaced.
    decoder_setup : callable, optional
        Run once in each decoder process first (see :class:`~monitor.decoding.DecodePool`);
        the server passes its logging set-up.
    scope_overrides : mapping, optional
        Allow-lists replacing the model's, by :class:`ScopeRules` field (``modalities``,
        ``body_parts``, ``view_positions``), each as text such as ``"CR,DX"`` or ``"*"``.
    """

    def __init__(
        self,
        model: ReliabilityModel,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        fft_threads: int = 1,
        wisdom_path: str | os.PathLike | None = None,
        decode_processes: int = 0,
        decode_timeout: float = DEFAULT_DECODE_TIMEOUT,
        decoder_setup: Callable[[], None] | None = None,
        scope_overrides: Mapping[str, str] | None = None,
    ) -> None:
        self.model = model
        self.max_pixels = max_pixels
        self.decode_timeout = decode_timeout
        self.scope: ScopeRules = model.scope.with_overrides(**(scope_overrides or {}))
        self._profiler = SpectralProfiler.from_spec(
            model.profiler.spec(), fft_threads=fft_threads, wisdom_path=wisdom_path
        )
        self._decoders = DecodePool(decode_processes, setup=decoder_setup) if decode_processes else None

    @classmethod
    def from_directory(cls, directory: str | os.PathLike, **kwargs: Any) -> Engine:
        return cls(load_model(directory), **kwargs)

    @property
    def decode_processes(self) -> int:
        return 0 if self._decoders is None else self._decoders.processes

    @property
    def stuck_decoder_kills(self) -> int:
        """Decoder processes killed because they were stuck past ``decode_timeout``."""
        return 0 if self._decoders is None else self._decoders.stuck_kills

    def decoder_pids(self) -> list[int | None]:
        """Process ids of the decoder processes (diagnostics and tests; empty without any)."""
        return [] if self._decoders is None else self._decoders.pids()

    # ------------------------------------------------------------------ lifecycle
    def warm_up(self) -> None:
        """Build this thread's FFT plans and start the decoder processes' imports.

        Call it once in each thread that will score, before the first request, so that
        planning does not add to a request's latency.
        """
        n = self._profiler.working_size
        self._profiler.profile(np.random.default_rng(0).random((n, n), dtype=np.float32))
        if self._decoders is not None:
            self._decoders.warm_up()

    def close(self) -> None:
        """Stop the decoder processes (call once no thread is scoring)."""
        if self._decoders is not None:
            self._decoders.shutdown()

    # ------------------------------------------------------------------ the per-image path
    def load(self, source: Source, *, kind: str | None = None, name: str | None = None) -> LoadedImage:
        """Decode ``source`` (bytes, path, array or an already decoded image) in this thread."""
        if isinstance(source, LoadedImage):
            return source
        if isinstance(source, np.ndarray):
            return imaging.from_array(source, name=name or "<array>", max_pixels=self.max_pixels)
        if isinstance(source, (bytes, bytearray, memoryview)):
            return imaging.load_bytes(
                bytes(source), kind=kind, name=name or "<bytes>", max_pixels=self.max_pixels
            )
        return imaging.load_image(Path(source), max_pixels=self.max_pixels)

    def score(
        self,
        source: Source,
        *,
        kind: str | None = None,
        name: str | None = None,
        classifier_score: float | None = None,
        deadline: float | None = None,
    ) -> ScoredImage:
        """Decode, profile and score one image.

        Parameters
        ----------
        source : bytes, path, ndarray or LoadedImage
            Encoded file contents, a file path, a pixel array of shape (rows, columns), or a
            decoded image. Encoded bytes go to a decoder process when there are any.
        kind : {None, "dicom", "png", "jpeg", "webp", "tiff"}
            Format of encoded bytes (``None``: sniffed).
        name : str, optional
            Names the image in errors and metadata (a path names itself).
        classifier_score : float, optional
            The classifier's probability, calibrated within the image's cluster.
        deadline : float, optional
            A ``time.monotonic()`` instant: the work is not started, or no longer waited
            for, after it.

        Raises
        ------
        InvalidInputError, ImageTooLargeError, ...
            What :mod:`monitor.imaging` raises for a bad image.
        DeadlineExceededError, DecodeTimeoutError, DecoderCrashedError
            Deadline passed; a decoder process was stuck or crashed twice on the image.
        """
        _check_deadline(deadline, name, "decoding")
        if self._decoders is not None and not isinstance(source, (np.ndarray, LoadedImage)):
            if not isinstance(source, (bytes, bytearray, memoryview)):
                path = Path(source)
                name = name or str(path)
                source = imaging.read_file(path)
            profile, meta, decode, prof = self._decoders.profile_bytes(
                bytes(source),
                kind=kind,
                name=name or "<bytes>",
                max_pixels=self.max_pixels,
                profiler=self._profiler,
                timeout=self.decode_timeout,
                deadline=deadline,
            )
            return self.score_profile(profile, meta, classifier_score, {"decode": decode, "profile": prof})
        t0 = time.perf_counter()
        image = self.load(source, kind=kind, name=name)
        decode = time.perf_counter() - t0
        _check_deadline(deadline, name or image.meta.source, "the spectral profile")
        t0 = time.perf_counter()
        profile = self._profiler.profile_image(image)
        timings = {"decode": decode, "profile": time.perf_counter() - t0}
        return self.score_profile(profile, image.meta, classifier_score, timings)

    def memory_estimate(self, source: Source, *, kind: str | None = None) -> tuple[int, int]:
        """(held, decode): bytes ``source`` holds while it waits, and adds while it is decoded and
        profiled, estimated from its header alone.

        Measured peak of a decode and profile (tracemalloc plus Pillow's own buffer) is 7-10
        bytes per pixel for 8- and 16-bit images of 1-16 Mpixel; :data:`BYTES_PER_PIXEL` (12)
        keeps a margin. Encoded bytes count twice (the request message and the copy handed to
        the decoder). An unreadable header costs its bytes only: the decoder refuses it without
        decoding. A path costs nothing here (its size is not known without reading it).
        """
        if isinstance(source, LoadedImage):
            return source.pixels.nbytes, source.pixels.size * BYTES_PER_PIXEL
        if isinstance(source, np.ndarray):
            return source.nbytes, source.size * BYTES_PER_PIXEL
        if not isinstance(source, (bytes, bytearray, memoryview)):
            return 0, 0
        size = imaging.peek_size(bytes(source), kind)
        if size is None:
            return 2 * len(source), 0
        return encoded_memory_cost(len(source), *size)

    def profile(self, source: Source, *, kind: str | None = None, name: str | None = None) -> np.ndarray:
        """The profile of one image, shape (n_features,), in the order of :attr:`feature_names`."""
        return self._profiler.profile_image(self.load(source, kind=kind, name=name))

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._profiler.feature_names

    def score_profile(
        self,
        profile: np.ndarray,
        meta: ImageMeta,
        classifier_score: float | None = None,
        timings: dict[str, float] | None = None,
    ) -> ScoredImage:
        """Score a profile computed elsewhere (e.g. in a worker process) with this model's spec.

        ``meta`` is checked against the scope (header allow-lists) first: an image whose header
        says it is not a chest radiograph is scored but not trusted.

        Parameters
        ----------
        profile : ndarray of shape (n_features,)
        timings : seconds already spent (``decode``, ``profile``); ``score`` is added.
        """
        t0 = time.perf_counter()
        row = np.asarray(profile, dtype=np.float64)[None, :]
        scores = None if classifier_score is None else np.array([classifier_score], dtype=np.float64)
        result = self.model.score(row, scores, scope_reasons=[self.scope.check(meta)])[0]
        z = self.model.standardise(row)[0]
        spent = {"decode": 0.0, "profile": 0.0, **(timings or {})}
        return ScoredImage(
            result=result,
            meta=meta,
            z_profile=z,
            timings={**spent, "score": time.perf_counter() - t0},
            profile=row[0],
        )

    # ------------------------------------------------------------------ drift
    def new_window(
        self, max_images: int | None = None, max_age_seconds: float | None = None
    ) -> SlidingWindow:
        """A sliding drift window sized for this model."""
        return SlidingWindow(
            self.model.n_clusters, len(self.model.feature_names), max_images, max_age_seconds,
            ranks=self.model.drift_ranks,
        )  # fmt: skip

    def window_drift(self, window: SlidingWindow, now: float | None = None) -> DriftReport:
        """Drift report of a sliding window at time ``now`` (monotonic seconds)."""
        return self.model.drift(window.stats(time.monotonic() if now is None else now))

    def batch_drift(self, scored: list[ScoredImage]) -> DriftReport:
        """Drift report of a batch of scored images."""
        window = self.model.new_window()
        for s in scored:
            r = s.result
            window.add(r.cluster, r.is_novel, r.cluster_failure_probability, s.z_profile, r.scope_field)
        return self.model.drift(window)


def _check_deadline(deadline: float | None, name: str | None, step: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceededError(f"{name or 'image'}: deadline exceeded before {step}")


def encoded_memory_cost(n_bytes: int, rows: int, columns: int, samples: int = 1) -> tuple[int, int]:
    """(held, decode) bytes of an encoded image of ``n_bytes`` whose header announces
    ``rows`` x ``columns`` x ``samples`` (see :meth:`Engine.memory_estimate`)."""
    # Colour channels add the decoder's buffer and an array per channel before the grey check.
    return 2 * n_bytes, rows * columns * (BYTES_PER_PIXEL + 2 * (samples - 1))
