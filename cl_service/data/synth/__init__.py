"""Built-in benchmarks. Importing this package registers ``dcl-mini``, ``acl-mini`` and ``acl-glyphs``."""

from cl_service.data.synth.base import BENCHMARKS, BenchmarkSpec, TaskSpec
from cl_service.data.synth import dcl as _dcl  # noqa: F401  (registers dcl-mini)
from cl_service.data.synth import acl as _acl  # noqa: F401  (registers acl-mini)
from cl_service.data.synth import acl_glyphs as _acl_glyphs  # noqa: F401  (registers acl-glyphs)

__all__ = ["BENCHMARKS", "BenchmarkSpec", "TaskSpec"]
from cl_service.data.synth import generic as _generic  # noqa: F401  (registers generic-captions)
