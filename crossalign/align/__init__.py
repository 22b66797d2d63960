"""Align: the cross-modal mapper, its loss, training on cached features, and retrieval evaluation."""

from crossalign.align.fit import FitSummary, evaluate_current_mapper, fit_mapper
from crossalign.align.mapper import JointMapper, MapperMismatchError
from crossalign.align.mapper_dir import MapperDir, current_mapper, load_mapper, save_mapper
from crossalign.align.metrics import metrics_table, retrieval_metrics
from crossalign.align.reuse import MapperChoice, choose_mapper

__all__ = [
    "FitSummary",
    "JointMapper",
    "MapperChoice",
    "MapperDir",
    "MapperMismatchError",
    "choose_mapper",
    "current_mapper",
    "evaluate_current_mapper",
    "fit_mapper",
    "load_mapper",
    "metrics_table",
    "retrieval_metrics",
    "save_mapper",
]
