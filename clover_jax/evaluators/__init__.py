"""Evaluation: metrics on numpy arrays (retrieval, VideoQA), the HTML report; evaluator types in `entries`."""
from clover_jax.evaluators.qa_metrics import (
           average_views,
           majority_baseline,
           multiple_choice_qa_accuracy,
           open_ended_accuracy,
)
from clover_jax.evaluators.report import write_retrieval_report
from clover_jax.evaluators.retrieval import multiple_choice_accuracy, retrieval_metrics, top_k

__all__ = ["average_views", "majority_baseline", "multiple_choice_qa_accuracy", "open_ended_accuracy",
           "write_retrieval_report", "multiple_choice_accuracy", "retrieval_metrics", "top_k"]
