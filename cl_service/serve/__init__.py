"""Serving a finished run over gRPC (plain grpc; Ray Serve wraps :mod:`cl_service.serve.service`)."""
