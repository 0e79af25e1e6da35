"""Unit tier: Ray is blocked, so the library is proven to work without it."""

import importlib.abc
import sys

import pytest


class _BlockRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"unit tests must not import Ray (tried {name!r}); put the test in tests/ray")
        return None


@pytest.fixture(autouse=True)
def _no_ray():
    finder = _BlockRay()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
