"""Fine-tuning metrics: accuracy and macro-F1 of classes; entity-level precision/recall/F1 of BIO tags.

Entities are read from BIO tags as seqeval does by default (and CoNLL's conlleval): an entity
starts at ``B-X``, or at an ``I-X`` that does not continue an entity of type X, and runs over
the ``I-X`` that follow. A predicted entity counts as correct only when its type, start and end
all match a true one. Written here (some 20 lines) rather than adding seqeval as a dependency.
Undefined ratios (no predicted entity, a class never predicted) count as 0, as scikit-learn's
``zero_division=0``.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _f1(precision: float, recall: float) -> float:
    return _ratio(2 * precision * recall, precision + recall)


def classification_scores(gold: Sequence, pred: Sequence) -> dict:
    """``{"accuracy", "macro_f1"}``; macro-F1 averages the F1 of every class in ``gold`` or ``pred``."""
    if len(gold) != len(pred):
        raise ValueError(f"gold and pred must have the same length, got {len(gold)} and {len(pred)}")
    if not gold:
        raise ValueError("classification_scores needs at least one example")
    tp, n_gold, n_pred = Counter(), Counter(gold), Counter(pred)
    for g, p in zip(gold, pred):
        tp[g] += g == p
    classes = set(n_gold) | set(n_pred)
    f1s = [_f1(_ratio(tp[c], n_pred[c]), _ratio(tp[c], n_gold[c])) for c in classes]
    return {"accuracy": sum(tp.values()) / len(gold), "macro_f1": sum(f1s) / len(f1s)}


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The (type, start, end exclusive) entities of one BIO tag sequence."""
    found, kind, start = set(), None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, name = tag.partition("-")
        if kind is not None and not (prefix == "I" and name == kind):  # the open entity ends before i
            found.add((kind, start, i))
            kind = None
        if prefix in ("B", "I") and kind is None:
            kind, start = name, i
    return found


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """``{"precision", "recall", "f1", "n_gold", "n_pred"}`` over the entities of all sequences (micro)."""
    if len(gold) != len(pred) or any(len(g) != len(p) for g, p in zip(gold, pred)):
        raise ValueError("gold and pred must hold the same number of sequences, each of the same length")
    correct = n_gold = n_pred = 0
    for g, p in zip(gold, pred):
        true, guessed = entities(g), entities(p)
        correct, n_gold, n_pred = correct + len(true & guessed), n_gold + len(true), n_pred + len(guessed)
    precision, recall = _ratio(correct, n_pred), _ratio(correct, n_gold)
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall), "n_gold": n_gold, "n_pred": n_pred}


def task_scores(kind: str, gold: Sequence, pred: Sequence) -> dict:
    """The metrics of a task kind: classification_scores for "sequence", entity_scores for "tokens"."""
    return classification_scores(gold, pred) if kind == "sequence" else entity_scores(gold, pred)


PRIMARY = {"sequence": "macro_f1", "tokens": "f1"}  # the validation metric early stopping follows
