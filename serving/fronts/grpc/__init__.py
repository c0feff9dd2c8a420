"""The gRPC front: the Open Inference Protocol's gRPC API, grpc.health.v1 and server reflection.

``server.GrpcFront`` is one worker's server (started by the gunicorn hooks after fork);
``calls.GrpcCalls`` serves each call over the same request state, gate, data plane, errors,
metrics and access log as the HTTP fronts.
"""
