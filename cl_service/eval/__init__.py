"""Evaluation: per-task scorers (the MLLM-CL rules), CL metrics over the accuracy matrix, reports."""

from cl_service.eval.metrics import CLMetrics, compute_cl_metrics, router_accuracy, router_accuracy_per_task
from cl_service.eval.scorers import SCORERS, Scorer, score_predictions

__all__ = [
    "SCORERS",
    "CLMetrics",
    "Scorer",
    "compute_cl_metrics",
    "router_accuracy",
    "router_accuracy_per_task",
    "score_predictions",
]
