"""VideoQA accuracy metrics (open-ended, multiple choice, multi-view averaging, majority baseline).

All accuracies are percentages. Open-ended answers outside the answer vocabulary (index -1) are always
WRONG and always stay in the denominator, so numbers are comparable with papers that score on the full
test set (clover-reference.md §5.2). Prediction is argmax: an exact tie goes to the lowest index.
"""
from __future__ import annotations

import collections
from typing import Any, Dict, Hashable, Sequence, Union

import numpy as np

OUT_OF_VOCAB = -1


def _check_scores(name: str, scores: np.ndarray, ndim: int) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != ndim or scores.shape[0] == 0 or scores.shape[-1] == 0:
        raise ValueError(f"{name} must be a non-empty {ndim}-d array, got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.number) or not np.all(np.isfinite(scores)):
        raise ValueError(f"{name} must be finite numbers (dtype {scores.dtype}): NaN/inf would make "
                         "argmax meaningless")
    return scores


def _check_labels(answer_index: np.ndarray, n: int, low: int, high: int, what: str) -> np.ndarray:
    """`answer_index` as an int array of shape (n,) with values in [low, high), or a ValueError."""
    answer_index = np.asarray(answer_index)
    if answer_index.shape != (n,) or not np.issubdtype(answer_index.dtype, np.integer):
        raise ValueError(f"answer_index must be an int array of shape ({n},), got "
                         f"{answer_index.dtype} {answer_index.shape}")
    if np.any((answer_index < low) | (answer_index >= high)):
        raise ValueError(f"answer_index must be in {what}; got min {answer_index.min()} max {answer_index.max()}")
    return answer_index


def open_ended_accuracy(logits: np.ndarray, answer_index: np.ndarray) -> Dict[str, Any]:
    """Accuracy of argmax(logits) against answer_index; -1 marks an answer outside the vocabulary.

    Args:
      logits: (N, C) class scores over the C-answer vocabulary.
      answer_index: (N,) int in [0, C) or -1 (out of vocabulary: counted wrong, kept in the denominator).

    Returns dict(accuracy=percent over all N, num=N, num_out_of_vocab=count of -1).
    """
    logits = _check_scores("logits", logits, ndim=2)
    n, num_classes = logits.shape
    answer_index = _check_labels(answer_index, n, OUT_OF_VOCAB, num_classes,
                                 f"[0, {num_classes}) or {OUT_OF_VOCAB} for out-of-vocab")
    in_vocab = answer_index != OUT_OF_VOCAB
    correct = in_vocab & (np.argmax(logits, axis=1) == answer_index)
    return {"accuracy": float(100.0 * np.mean(correct)), "num": int(n),
            "num_out_of_vocab": int(np.count_nonzero(~in_vocab))}


def multiple_choice_qa_accuracy(scores: np.ndarray, answer_index: np.ndarray) -> float:
    """Percent of questions whose highest-scoring option (of K) is the answer; answer_index in [0, K)."""
    scores = _check_scores("scores", scores, ndim=2)
    n, k = scores.shape
    answer_index = _check_labels(answer_index, n, 0, k, f"[0, {k})")
    return float(100.0 * np.mean(np.argmax(scores, axis=1) == answer_index))


def average_views(scores: Union[Sequence[np.ndarray], np.ndarray]) -> np.ndarray:
    """Mean over V test views of per-view scores: list of (N, K) or array (V, N, K) -> (N, K).

    For TGIF multi-view testing. The reference averages the Swin features of the 4 views inside the model
    (§5.2); this is the score-level average for when views are scored separately.
    """
    if isinstance(scores, np.ndarray):
        stacked = scores
    else:
        views = [np.asarray(s) for s in scores]
        if not views:
            raise ValueError("average_views needs at least one view")
        shapes = {v.shape for v in views}
        if len(shapes) != 1:
            raise ValueError(f"all views must have the same (N, K) shape, got {sorted(shapes)}")
        stacked = np.stack(views)
    stacked = _check_scores("scores", stacked, ndim=3)
    return stacked.astype(np.promote_types(stacked.dtype, np.float32)).mean(axis=0)


def majority_baseline(train_answers: Sequence[Hashable], test_answers: Sequence[Hashable]
                      ) -> Dict[str, Any]:
    """Accuracy of always predicting the most frequent training answer.

    Answers are compared as given (strings or ids). A test answer never seen in training can never
    match, so out-of-vocab test answers count as wrong and stay in the denominator. Among equally
    frequent training answers the one seen first wins.
    Returns dict(accuracy=percent, answer=the predicted answer, num=len(test_answers)).
    """
    if len(train_answers) == 0 or len(test_answers) == 0:
        raise ValueError(f"majority_baseline needs non-empty answers, got {len(train_answers)} train and "
                         f"{len(test_answers)} test")
    majority, _ = collections.Counter(train_answers).most_common(1)[0]
    hits = sum(1 for a in test_answers if a == majority)
    return {"accuracy": 100.0 * hits / len(test_answers), "answer": majority, "num": len(test_answers)}
