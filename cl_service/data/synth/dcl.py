"""``dcl-mini``: a procedural stand-in for the paper's domain continual-learning stream (DCL).

Five domains in the paper's order, each with its own look and 3-4 question types that mix answer
formats (yes/no, small numbers, letters, words), so that sequential fine-tuning interferes through
the shared answer vocabulary and a collapsed answer format is visibly different from lost skill:

| task | look | question types → answers |
|---|---|---|
| RS | aerial farmland/forest/desert/grass, water, roads, roofs | water? yes/no · buildings 0-4 · land cover (4 words) |
| Med | stained tissue and cell smears (pink/purple/brown/blue) | abnormal? yes/no · stain (4 words) · cells 1-5 |
| AD | six 32×32 camera views tiled 2×3 (96×64) | red light? yes/no · cars 0-4 · pedestrian's view 1-6 |
| Sci | framed diagrams, blue choropleth maps on white | shape A-D · panel A-D · MapQA states "A, C" · MapQA yes/no |
| Fin | candlesticks on a dark trading panel | rise? yes/no · highest close A-D · up days 0-5 |

Sci items carry ``metadata["source"]`` (``AI2D``, ``TQA``, ``MapQA``) for the Sci scorer's MapQA rule.

Train and test come from the same distribution (``iid=True``); the split only changes the seed.
"""

from __future__ import annotations

from cl_service.data.synth._common import paper_task
from cl_service.data.synth._dcl_charts import FIN_TYPES, SCI_TYPES
from cl_service.data.synth._dcl_scenes import AD_TYPES, MED_TYPES, RS_TYPES
from cl_service.data.synth.base import BENCHMARKS, BenchmarkSpec

DCL_MINI = BenchmarkSpec(
    name="dcl-mini",
    tasks=(
        paper_task("RS", RS_TYPES),
        paper_task("Med", MED_TYPES),
        paper_task("AD", AD_TYPES),
        paper_task("Sci", SCI_TYPES),
        paper_task("Fin", FIN_TYPES),
    ),
    iid=True,
    summary="domain stream RS → Med → AD → Sci → Fin: aerial, pathology, driving, diagrams, candlesticks",
)
BENCHMARKS.register(DCL_MINI.name, DCL_MINI)
