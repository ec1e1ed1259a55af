"""cxr-spectral-monitor: spectral reliability monitoring for chest X-ray classifiers."""

import sys

__version__ = "0.1.0"

# pyFFTW's package import pulls in dask.array (0.8 s) whenever dask is installed, for a
# dask_fft interface this package never uses; dask is here only for --scheduler. Hide
# dask.array.fft while pyfftw imports, so the core, every worker process and the server
# start as fast as without dask.
if "pyfftw" not in sys.modules and "dask.array.fft" not in sys.modules:
    sys.modules["dask.array.fft"] = None  # type: ignore[assignment]
    try:
        import pyfftw  # noqa: F401
    finally:
        del sys.modules["dask.array.fft"]
