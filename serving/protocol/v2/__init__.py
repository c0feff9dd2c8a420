"""The Open Inference Protocol (KServe v2): ``codec`` (wire format, usable on its own),
``tensors`` (binding tensors to a served model) and ``routes`` (the handlers
``serving.protocol.endpoints`` routes to)."""
