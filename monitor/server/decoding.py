"""Optional decoding and profiling of encoded images in worker processes (``--decode-processes N``).

Some decoders hold the GIL for the whole decode: pylibjpeg-openjpeg (JPEG 2000
DICOM) lets another Python thread run about 10% of the time, so scoring threads
cannot overlap those decodes (benchmarks/results/server.md). Decoding in processes
overlaps them, and a decoder that crashes on a hostile file takes down a child
process, not the server: the pool is rebuilt and the request fails with INTERNAL.
The child also computes the spectral profile, so only 31 numbers and the image
header travel back, not an image-sized array.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from .. import imaging
from ..errors import MonitorError
from ..spectrum import SpectralProfiler
from ..types import ImageMeta

__all__ = ["DecodePool", "DecoderCrashedError"]

log = logging.getLogger("cxr_monitor.server")


class DecoderCrashedError(MonitorError):
    """A decoder process died while decoding (twice: once on a fresh pool)."""

    code = "internal"


def _init_child() -> None:
    # Ctrl-C reaches the whole process group; the parent decides when children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # As in the parent (cli.main): parallelism is across images, so one BLAS thread per
    # process; with two, the children's small resampling products contended for the 2 cores.
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)


_PROFILERS: dict[tuple[int, int], SpectralProfiler] = {}


def _decode_and_profile(
    data: bytes, kind: str | None, name: str, max_pixels: int, working_size: int, n_bands: int
) -> tuple[np.ndarray, ImageMeta, float, float]:
    t0 = time.perf_counter()
    image = imaging.load_bytes(data, kind=kind, name=name, max_pixels=max_pixels)
    t1 = time.perf_counter()
    profiler = _PROFILERS.get((working_size, n_bands))
    if profiler is None:
        profiler = _PROFILERS[(working_size, n_bands)] = SpectralProfiler(working_size, n_bands)
    profile = profiler.profile(image.pixels)
    return profile, image.meta, t1 - t0, time.perf_counter() - t1


def _ready() -> bool:
    return True


class DecodePool:
    """``processes`` spawned decoder processes (spawn, not fork: the parent runs grpc threads)."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._lock = threading.Lock()
        self._pool = self._new()

    def _new(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.processes, mp_context=multiprocessing.get_context("spawn"), initializer=_init_child
        )

    def warm_up(self) -> None:
        """Start every process and import the decoders before the first request."""
        for future in [self._pool.submit(_ready) for _ in range(self.processes)]:
            future.result()

    def profile_bytes(
        self, data: bytes, *, kind: str | None, name: str, max_pixels: int, profiler: SpectralProfiler
    ) -> tuple[np.ndarray, ImageMeta, float, float]:
        """Decode and profile in a child process: (profile, header, decode s, profile s).

        Errors are those of :func:`monitor.imaging.load_bytes` and
        :meth:`monitor.spectrum.SpectralProfiler.profile`.
        """
        args = (data, kind, name, max_pixels, profiler.working_size, profiler.n_bands)
        for attempt in (1, 2):
            pool = self._pool
            try:
                return pool.submit(_decode_and_profile, *args).result()
            except BrokenProcessPool:
                log.error(
                    "a decoder process died; starting a new pool", extra={"image": name, "attempt": attempt}
                )
                with self._lock:
                    if self._pool is pool:
                        self._pool = self._new()
                pool.shutdown(wait=False, cancel_futures=True)
        raise DecoderCrashedError(
            f"{name}: the image decoder process died twice on this image (a decoder crash: the file may be "
            "malformed or hostile); the server goes on"
        )

    def pids(self) -> list[int]:
        """Process ids of the current children (for tests and diagnostics)."""
        return [p.pid for p in list(self._pool._processes.values())]  # noqa: SLF001

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
