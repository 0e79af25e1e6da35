"""What the project knows about the paper's tasks: default scorer and a one-line expert description.

The description feeds the MLLM router's lettered expert pool. Task names not listed here get
:data:`DEFAULT_SCORER` and a generic description (see :func:`task_info`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskInfo:
    name: str
    scorer: str
    description: str


#: Scorer for task names the paper does not define: case-insensitive "reference occurs in prediction".
DEFAULT_SCORER = "contains"

PAPER_TASKS: dict[str, TaskInfo] = {
    t.name: t
    for t in [
        TaskInfo("RS", "rs", "remote sensing: aerial and satellite images of land, roads, buildings and water"),
        TaskInfo("Med", "med", "medicine: pathology slides and medical images"),
        TaskInfo("AD", "ad", "autonomous driving: six tiled camera views around a car, traffic and objects"),
        TaskInfo("Sci", "sci", "science: diagrams, maps and textbook figures with multiple-choice questions"),
        TaskInfo("Fin", "fin", "finance: stock candlestick charts and price trends"),
        TaskInfo("OCR", "ocr", "optical character recognition: reading text rendered in images"),
        TaskInfo("Math", "math", "math and logic: solving expressions and problems shown in images"),
        TaskInfo("VP", "count", "visual perception: counting objects in images"),
        TaskInfo("GUI", "gui", "GUI agent: screenshots of apps, choosing the element or action by letter"),
    ]
}


def task_info(name: str) -> TaskInfo:
    """Info for a paper task, or a generic entry (default scorer) for any other name."""
    if name in PAPER_TASKS:
        return PAPER_TASKS[name]
    return TaskInfo(name, DEFAULT_SCORER, f"{name}: questions about images of the {name} task")
