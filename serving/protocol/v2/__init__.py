"""The Open Inference Protocol (KServe v2): ``routes`` (the blueprint), ``codec`` (wire format), ``tensors``."""

from serving.protocol.v2.routes import v2

__all__ = ["v2"]
