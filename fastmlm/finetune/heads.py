"""Task heads on the fastmlm encoder: sequence classification and token classification.

    input_ids (B, S) + attention_mask ─► encoder ─┬─► pooler([CLS]) (B, H) ─► dropout ─► linear ─► (B, C)
                                                  └─► hidden states (B, S, H) ─► dropout ─► linear ─► (B, S, C)

The same layout as transformers' ``BertForSequenceClassification`` (pooler, dropout, linear)
and ``BertForTokenClassification`` (no pooler), so fastmlm.hf.save_hf_classifier writes folders
those classes load and that give the same logits. The encoder is a FastMLMForMaskedLM whose
MLM head is removed (a classifier never uses it, and a transformers classifier has none).

A fine-tuned model's folder is the encoder's (config.json, model.safetensors, manifest.json,
fastmlm.checkpoint.save_model_folder) plus ``task.json``: ``{"kind", "labels", "classifier_dropout"}``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import checkpoint
from ..data import IGNORE_INDEX
from ..model import FastMLMForMaskedLM, Pooler

TASK_FILE = "task.json"
KINDS = ("sequence", "tokens")  # sequence classification, token classification


@dataclass
class ClassifierOutput:
    """loss: fp32 0-d mean cross-entropy (None without labels); logits: fp32 (B, C) or (B, S, C)."""

    loss: Optional[Tensor]
    logits: Tensor


def check_labels(labels) -> list[str]:
    """The label names as a list; ValueError unless they are 2 or more distinct non-empty strings."""
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise ValueError(f"labels must be a list of label names, got {type(labels).__name__}")
    labels = list(labels)
    if len(labels) < 2 or len(set(labels)) != len(labels) or not all(isinstance(x, str) and x for x in labels):
        raise ValueError(f"labels must be 2 or more distinct non-empty strings, got {labels!r}")
    return labels


class TaskModel(nn.Module):
    """The shared part of both heads: the encoder without its MLM head, dropout, a linear classifier."""

    kind = ""

    def __init__(self, encoder: FastMLMForMaskedLM, labels: Sequence[str], classifier_dropout: Optional[float] = None):
        super().__init__()
        if not isinstance(encoder, FastMLMForMaskedLM):
            raise ValueError(f"encoder must be a FastMLMForMaskedLM, got {type(encoder).__name__}")
        self.labels = check_labels(labels)
        cfg = encoder.config
        dropout = cfg.hidden_dropout if classifier_dropout is None else classifier_dropout
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"classifier_dropout must be in [0, 1), got {classifier_dropout!r}")
        self.classifier_dropout = float(dropout)
        encoder.head = None  # the MLM head: unused by a classifier (and absent from transformers' classifiers)
        self.encoder, self.config = encoder, cfg
        self.dropout = nn.Dropout(self.classifier_dropout)
        self.classifier = nn.Linear(cfg.hidden_size, len(self.labels))
        nn.init.normal_(self.classifier.weight, std=cfg.initializer_range)  # BERT's initialisation
        nn.init.zeros_(self.classifier.bias)

    def _encode(self, input_ids, attention_mask, token_type_ids):
        return self.encoder(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)

    # ------------------------------------------------------------------ files
    def save_pretrained(self, directory) -> Path:
        """config.json + model.safetensors + task.json, all three in manifest.json."""
        path = checkpoint.save_model_folder(self, directory)
        (path / TASK_FILE).write_text(json.dumps({"kind": self.kind, "labels": self.labels,
                                                  "classifier_dropout": self.classifier_dropout}, indent=2))
        checkpoint.write_manifest(path, [checkpoint.CONFIG_NAME, checkpoint.WEIGHTS_NAME, TASK_FILE])
        return path


class SequenceClassifier(TaskModel):
    """Pooler on the first token ([CLS]), dropout, linear: (B, S) ids -> (B, C) logits.

    A fresh pooler is added to an encoder without one (a fastmlm MLM run); a Hugging Face
    BertModel's pooler, when the encoder was loaded with it, is kept and fine-tuned.
    """

    kind = "sequence"

    def __init__(self, encoder: FastMLMForMaskedLM, labels: Sequence[str], classifier_dropout: Optional[float] = None):
        super().__init__(encoder, labels, classifier_dropout)
        if encoder.pooler is None:
            encoder.pooler = Pooler(encoder.config)
            encoder._init_weights(encoder.pooler.dense)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> ClassifierOutput:
        """labels: optional (B,) int64 class indices in [0, C), or -100 for an example to leave out of
        the loss (as transformers' classifiers do). The loss is the mean over the labelled examples, 0
        when there are none."""
        pooled = self._encode(input_ids, attention_mask, token_type_ids).pooler_output  # (B, H)
        logits = self.classifier(self.dropout(pooled)).float()  # (B, C)
        loss = None
        if labels is not None:
            _check_labels("SequenceClassifier", labels, tuple(logits.shape[:1]), len(self.labels), logits.device)
            loss = _mean_cross_entropy(logits, labels)
        return ClassifierOutput(loss, logits)


class TokenClassifier(TaskModel):
    """Dropout and linear on every token's hidden state: (B, S) ids -> (B, S, C) logits (no pooler)."""

    kind = "tokens"

    def __init__(self, encoder: FastMLMForMaskedLM, labels: Sequence[str], classifier_dropout: Optional[float] = None):
        super().__init__(encoder, labels, classifier_dropout)
        encoder.pooler = None  # transformers' BertForTokenClassification has none

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> ClassifierOutput:
        """labels: optional int64 like input_ids, a class index at the tokens to learn and -100
        elsewhere (padding, special tokens, a word's later sub-tokens). The loss is the mean
        over the labelled tokens, 0 when there are none."""
        hidden = self._encode(input_ids, attention_mask, token_type_ids).hidden_states  # (B, S, H)
        logits = self.classifier(self.dropout(hidden)).float()  # (B, S, C)
        loss = None
        if labels is not None:
            _check_labels("TokenClassifier", labels, tuple(input_ids.shape), len(self.labels), logits.device)
            loss = _mean_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return ClassifierOutput(loss, logits)


def _check_labels(owner: str, labels, shape: tuple, classes: int, device: torch.device) -> None:
    """ValueError unless ``labels`` is an int64 tensor of ``shape`` on ``device``; a class index outside
    [0, classes) other than -100 stops the step (a device-side assertion: no host sync) instead of
    reaching cross_entropy, whose IndexError names no argument."""
    if not isinstance(labels, Tensor) or labels.dtype != torch.long or tuple(labels.shape) != shape:
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"{owner}: labels must be int64 of shape {shape}, got {got}")
    if labels.device != device:
        raise ValueError(f"{owner}: labels is on {labels.device} but the logits are on {device}")
    torch._assert_async(((labels == IGNORE_INDEX) | ((labels >= 0) & (labels < classes))).all(),
                        f"{owner}: labels must be class indices in [0, {classes}) or -100 (not labelled)")


def _mean_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the labels that are not -100; 0 (not NaN) when there are none."""
    summed = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return summed / (labels != IGNORE_INDEX).sum().clamp(min=1)


HEADS = {cls.kind: cls for cls in (SequenceClassifier, TokenClassifier)}


def read_task_file(directory) -> dict:
    """The task.json of a fine-tuned model folder; ValueError naming the file when it is missing or wrong."""
    path = Path(directory) / TASK_FILE
    try:
        task = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} not found: a fine-tuned fastmlm model folder holds {TASK_FILE}") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(task, dict) or task.get("kind") not in KINDS:
        raise ValueError(f"{path}: expected {{'kind': one of {list(KINDS)}, 'labels': [...]}}, got {task!r}")
    task["labels"] = check_labels(task.get("labels"))
    return task


def is_task_folder(path) -> bool:
    """Whether ``path`` is a fine-tuned model folder (it holds task.json)."""
    return (Path(path) / TASK_FILE).is_file()


def load_task_model(directory, **config_overrides) -> TaskModel:
    """A fine-tuned model from its folder (what :meth:`TaskModel.save_pretrained` wrote)."""
    task = read_task_file(directory)

    def build(cfg, pooler):  # fastmlm.checkpoint.load_model_folder's model_class(cfg, pooler=...)
        return HEADS[task["kind"]](FastMLMForMaskedLM(cfg), task["labels"], task.get("classifier_dropout"))

    return checkpoint.load_model_folder(build, directory, **config_overrides)
