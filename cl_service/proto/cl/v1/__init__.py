"""Protobuf package ``cl.v1``: ``cl.proto`` and its generated stubs ``cl_pb2``, ``cl_pb2_grpc``."""
