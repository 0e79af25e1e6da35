"""Built-in benchmarks. Importing this package registers ``dcl-mini``, ``acl-mini``, ``acl-glyphs`` and the
procedural ``proc-N`` streams (N = 5, 10, 20, 50, 100)."""

from cl_service.data.synth.base import BENCHMARKS, BenchmarkSpec, TaskSpec
from cl_service.data.synth import dcl as _dcl  # noqa: F401  (registers dcl-mini)
from cl_service.data.synth import acl as _acl  # noqa: F401  (registers acl-mini)
from cl_service.data.synth import acl_glyphs as _acl_glyphs  # noqa: F401  (registers acl-glyphs)

__all__ = ["BENCHMARKS", "BenchmarkSpec", "TaskSpec"]
from cl_service.data.synth import generic as _generic  # noqa: F401  (registers generic-captions)
from cl_service.data.synth import proc as _proc  # noqa: F401  (registers proc-5 .. proc-100)
