"""Protobuf package ``cl``."""
