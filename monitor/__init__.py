"""cxr-spectral-monitor: spectral reliability monitoring for chest X-ray classifiers."""

__version__ = "0.1.0"
