"""Routers map a request (image + question) to an expert id. ``ROUTERS`` holds the kinds."""

from cl_service.routers.base import ROUTERS, Route, Router

__all__ = ["ROUTERS", "Route", "Router"]
