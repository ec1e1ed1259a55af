"""The gRPC sidecar: ``build_server(settings, engine) -> (server, port)``.

Importing this package is free: grpc is imported only when :func:`build_server` or
:class:`MonitorServer` is first used, so ``cxr-monitor fit`` never pays for it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MonitorServer", "build_server"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import service

        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
