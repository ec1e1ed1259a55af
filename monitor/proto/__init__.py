"""Code generated from protos/cxr_monitor/v1/monitor.proto (see monitor.codegen)."""

from . import monitor_pb2, monitor_pb2_grpc

__all__ = ["monitor_pb2", "monitor_pb2_grpc"]
